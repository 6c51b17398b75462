//! The decider: plans what to add and remove (a pure planner over cluster snapshots), explains
//! every decision, keeps a bounded decision history, manages NodePools, and answers capacity
//! requests. Only the leader acts; every replica answers reads and what-ifs.

mod api;
pub mod capacity;
pub mod control;
pub mod k8s;
pub mod planner;
pub mod provreq;
pub mod stats;
pub mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_proto::{
    service_names,
    v1::{decider_service_server::DeciderServiceServer, pool_service_server::PoolServiceServer},
};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors, validate_address};
use shoal_state::{PrefixCache, keys};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use planner::Expander;

/// Methods only the leader carries out; a standby forwards them to it.
pub mod leader_only {
    /// `RequestCapacity` records the request (and plans it) as the leader.
    pub const REQUEST_CAPACITY: &str = "/shoal.v1.DeciderService/RequestCapacity";
    /// `CancelCapacityRequest` ends a booking as the leader.
    pub const CANCEL_CAPACITY_REQUEST: &str = "/shoal.v1.DeciderService/CancelCapacityRequest";
}

/// Where the decider takes NodePools from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolSource {
    /// The store, written through `PoolService` (and `poolFiles`, applied on election).
    #[default]
    Store,
    /// Only `poolFiles`: `ApplyPool`/`DeletePool` are refused.
    Files,
    /// NodePool custom resources (`kubectl apply -f`): `ApplyPool`/`DeletePool` are refused.
    Crd,
}

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
    /// NodePool YAML files the leader applies to the store when elected (files win over API
    /// changes to the pools they name).
    pub pool_files: Vec<String>,
    /// Expander chain choosing among pools: least-waste, priority, price, most-pods, random.
    pub expanders: Vec<Expander>,
    /// Time one decision may spend improving the packing of new nodes beyond first-fit
    /// decreasing (0: first-fit decreasing only).
    #[serde(with = "humantime_serde")]
    pub packing_budget: std::time::Duration,
    /// Decisions kept in the store.
    pub history_limit: u32,
    /// Decisions older than this are removed.
    #[serde(with = "humantime_serde")]
    pub history_max_age: std::time::Duration,
    /// How long a pool whose launches failed waits before growing again (doubling per failed
    /// scale-up in a row).
    pub failure_backoff: planner::Backoff,
    /// Where pools come from: store, files or crd.
    pub pool_source: PoolSource,
    /// Write Events like Cluster Autoscaler's (TriggeredScaleUp, NotTriggerScaleUp, ScaleDown)
    /// on pods and nodes, naming the decision.
    pub events: bool,
    /// The Kubernetes API, used with `poolSource: crd` (NodePool resources and their status),
    /// `events: true` and `capacity.provisioningRequests: true`; otherwise the decider does not
    /// talk to Kubernetes.
    pub kube: shoal_kube::KubeSettings,
    /// Capacity requests (ProvisioningRequests and `RequestCapacity`): booking time, retention,
    /// limits.
    pub capacity: capacity::CapacitySettings,
}

impl DeciderSettings {
    /// Whether the decider talks to the Kubernetes API.
    pub fn uses_kube(&self) -> bool {
        self.events || self.pool_source == PoolSource::Crd || self.capacity.provisioning_requests
    }
}

impl Default for DeciderSettings {
    fn default() -> Self {
        DeciderSettings {
            metrics_addr: "http://127.0.0.1:50051".into(),
            provisioner_addr: "http://127.0.0.1:50053".into(),
            dry_run: false,
            pool_files: Vec::new(),
            expanders: vec![Expander::LeastWaste],
            packing_budget: planner::packing::DEFAULT_BUDGET,
            history_limit: 500,
            history_max_age: std::time::Duration::from_secs(7 * 24 * 3600),
            failure_backoff: planner::Backoff::default(),
            pool_source: PoolSource::Store,
            events: false,
            kube: shoal_kube::KubeSettings::default(),
            capacity: capacity::CapacitySettings::default(),
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
        if self.expanders.is_empty() {
            errors.add("service.expanders", "must list at least one expander");
        }
        if self.packing_budget > std::time::Duration::from_secs(2) {
            errors.add(
                "service.packingBudget",
                "must be at most 2s (a decision waits for it)",
            );
        }
        if self.history_limit == 0 || self.history_limit > 100_000 {
            errors.add("service.historyLimit", "must be between 1 and 100000");
        }
        if self.history_max_age < std::time::Duration::from_secs(60)
            || self.history_max_age > std::time::Duration::from_secs(90 * 86400)
        {
            errors.add("service.historyMaxAge", "must be between 1m and 90d");
        }
        let b = self.failure_backoff;
        if b.initial > b.max {
            errors.add(
                "service.failureBackoff.initial",
                "must not exceed failureBackoff.max",
            );
        }
        if b.max > std::time::Duration::from_secs(24 * 3600) {
            errors.add("service.failureBackoff.max", "must be at most 24h");
        }
        if self.uses_kube() {
            self.kube.validate("service.kube", errors);
        }
        self.capacity.validate(errors);
        match self.pool_source {
            PoolSource::Crd if !self.pool_files.is_empty() => errors.add(
                "service.poolFiles",
                "must be empty with poolSource: crd (pools come from NodePool resources)",
            ),
            PoolSource::Files if self.pool_files.is_empty() => errors.add(
                "service.poolFiles",
                "must name at least one file with poolSource: files",
            ),
            _ => {}
        }
        for (i, file) in self.pool_files.iter().enumerate() {
            if let Err(why) = control::load_pool_file(file) {
                errors.add(format!("service.poolFiles[{i}]"), format!("{file}: {why}"));
            }
        }
    }
}

/// Runs the decider until `shutdown`.
pub async fn serve(
    config: Config<DeciderSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let Some(mut host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let store = host.store().ok_or_else(|| HostError::Dependency {
        what: "state store",
        message: "the decider needs a store".into(),
    })?;
    let stats = stats::Stats::register(&host.metrics.registry)
        .map_err(|e| HostError::Metrics(shoal_runtime::metrics::MetricsError::from(e)))?;
    let upstreams = vec![
        host.upstream("metrics", &settings.metrics_addr, service_names::METRICS)?,
        host.upstream(
            "provisioner",
            &settings.provisioner_addr,
            service_names::PROVISIONER,
        )?,
    ];
    let kube = match settings.uses_kube().then_some(&settings.kube) {
        Some(kube_settings) => {
            let dependency = |e: shoal_kube::KubeError| HostError::Dependency {
                what: "kubernetes",
                message: e.to_string(),
            };
            let client = shoal_kube::connect(kube_settings)
                .await
                .map_err(dependency)?;
            let watch_client = shoal_kube::connect_for_watch(kube_settings)
                .await
                .map_err(dependency)?;
            let provreqs = settings.capacity.provisioning_requests.then(|| {
                Arc::new(provreq::ProvisioningRequests::new(
                    client.clone(),
                    watch_client.clone(),
                ))
            });
            let face = (settings.events || settings.pool_source == PoolSource::Crd).then(|| {
                Arc::new(k8s::KubeFace::new(
                    client,
                    watch_client,
                    settings.pool_source == PoolSource::Crd,
                    settings.events,
                ))
            });
            (face, provreqs)
        }
        None => (None, None),
    };
    let (kube, provreqs) = kube;
    let read_only_pools = match settings.pool_source {
        PoolSource::Store => None,
        PoolSource::Files => Some(
            "pools come from files (service.poolSource: files); edit the files named in service.poolFiles",
        ),
        PoolSource::Crd => Some(
            "pools come from NodePool resources (service.poolSource: crd); use kubectl apply/delete",
        ),
    };
    let tasks = shutdown.child_token();
    let pools = PrefixCache::start(store.clone(), keys::POOLS, tasks.clone());
    let claims = PrefixCache::start(store.clone(), keys::CLAIMS, tasks.clone());
    let book = Arc::new(capacity::Book::new(
        settings.capacity.clone(),
        store.clone(),
        tasks.clone(),
    ));
    let decider_store = store::DeciderStore::new(store);
    let decider = Arc::new(
        control::Decider::new(
            settings,
            decider_store.clone(),
            pools,
            claims,
            upstreams[0].channel.clone(),
            upstreams[1].channel.clone(),
            host.leader(),
            host.election(),
            stats,
            book,
        )
        .with_audit(host.audit_log())
        .with_kube(kube)
        .with_provisioning_requests(provreqs),
    );
    host.supervisor().spawn("control-loop", {
        let decider = decider.clone();
        move |token| decider.clone().control_loop(token)
    });
    host.leader_only(&[
        leader_only::REQUEST_CAPACITY,
        leader_only::CANCEL_CAPACITY_REQUEST,
    ]);
    let api = api::DeciderApi { decider, upstreams };
    let routes = Routes::new(DeciderServiceServer::new(api).max_decoding_message_size(256 << 20))
        .add_service(PoolServiceServer::new(api::PoolApi {
            store: decider_store,
            read_only: read_only_pools,
        }));
    let result = host
        .serve(
            routes,
            &[service_names::DECIDER, service_names::POOL],
            shutdown,
        )
        .await;
    tasks.cancel();
    result
}
