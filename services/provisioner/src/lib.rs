//! The provisioner: the only component that ever touches a backend. Records operations and
//! NodeClaims before acting (write-ahead), creates nodes in parallel behind retries and circuit
//! breakers, follows claims to Ready, and drains and deletes nodes safely. Only the leader acts.
//!
//! This version campaigns for leadership and serves the API surface, health and reflection; node
//! lifecycle and the backends arrive with the provisioner issue.

mod api;

use serde::{Deserialize, Serialize};
use shoal_proto::{service_names, v1::provisioner_service_server::ProvisionerServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// `service:` settings of the provisioner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionerSettings {}

impl ServiceSettings for ProvisionerSettings {
    const SERVICE: &'static str = "provisioner";
    const GRPC_PORT: u16 = 50053;
    const ADMIN_PORT: u16 = 9093;
    const USES_STORE: bool = true;
    const CAMPAIGNS: bool = true;
    fn validate(&self, _errors: &mut ValidationErrors) {}
}

/// Runs the provisioner until `shutdown`.
pub async fn serve(
    config: Config<ProvisionerSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let routes = Routes::new(ProvisionerServiceServer::new(api::ProvisionerApi));
    host.serve(routes, &[service_names::PROVISIONER], shutdown)
        .await
}
