//! Backends: places nodes come from, behind one [`NodeProvider`] trait. Every instance carries
//! the ownership labels `shoal.dev/cluster`, `shoal.dev/pool` and `shoal.dev/claim`, so a backend
//! can always answer "which instances are ours" — after a crash too.

pub mod aws;
pub mod docker;
pub mod externalgrpc;
pub mod plugin;
pub mod proxmox;
pub mod sim;

use std::collections::BTreeMap;

use shoal_core::Resources;
use shoal_proto::v1 as pb;

/// Label naming the cluster that owns an instance or node.
pub const CLUSTER_LABEL: &str = "shoal.dev/cluster";
/// Label naming the pool.
pub const POOL_LABEL: &str = "shoal.dev/pool";
/// Label naming the claim.
pub const CLAIM_LABEL: &str = "shoal.dev/claim";

/// One instance to create.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The claim it realises.
    pub claim_id: String,
    /// Pool.
    pub pool: String,
    /// Provider class (template) name.
    pub class: String,
    /// The node name it registers as.
    pub node_name: String,
    /// Ownership labels plus the pool's template labels.
    pub labels: BTreeMap<String, String>,
    /// Taints the node registers with (the pool's taints and startup taints).
    pub taints: Vec<pb::Taint>,
    /// Allocatable of the node.
    pub capacity: Resources,
    /// What the backend spends per node on top (the pool's `template.overhead`, e.g. a VM's
    /// own memory); pool limits count it.
    pub overhead: Resources,
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Retrying may succeed (timeouts, 5xx, connection refused, throttling).
    #[error("{0}")]
    Transient(String),
    /// Retrying the same call will not help (bad request, unknown class, quota).
    #[error("{0}")]
    Permanent(String),
    /// An instance of that name exists already (a create that succeeded before, maybe).
    #[error("{0}")]
    Conflict(String),
    /// The circuit breaker is open: the backend is not being called.
    #[error(
        "backend {backend} circuit breaker is open after {failures} consecutive failures (last: {last}); retrying after {retry_in_ms} ms"
    )]
    BreakerOpen {
        /// Backend.
        backend: String,
        /// Consecutive failures that opened it.
        failures: u32,
        /// Last error.
        last: String,
        /// Until the half-open probe.
        retry_in_ms: u64,
    },
}

impl ProviderError {
    /// True when the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProviderError::Transient(_) | ProviderError::BreakerOpen { .. }
        )
    }
}

/// A place nodes come from.
#[async_trait::async_trait]
pub trait NodeProvider: Send + Sync {
    /// Creates one instance. An instance that already exists for the same node name is a
    /// [`ProviderError::Conflict`]; the caller then looks it up with [`NodeProvider::list_owned`].
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError>;
    /// Deletes an instance; deleting an absent one succeeds.
    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError>;
    /// Instances carrying every one of `owner` labels.
    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError>;
    /// What this provider is.
    fn describe(&self) -> pb::ProviderInfo;
}

/// Fills the pool/claim fields of an instance from its labels.
pub fn with_ownership(mut instance: pb::Instance, backend: &str) -> pb::Instance {
    instance.backend = backend.to_string();
    if let Some(pool) = instance.labels.get(POOL_LABEL) {
        instance.pool = pool.clone();
    }
    if let Some(claim) = instance.labels.get(CLAIM_LABEL) {
        instance.claim_id = claim.clone();
    }
    instance
}

/// A taint in Kubernetes' JSON form.
pub fn taint_json(t: &pb::Taint) -> serde_json::Value {
    let effect = match pb::TaintEffect::try_from(t.effect).unwrap_or(pb::TaintEffect::NoSchedule) {
        pb::TaintEffect::PreferNoSchedule => "PreferNoSchedule",
        pb::TaintEffect::NoExecute => "NoExecute",
        _ => "NoSchedule",
    };
    let mut v = serde_json::json!({ "key": t.key, "effect": effect });
    if !t.value.is_empty() {
        v["value"] = serde_json::Value::String(t.value.clone());
    }
    v
}
