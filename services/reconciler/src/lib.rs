//! The reconciler: compares claims in the store, instances the backends report and Nodes in
//! Kubernetes, classifies drift and repairs it through the provisioner. Only the leader acts.
//!

mod api;
pub mod drift;
pub mod pass;
pub mod stats;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::v1::provisioner_service_client::ProvisionerServiceClient;
use shoal_proto::{service_names, v1::reconciler_service_server::ReconcilerServiceServer};
use shoal_runtime::{Config, Host, HostError, ServiceSettings, ValidationErrors, validate_address};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Methods only the leader carries out; a standby forwards them to it.
pub mod leader_only {
    /// `Reconcile` repairs as the leader.
    pub const RECONCILE: &str = "/shoal.v1.ReconcilerService/Reconcile";
}

/// `service:` settings of the reconciler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcilerSettings {
    /// The provisioner service, `http://host:port` (all repairs go through it).
    pub provisioner_addr: String,
    /// Time between reconciliation passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The Kubernetes API (Nodes with our labels).
    #[serde(default)]
    pub kube: shoal_kube::KubeSettings,
    /// Orphan instances: `delete` (after `orphanGrace`), `adopt` (write their claim again, for
    /// instances Shoal created whose record was lost) or `report-only`.
    #[serde(default = "default_orphans")]
    pub orphan_policy: drift::OrphanPolicy,
    /// Orphan instances younger than this are left alone (they may still be booting).
    #[serde(with = "humantime_serde", default = "five_minutes")]
    pub orphan_grace: Duration,
    /// Nodes NotReady this long are acted on (orphan node, phase mismatch).
    #[serde(with = "humantime_serde", default = "five_minutes")]
    pub not_ready_grace: Duration,
    /// Claims launching longer than this are stuck.
    #[serde(with = "humantime_serde", default = "fifteen_minutes")]
    pub launch_ttl: Duration,
    /// Claims draining or terminating longer than this are stuck.
    #[serde(with = "humantime_serde", default = "thirty_minutes")]
    pub removal_ttl: Duration,
    /// An operation still Running this long after its claims settled is settled from them.
    #[serde(with = "humantime_serde", default = "one_minute")]
    pub operation_grace: Duration,
    /// Drift records kept in the store (oldest dropped first).
    #[serde(default = "default_drift_history")]
    pub drift_history: usize,
    /// Drift records older than this are dropped.
    #[serde(with = "humantime_serde", default = "seven_days")]
    pub drift_max_age: Duration,
    /// Report drift without repairing it.
    #[serde(default)]
    pub dry_run: bool,
    /// A pass still running after this is given up (DEADLINE_EXCEEDED); the next starts on
    /// schedule.
    #[serde(with = "humantime_serde", default = "one_minute")]
    pub pass_timeout: Duration,
    /// Compaction of the store's history by the leader.
    #[serde(default)]
    pub compaction: Compaction,
}

/// `service.compaction`: the reconciler's leader compacts the store's history (as
/// kube-apiserver does its etcd's), so etcd's database stops growing with every write Shoal
/// makes. Turn it off when the etcd is shared and compacted by its own operators.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Compaction {
    /// Compact at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Time between compactions.
    #[serde(with = "humantime_serde", default = "five_minutes")]
    pub interval: Duration,
    /// Revisions of history kept (watches resume within them; older ones re-read).
    #[serde(default = "default_keep")]
    pub keep_revisions: u64,
    /// After a compaction, defragment (member by member) when the database file is more than
    /// this many times the bytes in use, so the file shrinks back; 0 never defragments.
    #[serde(default = "default_defragment_above")]
    pub defragment_above: f64,
}

fn default_defragment_above() -> f64 {
    2.0
}

fn yes() -> bool {
    true
}
fn default_keep() -> u64 {
    10_000
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction {
            enabled: true,
            interval: five_minutes(),
            keep_revisions: default_keep(),
            defragment_above: default_defragment_above(),
        }
    }
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn default_drift_history() -> usize {
    1000
}
fn seven_days() -> Duration {
    Duration::from_secs(7 * 86400)
}

fn default_orphans() -> drift::OrphanPolicy {
    drift::OrphanPolicy::Delete
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn fifteen_minutes() -> Duration {
    Duration::from_secs(900)
}
fn thirty_minutes() -> Duration {
    Duration::from_secs(1800)
}

impl ReconcilerSettings {
    /// The classification thresholds.
    pub fn policy(&self) -> drift::Policy {
        drift::Policy {
            orphan_grace: self.orphan_grace,
            orphans: self.orphan_policy,
            not_ready_grace: self.not_ready_grace,
            launch_ttl: self.launch_ttl,
            removal_ttl: self.removal_ttl,
            operation_grace: self.operation_grace,
        }
    }
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        ReconcilerSettings {
            provisioner_addr: "http://127.0.0.1:50053".into(),
            interval: Duration::from_secs(60),
            kube: shoal_kube::KubeSettings::default(),
            orphan_policy: default_orphans(),
            orphan_grace: five_minutes(),
            not_ready_grace: five_minutes(),
            launch_ttl: fifteen_minutes(),
            removal_ttl: thirty_minutes(),
            operation_grace: one_minute(),
            drift_history: default_drift_history(),
            drift_max_age: seven_days(),
            dry_run: false,
            pass_timeout: one_minute(),
            compaction: Compaction::default(),
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
        self.kube.validate("service.kube", errors);
        if self.drift_history == 0 || self.drift_history > 1_000_000 {
            errors.add("service.driftHistory", "must be between 1 and 1000000");
        }
        if self.drift_max_age < Duration::from_secs(60)
            || self.drift_max_age > Duration::from_secs(90 * 86400)
        {
            errors.add("service.driftMaxAge", "must be between 1m and 90d");
        }
        if self.compaction.interval < Duration::from_secs(1) {
            errors.add("service.compaction.interval", "must be at least 1s");
        }
        if self.compaction.defragment_above != 0.0
            && !(1.1..=100.0).contains(&self.compaction.defragment_above)
        {
            errors.add(
                "service.compaction.defragmentAbove",
                "must be 0 (never) or between 1.1 and 100",
            );
        }
        if self.compaction.keep_revisions < 100 {
            errors.add("service.compaction.keepRevisions", "must be at least 100");
        }
        if self.pass_timeout < Duration::from_secs(1)
            || self.pass_timeout > Duration::from_secs(3600)
        {
            errors.add("service.passTimeout", "must be between 1s and 1h");
        }
    }
}

/// Runs the reconciler until `shutdown`.
pub async fn serve(
    config: Config<ReconcilerSettings>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let settings = config.service.clone();
    let Some(mut host) = Host::start(config, &shutdown).await? else {
        return Ok(());
    };
    let cluster = host.cluster_id().to_string();
    let store = host.store().ok_or_else(|| HostError::Dependency {
        what: "state store",
        message: "the reconciler needs a store".into(),
    })?;
    let stats = stats::Stats::register(&host.metrics.registry)
        .map_err(|e| HostError::Metrics(shoal_runtime::metrics::MetricsError::from(e)))?;
    let kube = shoal_kube::connect(&settings.kube)
        .await
        .map_err(|e| HostError::Dependency {
            what: "Kubernetes API",
            message: e.to_string(),
        })?;
    let provisioner = host.upstream(
        "provisioner",
        &settings.provisioner_addr,
        service_names::PROVISIONER,
    )?;
    let reconciler = Arc::new(pass::Reconciler {
        settings,
        cluster,
        store,
        provisioner: ProvisionerServiceClient::new(provisioner.channel.clone()),
        kube,
        stats,
        last: std::sync::Mutex::new(None),
        lock: tokio::sync::Mutex::new(()),
        repaired: std::sync::atomic::AtomicI64::new(0),
        previous_pass_ms: std::sync::atomic::AtomicU64::new(0),
    });
    let tasks = shutdown.child_token();
    host.supervisor().spawn("pass-loop", {
        let (reconciler, leader) = (reconciler.clone(), host.leader());
        move |token| pass::run(reconciler.clone(), leader.clone(), token)
    });
    host.leader_only(&[leader_only::RECONCILE]);
    let api = api::ReconcilerApi {
        leader: host.leader(),
        election: host.election(),
        reconciler,
        upstreams: vec![provisioner],
    };
    let routes = Routes::new(ReconcilerServiceServer::new(api));
    let result = host
        .serve(routes, &[service_names::RECONCILER], shutdown)
        .await;
    tasks.cancel();
    result
}
