//! The metrics service: a live, compact picture of the cluster — watch-backed caches of Nodes,
//! Pods and PodDisruptionBudgets, pods grouped into equivalence classes, utilization from
//! Prometheus — served as snapshots over gRPC (`GetSnapshot`, `WatchSnapshots`). Serves on every
//! replica; it never campaigns and needs no state store.

mod api;
pub mod cache;
pub mod facts;
pub mod publisher;
pub mod state;
pub mod stats;
pub mod utilization;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_kube::KubeSettings;
use shoal_proto::{service_names, v1::metrics_service_server::MetricsServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use utilization::PrometheusSettings;

/// `service:` settings of the metrics service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSettings {
    /// How to reach the Kubernetes API.
    pub kube: KubeSettings,
    /// Node label that names a node's pool.
    pub pool_label: String,
    /// Utilization source.
    pub prometheus: PrometheusSettings,
    /// A batching window closes after this long without another relevant change.
    #[serde(with = "humantime_serde")]
    pub batch_idle: Duration,
    /// A batching window closes at the latest this long after it opened.
    #[serde(with = "humantime_serde")]
    pub batch_max: Duration,
    /// A snapshot goes out at least this often.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            kube: KubeSettings::default(),
            pool_label: shoal_core::labels::POOL.into(),
            prometheus: PrometheusSettings::default(),
            batch_idle: Duration::from_secs(1),
            batch_max: Duration::from_secs(10),
            scan_interval: Duration::from_secs(10),
        }
    }
}

impl ServiceSettings for MetricsSettings {
    const SERVICE: &'static str = "metrics";
    const GRPC_PORT: u16 = 50051;
    const ADMIN_PORT: u16 = 9091;
    const USES_STORE: bool = false;
    const CAMPAIGNS: bool = false;
    fn validate(&self, errors: &mut ValidationErrors) {
        self.kube.validate("service.kube", errors);
        if self.pool_label.trim().is_empty() {
            errors.add("service.poolLabel", "must not be empty");
        }
        self.prometheus.validate("service.prometheus", errors);
        if self.batch_idle.is_zero() {
            errors.add("service.batchIdle", "must be above zero");
        }
        if self.batch_max < self.batch_idle {
            errors.add(
                "service.batchMax",
                format!(
                    "must be at least batchIdle ({})",
                    humantime::format_duration(self.batch_idle)
                ),
            );
        }
        if self.scan_interval < Duration::from_secs(1) {
            errors.add("service.scanInterval", "must be at least 1s");
        }
    }
}

/// Runs the metrics service until `shutdown`.
pub async fn serve(
    config: Config<MetricsSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    // Watches only (watch-backed caches): no per-call read deadline.
    let client = shoal_kube::connect_for_watch(&settings.kube)
        .await
        .map_err(|e| HostError::Dependency {
            what: "Kubernetes client",
            message: e.to_string(),
        })?;
    let stats = stats::Stats::register(&host.metrics.registry)
        .map_err(|e| HostError::Metrics(shoal_runtime::metrics::MetricsError::from(e)))?;
    let tasks = shutdown.child_token();
    let state = Arc::new(Mutex::new(state::ClusterState::new(&settings.pool_label)));
    let changes = Arc::new(Notify::new());
    cache::start(
        client,
        state.clone(),
        changes.clone(),
        stats.clone(),
        tasks.clone(),
    );
    let usage = utilization::UtilizationSource::new(
        settings.prometheus.clone(),
        stats.clone(),
        host.readiness(),
    )
    .map_err(|message| HostError::Dependency {
        what: "Prometheus client",
        message,
    })?;
    if usage.enabled() {
        host.supervisor().spawn("utilization-poller", {
            let usage = usage.clone();
            move |token| {
                let usage = usage.clone();
                async move {
                    usage.run(token).await;
                    Ok(())
                }
            }
        });
    }
    let publisher = Arc::new(publisher::Publisher::new(state, usage, stats));
    let batching = publisher::Batching {
        idle: settings.batch_idle,
        max: settings.batch_max,
        scan: settings.scan_interval,
    };
    host.supervisor().spawn("publisher", {
        let publisher = publisher.clone();
        move |token| {
            let (publisher, changes) = (publisher.clone(), changes.clone());
            async move {
                shoal_runtime::supervise::panic_point("publisher");
                publisher.run(changes, batching, token).await;
                Ok(())
            }
        }
    });
    let api = api::MetricsApi { publisher };
    let routes = Routes::new(MetricsServiceServer::new(api).max_encoding_message_size(usize::MAX));
    let result = host
        .serve(routes, &[service_names::METRICS], shutdown)
        .await;
    tasks.cancel();
    result
}
