//! The provisioner: the only component that ever touches a backend. Records operations and
//! NodeClaims before acting (write-ahead), creates nodes in parallel behind timeouts, retries and
//! circuit breakers, follows claims to Ready (rolling back nodes that never get there), and
//! drains and deletes nodes safely. Any replica accepts requests; only the leader acts.

mod api;
pub mod backend;
pub mod guard;
pub mod lifecycle;
pub mod nodes;
pub mod stats;
pub mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use shoal_kube::KubeSettings;
use shoal_proto::{service_names, v1::provisioner_service_server::ProvisionerServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors, validate_address};
use shoal_state::{PrefixCache, keys};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{
    backend::{NodeProvider, docker::DockerClass},
    guard::{Guarded, Resilience},
};

/// `service.backends.sim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimBackend {
    /// The simulator's base URL (its cloud API is under `/cloud/v1`).
    pub url: String,
}

/// `service.backends.docker`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerBackend {
    /// Provider classes by name; a pool's `provider.class` picks one (`default` when empty).
    #[serde(default)]
    pub classes: BTreeMap<String, DockerClass>,
}

/// `service.backends`: which backends this provisioner can use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backends {
    /// The simulator's cloud.
    #[serde(default)]
    pub sim: Option<SimBackend>,
    /// Docker containers on the local engine.
    #[serde(default)]
    pub docker: Option<DockerBackend>,
}

/// `service:` settings of the provisioner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionerSettings {
    /// The Kubernetes API (nodes, pods, evictions).
    #[serde(default)]
    pub kube: KubeSettings,
    /// Backends.
    #[serde(default)]
    pub backends: Backends,
    /// Timeouts, retries and circuit breakers of backend calls.
    #[serde(default)]
    pub resilience: Resilience,
    /// A node not Ready this long after its claim was created is deleted (rollback).
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub node_ttl: Duration,
    /// How often launching and Ready claims are checked against their backend.
    #[serde(with = "humantime_serde", default = "default_check")]
    pub instance_check_interval: Duration,
    /// Time between eviction rounds of a drain.
    #[serde(with = "humantime_serde", default = "default_poll")]
    pub drain_poll_interval: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_check() -> Duration {
    Duration::from_secs(15)
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}

impl Default for ProvisionerSettings {
    fn default() -> Self {
        ProvisionerSettings {
            kube: KubeSettings::default(),
            backends: Backends::default(),
            resilience: Resilience::default(),
            node_ttl: default_ttl(),
            instance_check_interval: default_check(),
            drain_poll_interval: default_poll(),
        }
    }
}

impl ServiceSettings for ProvisionerSettings {
    const SERVICE: &'static str = "provisioner";
    const GRPC_PORT: u16 = 50053;
    const ADMIN_PORT: u16 = 9093;
    const USES_STORE: bool = true;
    const CAMPAIGNS: bool = true;
    fn validate(&self, errors: &mut ValidationErrors) {
        self.kube.validate("service.kube", errors);
        self.resilience.validate("service.resilience", errors);
        if let Some(sim) = &self.backends.sim {
            validate_address("service.backends.sim.url", &sim.url, errors);
        }
        if let Some(docker) = &self.backends.docker {
            for (name, class) in &docker.classes {
                class.validate(&format!("service.backends.docker.classes.{name}"), errors);
            }
        }
        if self.node_ttl < Duration::from_secs(1) {
            errors.add("service.nodeTtl", "must be at least 1s");
        }
        if self.instance_check_interval < Duration::from_millis(100) {
            errors.add("service.instanceCheckInterval", "must be at least 100ms");
        }
        if self.drain_poll_interval < Duration::from_millis(50) {
            errors.add("service.drainPollInterval", "must be at least 50ms");
        }
    }
}

/// Runs the provisioner until `shutdown`.
pub async fn serve(
    config: Config<ProvisionerSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let cluster = config.cluster.clone();
    let Some(host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let store = host.store().ok_or_else(|| HostError::Dependency {
        what: "state store",
        message: "the provisioner needs a store".into(),
    })?;
    let stats = stats::Stats::register(&host.metrics.registry)
        .map_err(|e| HostError::Metrics(shoal_runtime::metrics::MetricsError::from(e)))?;
    // No client-side retries: a PDB's 429 must reach the drain loop at once.
    let client = shoal_kube::connect_direct(&settings.kube)
        .await
        .map_err(|e| HostError::Dependency {
            what: "Kubernetes API",
            message: e.to_string(),
        })?;
    let mut providers: BTreeMap<String, Arc<dyn NodeProvider>> = BTreeMap::new();
    if let Some(sim) = &settings.backends.sim {
        let provider =
            backend::sim::SimProvider::new(&sim.url).map_err(|e| HostError::Dependency {
                what: "sim backend",
                message: e.to_string(),
            })?;
        providers.insert("sim".into(), Arc::new(provider));
    }
    if let Some(docker) = &settings.backends.docker {
        let provider =
            backend::docker::DockerProvider::connect(docker.classes.clone()).map_err(|e| {
                HostError::Dependency {
                    what: "docker backend",
                    message: e.to_string(),
                }
            })?;
        providers.insert("docker".into(), Arc::new(provider));
    }
    let backends = providers
        .into_iter()
        .map(|(name, provider)| {
            let guarded = Guarded::new(&name, provider, settings.resilience.clone(), stats.clone());
            (name, Arc::new(guarded))
        })
        .collect();
    let tasks = shutdown.child_token();
    let caches = [
        PrefixCache::start(store.clone(), keys::POOLS, tasks.clone()),
        PrefixCache::start(store.clone(), keys::CLAIMS, tasks.clone()),
        PrefixCache::start(store.clone(), keys::OPERATIONS, tasks.clone()),
    ];
    let nodes = nodes::NodeIndex::start(client.clone(), tasks.clone());
    let provisioner = Arc::new(lifecycle::Provisioner::new(
        settings,
        cluster,
        store::ClaimStore::new(store),
        caches,
        backends,
        shoal_kube::NodeOps::new(client),
        nodes,
        host.leader(),
        stats,
    ));
    tokio::spawn(provisioner.clone().run(tasks.clone()));
    let routes = Routes::new(ProvisionerServiceServer::new(api::ProvisionerApi {
        provisioner,
    }));
    let result = host
        .serve(routes, &[service_names::PROVISIONER], shutdown)
        .await;
    tasks.cancel();
    result
}
