//! Node lifecycle: the provisioner's core and what its parts share. Requests are validated and
//! written ahead by any replica ([`crate::requests`]); the leader drives every Running
//! operation found in the store ([`crate::driver`]) — new ones within milliseconds
//! (watch-backed cache), unfinished ones after a restart or failover — so a crash at any point
//! resumes from the store:
//!
//! - create: per claim, backend calls bounded by the pool's `maxConcurrent`; `Launched` →
//!   `Registered` (the Node appeared) → `Ready` (Node Ready, startup taints removed). A node
//!   not Ready within the TTL, or whose instance failed, is deleted and its claim `Failed`
//!   (rollback).
//! - delete: cordon, taint `shoal.dev/disrupted:NoSchedule`, evict ([`crate::drain`]), delete
//!   the instance, delete the Node, `Deleted`.
//! - repairs from the reconciler ([`crate::repair`]), only ever on what this cluster owns.
//!
//! This module holds the claim writes (fenced CAS, retried), instance lookups and releases that
//! the others use.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};
use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation, now_ms},
    pool::Pool,
    snapshot::effect_to_proto,
};
use shoal_kube::NodeOps;
use shoal_proto::v1 as pb;
use shoal_runtime::LeaderWatch;
use shoal_state::{Leadership, PrefixCache, keys, records};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    ProvisionerSettings,
    backend::{CLAIM_LABEL, CLUSTER_LABEL, InstanceSpec},
    guard::Guarded,
    nodes::NodeIndex,
    stats::Stats,
    store::{self, ClaimStore},
};

/// The taint put on nodes being drained.
pub const DISRUPTED_TAINT: &str = shoal_core::labels::DISRUPTED_TAINT;

/// Why a request was refused; mapped to gRPC codes by the API layer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Malformed request (INVALID_ARGUMENT).
    #[error("{field}: {reason}")]
    Invalid {
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Unknown pool, node or operation (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Valid, but not possible in the current state (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// The store failed (UNAVAILABLE).
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Not possible right now; retry (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
}

impl From<shoal_state::StoreError> for RequestError {
    fn from(e: shoal_state::StoreError) -> Self {
        RequestError::Store(store::Error::Store(e))
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field,
        reason: reason.into(),
    }
}

pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Backoff of store writes retried until the term ends.
fn store_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
}

/// Backoff of instance deletions retried until the term ends.
pub(crate) fn release_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Retries `call` with `backoff` while `retry(&error)` holds, until `term` ends (`None`).
pub(crate) async fn retry_in_term<T, E, Fut>(
    term: &CancellationToken,
    backoff: ExponentialBuilder,
    what: &str,
    retry: impl FnMut(&E) -> bool,
    call: impl FnMut() -> Fut,
) -> Option<Result<T, E>>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let attempts = call.retry(backoff).when(retry).notify(
        |e: &E, after: Duration| tracing::warn!(error = %e, retry_in = ?after, "{what}: retrying"),
    );
    tokio::select! {
        _ = term.cancelled() => None,
        result = attempts => Some(result),
    }
}

/// The provisioner's core.
pub struct Provisioner {
    pub(crate) settings: ProvisionerSettings,
    pub(crate) cluster: String,
    pub(crate) store: ClaimStore,
    pub(crate) pools: PrefixCache,
    pub(crate) claims: PrefixCache,
    pub(crate) ops: PrefixCache,
    pub(crate) backends: BTreeMap<String, Arc<Guarded>>,
    pub(crate) kube: NodeOps,
    pub(crate) nodes: NodeIndex,
    pub(crate) leader: Option<LeaderWatch>,
    pub(crate) stats: Stats,
    limits: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
}

impl Provisioner {
    /// Assembles the core.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ProvisionerSettings,
        cluster: String,
        store: ClaimStore,
        caches: [PrefixCache; 3],
        backends: BTreeMap<String, Arc<Guarded>>,
        kube: NodeOps,
        nodes: NodeIndex,
        leader: Option<LeaderWatch>,
        stats: Stats,
    ) -> Provisioner {
        let [pools, claims, ops] = caches;
        Provisioner {
            settings,
            cluster,
            store,
            pools,
            claims,
            ops,
            backends,
            kube,
            nodes,
            leader,
            stats,
            limits: Mutex::default(),
        }
    }

    /// Valid pools by name (from the watch-backed cache).
    pub fn pools(&self) -> BTreeMap<String, Pool> {
        self.pools
            .values()
            .iter()
            .filter_map(|kv| Pool::from_stored(&kv.value).ok())
            .map(|p| (p.name.clone(), p))
            .collect()
    }

    /// One valid pool, read from the store (requests never trust a cache that may not have
    /// synced yet).
    pub async fn pool_from_store(&self, name: &str) -> Result<Option<Pool>, RequestError> {
        let Some(kv) = self.store.records().store().get(&keys::pool(name)).await? else {
            return Ok(None);
        };
        Pool::from_stored(&kv.value)
            .map(Some)
            .map_err(|why| RequestError::Precondition(format!("stored pool is invalid: {why}")))
    }

    /// Every valid pool, read from the store.
    pub async fn pools_from_store(&self) -> Result<BTreeMap<String, Pool>, RequestError> {
        Ok(self
            .store
            .records()
            .store()
            .range(keys::POOLS)
            .await?
            .kvs
            .iter()
            .filter_map(|kv| Pool::from_stored(&kv.value).ok())
            .map(|p| (p.name.clone(), p))
            .collect())
    }

    /// Every claim (from the watch-backed cache).
    pub fn claims(&self) -> Vec<NodeClaim> {
        records::decode_claims(&self.claims.values())
    }

    /// Every operation (from the watch-backed cache).
    pub fn operations(&self) -> Vec<Operation> {
        records::decode_operations(&self.ops.values())
    }

    /// This replica's leadership, if it holds it now.
    pub(crate) fn leadership(&self) -> Option<Leadership> {
        shoal_runtime::current_leadership(self.leader.as_ref())
    }

    /// The leadership a leader-only action needs, or UNAVAILABLE.
    pub(crate) fn require_leadership(&self) -> Result<Leadership, RequestError> {
        self.leadership().ok_or_else(|| {
            RequestError::Unavailable("this provisioner replica is not the leader; retry".into())
        })
    }

    pub(crate) fn backend(&self, name: &str) -> Result<&Arc<Guarded>, String> {
        self.backends
            .get(name)
            .ok_or_else(|| format!("backend {name} is not configured in this provisioner"))
    }

    /// The semaphore bounding a pool's concurrent backend calls (`scaleUp.maxConcurrent`).
    pub(crate) fn limit(&self, pool: &str, max: u32) -> Arc<Semaphore> {
        let max = max.max(1);
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let entry = limits
            .entry(pool.to_string())
            .or_insert_with(|| (max, Arc::new(Semaphore::new(max as usize))));
        if entry.0 != max {
            // The pool changed: new work uses the new limit.
            *entry = (max, Arc::new(Semaphore::new(max as usize)));
        }
        entry.1.clone()
    }

    /// Changes a claim (fenced CAS), retrying transient store errors until `term` ends.
    pub(crate) async fn update(
        &self,
        leadership: &Leadership,
        term: &CancellationToken,
        id: &str,
        edit: impl Fn(&mut NodeClaim) -> bool,
    ) -> Result<NodeClaim, String> {
        let edit = &edit;
        let result = retry_in_term(
            term,
            store_backoff(),
            "claim write",
            |e: &store::Error| matches!(e, store::Error::Store(s) if s.is_transient()),
            || async move { self.store.update_claim(leadership, id, edit).await },
        )
        .await;
        match result {
            None => Err("leadership ended".into()),
            Some(r) => r.map_err(|e| e.to_string()),
        }
    }

    /// Moves a claim to `to` (if its lifecycle allows), setting what `set` sets.
    pub(crate) async fn transition(
        &self,
        leadership: &Leadership,
        term: &CancellationToken,
        id: &str,
        to: ClaimPhase,
        reason: &str,
        set: impl Fn(&mut NodeClaim),
    ) -> Result<NodeClaim, String> {
        let claim = self
            .update(leadership, term, id, |c| {
                if !c.phase.can_become(to) {
                    return false;
                }
                set(c);
                c.transition(to, reason, now_ms()).is_ok()
            })
            .await?;
        if to == ClaimPhase::Failed && claim.phase == ClaimPhase::Failed {
            self.stats.failed.with_label_values(&[&claim.pool]).inc();
            tracing::warn!(claim = %claim.id, node = %claim.node_name, %reason, "claim failed");
        }
        Ok(claim)
    }

    /// What the backend is asked to create for a claim.
    pub(crate) fn spec(&self, claim: &NodeClaim, pool: Option<&Pool>) -> InstanceSpec {
        let taint = |t: &shoal_core::fit::Taint| pb::Taint {
            key: t.key.clone(),
            value: t.value.clone(),
            effect: effect_to_proto(t.effect) as i32,
        };
        InstanceSpec {
            claim_id: claim.id.clone(),
            pool: claim.pool.clone(),
            class: pool.map(|p| p.class.clone()).unwrap_or_default(),
            node_name: claim.node_name.clone(),
            labels: claim.labels.clone(),
            taints: pool
                .map(|p| {
                    p.taints
                        .iter()
                        .chain(&p.startup_taints)
                        .map(taint)
                        .collect()
                })
                .unwrap_or_default(),
            capacity: pool.map(|p| p.capacity.clone()).unwrap_or_default(),
            overhead: pool.map(|p| p.overhead.clone()).unwrap_or_default(),
        }
    }

    /// The ownership labels that say "this cluster's" (the cluster id).
    pub(crate) fn owner(&self) -> BTreeMap<String, String> {
        [(CLUSTER_LABEL.to_string(), self.cluster.clone())].into()
    }

    /// The instance of a claim, looked up by its claim label.
    pub(crate) async fn find_instance(
        &self,
        claim: &NodeClaim,
    ) -> Result<Option<pb::Instance>, String> {
        let backend = self.backend(&claim.backend)?;
        let mut owner = self.owner();
        owner.insert(CLAIM_LABEL.to_string(), claim.id.clone());
        let found = backend
            .list_owned(&owner)
            .await
            .map_err(|e| e.to_string())?;
        // Only an instance that really carries this claim (never "the first one listed").
        Ok(found.into_iter().find(|i| i.claim_id == claim.id))
    }

    /// Deletes whatever a failed or rolled-back claim holds: its instance and its Node.
    pub(crate) async fn release(&self, claim: &NodeClaim) -> Result<(), String> {
        let backend = self.backend(&claim.backend)?;
        let mut ids: Vec<String> = Vec::new();
        if !claim.instance_id.is_empty() {
            ids.push(claim.instance_id.clone());
        }
        if let Ok(Some(found)) = self.find_instance(claim).await
            && !ids.contains(&found.id)
        {
            ids.push(found.id);
        }
        for id in ids {
            backend.delete(&id).await.map_err(|e| e.to_string())?;
        }
        self.kube
            .delete(&claim.node_name)
            .await
            .map_err(|e| e.to_string())
    }

    /// Releases a claim's instance and Node, retrying until it worked or `term` ends.
    pub(crate) async fn release_in_term(
        &self,
        claim: &NodeClaim,
        term: &CancellationToken,
    ) -> Result<(), String> {
        match retry_in_term(
            term,
            release_backoff(),
            "instance release",
            |_| true,
            || self.release(claim),
        )
        .await
        {
            None => Err("leadership ended".into()),
            Some(r) => r,
        }
    }

    /// Rolls a claim back: delete what it holds (retrying), then mark it Failed.
    pub(crate) async fn roll_back(
        &self,
        leadership: &Leadership,
        claim: &NodeClaim,
        why: &str,
        code: &str,
        term: &CancellationToken,
    ) -> Result<(), String> {
        self.stats
            .rollbacks
            .with_label_values(&[&claim.pool, code])
            .inc();
        if self.release_in_term(claim, term).await.is_err() {
            return Err(format!("{why} (rollback interrupted)"));
        }
        self.transition(leadership, term, &claim.id, ClaimPhase::Failed, why, |_| {})
            .await?;
        Err(why.to_string())
    }
}
