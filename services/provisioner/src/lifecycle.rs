//! Node lifecycle. Requests are validated and written ahead (operation + claims + idempotency
//! key + name reservations, one transaction) by any replica; the leader drives every Running
//! operation found in the store — new ones within milliseconds (watch-backed cache), unfinished
//! ones after a restart or failover — so a crash at any point resumes from the store:
//!
//! - create: per claim, bounded by the pool's `maxConcurrent`: look the instance up by its claim
//!   label (a create that succeeded before a crash is adopted, never repeated), else create it;
//!   `Launched` → `Registered` (the Node appeared) → `Ready` (Node Ready, startup taints
//!   removed). A node not Ready within the TTL, or whose instance failed, is deleted and its
//!   claim `Failed` (rollback).
//! - delete: cordon, taint `shoal.dev/disrupted:NoSchedule`, evict (PDB 429s retried until
//!   `drainTimeout`, then uncordon and fail — or delete pods if the pool forces), delete the
//!   instance, delete the Node, `Deleted`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation, OperationKind, OperationState, RECORD_VERSION, now_ms},
    pool::Pool,
    snapshot::effect_to_proto,
};
use shoal_kube::{Eviction, NodeOps};
use shoal_proto::v1 as pb;
use shoal_runtime::LeaderWatch;
use shoal_state::{Leadership, PrefixCache};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    ProvisionerSettings,
    backend::{CLAIM_LABEL, CLUSTER_LABEL, InstanceSpec, POOL_LABEL},
    guard::Guarded,
    nodes::NodeIndex,
    stats::Stats,
    store::{self, ClaimStore, Written},
};

/// The taint put on nodes being drained.
pub const DISRUPTED_TAINT: &str = "shoal.dev/disrupted";

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
    /// Only the leader can do this now (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Pauses this task forever at a named point when `SHOAL_TEST_PAUSE_AT` lists it, so crash
/// tests can `kill -9` the process exactly there. Logged, so the test knows it got there.
async fn crash_point(name: &str) {
    let listed = std::env::var("SHOAL_TEST_PAUSE_AT")
        .map(|v| v.split(',').any(|p| p.trim() == name))
        .unwrap_or(false);
    if listed {
        tracing::error!(point = name, "SHOAL_TEST_PAUSE_AT: paused at crash point");
        eprintln!("crash point {name} reached");
        std::future::pending::<()>().await;
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
    active: Mutex<HashSet<String>>,
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
            active: Mutex::default(),
            limits: Mutex::default(),
        }
    }

    /// Valid pools by name.
    pub fn pools(&self) -> BTreeMap<String, Pool> {
        self.pools
            .values()
            .iter()
            .filter_map(|kv| Pool::from_stored(&kv.value).ok())
            .map(|p| (p.name.clone(), p))
            .collect()
    }

    /// Every claim (from the watch-backed cache).
    pub fn claims(&self) -> Vec<NodeClaim> {
        store::decode_claims(&self.claims.values())
    }

    /// Every operation (from the watch-backed cache).
    pub fn operations(&self) -> Vec<Operation> {
        store::decode_ops(&self.ops.values())
    }

    // ---- requests -------------------------------------------------------------------------

    /// The caller's idempotency key (one is made up when empty), or the operation it already
    /// names.
    async fn idempotency(&self, key: &str) -> Result<Result<String, Operation>, RequestError> {
        if key.is_empty() {
            return Ok(Ok(random_id("auto")));
        }
        match self.store.op_for_key(key).await? {
            Some(op) => Ok(Err(self.store.op(&op).await?)),
            None => Ok(Ok(key.to_string())),
        }
    }

    /// `CreateNodes`: validates, then writes the operation and its claims ahead of any work.
    pub async fn create_nodes(
        &self,
        pool_name: &str,
        count: i32,
        key: &str,
        reason: &str,
        traceparent: String,
    ) -> Result<Operation, RequestError> {
        if pool_name.is_empty() {
            return Err(invalid("pool", "must name a NodePool"));
        }
        if count <= 0 {
            return Err(invalid("count", format!("must be at least 1, not {count}")));
        }
        let key = match self.idempotency(key).await? {
            Ok(key) => key,
            Err(existing) => return Ok(existing),
        };
        let pool = self.pools().remove(pool_name).ok_or_else(|| {
            RequestError::NotFound(format!(
                "pool {pool_name} not found (apply it with PoolService/ApplyPool first)"
            ))
        })?;
        if !self.backends.contains_key(&pool.backend) {
            return Err(RequestError::Precondition(format!(
                "pool {pool_name} uses backend {}, which this provisioner has no settings for (service.backends.{})",
                pool.backend, pool.backend
            )));
        }
        for _ in 0..10 {
            let claims = self.claims();
            let live = claims
                .iter()
                .filter(|c| c.pool == pool.name && !c.phase.is_terminal())
                .count() as u32;
            let bounds = pool.bounds(std::time::SystemTime::now());
            if live + count as u32 > bounds.max {
                return Err(invalid(
                    "count",
                    format!(
                        "{count} more node(s) would take pool {} to {} nodes, above its maxNodes {} ({live} live)",
                        pool.name,
                        live + count as u32,
                        bounds.max
                    ),
                ));
            }
            let reserved = self.store.reserved_names(&pool.backend).await?;
            let now = now_ms();
            let op_id = random_id("op");
            let mut names = Vec::new();
            let mut n = 1;
            while names.len() < count as usize {
                let name = format!("{}-{n}", pool.name);
                if !reserved.contains(&name) {
                    names.push(name);
                }
                n += 1;
            }
            let claims: Vec<NodeClaim> = names
                .into_iter()
                .map(|name| {
                    let id = random_id("c");
                    NodeClaim {
                        version: RECORD_VERSION,
                        labels: self.ownership(&pool, &id),
                        id,
                        pool: pool.name.clone(),
                        phase: ClaimPhase::Pending,
                        backend: pool.backend.clone(),
                        instance_id: String::new(),
                        node_name: name,
                        operation_id: op_id.clone(),
                        created_at_ms: now,
                        updated_at_ms: now,
                        failure_reason: String::new(),
                        history: vec![shoal_core::claim::Transition {
                            phase: ClaimPhase::Pending,
                            at_ms: now,
                            reason: reason.to_string(),
                        }],
                    }
                })
                .collect();
            let op = Operation {
                version: RECORD_VERSION,
                id: op_id,
                kind: OperationKind::Create,
                pool: pool.name.clone(),
                idempotency_key: key.clone(),
                claim_ids: claims.iter().map(|c| c.id.clone()).collect(),
                state: OperationState::Running,
                reason: reason.to_string(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
                traceparent: traceparent.clone(),
            };
            match self.store.create(&op, &claims, &pool.backend).await? {
                Written::Created => {
                    tracing::info!(op = %op.id, pool = %pool.name, count, %reason, "create operation written");
                    return Ok(op);
                }
                Written::Exists(id) => return Ok(self.store.op(&id).await?),
                Written::Raced => continue,
            }
        }
        Err(RequestError::Precondition(
            "node names kept being taken concurrently; try again".into(),
        ))
    }

    fn ownership(&self, pool: &Pool, claim: &str) -> BTreeMap<String, String> {
        let mut labels = pool.labels.clone();
        labels.insert(CLUSTER_LABEL.into(), self.cluster.clone());
        labels.insert(POOL_LABEL.into(), pool.name.clone());
        labels.insert(CLAIM_LABEL.into(), claim.to_string());
        labels
    }

    /// `DeleteNodes`: validates, then writes the operation and moves the claims to Draining.
    pub async fn delete_nodes(
        &self,
        nodes: &[String],
        key: &str,
        reason: &str,
        traceparent: String,
    ) -> Result<Operation, RequestError> {
        if nodes.is_empty() {
            return Err(invalid("nodes", "must name at least one node"));
        }
        let unique: HashSet<&String> = nodes.iter().collect();
        if unique.len() != nodes.len() {
            return Err(invalid("nodes", "names a node twice"));
        }
        let key = match self.idempotency(key).await? {
            Ok(key) => key,
            Err(existing) => return Ok(existing),
        };
        let pools = self.pools();
        for _ in 0..10 {
            let all = self.store.all_claims().await?;
            let mut chosen = Vec::new();
            for name in nodes {
                if let Some(pool) = pools.values().find(|p| p.is_permanent(name)) {
                    return Err(RequestError::Precondition(format!(
                        "node {name} is a permanent node of pool {}: it is never removed",
                        pool.name
                    )));
                }
                let claim = all
                    .values()
                    .find(|c| &c.node_name == name && !c.phase.is_terminal());
                let Some(claim) = claim else {
                    let exists = self.kube.get(name).await.ok().flatten().is_some();
                    return Err(if exists {
                        RequestError::Precondition(format!(
                            "node {name} was not created by Shoal (no NodeClaim); remove it by hand"
                        ))
                    } else {
                        RequestError::NotFound(format!("node {name} not found"))
                    });
                };
                if matches!(claim.phase, ClaimPhase::Draining | ClaimPhase::Terminating) {
                    return Err(RequestError::Precondition(format!(
                        "node {name} is already being removed by operation {}",
                        claim.operation_id
                    )));
                }
                if claim.phase == ClaimPhase::Pending {
                    return Err(RequestError::Precondition(format!(
                        "node {name} has not launched yet (claim {} is Pending); retry once it has",
                        claim.id
                    )));
                }
                chosen.push(claim.clone());
            }
            let now = now_ms();
            let op_id = random_id("op");
            let mut writes = Vec::new();
            for mut claim in chosen {
                let (_, revision) = self.store.claim(&claim.id).await?;
                claim.operation_id = op_id.clone();
                let _ = claim.transition(ClaimPhase::Draining, reason, now);
                writes.push((claim, revision));
            }
            let op = Operation {
                version: RECORD_VERSION,
                id: op_id,
                kind: OperationKind::Delete,
                pool: writes[0].0.pool.clone(),
                idempotency_key: key.clone(),
                claim_ids: writes.iter().map(|(c, _)| c.id.clone()).collect(),
                state: OperationState::Running,
                reason: reason.to_string(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
                traceparent: traceparent.clone(),
            };
            match self.store.delete(&op, &writes).await? {
                Written::Created => {
                    tracing::info!(op = %op.id, nodes = ?nodes, %reason, "delete operation written");
                    return Ok(op);
                }
                Written::Exists(id) => return Ok(self.store.op(&id).await?),
                Written::Raced => continue,
            }
        }
        Err(RequestError::Precondition(
            "the nodes' claims kept changing concurrently; try again".into(),
        ))
    }

    // ---- repairs (the reconciler's) ---------------------------------------------------------

    /// `Repair`: one repair chosen by the reconciler. Returns the claim concerned, if any.
    /// Refuses anything a live claim still owns, so a stale report cannot delete a good node.
    pub async fn repair(
        &self,
        action: &pb::repair_request::Action,
        why: &str,
    ) -> Result<String, RequestError> {
        use pb::repair_request::Action;
        let live: Vec<NodeClaim> = self
            .store
            .all_claims()
            .await?
            .into_values()
            .filter(|c| !c.phase.is_terminal())
            .collect();
        match action {
            Action::DeleteInstance(target) => {
                let (backend, id) = match target.split_once('/') {
                    Some((b, i)) => (b.to_string(), i.to_string()),
                    None => {
                        return Err(invalid("deleteInstance", "must be <backend>/<instance id>"));
                    }
                };
                let guarded = self.backend(&backend).map_err(RequestError::NotFound)?;
                if let Some(owner) = live
                    .iter()
                    .find(|c| c.backend == backend && c.instance_id == id)
                {
                    return Err(RequestError::Precondition(format!(
                        "instance {id} belongs to live claim {} ({:?})",
                        owner.id, owner.phase
                    )));
                }
                guarded
                    .delete(&id)
                    .await
                    .map_err(|e| RequestError::Precondition(format!("backend {backend}: {e}")))?;
                tracing::warn!(instance = %id, %backend, %why, "repair: orphan instance deleted");
                Ok(String::new())
            }
            Action::DeleteNode(name) => {
                if let Some(owner) = live.iter().find(|c| &c.node_name == name) {
                    return Err(RequestError::Precondition(format!(
                        "node {name} belongs to live claim {} ({:?})",
                        owner.id, owner.phase
                    )));
                }
                self.kube.delete(name).await.map_err(|e| {
                    RequestError::Precondition(format!("deleting node {name}: {e}"))
                })?;
                tracing::warn!(node = %name, %why, "repair: orphan node deleted");
                Ok(String::new())
            }
            Action::ReleaseId(target) => {
                let Some((backend, name)) = target.split_once('/') else {
                    return Err(invalid("releaseId", "must be <backend>/<name>"));
                };
                if let Some(owner) = live
                    .iter()
                    .find(|c| c.backend == backend && c.node_name == name)
                {
                    return Err(RequestError::Precondition(format!(
                        "name {name} is held by live claim {}",
                        owner.id
                    )));
                }
                self.store.release_name(backend, name).await?;
                tracing::warn!(%backend, %name, %why, "repair: leaked name reservation released");
                Ok(String::new())
            }
            Action::FailClaim(id) => {
                let leadership = self.leadership().ok_or_else(|| {
                    RequestError::Unavailable(
                        "this provisioner replica is not the leader; retry".into(),
                    )
                })?;
                let claim = self
                    .transition(
                        &leadership,
                        id,
                        ClaimPhase::Failed,
                        &format!("reconciler: {why}"),
                        |_| {},
                    )
                    .await
                    .map_err(RequestError::Precondition)?;
                if claim.phase != ClaimPhase::Failed {
                    return Err(RequestError::Precondition(format!(
                        "claim {id} is {:?}: it cannot be failed",
                        claim.phase
                    )));
                }
                if let Err(e) = self.release(&claim).await {
                    tracing::warn!(claim = %id, error = %e, "repair: claim failed; its instance or node could not be deleted yet");
                }
                Ok(id.clone())
            }
            Action::AdoptInstance(adopt) => self.adopt(adopt, &live, why).await,
            Action::SettleOperation(id) => {
                let leadership = self.leadership().ok_or_else(|| {
                    RequestError::Unavailable(
                        "this provisioner replica is not the leader; retry".into(),
                    )
                })?;
                let mut op = self.store.op(id).await?;
                let claims = self.store.all_claims().await?;
                let Some((state, failures)) = op.outcome(|c| claims.get(c)) else {
                    return Err(RequestError::Precondition(format!(
                        "operation {id} still has claims in progress"
                    )));
                };
                if op.state != state {
                    tracing::warn!(op = %id, recorded = ?op.state, settled = ?state, %why, "repair: operation state rewritten from its claims");
                    op.state = state;
                    op.error = failures.join("; ");
                    op.updated_at_ms = now_ms();
                    self.store.put_op(&leadership, &op).await?;
                }
                Ok(String::new())
            }
        }
    }

    fn leadership(&self) -> Option<Leadership> {
        self.leader
            .as_ref()
            .and_then(|l| l.borrow().clone())
            .filter(Leadership::is_held)
    }

    /// Adopts an instance Shoal created whose claim record is gone: writes the claim again
    /// (Launched, same id, so the instance's and the Node's labels match) with a create
    /// operation, and the leader takes it to Ready or, past the node TTL, rolls it back.
    async fn adopt(
        &self,
        adopt: &pb::AdoptInstance,
        live: &[NodeClaim],
        why: &str,
    ) -> Result<String, RequestError> {
        let backend = self
            .backend(&adopt.backend)
            .map_err(RequestError::NotFound)?;
        let owner: BTreeMap<String, String> =
            [(CLUSTER_LABEL.to_string(), self.cluster.clone())].into();
        let instance = backend
            .list_owned(&owner)
            .await
            .map_err(|e| RequestError::Unavailable(format!("backend {}: {e}", adopt.backend)))?
            .into_iter()
            .find(|i| i.id == adopt.instance_id)
            .ok_or_else(|| {
                RequestError::NotFound(format!(
                    "backend {} has no instance {} of cluster {}",
                    adopt.backend, adopt.instance_id, self.cluster
                ))
            })?;
        if instance.claim_id.is_empty() {
            return Err(RequestError::Precondition(format!(
                "instance {} carries no {CLAIM_LABEL} label: only instances Shoal created can be adopted",
                instance.id
            )));
        }
        let pool_name = if adopt.pool.is_empty() {
            instance.pool.clone()
        } else {
            adopt.pool.clone()
        };
        let pool = self.pools().remove(&pool_name).ok_or_else(|| {
            RequestError::NotFound(format!(
                "pool {pool_name:?} of instance {} not found",
                instance.id
            ))
        })?;
        if pool.backend != adopt.backend {
            return Err(RequestError::Precondition(format!(
                "pool {} uses backend {}, not {}",
                pool.name, pool.backend, adopt.backend
            )));
        }
        let id = instance.claim_id.clone();
        match self.store.claim(&id).await {
            Ok((existing, _)) => {
                return Err(RequestError::Precondition(format!(
                    "claim {id} exists ({:?}): the instance is not an orphan",
                    existing.phase
                )));
            }
            Err(store::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let count = live.iter().filter(|c| c.pool == pool.name).count() as u32;
        let max = pool.bounds(std::time::SystemTime::now()).max;
        if count >= max {
            return Err(RequestError::Precondition(format!(
                "pool {} is at maxNodes {max}: adopting {} would exceed it",
                pool.name, instance.id
            )));
        }
        let now = now_ms();
        let op_id = random_id("op");
        let reason = format!("adopted instance {}: {why}", instance.id);
        let claim = NodeClaim {
            version: RECORD_VERSION,
            labels: self.ownership(&pool, &id),
            id: id.clone(),
            pool: pool.name.clone(),
            phase: ClaimPhase::Launched,
            backend: adopt.backend.clone(),
            instance_id: instance.id.clone(),
            node_name: if instance.node_name.is_empty() {
                instance.id.clone()
            } else {
                instance.node_name.clone()
            },
            operation_id: op_id.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            failure_reason: String::new(),
            history: vec![shoal_core::claim::Transition {
                phase: ClaimPhase::Launched,
                at_ms: now,
                reason: reason.clone(),
            }],
        };
        let op = Operation {
            version: RECORD_VERSION,
            id: op_id,
            kind: OperationKind::Create,
            pool: pool.name.clone(),
            idempotency_key: format!("adopt/{}/{}", adopt.backend, instance.id),
            claim_ids: vec![id.clone()],
            state: OperationState::Running,
            reason,
            created_at_ms: now,
            updated_at_ms: now,
            error: String::new(),
            traceparent: String::new(),
        };
        match self.store.adopt(&op, &claim, &adopt.backend).await? {
            Written::Created | Written::Exists(_) => {
                tracing::warn!(claim = %id, instance = %instance.id, node = %claim.node_name, %why, "repair: orphan instance adopted");
                Ok(id)
            }
            Written::Raced => Err(RequestError::Precondition(format!(
                "name {} is reserved by another claim, or claim {id} was written meanwhile",
                claim.node_name
            ))),
        }
    }

    // ---- the leader -----------------------------------------------------------------------

    /// Runs until `shutdown`: while leading, drive every Running operation and check instances.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut leader) = self.leader.clone() else {
            return;
        };
        tokio::spawn(self.clone().export_claim_gauges(shutdown.clone()));
        loop {
            let leadership = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = leader.wait_for(|l| l.as_ref().is_some_and(Leadership::is_held)) => match l {
                    Ok(l) => l.clone(),
                    Err(_) => return,
                },
            };
            let Some(leadership) = leadership else {
                continue;
            };
            tracing::info!(
                term = leadership.term(),
                "leading the provisioner: resuming unfinished operations"
            );
            let term = shutdown.child_token();
            let lost = leadership.lost().clone();
            let stop = term.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => stop.cancel(),
                    _ = stop.cancelled() => {}
                }
            });
            tokio::spawn(
                self.clone()
                    .check_instances(leadership.clone(), term.clone()),
            );
            self.clone()
                .dispatch(leadership.clone(), term.clone())
                .await;
            term.cancel();
            self.active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            if shutdown.is_cancelled() {
                return;
            }
            tracing::warn!("lost leadership: no longer provisioning");
        }
    }

    /// Starts a driver for every Running operation, now and whenever the store changes.
    async fn dispatch(self: Arc<Self>, leadership: Leadership, term: CancellationToken) {
        self.ops.wait_synced(Duration::from_secs(30)).await;
        let mut changes = self.ops.changes();
        loop {
            for op in self.operations() {
                if op.is_finished() {
                    continue;
                }
                let fresh = self
                    .active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(op.id.clone());
                if fresh {
                    let me = self.clone();
                    let leadership = leadership.clone();
                    let term = term.clone();
                    tokio::spawn(async move {
                        let id = op.id.clone();
                        tokio::select! {
                            _ = term.cancelled() => {}
                            _ = me.drive(op, &leadership, &term) => {}
                        }
                        me.active
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                    });
                }
            }
            tokio::select! {
                _ = term.cancelled() => return,
                c = changes.changed() => if c.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    fn limit(&self, pool: &str, max: u32) -> Arc<Semaphore> {
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

    async fn drive(
        self: &Arc<Self>,
        op: Operation,
        leadership: &Leadership,
        term: &CancellationToken,
    ) {
        let span = tracing::info_span!("provisioner.operation", op = %op.id, kind = ?op.kind, pool = %op.pool);
        shoal_runtime::telemetry::continue_trace(&span, &op.traceparent);
        let pool = self.pools().remove(&op.pool);
        let tasks = op.claim_ids.iter().map(|id| {
            let me = self.clone();
            let pool = pool.clone();
            let id = id.clone();
            let leadership = leadership.clone();
            let term = term.clone();
            let kind = op.kind;
            async move {
                let outcome = match kind {
                    OperationKind::Create => {
                        me.drive_create(&id, pool.as_ref(), &leadership, &term)
                            .await
                    }
                    OperationKind::Delete => {
                        me.drive_delete(&id, pool.as_ref(), &leadership, &term)
                            .await
                    }
                };
                (id, outcome)
            }
        });
        let outcomes = futures::future::join_all(tasks)
            .instrument(span.clone())
            .await;
        if term.is_cancelled() {
            return;
        }
        let mut failures = Vec::new();
        for (id, outcome) in &outcomes {
            if let Err(why) = outcome {
                failures.push(format!("{id}: {why}"));
            }
        }
        let mut done = op.clone();
        done.state = if failures.is_empty() {
            OperationState::Succeeded
        } else if failures.len() == outcomes.len() {
            OperationState::Failed
        } else {
            OperationState::PartiallyFailed
        };
        done.error = failures.join("; ");
        done.updated_at_ms = now_ms();
        for _ in 0..50 {
            match self.store.put_op(leadership, &done).await {
                Ok(()) => break,
                Err(store::Error::Store(e)) if !e.is_transient() => return,
                Err(e) => {
                    tracing::warn!(op = %done.id, error = %e, "cannot record operation result; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let kind = match done.kind {
            OperationKind::Create => "create",
            OperationKind::Delete => "delete",
        };
        let state = match done.state {
            OperationState::Succeeded => "succeeded",
            OperationState::PartiallyFailed => "partially_failed",
            _ => "failed",
        };
        self.stats
            .operations
            .with_label_values(&[kind, state])
            .inc();
        tracing::info!(parent: &span, op = %done.id, state, error = %done.error, "operation finished");
    }

    /// Changes a claim (fenced CAS), retrying transient store errors until the term ends.
    async fn update(
        &self,
        leadership: &Leadership,
        id: &str,
        mut edit: impl FnMut(&mut NodeClaim) -> bool,
    ) -> Result<NodeClaim, String> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.update_claim(leadership, id, &mut edit).await {
                Ok(c) => return Ok(c),
                Err(store::Error::Store(e)) if e.is_transient() => {
                    tracing::warn!(claim = id, error = %e, "store unavailable; retrying claim write");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn transition(
        &self,
        leadership: &Leadership,
        id: &str,
        to: ClaimPhase,
        reason: &str,
        set: impl Fn(&mut NodeClaim),
    ) -> Result<NodeClaim, String> {
        let claim = self
            .update(leadership, id, |c| {
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

    fn spec(&self, claim: &NodeClaim, pool: Option<&Pool>) -> InstanceSpec {
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
        }
    }

    /// The instance of a claim, looked up by its claim label.
    async fn find_instance(&self, claim: &NodeClaim) -> Result<Option<pb::Instance>, String> {
        let backend = self.backend(&claim.backend)?;
        let owner: BTreeMap<String, String> = [
            (CLUSTER_LABEL.to_string(), self.cluster.clone()),
            (CLAIM_LABEL.to_string(), claim.id.clone()),
        ]
        .into_iter()
        .collect();
        let found = backend
            .list_owned(&owner)
            .await
            .map_err(|e| e.to_string())?;
        // Only an instance that really carries this claim (never "the first one listed").
        Ok(found.into_iter().find(|i| i.claim_id == claim.id))
    }

    fn backend(&self, name: &str) -> Result<&Arc<Guarded>, String> {
        self.backends
            .get(name)
            .ok_or_else(|| format!("backend {name} is not configured in this provisioner"))
    }

    /// Deletes whatever a failed or rolled-back claim holds: its instance and its Node.
    async fn release(&self, claim: &NodeClaim) -> Result<(), String> {
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

    /// Rolls a claim back: delete what it holds (retrying), then mark it Failed.
    async fn roll_back(
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
        let mut delay = Duration::from_secs(1);
        while let Err(e) = self.release(claim).await {
            tracing::warn!(claim = %claim.id, error = %e, "rollback: cannot delete the instance yet; retrying");
            tokio::select! {
                _ = term.cancelled() => return Err(format!("{why} (rollback interrupted)")),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        self.transition(leadership, &claim.id, ClaimPhase::Failed, why, |_| {})
            .await?;
        Err(why.to_string())
    }

    async fn drive_create(
        &self,
        id: &str,
        pool: Option<&Pool>,
        leadership: &Leadership,
        term: &CancellationToken,
    ) -> Result<(), String> {
        let max = pool.map_or(1, |p| p.scale_up.max_concurrent);
        let limit = self.limit(pool.map_or("", |p| p.name.as_str()), max);
        let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
        let mut changes = self.nodes.changes();
        let mut last_instance_check = std::time::Instant::now();
        let mut last_error = String::new();
        loop {
            let (claim, _) = self.store.claim(id).await.map_err(|e| e.to_string())?;
            let ttl_left = Duration::from_millis(
                (claim.created_at_ms + self.settings.node_ttl.as_millis() as u64)
                    .saturating_sub(now_ms()),
            );
            match claim.phase {
                ClaimPhase::Ready => return Ok(()),
                ClaimPhase::Failed => return Err(claim.failure_reason),
                ClaimPhase::Deleted | ClaimPhase::Draining | ClaimPhase::Terminating => {
                    return Err(format!("claim is {:?}: being removed", claim.phase));
                }
                ClaimPhase::Pending => {
                    if ttl_left.is_zero() {
                        let why = if last_error.is_empty() {
                            "not launched within the node TTL".to_string()
                        } else {
                            format!(
                                "not launched within the node TTL; backend {}: {last_error}",
                                claim.backend
                            )
                        };
                        return self.roll_back(leadership, &claim, &why, "ttl", term).await;
                    }
                    let instance = match self.find_instance(&claim).await {
                        Ok(Some(found)) => {
                            tracing::info!(claim = id, instance = %found.id, "adopting the instance created before a restart");
                            Ok(found)
                        }
                        Ok(None) => {
                            crash_point("before-backend-create").await;
                            let spec = self.spec(&claim, pool);
                            match self.backend(&claim.backend)?.create(&spec).await {
                                Ok(i) => Ok(i),
                                Err(crate::backend::ProviderError::Conflict(m)) => {
                                    match self.find_instance(&claim).await {
                                        Ok(Some(found)) => Ok(found),
                                        _ => Err(CreateError::Permanent(format!(
                                            "name {} is taken on the backend: {m}",
                                            claim.node_name
                                        ))),
                                    }
                                }
                                Err(e) if e.is_transient() => {
                                    Err(CreateError::Transient(e.to_string()))
                                }
                                Err(e) => Err(CreateError::Permanent(e.to_string())),
                            }
                        }
                        Err(e) => Err(CreateError::Transient(e)),
                    };
                    match instance {
                        Ok(instance) => {
                            crash_point("after-backend-create").await;
                            self.transition(
                                leadership,
                                id,
                                ClaimPhase::Launched,
                                &format!("instance {} created", instance.id),
                                |c| c.instance_id = instance.id.clone(),
                            )
                            .await?;
                        }
                        Err(CreateError::Transient(why)) => {
                            // The backend is down or its breaker open: keep the claim Pending
                            // and try again until the node TTL, then fail with this reason.
                            tracing::warn!(claim = id, error = %why, "backend unavailable; the claim waits");
                            last_error = why;
                            tokio::select! {
                                _ = term.cancelled() => return Err("leadership ended".into()),
                                _ = tokio::time::sleep(ttl_left.min(Duration::from_secs(2))) => {}
                            }
                        }
                        Err(CreateError::Permanent(why)) => {
                            let reason = format!("backend {}: {why}", claim.backend);
                            // Nothing may have been created, but a timed-out call might have:
                            // release by label before failing.
                            return self
                                .roll_back(leadership, &claim, &reason, "create_failed", term)
                                .await;
                        }
                    }
                }
                ClaimPhase::Launched | ClaimPhase::Registered => {
                    if ttl_left.is_zero() {
                        let why = format!(
                            "node {} did not become Ready within the node TTL ({})",
                            claim.node_name,
                            humantime::format_duration(self.settings.node_ttl)
                        );
                        return self.roll_back(leadership, &claim, &why, "ttl", term).await;
                    }
                    if let Some(node) = self.nodes.get(id) {
                        if claim.phase == ClaimPhase::Launched && !node.ready {
                            self.transition(
                                leadership,
                                id,
                                ClaimPhase::Registered,
                                "node registered",
                                |_| {},
                            )
                            .await?;
                            continue;
                        }
                        if node.ready {
                            let startup: Vec<String> = pool
                                .map(|p| p.startup_taints.iter().map(|t| t.key.clone()).collect())
                                .unwrap_or_default();
                            if node.taints.iter().any(|t| startup.contains(t))
                                && let Err(e) = self.kube.remove_taints(&node.name, &startup).await
                            {
                                tracing::warn!(node = %node.name, error = %e, "cannot remove startup taints yet");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                continue;
                            }
                            let ready = self
                                .transition(leadership, id, ClaimPhase::Ready, "node Ready", |_| {})
                                .await?;
                            if ready.phase == ClaimPhase::Ready {
                                let secs =
                                    now_ms().saturating_sub(ready.created_at_ms) as f64 / 1000.0;
                                self.stats
                                    .node_ready
                                    .with_label_values(&[&ready.pool])
                                    .observe(secs);
                            }
                            continue;
                        }
                    }
                    // Boot failures show on the backend, not in Kubernetes.
                    if last_instance_check.elapsed() >= self.settings.instance_check_interval {
                        last_instance_check = std::time::Instant::now();
                        match self.find_instance(&claim).await {
                            Ok(None) => {
                                let why = format!(
                                    "instance {} disappeared before its node was Ready",
                                    claim.instance_id
                                );
                                return self
                                    .roll_back(leadership, &claim, &why, "instance_gone", term)
                                    .await;
                            }
                            Ok(Some(i))
                                if matches!(i.state.as_str(), "failed" | "exited" | "dead") =>
                            {
                                let why = format!("instance {} is {}: boot failed", i.id, i.state);
                                return self
                                    .roll_back(leadership, &claim, &why, "boot_failed", term)
                                    .await;
                            }
                            _ => {}
                        }
                    }
                    tokio::select! {
                        _ = term.cancelled() => return Err("leadership ended".into()),
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep(ttl_left.min(self.settings.instance_check_interval)) => {}
                    }
                }
            }
        }
    }

    async fn drive_delete(
        &self,
        id: &str,
        pool: Option<&Pool>,
        leadership: &Leadership,
        term: &CancellationToken,
    ) -> Result<(), String> {
        let drain_timeout = pool.map_or(Duration::from_secs(300), |p| p.scale_down.drain_timeout);
        let force = pool.is_some_and(|p| p.scale_down.force_after_drain_timeout);
        loop {
            let (claim, _) = self.store.claim(id).await.map_err(|e| e.to_string())?;
            match claim.phase {
                ClaimPhase::Deleted => return Ok(()),
                ClaimPhase::Failed => return Err(claim.failure_reason),
                ClaimPhase::Ready
                | ClaimPhase::Registered
                | ClaimPhase::Launched
                | ClaimPhase::Pending => {
                    // Returned to service (drain timed out) or never moved: the last reason says why.
                    let why = claim
                        .history
                        .last()
                        .map(|t| t.reason.clone())
                        .unwrap_or_default();
                    return Err(why);
                }
                ClaimPhase::Draining => {
                    match self.drain(&claim, drain_timeout, force, term).await {
                        Ok(()) => {
                            self.transition(
                                leadership,
                                id,
                                ClaimPhase::Terminating,
                                "drained",
                                |_| {},
                            )
                            .await?;
                        }
                        Err(DrainError::TimedOut(why)) => {
                            if let Err(e) =
                                self.kube.uncordon(&claim.node_name, DISRUPTED_TAINT).await
                            {
                                tracing::warn!(node = %claim.node_name, error = %e, "cannot uncordon yet; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                            let reason = format!(
                                "drain timed out after {}: {why}; node uncordoned",
                                humantime::format_duration(drain_timeout)
                            );
                            self.transition(leadership, id, ClaimPhase::Ready, &reason, |_| {})
                                .await?;
                            return Err(reason);
                        }
                        Err(DrainError::Interrupted) => return Err("leadership ended".into()),
                    }
                }
                ClaimPhase::Terminating => {
                    let mut delay = Duration::from_secs(1);
                    while let Err(e) = self.release(&claim).await {
                        tracing::warn!(claim = id, error = %e, "cannot delete the instance yet; retrying");
                        tokio::select! {
                            _ = term.cancelled() => return Err("leadership ended".into()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    self.transition(
                        leadership,
                        id,
                        ClaimPhase::Deleted,
                        "instance and node deleted",
                        |_| {},
                    )
                    .await?;
                }
            }
        }
    }

    async fn drain(
        &self,
        claim: &NodeClaim,
        timeout: Duration,
        force: bool,
        term: &CancellationToken,
    ) -> Result<(), DrainError> {
        let node = &claim.node_name;
        let started = claim.phase_since_ms();
        let mut cordoned = false;
        loop {
            let result: Result<Option<String>, shoal_kube::KubeError> = async {
                if !cordoned {
                    if !self.kube.cordon(node, DISRUPTED_TAINT).await? {
                        return Ok(None); // no Node: nothing to drain
                    }
                    cordoned = true;
                }
                let pods = self.kube.pods_to_drain(node).await?;
                if pods.is_empty() {
                    return Ok(None);
                }
                let mut blocked = None;
                for pod in &pods {
                    if pod.metadata.deletion_timestamp.is_some() {
                        continue; // terminating: wait for it
                    }
                    let result = self.kube.evict(pod).await?;
                    let label = match &result {
                        Eviction::Evicted => "evicted",
                        Eviction::Blocked(_) => "blocked",
                        Eviction::Gone => "gone",
                    };
                    self.stats.evictions.with_label_values(&[label]).inc();
                    if let Eviction::Blocked(msg) = result {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        blocked = Some(format!("pod {name}: {msg}"));
                        if force && now_ms().saturating_sub(started) >= timeout.as_millis() as u64 {
                            tracing::warn!(%node, pod = %name, "drainTimeout passed and the pool forces: deleting the pod");
                            self.kube.delete_pod(pod).await?;
                        }
                    }
                }
                Ok(Some(blocked.unwrap_or_else(|| format!("{} pod(s) still terminating", pods.len()))))
            }
            .await;
            crash_point("mid-drain").await;
            tracing::debug!(%node, ?result, "drain round");
            let waiting_for = match result {
                Ok(None) => return Ok(()),
                Ok(Some(what)) => what,
                Err(e) => format!("Kubernetes API: {e}"),
            };
            if !force && now_ms().saturating_sub(started) >= timeout.as_millis() as u64 {
                return Err(DrainError::TimedOut(waiting_for));
            }
            tokio::select! {
                _ = term.cancelled() => return Err(DrainError::Interrupted),
                _ = tokio::time::sleep(self.settings.drain_poll_interval) => {}
            }
        }
    }

    /// Every `instanceCheckInterval`: a live claim whose instance vanished from its backend (a
    /// container removed by hand) is failed and its Node deleted — never left Ready.
    async fn check_instances(self: Arc<Self>, leadership: Leadership, term: CancellationToken) {
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(self.settings.instance_check_interval) => {}
            }
            let owner: BTreeMap<String, String> =
                [(CLUSTER_LABEL.to_string(), self.cluster.clone())]
                    .into_iter()
                    .collect();
            for (name, backend) in &self.backends {
                let Ok(instances) = backend.list_owned(&owner).await else {
                    continue; // unknown is not absent
                };
                let present: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
                let by_claim: HashSet<&str> =
                    instances.iter().map(|i| i.claim_id.as_str()).collect();
                let cutoff = now_ms()
                    .saturating_sub(self.settings.instance_check_interval.as_millis() as u64);
                for claim in self.claims() {
                    if &claim.backend != name
                        || claim.phase != ClaimPhase::Ready
                        || claim.instance_id.is_empty()
                        || claim.updated_at_ms > cutoff
                        || present.contains(claim.instance_id.as_str())
                        || by_claim.contains(claim.id.as_str())
                    {
                        continue;
                    }
                    let why = format!(
                        "instance {} of node {} disappeared from backend {name}",
                        claim.instance_id, claim.node_name
                    );
                    if let Err(e) = self.kube.delete(&claim.node_name).await {
                        tracing::warn!(node = %claim.node_name, error = %e, "cannot delete the node of a vanished instance yet");
                        continue;
                    }
                    let _ = self
                        .transition(&leadership, &claim.id, ClaimPhase::Failed, &why, |_| {})
                        .await;
                    self.stats
                        .rollbacks
                        .with_label_values(&[&claim.pool, "instance_gone"])
                        .inc();
                }
            }
        }
    }

    async fn export_claim_gauges(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.claims.changes();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        loop {
            let mut counts: HashMap<(String, String), i64> = HashMap::new();
            for claim in self.claims() {
                *counts
                    .entry((claim.pool.clone(), format!("{:?}", claim.phase)))
                    .or_default() += 1;
            }
            for key in seen.iter() {
                if !counts.contains_key(key) {
                    self.stats
                        .claims
                        .with_label_values(&[&key.0, &key.1])
                        .set(0);
                }
            }
            for (key, n) in &counts {
                self.stats
                    .claims
                    .with_label_values(&[&key.0, &key.1])
                    .set(*n);
                seen.insert(key.clone());
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.changed() => if c.is_err() { return },
            }
        }
    }
}

enum CreateError {
    /// May succeed later (backend down, breaker open): wait, up to the node TTL.
    Transient(String),
    /// Will not succeed: fail the claim now.
    Permanent(String),
}

enum DrainError {
    TimedOut(String),
    Interrupted,
}
