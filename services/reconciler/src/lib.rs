//! The reconciler: compares claims in the store, instances the backends report and Nodes in
//! Kubernetes, classifies drift and repairs it through the provisioner. Only the leader acts.
//!
//! This version campaigns for leadership and serves `GetStatus` (leadership) plus the API
//! surface; drift detection and repair arrive with the reconciler issue.

mod api;
pub mod drift;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::{service_names, v1::reconciler_service_server::ReconcilerServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors, validate_address};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// `service:` settings of the reconciler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcilerSettings {
    /// The provisioner service, `http://host:port` (all repairs go through it).
    pub provisioner_addr: String,
    /// Time between reconciliation passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        ReconcilerSettings {
            provisioner_addr: "http://127.0.0.1:50053".into(),
            interval: Duration::from_secs(60),
        }
    }
}

impl ServiceSettings for ReconcilerSettings {
    const SERVICE: &'static str = "reconciler";
    const GRPC_PORT: u16 = 50054;
    const ADMIN_PORT: u16 = 9094;
    const USES_STORE: bool = true;
    const CAMPAIGNS: bool = true;
    fn validate(&self, errors: &mut ValidationErrors) {
        validate_address("service.provisionerAddr", &self.provisioner_addr, errors);
        if self.interval < Duration::from_secs(1) {
            errors.add("service.interval", "must be at least 1s");
        }
    }
}

/// Runs the reconciler until `shutdown`.
pub async fn serve(
    config: Config<ReconcilerSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let api = api::ReconcilerApi {
        leader: host.leader(),
        election: host.election(),
    };
    let routes = Routes::new(ReconcilerServiceServer::new(api));
    host.serve(routes, &[service_names::RECONCILER], shutdown)
        .await
}
