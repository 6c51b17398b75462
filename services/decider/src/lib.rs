//! The decider: plans what to add and remove (a pure planner over cluster snapshots), explains
//! every decision, keeps decision history, and manages NodePools. Only the leader acts.
//!
//! This version campaigns for leadership, serves `GetStatus` (leadership, mode, and the health
//! of the metrics and provisioner services it depends on), and the rest of the API surface; the
//! planner, control loop and pool management arrive with the decider issue.

mod api;

use serde::{Deserialize, Serialize};
use shoal_proto::{
    service_names,
    v1::{decider_service_server::DeciderServiceServer, pool_service_server::PoolServiceServer},
};
use shoal_runtime::{
    Config, Host, HostError, ServiceSettings, Upstream, ValidationErrors, validate_address,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// `service:` settings of the decider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeciderSettings {
    /// The metrics service, `http://host:port`.
    pub metrics_addr: String,
    /// The provisioner service, `http://host:port`.
    pub provisioner_addr: String,
    /// Plan and record decisions, but never call the provisioner.
    pub dry_run: bool,
}

impl Default for DeciderSettings {
    fn default() -> Self {
        DeciderSettings {
            metrics_addr: "http://127.0.0.1:50051".into(),
            provisioner_addr: "http://127.0.0.1:50053".into(),
            dry_run: false,
        }
    }
}

impl ServiceSettings for DeciderSettings {
    const SERVICE: &'static str = "decider";
    const GRPC_PORT: u16 = 50052;
    const ADMIN_PORT: u16 = 9092;
    const USES_STORE: bool = true;
    const CAMPAIGNS: bool = true;
    fn validate(&self, errors: &mut ValidationErrors) {
        validate_address("service.metricsAddr", &self.metrics_addr, errors);
        validate_address("service.provisionerAddr", &self.provisioner_addr, errors);
    }
}

/// Runs the decider until `shutdown`.
pub async fn serve(
    config: Config<DeciderSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let upstreams = vec![
        Upstream::new("metrics", &settings.metrics_addr, service_names::METRICS)?,
        Upstream::new(
            "provisioner",
            &settings.provisioner_addr,
            service_names::PROVISIONER,
        )?,
    ];
    let decider = api::DeciderApi {
        leader: host.leader(),
        election: host.election(),
        upstreams,
        dry_run: settings.dry_run,
    };
    let routes = Routes::new(DeciderServiceServer::new(decider))
        .add_service(PoolServiceServer::new(api::PoolApi));
    host.serve(
        routes,
        &[service_names::DECIDER, service_names::POOL],
        shutdown,
    )
    .await
}
