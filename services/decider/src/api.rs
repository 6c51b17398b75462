//! gRPC handlers of `shoal.v1.DeciderService` and `shoal.v1.PoolService`.

use std::pin::Pin;

use shoal_proto::v1::{
    ApplyPoolRequest, DeciderStatus, Decision, DeletePoolRequest, DeletePoolResponse,
    EvaluateRequest, GetDeciderStatusRequest, GetDecisionRequest, GetPoolRequest,
    ListDecisionsRequest, ListDecisionsResponse, ListPoolsRequest, ListPoolsResponse, NodePool,
    PauseRequest, RequestCapacityRequest, RequestCapacityResponse, ResumeRequest,
    WatchDecisionsRequest, decider_service_server::DeciderService,
    pool_service_server::PoolService,
};
use shoal_runtime::{LeaderWatch, Upstream, describe_leadership, not_yet_implemented};
use shoal_state::Election;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The DeciderService handlers.
pub struct DeciderApi {
    pub(crate) leader: Option<LeaderWatch>,
    pub(crate) election: Option<Election>,
    pub(crate) upstreams: Vec<Upstream>,
    pub(crate) dry_run: bool,
}

#[tonic::async_trait]
impl DeciderService for DeciderApi {
    async fn evaluate(
        &self,
        _request: Request<EvaluateRequest>,
    ) -> Result<Response<Decision>, Status> {
        Err(not_yet_implemented("DeciderService/Evaluate"))
    }

    async fn get_decision(
        &self,
        _request: Request<GetDecisionRequest>,
    ) -> Result<Response<Decision>, Status> {
        Err(not_yet_implemented("DeciderService/GetDecision"))
    }

    async fn list_decisions(
        &self,
        _request: Request<ListDecisionsRequest>,
    ) -> Result<Response<ListDecisionsResponse>, Status> {
        Err(not_yet_implemented("DeciderService/ListDecisions"))
    }

    type WatchDecisionsStream = Pin<Box<dyn Stream<Item = Result<Decision, Status>> + Send>>;

    async fn watch_decisions(
        &self,
        _request: Request<WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        Err(not_yet_implemented("DeciderService/WatchDecisions"))
    }

    async fn pause(
        &self,
        _request: Request<PauseRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        Err(not_yet_implemented("DeciderService/Pause"))
    }

    async fn resume(
        &self,
        _request: Request<ResumeRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        Err(not_yet_implemented("DeciderService/Resume"))
    }

    async fn get_status(
        &self,
        _request: Request<GetDeciderStatusRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        let (leader, upstreams) = tokio::join!(
            describe_leadership(self.leader.as_ref(), self.election.as_ref()),
            probe_upstreams(&self.upstreams),
        );
        Ok(Response::new(DeciderStatus {
            leader: Some(leader),
            paused: false,
            pause_reason: String::new(),
            dry_run: self.dry_run,
            upstreams,
            last_decision_at: None,
        }))
    }

    async fn request_capacity(
        &self,
        _request: Request<RequestCapacityRequest>,
    ) -> Result<Response<RequestCapacityResponse>, Status> {
        Err(not_yet_implemented("DeciderService/RequestCapacity"))
    }
}

/// Probes every upstream concurrently, in configuration order.
async fn probe_upstreams(upstreams: &[Upstream]) -> Vec<shoal_proto::v1::UpstreamStatus> {
    let probes = upstreams.iter().map(|u| {
        let u = u.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            u.health().await
        }))
    });
    let mut out = Vec::with_capacity(upstreams.len());
    for (probe, upstream) in probes.collect::<Vec<_>>().into_iter().zip(upstreams) {
        out.push(
            probe
                .await
                .unwrap_or_else(|e| shoal_proto::v1::UpstreamStatus {
                    name: upstream.name.to_string(),
                    address: upstream.address.clone(),
                    status: format!("UNREACHABLE: probe failed: {e}"),
                }),
        );
    }
    out
}

/// The PoolService handlers.
pub struct PoolApi;

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn list_pools(
        &self,
        _request: Request<ListPoolsRequest>,
    ) -> Result<Response<ListPoolsResponse>, Status> {
        Err(not_yet_implemented("PoolService/ListPools"))
    }

    async fn get_pool(
        &self,
        _request: Request<GetPoolRequest>,
    ) -> Result<Response<NodePool>, Status> {
        Err(not_yet_implemented("PoolService/GetPool"))
    }

    async fn apply_pool(
        &self,
        _request: Request<ApplyPoolRequest>,
    ) -> Result<Response<NodePool>, Status> {
        Err(not_yet_implemented("PoolService/ApplyPool"))
    }

    async fn delete_pool(
        &self,
        _request: Request<DeletePoolRequest>,
    ) -> Result<Response<DeletePoolResponse>, Status> {
        Err(not_yet_implemented("PoolService/DeletePool"))
    }
}
