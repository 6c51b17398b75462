//! `CreateNodes` and `DeleteNodes`, as any replica serves them: validate, write the intent
//! (operation + idempotency key, and for creates the pool ledger) in one small transaction, then
//! the claims in chunks. The leader drives what was written; a request that stops half way is
//! completed by the leader from the operation record, so any count works and nothing is lost.
//!
//! Reads here are fresh store reads, never caches: a replica that just started (or whose caches
//! lag) decides on the same data as the leader.

use std::collections::{BTreeMap, HashSet};

use shoal_core::{
    ClaimPhase,
    claim::{
        NodeClaim, Operation, OperationKind, OperationState, PlannedClaim, RECORD_VERSION, now_ms,
    },
    pool::Pool,
};
use shoal_state::records::{LedgerRead, PoolLedger};

use crate::{
    backend::{CLAIM_LABEL, CLUSTER_LABEL, POOL_LABEL},
    lifecycle::{Provisioner, RequestError, invalid, random_id},
    store::{Written, takeable},
};

/// Most nodes one call may create or delete (and most a pool may hold).
pub const MAX_NODES_PER_CALL: i32 = shoal_core::pool::MAX_NODES as i32;

/// How a pool's size stands, read fresh from the store after its ledger.
pub(crate) struct PoolRoom {
    /// The ledger as read (its revision guards the write).
    pub ledger: LedgerRead,
    /// Live claims of the pool, including planned ones not written yet.
    pub live: u32,
    /// The highest `<pool>-<n>` ordinal in use (for a pool with no ledger yet).
    pub highest_ordinal: u64,
}

fn ordinal(pool: &str, name: &str) -> Option<u64> {
    name.strip_prefix(pool)?.strip_prefix('-')?.parse().ok()
}

impl Provisioner {
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

    /// Reads the pool's ledger, then its live claims: only creates and adoptions grow a pool
    /// and each bumps the ledger, so a write that compares the ledger's revision knows `live`
    /// was not outgrown meanwhile.
    pub(crate) async fn pool_room(&self, pool: &str) -> Result<PoolRoom, RequestError> {
        let ledger = self.store.records().ledger(pool).await?;
        let claims = self.store.records().claims().await?;
        let ops = self.store.records().operations().await?;
        let written: HashSet<&str> = claims.iter().map(|c| c.id.as_str()).collect();
        let mut live = claims
            .iter()
            .filter(|c| c.pool == pool && !c.phase.is_terminal())
            .count() as u32;
        let mut highest_ordinal = claims
            .iter()
            .filter(|c| c.pool == pool)
            .filter_map(|c| ordinal(pool, &c.node_name))
            .max()
            .unwrap_or(0);
        for op in ops
            .iter()
            .filter(|o| o.pool == pool && o.kind == OperationKind::Create && !o.is_finished())
        {
            for planned in &op.planned {
                if !written.contains(planned.id.as_str()) {
                    live += 1;
                }
                if let Some(n) = ordinal(pool, &planned.node_name) {
                    highest_ordinal = highest_ordinal.max(n);
                }
            }
        }
        Ok(PoolRoom {
            ledger,
            live,
            highest_ordinal,
        })
    }

    /// `CreateNodes`: validates, writes the intent, then the claims.
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
        bounded("pool", pool_name, 63)?;
        bounded("idempotencyKey", key, MAX_KEY_LEN)?;
        bounded("reason", reason, MAX_REASON_LEN)?;
        if !(1..=MAX_NODES_PER_CALL).contains(&count) {
            return Err(invalid(
                "count",
                format!("must be between 1 and {MAX_NODES_PER_CALL}, not {count}"),
            ));
        }
        let key = match self.idempotency(key).await? {
            Ok(key) => key,
            Err(existing) => return Ok(existing),
        };
        let pool = self.pool_from_store(pool_name).await?.ok_or_else(|| {
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
        let count = count as u32;
        let max = pool.bounds(std::time::SystemTime::now()).max;
        if count > max {
            return Err(invalid(
                "count",
                format!(
                    "{count} node(s) can never fit pool {}: it is above its maxNodes {max}",
                    pool.name
                ),
            ));
        }
        for _ in 0..20 {
            let room = self.pool_room(&pool.name).await?;
            let bounds = pool.bounds(std::time::SystemTime::now());
            if room.live + count > bounds.max {
                return Err(RequestError::Precondition(format!(
                    "{count} more node(s) would take pool {} to {} nodes, above its maxNodes {} ({} live)",
                    pool.name,
                    room.live + count,
                    bounds.max,
                    room.live
                )));
            }
            let first = if room.ledger.revision == 0 {
                room.highest_ordinal
                    .max(self.highest_reserved(&pool).await?)
            } else {
                room.ledger.ledger.next_ordinal.max(room.highest_ordinal)
            };
            let now = now_ms();
            let op_id = random_id("op");
            let planned: Vec<PlannedClaim> = (1..=u64::from(count))
                .map(|i| PlannedClaim {
                    id: random_id("c"),
                    node_name: format!("{}-{}", pool.name, first + i),
                })
                .collect();
            let op = Operation {
                version: RECORD_VERSION,
                id: op_id,
                kind: OperationKind::Create,
                pool: pool.name.clone(),
                idempotency_key: key.clone(),
                claim_ids: planned.iter().map(|p| p.id.clone()).collect(),
                state: OperationState::Running,
                reason: reason.to_string(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
                traceparent: traceparent.clone(),
                planned,
                backend: pool.backend.clone(),
                labels: self.ownership(&pool),
            };
            let next = PoolLedger {
                version: 1,
                next_ordinal: first + u64::from(count),
            };
            match self.store.write_create(&op, &room.ledger, &next).await? {
                Written::Created => {
                    tracing::info!(op = %op.id, pool = %pool.name, count, %reason, "create operation written");
                    shoal_runtime::supervise::pause_point("after-create-intent").await;
                    // The leader writes whatever this does not (it drives the op as soon as it
                    // sees it), so a failure here loses nothing.
                    if let Err(e) = self.store.materialize(&op).await {
                        tracing::warn!(op = %op.id, error = %e, "claims not all written by the request; the leader completes them");
                    }
                    return Ok(op);
                }
                Written::Exists(id) => return Ok(self.store.op(&id).await?),
                Written::Raced => continue,
            }
        }
        Err(RequestError::Unavailable(format!(
            "pool {} kept growing concurrently; retry",
            pool.name
        )))
    }

    /// The highest `<pool>-<n>` name reserved on the pool's backend (names from before ledgers).
    async fn highest_reserved(&self, pool: &Pool) -> Result<u64, RequestError> {
        Ok(self
            .store
            .reserved_names(&pool.backend)
            .await?
            .iter()
            .filter_map(|name| ordinal(&pool.name, name))
            .max()
            .unwrap_or(0))
    }

    /// Ownership labels every instance and Node of `pool` carries (claims add theirs).
    pub(crate) fn ownership(&self, pool: &Pool) -> BTreeMap<String, String> {
        let mut labels = pool.labels.clone();
        labels.insert(CLUSTER_LABEL.into(), self.cluster.clone());
        labels.insert(POOL_LABEL.into(), pool.name.clone());
        labels.remove(CLAIM_LABEL);
        labels
    }

    /// `DeleteNodes`: validates, writes the intent, then moves the claims to Draining.
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
        if nodes.len() > MAX_NODES_PER_CALL as usize {
            return Err(invalid(
                "nodes",
                format!(
                    "names {} nodes; at most {MAX_NODES_PER_CALL} per call",
                    nodes.len()
                ),
            ));
        }
        if let Some((i, _)) = nodes.iter().enumerate().find(|(_, n)| n.is_empty()) {
            return Err(invalid("nodes", format!("entry {i} is empty")));
        }
        if let Some((i, n)) = nodes.iter().enumerate().find(|(_, n)| n.len() > 253) {
            return Err(invalid(
                "nodes",
                format!(
                    "entry {i} is {} characters; a node name has at most 253",
                    n.len()
                ),
            ));
        }
        bounded("idempotencyKey", key, MAX_KEY_LEN)?;
        bounded("reason", reason, MAX_REASON_LEN)?;
        let unique: HashSet<&String> = nodes.iter().collect();
        if unique.len() != nodes.len() {
            return Err(invalid("nodes", "names a node twice"));
        }
        let key = match self.idempotency(key).await? {
            Ok(key) => key,
            Err(existing) => return Ok(existing),
        };
        let pools = self.pools_from_store().await?;
        let all = self.store.records().claims_with_revisions().await?;
        let by_node: BTreeMap<&str, &(NodeClaim, i64)> = all
            .iter()
            .filter(|(c, _)| !c.phase.is_terminal())
            .map(|entry| (entry.0.node_name.as_str(), entry))
            .collect();
        let mut chosen = Vec::new();
        for name in nodes {
            if let Some(pool) = pools.values().find(|p| p.is_permanent(name)) {
                return Err(RequestError::Precondition(format!(
                    "node {name} is a permanent node of pool {}: it is never removed",
                    pool.name
                )));
            }
            let Some(&entry) = by_node.get(name.as_str()) else {
                let exists = self.kube.get(name).await.ok().flatten().is_some();
                return Err(if exists {
                    RequestError::Precondition(format!(
                        "node {name} was not created by Shoal (no NodeClaim); remove it by hand"
                    ))
                } else {
                    RequestError::NotFound(format!("node {name} not found"))
                });
            };
            let claim = &entry.0;
            if matches!(claim.phase, ClaimPhase::Draining | ClaimPhase::Terminating) {
                return Err(RequestError::Precondition(format!(
                    "node {name} is already being removed by operation {}",
                    claim.operation_id
                )));
            }
            if !takeable(claim.phase) {
                return Err(RequestError::Precondition(format!(
                    "node {name} has not launched yet (claim {} is {:?}); retry once it has",
                    claim.id, claim.phase
                )));
            }
            chosen.push(entry.clone());
        }
        let now = now_ms();
        let op = Operation {
            version: RECORD_VERSION,
            id: random_id("op"),
            kind: OperationKind::Delete,
            pool: chosen[0].0.pool.clone(),
            idempotency_key: key,
            claim_ids: chosen.iter().map(|(c, _)| c.id.clone()).collect(),
            state: OperationState::Running,
            reason: reason.to_string(),
            created_at_ms: now,
            updated_at_ms: now,
            error: String::new(),
            traceparent,
            planned: vec![],
            backend: String::new(),
            labels: BTreeMap::new(),
        };
        match self.store.write_delete(&op).await? {
            Written::Created => {}
            Written::Exists(id) => return Ok(self.store.op(&id).await?),
            Written::Raced => {
                return Err(RequestError::Unavailable(
                    "the idempotency key changed hands concurrently; retry".into(),
                ));
            }
        }
        tracing::info!(op = %op.id, nodes = nodes.len(), %reason, "delete operation written");
        // At the revisions read above: a claim changed since is read again and taken if it
        // still can be. What this leaves undone, the leader completes from the operation.
        match self.store.take_for_delete(&op, &chosen, reason, now).await {
            Ok(taken) if taken.len() < chosen.len() => {
                tracing::warn!(op = %op.id, taken = taken.len(), asked = chosen.len(), "some nodes were taken by another operation meanwhile");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "claims not all moved by the request; the leader completes them")
            }
        }
        Ok(op)
    }
}

/// Longest idempotency key.
const MAX_KEY_LEN: usize = 128;
/// Longest reason.
const MAX_REASON_LEN: usize = 1024;

/// `value` is at most `max` bytes.
fn bounded(field: &'static str, value: &str, max: usize) -> Result<(), RequestError> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("is {} characters; at most {max}", value.len()),
        ));
    }
    Ok(())
}
