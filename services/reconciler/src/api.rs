//! gRPC handlers of `shoal.v1.ReconcilerService`.

use shoal_proto::v1::{
    GetReconcilerStatusRequest, ListDriftsRequest, ListDriftsResponse, ReconcileReport,
    ReconcileRequest, ReconcilerStatus, reconciler_service_server::ReconcilerService,
};
use shoal_runtime::{LeaderWatch, describe_leadership, not_yet_implemented};
use shoal_state::Election;
use tonic::{Request, Response, Status};

/// The ReconcilerService handlers.
pub struct ReconcilerApi {
    pub(crate) leader: Option<LeaderWatch>,
    pub(crate) election: Option<Election>,
}

#[tonic::async_trait]
impl ReconcilerService for ReconcilerApi {
    async fn reconcile(
        &self,
        _request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileReport>, Status> {
        Err(not_yet_implemented("ReconcilerService/Reconcile"))
    }

    async fn get_status(
        &self,
        _request: Request<GetReconcilerStatusRequest>,
    ) -> Result<Response<ReconcilerStatus>, Status> {
        let leader = describe_leadership(self.leader.as_ref(), self.election.as_ref()).await;
        Ok(Response::new(ReconcilerStatus {
            leader: Some(leader),
            ..Default::default()
        }))
    }

    async fn list_drifts(
        &self,
        _request: Request<ListDriftsRequest>,
    ) -> Result<Response<ListDriftsResponse>, Status> {
        Err(not_yet_implemented("ReconcilerService/ListDrifts"))
    }
}
