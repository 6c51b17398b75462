//! gRPC handlers of `shoal.v1.ReconcilerService`: thin, over [`Reconciler`].

use std::sync::Arc;

use prost::Message;
use shoal_proto::v1::{
    self as pb, GetReconcilerStatusRequest, ListDriftsRequest, ListDriftsResponse, ReconcileReport,
    ReconcileRequest, ReconcilerStatus, reconciler_service_server::ReconcilerService,
};
use shoal_runtime::{LeaderWatch, Upstream, describe_leadership, status_from_store};
use shoal_state::{Election, keys};
use tonic::{Request, Response, Status};

use crate::pass::Reconciler;

/// The ReconcilerService handlers.
pub struct ReconcilerApi {
    pub(crate) leader: Option<LeaderWatch>,
    pub(crate) election: Option<Election>,
    pub(crate) reconciler: Arc<Reconciler>,
    /// Kept so the provisioner channel lives as long as the API.
    #[allow(dead_code)]
    pub(crate) upstreams: Vec<Upstream>,
}

#[tonic::async_trait]
impl ReconcilerService for ReconcilerApi {
    async fn reconcile(
        &self,
        request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileReport>, Status> {
        // Leader routing sends this call to the leader; a term that ended meanwhile must not
        // repair (or report as if it could).
        if shoal_runtime::current_leadership(self.leader.as_ref()).is_none() {
            let leader = describe_leadership(self.leader.as_ref(), self.election.as_ref()).await;
            return Err(Status::unavailable(format!(
                "this replica does not lead the reconciler; the leader is {:?} at {:?}: retry",
                leader.leader_id, leader.address
            )));
        }
        let report = self
            .reconciler
            .bounded_pass(request.into_inner().dry_run)
            .await?;
        Ok(Response::new(report))
    }

    async fn get_status(
        &self,
        _request: Request<GetReconcilerStatusRequest>,
    ) -> Result<Response<ReconcilerStatus>, Status> {
        let leader = describe_leadership(self.leader.as_ref(), self.election.as_ref()).await;
        let last = self
            .reconciler
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let passes_total = self.reconciler.stats.cycles.get() as i64;
        let repairs_total = self
            .reconciler
            .repaired
            .load(std::sync::atomic::Ordering::Relaxed);
        let next = last.as_ref().and_then(|r| r.started_at).map(|t| {
            let mut t = t;
            t.seconds += self.reconciler.settings.interval.as_secs() as i64;
            t
        });
        Ok(Response::new(ReconcilerStatus {
            leader: Some(leader),
            last_pass: last,
            next_pass_at: next,
            passes_total,
            repairs_total,
        }))
    }

    async fn list_drifts(
        &self,
        request: Request<ListDriftsRequest>,
    ) -> Result<Response<ListDriftsResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit <= 0 { 100 } else { r.limit as usize };
        let kvs = self
            .reconciler
            .store
            .range(keys::DRIFTS)
            .await
            .map_err(|e| status_from_store(&e))?
            .kvs;
        let drifts: Vec<pb::Drift> = kvs
            .iter()
            .rev()
            .filter_map(|kv| pb::Drift::decode(kv.value.as_slice()).ok())
            .filter(|d| r.types.is_empty() || r.types.contains(&d.r#type))
            .take(limit)
            .collect();
        Ok(Response::new(ListDriftsResponse { drifts }))
    }
}
