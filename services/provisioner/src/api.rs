//! gRPC handlers of `shoal.v1.ProvisionerService`: thin, over [`Provisioner`].

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use shoal_core::ClaimPhase;
use shoal_proto::v1::{
    CreateNodesRequest, DeleteNodesRequest, GetBackendStatusRequest, GetBackendStatusResponse,
    GetOperationRequest, ListInstancesRequest, ListInstancesResponse, ListNodeClaimsRequest,
    ListNodeClaimsResponse, Operation, RepairRequest, RepairResponse, WatchOperationsRequest,
    provisioner_service_server::ProvisionerService,
};
use shoal_runtime::{
    ValidationErrors, invalid_argument, status_from_store, telemetry::traceparent_of,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    backend::CLUSTER_LABEL,
    lifecycle::{Provisioner, RequestError},
    store,
};

/// The ProvisionerService handlers.
pub struct ProvisionerApi {
    /// The core.
    pub provisioner: Arc<Provisioner>,
}

pub(crate) fn status(err: RequestError) -> Status {
    match err {
        RequestError::Invalid { field, reason } => {
            let mut errors = ValidationErrors::default();
            errors.add(field, reason);
            invalid_argument(&errors, "")
        }
        RequestError::NotFound(m) => Status::not_found(m),
        RequestError::Precondition(m) => Status::failed_precondition(m),
        RequestError::Store(e) => store_status(e),
        RequestError::Unavailable(m) => Status::unavailable(m),
    }
}

fn store_status(err: store::Error) -> Status {
    match err {
        store::Error::Store(e) => status_from_store(&e),
        store::Error::NotFound(m) => Status::not_found(m),
        store::Error::Contended(m) => Status::aborted(m),
    }
}

#[tonic::async_trait]
impl ProvisionerService for ProvisionerApi {
    async fn create_nodes(
        &self,
        request: Request<CreateNodesRequest>,
    ) -> Result<Response<Operation>, Status> {
        let r = request.into_inner();
        let traceparent = traceparent_of(&tracing::Span::current());
        let op = self
            .provisioner
            .create_nodes(&r.pool, r.count, &r.idempotency_key, &r.reason, traceparent)
            .await
            .map_err(status)?;
        Ok(Response::new(op.to_proto()))
    }

    async fn delete_nodes(
        &self,
        request: Request<DeleteNodesRequest>,
    ) -> Result<Response<Operation>, Status> {
        let r = request.into_inner();
        let traceparent = traceparent_of(&tracing::Span::current());
        let op = self
            .provisioner
            .delete_nodes(&r.nodes, &r.idempotency_key, &r.reason, traceparent)
            .await
            .map_err(status)?;
        Ok(Response::new(op.to_proto()))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(status(RequestError::Invalid {
                field: "id",
                reason: "must name an operation".into(),
            }));
        }
        let op = self.provisioner.store.op(&id).await.map_err(store_status)?;
        Ok(Response::new(op.to_proto()))
    }

    type WatchOperationsStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

    async fn watch_operations(
        &self,
        request: Request<WatchOperationsRequest>,
    ) -> Result<Response<Self::WatchOperationsStream>, Status> {
        let only = request.into_inner().operation_id;
        if !only.is_empty() {
            // Fail fast on an unknown id rather than streaming nothing forever.
            self.provisioner
                .store
                .op(&only)
                .await
                .map_err(store_status)?;
        }
        let provisioner = self.provisioner.clone();
        let mut changes = provisioner.ops.changes();
        let stream = async_stream(move |tx| async move {
            let mut sent: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                for op in provisioner.operations() {
                    if !only.is_empty() && op.id != only {
                        continue;
                    }
                    if sent.get(&op.id) == Some(&op.updated_at_ms) {
                        continue;
                    }
                    sent.insert(op.id.clone(), op.updated_at_ms);
                    let finished = op.is_finished();
                    if tx.send(Ok(op.to_proto())).await.is_err() {
                        return;
                    }
                    if finished && !only.is_empty() {
                        return;
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_node_claims(
        &self,
        request: Request<ListNodeClaimsRequest>,
    ) -> Result<Response<ListNodeClaimsResponse>, Status> {
        let r = request.into_inner();
        let mut phases = Vec::new();
        for (i, p) in r.phases.iter().enumerate() {
            let phase = shoal_proto::v1::ClaimPhase::try_from(*p)
                .ok()
                .and_then(|p| ClaimPhase::try_from(p).ok());
            match phase {
                Some(phase) => phases.push(phase),
                None => {
                    let mut errors = ValidationErrors::default();
                    errors.add(format!("phases[{i}]"), format!("{p} is not a claim phase"));
                    return Err(invalid_argument(&errors, ""));
                }
            }
        }
        let claims = self
            .provisioner
            .claims()
            .into_iter()
            .filter(|c| r.pool.is_empty() || c.pool == r.pool)
            .filter(|c| phases.is_empty() || phases.contains(&c.phase))
            .map(|c| c.to_proto())
            .collect();
        Ok(Response::new(ListNodeClaimsResponse { claims }))
    }

    async fn get_backend_status(
        &self,
        _request: Request<GetBackendStatusRequest>,
    ) -> Result<Response<GetBackendStatusResponse>, Status> {
        let backends = self
            .provisioner
            .backends
            .values()
            .map(|b| b.status())
            .collect();
        Ok(Response::new(GetBackendStatusResponse { backends }))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let only = request.into_inner().backend;
        if !only.is_empty() && !self.provisioner.backends.contains_key(&only) {
            return Err(Status::not_found(format!(
                "backend {only} is not configured in this provisioner"
            )));
        }
        let owner: BTreeMap<String, String> =
            [(CLUSTER_LABEL.to_string(), self.provisioner.cluster.clone())]
                .into_iter()
                .collect();
        let mut response = ListInstancesResponse::default();
        for (name, backend) in &self.provisioner.backends {
            if !only.is_empty() && name != &only {
                continue;
            }
            match backend.list_owned(&owner).await {
                Ok(instances) => response.instances.extend(instances),
                Err(e) => {
                    response.errors.insert(name.clone(), e.to_string());
                }
            }
        }
        Ok(Response::new(response))
    }

    async fn repair(
        &self,
        request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        let r = request.into_inner();
        let Some(action) = r.action.as_ref() else {
            return Err(status(RequestError::Invalid {
                field: "action",
                reason:
                    "must be one of deleteInstance, adoptInstance, failClaim, deleteNode, releaseId, settleOperation"
                        .into(),
            }));
        };
        let why = format!("pass {}: {}", r.pass_id, r.reason);
        let claim_id = self
            .provisioner
            .repair(action, &why)
            .await
            .map_err(status)?;
        Ok(Response::new(RepairResponse { claim_id }))
    }
}

/// A stream fed by a task through a bounded channel (slow consumers apply backpressure).
fn async_stream<F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Operation, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
