//! gRPC handlers of `shoal.v1.ProvisionerService`.

use std::pin::Pin;

use shoal_proto::v1::{
    CreateNodesRequest, DeleteNodesRequest, GetBackendStatusRequest, GetBackendStatusResponse,
    GetOperationRequest, ListInstancesRequest, ListInstancesResponse, ListNodeClaimsRequest,
    ListNodeClaimsResponse, Operation, RepairRequest, RepairResponse, WatchOperationsRequest,
    provisioner_service_server::ProvisionerService,
};
use shoal_runtime::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The ProvisionerService handlers.
pub struct ProvisionerApi;

#[tonic::async_trait]
impl ProvisionerService for ProvisionerApi {
    async fn create_nodes(
        &self,
        _request: Request<CreateNodesRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(not_yet_implemented("ProvisionerService/CreateNodes"))
    }

    async fn delete_nodes(
        &self,
        _request: Request<DeleteNodesRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(not_yet_implemented("ProvisionerService/DeleteNodes"))
    }

    async fn get_operation(
        &self,
        _request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(not_yet_implemented("ProvisionerService/GetOperation"))
    }

    type WatchOperationsStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

    async fn watch_operations(
        &self,
        _request: Request<WatchOperationsRequest>,
    ) -> Result<Response<Self::WatchOperationsStream>, Status> {
        Err(not_yet_implemented("ProvisionerService/WatchOperations"))
    }

    async fn list_node_claims(
        &self,
        _request: Request<ListNodeClaimsRequest>,
    ) -> Result<Response<ListNodeClaimsResponse>, Status> {
        Err(not_yet_implemented("ProvisionerService/ListNodeClaims"))
    }

    async fn get_backend_status(
        &self,
        _request: Request<GetBackendStatusRequest>,
    ) -> Result<Response<GetBackendStatusResponse>, Status> {
        Err(not_yet_implemented("ProvisionerService/GetBackendStatus"))
    }

    async fn list_instances(
        &self,
        _request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        Err(not_yet_implemented("ProvisionerService/ListInstances"))
    }

    async fn repair(
        &self,
        _request: Request<RepairRequest>,
    ) -> Result<Response<RepairResponse>, Status> {
        Err(not_yet_implemented("ProvisionerService/Repair"))
    }
}
