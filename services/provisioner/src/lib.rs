//! The provisioner: the only component that ever touches a backend. Records operations and
//! NodeClaims before acting (write-ahead), creates nodes in parallel behind timeouts, retries and
//! circuit breakers, follows claims to Ready (rolling back nodes that never get there), and
//! drains and deletes nodes safely. Any replica accepts requests; only the leader acts.

mod api;
pub mod backend;
mod drain;
mod driver;
pub mod externalgrpc;
pub mod guard;
pub mod lifecycle;
mod mirror;
pub mod nodes;
mod repair;
pub mod requests;
pub mod stats;
pub mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use shoal_kube::KubeSettings;
use shoal_proto::{
    externalgrpc::cloud_provider_server::CloudProviderServer, service_names,
    v1::provisioner_service_server::ProvisionerServiceServer,
};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors, validate_address};
use shoal_state::{PrefixCache, keys, records::Retention};
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
    /// Proxmox VE VMs cloned from templates.
    #[serde(default)]
    pub proxmox: Option<backend::proxmox::config::ProxmoxBackend>,
    /// AWS EC2 instances.
    #[serde(default)]
    pub aws: Option<backend::aws::config::AwsBackend>,
    /// Out-of-tree `shoal.v1.NodeProvider` servers; a pool names one as `plugin:<name>`.
    #[serde(default)]
    pub plugins: BTreeMap<String, backend::plugin::PluginBackend>,
    /// Cluster Autoscaler externalgrpc plugins; a pool names one as `externalgrpc:<name>` and
    /// one of its node groups as `provider.class`.
    #[serde(default)]
    pub external_grpc: BTreeMap<String, backend::externalgrpc::ExternalGrpcBackend>,
}

/// Methods only the leader carries out; a standby forwards them to it.
pub mod leader_only {
    /// `Repair` acts on claims as the leader.
    pub const REPAIR: &str = "/shoal.v1.ProvisionerService/Repair";
}

/// `service.retention`: how long finished claims and operations (with their idempotency keys)
/// are kept. A retried request whose key was removed starts a new operation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionSettings {
    /// Deleted and Failed claims.
    #[serde(default = "default_claim_retention")]
    pub claims: Retention,
    /// Finished operations and their idempotency keys (fewer than claims: an operation lists
    /// all its claims).
    #[serde(default = "default_operation_retention")]
    pub operations: Retention,
    /// Time between sweeps (leader only).
    #[serde(with = "humantime_serde", default = "default_sweep")]
    pub interval: Duration,
}

fn default_claim_retention() -> Retention {
    Retention {
        max_age: Duration::from_secs(24 * 3600),
        max_count: 1000,
    }
}
fn default_operation_retention() -> Retention {
    Retention {
        max_age: Duration::from_secs(24 * 3600),
        max_count: 200,
    }
}
fn default_sweep() -> Duration {
    Duration::from_secs(60)
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            claims: default_claim_retention(),
            operations: default_operation_retention(),
            interval: default_sweep(),
        }
    }
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
    /// Retention of finished records.
    #[serde(default)]
    pub retention: RetentionSettings,
    /// Also serve Cluster Autoscaler's externalgrpc `CloudProvider` (node groups = pools), so a
    /// stock Cluster Autoscaler can drive this provisioner's backends.
    #[serde(default)]
    pub external_grpc: bool,
    /// Mirror claim records as NodeClaim resources (`kubectl get nodeclaims`); needs the CRDs
    /// of deploy/k8s/crds installed.
    #[serde(default)]
    pub node_claims: bool,
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
            retention: RetentionSettings::default(),
            external_grpc: false,
            node_claims: false,
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
        if let Some(proxmox) = &self.backends.proxmox {
            proxmox.validate("service.backends.proxmox", errors);
        }
        if let Some(aws) = &self.backends.aws {
            aws.validate("service.backends.aws", errors);
        }
        let plugins = (self.backends.plugins.iter()).map(|(n, p)| ("plugins", n, p));
        let external = (self.backends.external_grpc.iter()).map(|(n, p)| ("externalGrpc", n, p));
        for (kind, name, plugin) in plugins.chain(external) {
            let path = format!("service.backends.{kind}.{name}");
            if !backend::plugin::valid_name(name) {
                errors.add(
                    path.clone(),
                    format!("{name:?} is not a plugin name (lower-case letters, digits and -)"),
                );
            }
            plugin.validate(&path, errors);
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
        self.retention
            .claims
            .validate("service.retention.claims", errors);
        self.retention
            .operations
            .validate("service.retention.operations", errors);
        if self.retention.interval < Duration::from_secs(1) {
            errors.add("service.retention.interval", "must be at least 1s");
        }
    }
}

/// Runs the provisioner until `shutdown`.
pub async fn serve(
    config: Config<ProvisionerSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let external_grpc = settings.external_grpc;
    let node_claims = settings.node_claims;
    let Some(mut host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let cluster = host.cluster_id().to_string();
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
    if let Some(proxmox) = &settings.backends.proxmox {
        let provider = backend::proxmox::ProxmoxProvider::new(proxmox.clone(), store.clone())
            .map_err(|e| HostError::Dependency {
                what: "proxmox backend",
                message: e.to_string(),
            })?;
        providers.insert(backend::proxmox::BACKEND.into(), Arc::new(provider));
    }
    if let Some(aws) = &settings.backends.aws {
        let provider = backend::aws::AwsProvider::new(aws.clone()).await;
        providers.insert(backend::aws::BACKEND.into(), Arc::new(provider));
    }
    for (name, plugin) in &settings.backends.plugins {
        let provider = Arc::new(backend::plugin::PluginProvider::new(name, plugin).map_err(
            |e| HostError::Dependency {
                what: "plugin backend",
                message: e.to_string(),
            },
        )?);
        provider.describe_in_background(Duration::from_secs(30));
        providers.insert(backend::plugin::backend_name(name), provider);
    }
    for (name, plugin) in &settings.backends.external_grpc {
        let provider =
            backend::externalgrpc::ExternalGrpcProvider::new(name, plugin, store.clone()).map_err(
                |e| HostError::Dependency {
                    what: "externalgrpc backend",
                    message: e.to_string(),
                },
            )?;
        providers.insert(
            backend::externalgrpc::backend_name(name),
            Arc::new(provider),
        );
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
    let watch_client = shoal_kube::connect_for_watch(&settings.kube)
        .await
        .map_err(|e| HostError::Dependency {
            what: "Kubernetes API",
            message: e.to_string(),
        })?;
    let nodes = nodes::NodeIndex::start(watch_client, tasks.clone());
    let claims_cache = caches[1].clone();
    let mirror_client = client.clone();
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
    host.supervisor().spawn("driver", {
        let provisioner = provisioner.clone();
        move |token| provisioner.clone().run(token)
    });
    host.supervisor().spawn("claim-gauges", {
        let provisioner = provisioner.clone();
        move |token| {
            let provisioner = provisioner.clone();
            async move {
                provisioner.export_claim_gauges(token).await;
                Ok(())
            }
        }
    });
    if node_claims {
        let leader = host.leader();
        host.supervisor().spawn("nodeclaim-mirror", move |token| {
            mirror::run(
                mirror_client.clone(),
                claims_cache.clone(),
                leader.clone(),
                token,
            )
        });
    }
    host.leader_only(&[leader_only::REPAIR]);
    let mut names = vec![service_names::PROVISIONER];
    let mut routes = Routes::new(ProvisionerServiceServer::new(api::ProvisionerApi {
        provisioner: provisioner.clone(),
    }));
    if external_grpc {
        routes = routes.add_service(CloudProviderServer::new(externalgrpc::CloudProviderApi {
            provisioner,
        }));
        names.push(service_names::EXTERNAL_GRPC);
    }
    let result = host.serve(routes, &names, shutdown).await;
    tasks.cancel();
    result
}
