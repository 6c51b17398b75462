//! gRPC handlers of `shoal.v1.MetricsService`: decode, validate, call the cache, publisher or
//! Prometheus, encode.

use std::{pin::Pin, sync::Arc};

use futures::StreamExt;
use shoal_proto::v1::{
    ClusterSnapshot, GetNodeMetricsRequest, GetNodeMetricsResponse, GetSnapshotRequest,
    NodeMetrics, NodeUsage, QueryPromQlRequest, QueryPromQlResponse, WatchSnapshotsRequest,
    metrics_service_server::MetricsService,
};
use tokio_stream::{Stream, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::{publisher::Publisher, utilization::PromError};

/// The MetricsService handlers.
pub struct MetricsApi {
    pub(crate) publisher: Arc<Publisher>,
}

impl From<PromError> for Status {
    fn from(err: PromError) -> Status {
        match err {
            PromError::Disabled => Status::failed_precondition(err.to_string()),
            PromError::Unreachable { .. } => Status::unavailable(err.to_string()),
            PromError::Rejected { .. } => Status::invalid_argument(format!("query: {err}")),
            PromError::Malformed(_) => Status::internal(err.to_string()),
        }
    }
}

#[tonic::async_trait]
impl MetricsService for MetricsApi {
    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<ClusterSnapshot>, Status> {
        if request.get_ref().fresh_utilization {
            self.publisher.usage().refresh().await;
        }
        self.publisher
            .build()
            .map(Response::new)
            .map_err(Status::unavailable)
    }

    type WatchSnapshotsStream = Pin<Box<dyn Stream<Item = Result<ClusterSnapshot, Status>> + Send>>;

    async fn watch_snapshots(
        &self,
        request: Request<WatchSnapshotsRequest>,
    ) -> Result<Response<Self::WatchSnapshotsStream>, Status> {
        let send_initial = request.get_ref().send_initial;
        let receiver = self.publisher.subscribe();
        let stream = if send_initial {
            WatchStream::new(receiver)
        } else {
            WatchStream::from_changes(receiver)
        };
        // The channel holds only the latest snapshot: a slow subscriber skips to it.
        let stream = stream.filter_map(|latest| async move {
            latest.map(|snapshot| Ok(ClusterSnapshot::clone(&snapshot)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_node_metrics(
        &self,
        request: Request<GetNodeMetricsRequest>,
    ) -> Result<Response<GetNodeMetricsResponse>, Status> {
        let wanted = request.into_inner().nodes;
        let resources = {
            let state = self
                .publisher
                .state()
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !state.synced().nodes {
                return Err(Status::unavailable("nodes are still being listed"));
            }
            state.node_resources()
        };
        let known: std::collections::HashSet<&str> =
            resources.iter().map(|(n, _, _)| n.as_str()).collect();
        let missing: Vec<&str> = wanted
            .iter()
            .map(String::as_str)
            .filter(|n| !known.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(Status::not_found(format!(
                "nodes: no such node(s): {}",
                missing.join(", ")
            )));
        }
        let usage = self.publisher.usage().current();
        let sampled_at = usage.sampled_at.map(shoal_core::snapshot::timestamp);
        let nodes = resources
            .into_iter()
            .filter(|(name, _, _)| wanted.is_empty() || wanted.contains(name))
            .map(|(name, allocatable, requested)| NodeMetrics {
                usage: usage.nodes.get(&name).map(|u| NodeUsage {
                    cpu: u.cpu,
                    memory: u.memory,
                    sampled_at,
                }),
                node: name,
                allocatable: Some((&allocatable).into()),
                requested: Some((&requested).into()),
            })
            .collect();
        Ok(Response::new(GetNodeMetricsResponse {
            nodes,
            utilization_stale: usage.stale,
        }))
    }

    async fn query_prom_ql(
        &self,
        request: Request<QueryPromQlRequest>,
    ) -> Result<Response<QueryPromQlResponse>, Status> {
        let request = request.into_inner();
        if request.query.trim().is_empty() {
            return Err(Status::invalid_argument("query: must not be empty"));
        }
        let time = request.time.as_ref().map(shoal_core::snapshot::system_time);
        let data = self
            .publisher
            .usage()
            .prometheus()
            .query(&request.query, time)
            .await?;
        Ok(Response::new(QueryPromQlResponse {
            result_type: data.result_type,
            result_json: data.result.to_string(),
        }))
    }
}
