//! The store's record layout and decoding, in one place: NodeClaims (`claims/<id>`), operations
//! (`ops/<id>`), idempotency keys (`idempotency/<key>` → op id), id reservations
//! (`ids/<backend>/<id>` → claim id), pool ledgers (`ledgers/<pool>`), the cluster id
//! (`cluster`), and the retention of finished records. Services read and write these records
//! through here and never parse keys or values themselves.
//!
//! Decisions and drifts are protobuf and stay with the services that own them; their
//! retention uses [`Retention`] and [`delete_in_chunks`] from here too.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation},
};

use crate::{
    Compare, KeyValue, Leadership, Revision, SharedStore, StoreError, Txn, TxnOp, chunks, keys,
};

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
        key: kv.key.clone(),
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys).
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode_all<T: serde::de::DeserializeOwned>(kvs: &[KeyValue], what: &str) -> Vec<T> {
    kvs.iter()
        .filter_map(|kv| match decode::<T>(kv) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable {what} ignored");
                None
            }
        })
        .collect()
}

/// Decodes one claim.
pub fn decode_claim(kv: &KeyValue) -> Result<NodeClaim, StoreError> {
    decode(kv)
}

/// Decodes claims, skipping (and logging) unreadable ones.
pub fn decode_claims(kvs: &[KeyValue]) -> Vec<NodeClaim> {
    decode_all(kvs, "claim")
}

/// Decodes one operation.
pub fn decode_operation(kv: &KeyValue) -> Result<Operation, StoreError> {
    decode(kv)
}

/// Decodes operations, skipping (and logging) unreadable ones.
pub fn decode_operations(kvs: &[KeyValue]) -> Vec<Operation> {
    decode_all(kvs, "operation")
}

/// A reserved backend id (a node name, a Proxmox VMID) and the claim holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Backend.
    pub backend: String,
    /// The id, unique per backend.
    pub id: String,
    /// Claim holding it.
    pub claim: String,
}

/// Decodes a reservation (`ids/<backend>/<id>` → claim id).
pub fn decode_reservation(kv: &KeyValue) -> Option<Reservation> {
    let rest = kv.key.strip_prefix(keys::IDS)?;
    let (backend, id) = rest.split_once('/')?;
    Some(Reservation {
        backend: backend.to_string(),
        id: id.to_string(),
        claim: String::from_utf8_lossy(&kv.value).into_owned(),
    })
}

/// Writes a claim.
pub fn put_claim(claim: &NodeClaim) -> TxnOp {
    TxnOp::Put {
        key: keys::claim(&claim.id),
        value: encode(claim),
        lease: None,
    }
}

/// Writes an operation.
pub fn put_operation(op: &Operation) -> TxnOp {
    TxnOp::Put {
        key: keys::operation(&op.id),
        value: encode(op),
        lease: None,
    }
}

/// Reserves `id` on `backend` for `claim`.
pub fn put_reservation(backend: &str, id: &str, claim: &str) -> TxnOp {
    TxnOp::Put {
        key: keys::reserved_id(backend, id),
        value: claim.as_bytes().to_vec(),
        lease: None,
    }
}

/// Releases `id` on `backend`.
pub fn delete_reservation(backend: &str, id: &str) -> TxnOp {
    TxnOp::Delete {
        key: keys::reserved_id(backend, id),
    }
}

/// Points idempotency key `key` at operation `op`.
pub fn put_idempotency(key: &str, op: &str) -> TxnOp {
    TxnOp::Put {
        key: keys::idempotency(key),
        value: op.as_bytes().to_vec(),
        lease: None,
    }
}

/// The record every create or adoption in a pool bumps (`ledgers/<pool>`). Its revision
/// serialises growth: a create reads it, counts the pool's live claims, and writes only if the
/// ledger is still at the revision it read, so two replicas (or two concurrent calls) can never
/// both pass `maxNodes`. It also hands out node-name ordinals, so names never collide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolLedger {
    /// Record version.
    #[serde(default)]
    pub version: u32,
    /// Next node-name ordinal (`<pool>-<n>`).
    #[serde(default)]
    pub next_ordinal: u64,
}

/// A pool ledger and the revision it was read at (0: none yet).
#[derive(Debug, Clone, Default)]
pub struct LedgerRead {
    /// The ledger.
    pub ledger: PoolLedger,
    /// Its mod revision (0 when absent).
    pub revision: Revision,
}

impl LedgerRead {
    /// The compare that holds only if nobody grew the pool since this read.
    pub fn unchanged(&self, pool: &str) -> Compare {
        Compare::ModRevision {
            key: keys::ledger(pool),
            revision: self.revision,
        }
    }
}

/// Writes a pool ledger.
pub fn put_ledger(pool: &str, ledger: &PoolLedger) -> TxnOp {
    TxnOp::Put {
        key: keys::ledger(pool),
        value: encode(ledger),
        lease: None,
    }
}

/// This store's cluster identity (`cluster`): written once, by the first service to start;
/// every instance and Node Shoal creates carries it as `shoal.dev/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// Record version.
    #[serde(default)]
    pub version: u32,
    /// The id.
    pub id: String,
    /// When it was written (Unix ms).
    #[serde(default)]
    pub created_at_ms: u64,
}

/// Why the cluster id could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterIdError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configured id is not the one the store holds.
    #[error(
        "cluster: configured {configured:?}, but this store (namespace) belongs to cluster {stored:?}; \
         use that id, leave cluster empty, or point this service at the store of its own cluster"
    )]
    Mismatch {
        /// Configured.
        configured: String,
        /// In the store.
        stored: String,
    },
}

/// Settles the cluster id: the one in the store; else `configured` (or a generated one when
/// empty), written once with create-if-absent so every service agrees on the same id.
pub async fn cluster_id(store: &SharedStore, configured: &str) -> Result<String, ClusterIdError> {
    loop {
        if let Some(kv) = store.get(keys::CLUSTER).await? {
            let stored: ClusterRecord = decode(&kv)?;
            if !configured.is_empty() && configured != stored.id {
                return Err(ClusterIdError::Mismatch {
                    configured: configured.to_string(),
                    stored: stored.id,
                });
            }
            return Ok(stored.id);
        }
        let id = if configured.is_empty() {
            format!("shoal-{:08x}", rand::random::<u32>())
        } else {
            configured.to_string()
        };
        let record = ClusterRecord {
            version: 1,
            id: id.clone(),
            created_at_ms: shoal_core::claim::now_ms(),
        };
        let outcome = store
            .txn(Txn {
                compares: vec![Compare::CreateRevision {
                    key: keys::CLUSTER.to_string(),
                    revision: 0,
                }],
                success: vec![TxnOp::Put {
                    key: keys::CLUSTER.to_string(),
                    value: encode(&record),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if outcome.succeeded {
            tracing::info!(cluster = %id, "cluster id written to the store");
            return Ok(id);
        }
        // Another service wrote it first: read theirs.
    }
}

/// Typed reads of the records.
#[derive(Clone)]
pub struct Records {
    store: SharedStore,
}

impl Records {
    /// Over `store`.
    pub fn new(store: SharedStore) -> Records {
        Records { store }
    }

    /// The raw store.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Every claim (paginated read; unreadable ones skipped).
    pub async fn claims(&self) -> Result<Vec<NodeClaim>, StoreError> {
        Ok(decode_claims(&self.store.range(keys::CLAIMS).await?.kvs))
    }

    /// Every claim with its revision (paginated read; unreadable ones skipped).
    pub async fn claims_with_revisions(&self) -> Result<Vec<(NodeClaim, Revision)>, StoreError> {
        Ok(self
            .store
            .range(keys::CLAIMS)
            .await?
            .kvs
            .iter()
            .filter_map(|kv| match decode::<NodeClaim>(kv) {
                Ok(c) => Some((c, kv.mod_revision)),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable claim ignored");
                    None
                }
            })
            .collect())
    }

    /// One claim and its revision.
    pub async fn claim(&self, id: &str) -> Result<Option<(NodeClaim, Revision)>, StoreError> {
        match self.store.get(&keys::claim(id)).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every operation.
    pub async fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        Ok(decode_operations(
            &self.store.range(keys::OPERATIONS).await?.kvs,
        ))
    }

    /// One operation.
    pub async fn operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        match self.store.get(&keys::operation(id)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// The operation an idempotency key names, if any.
    pub async fn op_for_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .get(&keys::idempotency(key))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Every reservation.
    pub async fn reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        Ok(self
            .store
            .range(keys::IDS)
            .await?
            .kvs
            .iter()
            .filter_map(decode_reservation)
            .collect())
    }

    /// A pool's ledger as of now.
    pub async fn ledger(&self, pool: &str) -> Result<LedgerRead, StoreError> {
        match self.store.get(&keys::ledger(pool)).await? {
            Some(kv) => Ok(LedgerRead {
                ledger: decode(&kv)?,
                revision: kv.mod_revision,
            }),
            None => Ok(LedgerRead::default()),
        }
    }
}

/// How long, and how many, finished records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// Finished records older than this are removed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// At most this many finished records are kept (the newest).
    pub max_count: usize,
}

impl Retention {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut shoal_core::ValidationErrors) {
        if self.max_age < Duration::from_secs(1) || self.max_age > Duration::from_secs(90 * 86400) {
            errors.add(format!("{path}.maxAge"), "must be between 1s and 90d");
        }
        if !(1..=1_000_000).contains(&self.max_count) {
            errors.add(format!("{path}.maxCount"), "must be between 1 and 1000000");
        }
    }

    /// Of `finished` (key, finished at in Unix ms), the keys to remove at `now_ms`: every one
    /// older than `max_age`, and the oldest beyond `max_count`.
    pub fn expired(&self, mut finished: Vec<(String, u64)>, now_ms: u64) -> Vec<String> {
        finished.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let cutoff = now_ms.saturating_sub(self.max_age.as_millis() as u64);
        finished
            .into_iter()
            .enumerate()
            .filter(|(i, (_, at))| *i >= self.max_count || *at < cutoff)
            .map(|(_, (key, _))| key)
            .collect()
    }
}

/// Deletes `keys` in transactions etcd accepts, fenced by `leadership` when given. Returns how
/// many were deleted; stops at the first failure.
pub async fn delete_in_chunks(
    store: &SharedStore,
    leadership: Option<&Leadership>,
    keys: &[String],
) -> Result<usize, StoreError> {
    let mut deleted = 0;
    // One slot is kept for the fence's own compare.
    for chunk in chunks(keys, 1, 1) {
        let txn = Txn {
            compares: vec![],
            success: chunk
                .iter()
                .map(|k| TxnOp::Delete { key: k.clone() })
                .collect(),
            failure: vec![],
        };
        match leadership {
            Some(l) => l.fenced_txn(txn).await?,
            None => store.txn(txn).await?,
        };
        deleted += chunk.len();
    }
    Ok(deleted)
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// History before this revision is gone.
    pub revision: Revision,
    /// The database was defragmented afterwards.
    pub defragmented: bool,
    /// Its size after all that, when the store can tell.
    pub size: Option<crate::StoreSize>,
}

/// Compacts the store's history to `keep` revisions before the current one (only while
/// `leadership` holds: one replica does it), then, when the database file has grown past
/// `defragment_above` times the bytes in use (0: never), defragments it so the file shrinks to
/// what is kept.
pub async fn compact_history(
    store: &SharedStore,
    leadership: &Leadership,
    keep: u64,
    defragment_above: f64,
) -> Result<Option<Compacted>, StoreError> {
    let current = store.revision().await?;
    let target = current - keep as Revision;
    if target <= 1 || !leadership.is_held() {
        return Ok(None);
    }
    store.compact(target).await?;
    let mut size = store.size().await?;
    let mut defragmented = false;
    if let Some(s) = size
        && defragment_above > 0.0
        && s.in_use_bytes > 0
        && s.file_bytes as f64 > defragment_above * s.in_use_bytes as f64
        && leadership.is_held()
    {
        store.defragment().await?;
        defragmented = true;
        size = store.size().await?;
    }
    Ok(Some(Compacted {
        revision: target,
        defragmented,
        size,
    }))
}

/// What retention removes from the provisioner's records in one sweep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Finished operations and their idempotency keys.
    pub operations: Vec<String>,
    /// Finished (Deleted or Failed) claims no running operation still references.
    pub claims: Vec<String>,
}

impl Sweep {
    /// Every key to delete.
    pub fn keys(&self) -> Vec<String> {
        self.operations
            .iter()
            .chain(&self.claims)
            .cloned()
            .collect()
    }
}

/// Plans one retention sweep over claims and operations (pure): finished operations beyond
/// `ops` go with their idempotency keys; terminal claims beyond `claims` go unless an operation
/// still running lists them.
pub fn plan_sweep(
    all_claims: &[NodeClaim],
    all_ops: &[Operation],
    claims: &Retention,
    ops: &Retention,
    now_ms: u64,
) -> Sweep {
    let running: std::collections::HashSet<&str> = all_ops
        .iter()
        .filter(|o| !o.is_finished())
        .flat_map(|o| o.claim_ids.iter().map(String::as_str))
        .collect();
    let finished_ops: Vec<(String, u64)> = all_ops
        .iter()
        .filter(|o| o.is_finished())
        .map(|o| (o.id.clone(), o.updated_at_ms))
        .collect();
    let expired_ops = ops.expired(finished_ops, now_ms);
    let by_id: std::collections::HashMap<&str, &Operation> =
        all_ops.iter().map(|o| (o.id.as_str(), o)).collect();
    let mut op_keys = Vec::new();
    for id in expired_ops {
        if let Some(op) = by_id.get(id.as_str()) {
            op_keys.push(keys::operation(&op.id));
            op_keys.push(keys::idempotency(&op.idempotency_key));
        }
    }
    let finished_claims: Vec<(String, u64)> = all_claims
        .iter()
        .filter(|c| {
            matches!(c.phase, ClaimPhase::Deleted | ClaimPhase::Failed)
                && !running.contains(c.id.as_str())
        })
        .map(|c| (c.id.clone(), c.updated_at_ms))
        .collect();
    Sweep {
        operations: op_keys,
        claims: claims
            .expired(finished_claims, now_ms)
            .iter()
            .map(|id| keys::claim(id))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_within_age_and_count() {
        let r = Retention {
            max_age: Duration::from_secs(60),
            max_count: 2,
        };
        let now = 1_000_000;
        let items = vec![
            ("a".to_string(), now - 1_000),
            ("b".to_string(), now - 2_000),
            ("c".to_string(), now - 3_000),
            ("old".to_string(), now - 120_000),
        ];
        let mut gone = r.expired(items, now);
        gone.sort();
        assert_eq!(gone, ["c", "old"]);
        let generous = Retention {
            max_age: Duration::from_secs(600),
            max_count: 10,
        };
        assert!(generous.expired(vec![("a".into(), now)], now).is_empty());
    }

    #[test]
    fn reservations_decode_from_their_keys() {
        let kv = KeyValue {
            key: "ids/proxmox/105".into(),
            value: b"c-1".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        };
        assert_eq!(
            decode_reservation(&kv),
            Some(Reservation {
                backend: "proxmox".into(),
                id: "105".into(),
                claim: "c-1".into()
            })
        );
        let bad = KeyValue {
            key: "ids/nobackend".into(),
            ..kv
        };
        assert_eq!(decode_reservation(&bad), None);
    }
}
