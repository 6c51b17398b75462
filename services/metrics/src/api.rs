//! gRPC handlers of `shoal.v1.MetricsService`.

use std::pin::Pin;

use shoal_proto::v1::{
    ClusterSnapshot, GetNodeMetricsRequest, GetNodeMetricsResponse, GetSnapshotRequest,
    QueryPromQlRequest, QueryPromQlResponse, WatchSnapshotsRequest,
    metrics_service_server::MetricsService,
};
use shoal_runtime::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The MetricsService handlers.
pub struct MetricsApi;

#[tonic::async_trait]
impl MetricsService for MetricsApi {
    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<ClusterSnapshot>, Status> {
        Err(not_yet_implemented("MetricsService/GetSnapshot"))
    }

    type WatchSnapshotsStream = Pin<Box<dyn Stream<Item = Result<ClusterSnapshot, Status>> + Send>>;

    async fn watch_snapshots(
        &self,
        _request: Request<WatchSnapshotsRequest>,
    ) -> Result<Response<Self::WatchSnapshotsStream>, Status> {
        Err(not_yet_implemented("MetricsService/WatchSnapshots"))
    }

    async fn get_node_metrics(
        &self,
        _request: Request<GetNodeMetricsRequest>,
    ) -> Result<Response<GetNodeMetricsResponse>, Status> {
        Err(not_yet_implemented("MetricsService/GetNodeMetrics"))
    }

    async fn query_prom_ql(
        &self,
        _request: Request<QueryPromQlRequest>,
    ) -> Result<Response<QueryPromQlResponse>, Status> {
        Err(not_yet_implemented("MetricsService/QueryPromQL"))
    }
}
