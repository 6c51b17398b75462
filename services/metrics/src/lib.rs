//! The metrics service: a live, compact picture of the cluster (watch-backed caches of Nodes,
//! Pods and PDBs, utilization from Prometheus) served as snapshots over gRPC. Serves on every
//! replica; it never campaigns and needs no state store.
//!
//! This version serves the API surface, health and reflection; the cluster caches and the
//! snapshot builder arrive with the metrics issue.

mod api;

use serde::{Deserialize, Serialize};
use shoal_proto::{service_names, v1::metrics_service_server::MetricsServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// `service:` settings of the metrics service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSettings {}

impl ServiceSettings for MetricsSettings {
    const SERVICE: &'static str = "metrics";
    const GRPC_PORT: u16 = 50051;
    const ADMIN_PORT: u16 = 9091;
    const USES_STORE: bool = false;
    const CAMPAIGNS: bool = false;
    fn validate(&self, _errors: &mut ValidationErrors) {}
}

/// Runs the metrics service until `shutdown`.
pub async fn serve(
    config: Config<MetricsSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let routes = Routes::new(MetricsServiceServer::new(api::MetricsApi));
    host.serve(routes, &[service_names::METRICS], shutdown)
        .await
}
