//! The provisioner's transactions. Record layout and decoding live in
//! [`shoal_state::records`]; this module decides what is written together:
//!
//! - a create's *intent* — operation, idempotency key and a bump of the pool ledger — is one
//!   small transaction whatever the count; the ledger compare makes `maxNodes` hold across
//!   replicas. Its claims (with their name reservations) follow in chunks etcd accepts
//!   ([`ClaimStore::materialize`]), written by the request and, if it stopped half way, by the
//!   leader from the operation's `planned` list;
//! - a delete's intent — operation and key — likewise; its claims are moved to Draining in
//!   chunks, each a compare-and-swap on the claim's revision;
//! - every later claim change is a compare-and-swap fenced by the leader's term.

use std::collections::{BTreeMap, HashSet};

use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation},
};
use shoal_state::{
    Compare, Leadership, Revision, SharedStore, StoreError, Txn, chunks, keys,
    records::{self, LedgerRead, PoolLedger, Records},
};

/// Why a provisioner store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (or leadership was lost mid-write: fenced), or a record is unreadable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The record kept changing under us.
    #[error("{0} changed concurrently too often; try again")]
    Contended(String),
}

/// Outcome of writing a new operation.
#[derive(Debug)]
pub enum Written {
    /// Stored.
    Created,
    /// The idempotency key names this existing operation.
    Exists(String),
    /// Another writer grew the pool (or changed a claim) first: read again and retry.
    Raced,
}

/// Store access for the provisioner.
#[derive(Clone)]
pub struct ClaimStore {
    records: Records,
}

/// A claim a delete may take: still running and not being removed already.
pub fn takeable(phase: ClaimPhase) -> bool {
    matches!(
        phase,
        ClaimPhase::Launched | ClaimPhase::Registered | ClaimPhase::Ready
    )
}

impl ClaimStore {
    /// Over `store`.
    pub fn new(store: SharedStore) -> ClaimStore {
        ClaimStore {
            records: Records::new(store),
        }
    }

    /// Typed reads.
    pub fn records(&self) -> &Records {
        &self.records
    }

    fn store(&self) -> &SharedStore {
        self.records.store()
    }

    /// The operation an idempotency key names, if any.
    pub async fn op_for_key(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self.records.op_for_key(key).await?)
    }

    /// One operation.
    pub async fn op(&self, id: &str) -> Result<Operation, Error> {
        self.records
            .operation(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("operation {id}")))
    }

    /// One claim and its revision.
    pub async fn claim(&self, id: &str) -> Result<(NodeClaim, Revision), Error> {
        self.records
            .claim(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("claim {id}")))
    }

    /// Every claim, by id (a fresh, paginated read).
    pub async fn all_claims(&self) -> Result<BTreeMap<String, NodeClaim>, Error> {
        Ok(self
            .records
            .claims()
            .await?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect())
    }

    /// Writes a create's intent: the operation and its idempotency key, and the pool ledger as
    /// `next`, only if the key is unused and the ledger is still as read.
    pub async fn write_create(
        &self,
        op: &Operation,
        ledger: &LedgerRead,
        next: &PoolLedger,
    ) -> Result<Written, Error> {
        let txn = Txn {
            compares: vec![key_unused(op), ledger.unchanged(&op.pool)],
            success: vec![
                records::put_idempotency(&op.idempotency_key, &op.id),
                records::put_operation(op),
                records::put_ledger(&op.pool, next),
            ],
            failure: vec![],
        };
        self.write_new(op, txn).await
    }

    /// Writes the planned claims of create `op` that are not written yet, with their name
    /// reservations, in chunks; safe to run by several writers at once. Returns how many this
    /// call wrote.
    pub async fn materialize(&self, op: &Operation) -> Result<usize, Error> {
        let mut written = 0;
        // Two compares and two writes per claim.
        for chunk in chunks(&op.planned, 2, 0) {
            let mut todo: Vec<NodeClaim> = chunk.iter().map(|p| op.planned_claim(p)).collect();
            for _ in 0..5 {
                if todo.is_empty() {
                    break;
                }
                let mut compares = Vec::with_capacity(todo.len() * 2);
                let mut success = Vec::with_capacity(todo.len() * 2);
                for claim in &todo {
                    compares.push(Compare::CreateRevision {
                        key: keys::claim(&claim.id),
                        revision: 0,
                    });
                    compares.push(Compare::CreateRevision {
                        key: keys::reserved_id(&claim.backend, &claim.node_name),
                        revision: 0,
                    });
                    success.push(records::put_claim(claim));
                    success.push(records::put_reservation(
                        &claim.backend,
                        &claim.node_name,
                        &claim.id,
                    ));
                }
                let outcome = self
                    .store()
                    .txn(Txn {
                        compares,
                        success,
                        failure: vec![],
                    })
                    .await?;
                if outcome.succeeded {
                    written += todo.len();
                    todo.clear();
                    break;
                }
                // Someone wrote some of them (the leader resuming, or the request itself): keep
                // only the claims still absent. A name held by another claim fails its claim.
                let mut still = Vec::new();
                for claim in todo {
                    if self.records.claim(&claim.id).await?.is_some() {
                        continue;
                    }
                    let name = keys::reserved_id(&claim.backend, &claim.node_name);
                    match self.store().get(&name).await? {
                        Some(kv) if kv.value != claim.id.as_bytes() => {
                            let holder = String::from_utf8_lossy(&kv.value).into_owned();
                            let mut failed = claim.clone();
                            let _ = failed.transition(
                                ClaimPhase::Failed,
                                format!(
                                    "node name {} is reserved by claim {holder}",
                                    claim.node_name
                                ),
                                claim.created_at_ms,
                            );
                            let txn = Txn {
                                compares: vec![Compare::CreateRevision {
                                    key: keys::claim(&claim.id),
                                    revision: 0,
                                }],
                                success: vec![records::put_claim(&failed)],
                                failure: vec![],
                            };
                            self.store().txn(txn).await?;
                        }
                        _ => still.push(claim),
                    }
                }
                todo = still;
            }
            if !todo.is_empty() {
                return Err(Error::Contended(format!(
                    "claims of operation {} ({} left)",
                    op.id,
                    todo.len()
                )));
            }
        }
        Ok(written)
    }

    /// Writes a delete's intent: the operation and its idempotency key.
    pub async fn write_delete(&self, op: &Operation) -> Result<Written, Error> {
        let txn = Txn {
            compares: vec![key_unused(op)],
            success: vec![
                records::put_idempotency(&op.idempotency_key, &op.id),
                records::put_operation(op),
            ],
            failure: vec![],
        };
        self.write_new(op, txn).await
    }

    /// Moves `claims` (as read, with their revisions) to Draining under delete `op`, in
    /// chunks; a claim changed meanwhile is read again and taken if still takeable. Returns the
    /// ids this call moved.
    pub async fn take_for_delete(
        &self,
        op: &Operation,
        claims: &[(NodeClaim, Revision)],
        reason: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, Error> {
        let mut taken = Vec::new();
        for chunk in chunks(claims, 1, 0) {
            let mut compares = Vec::with_capacity(chunk.len());
            let mut success = Vec::with_capacity(chunk.len());
            for (claim, revision) in chunk {
                let mut claim = claim.clone();
                claim.operation_id = op.id.clone();
                let _ = claim.transition(ClaimPhase::Draining, reason, now_ms);
                compares.push(Compare::ModRevision {
                    key: keys::claim(&claim.id),
                    revision: *revision,
                });
                success.push(records::put_claim(&claim));
            }
            let outcome = self
                .store()
                .txn(Txn {
                    compares,
                    success,
                    failure: vec![],
                })
                .await?;
            if outcome.succeeded {
                taken.extend(chunk.iter().map(|(c, _)| c.id.clone()));
                continue;
            }
            for (claim, _) in chunk {
                if self.take_one(op, &claim.id, reason, now_ms).await? {
                    taken.push(claim.id.clone());
                }
            }
        }
        Ok(taken)
    }

    /// Moves one claim to Draining under `op` if it is still takeable (unfenced CAS: a request
    /// may do this, as the intent is already written). True when this call moved it.
    pub async fn take_one(
        &self,
        op: &Operation,
        id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, Error> {
        for _ in 0..20 {
            let Some((mut claim, revision)) = self.records.claim(id).await? else {
                return Ok(false);
            };
            if !takeable(claim.phase) || claim.operation_id == op.id {
                return Ok(false);
            }
            claim.operation_id = op.id.clone();
            let _ = claim.transition(ClaimPhase::Draining, reason, now_ms);
            let outcome = self
                .store()
                .txn(Txn {
                    compares: vec![Compare::ModRevision {
                        key: keys::claim(id),
                        revision,
                    }],
                    success: vec![records::put_claim(&claim)],
                    failure: vec![],
                })
                .await?;
            if outcome.succeeded {
                return Ok(true);
            }
        }
        Err(Error::Contended(format!("claim {id}")))
    }

    /// Writes an adopted claim with its create operation, all or nothing: the claim must not
    /// exist, its name must be free or still reserved for the same claim id, and the pool
    /// ledger must be as read (adoption grows the pool like a create).
    pub async fn adopt(
        &self,
        op: &Operation,
        claim: &NodeClaim,
        ledger: &LedgerRead,
    ) -> Result<Written, Error> {
        let name_key = keys::reserved_id(&claim.backend, &claim.node_name);
        let reserved = match self.store().get(&name_key).await? {
            None => 0,
            Some(kv) if kv.value == claim.id.as_bytes() => kv.mod_revision,
            Some(_) => return Ok(Written::Raced),
        };
        let txn = Txn {
            compares: vec![
                key_unused(op),
                ledger.unchanged(&op.pool),
                // Revision 0: still absent.
                Compare::ModRevision {
                    key: name_key,
                    revision: reserved,
                },
                Compare::CreateRevision {
                    key: keys::claim(&claim.id),
                    revision: 0,
                },
            ],
            success: vec![
                records::put_idempotency(&op.idempotency_key, &op.id),
                records::put_operation(op),
                records::put_ledger(&op.pool, &ledger.ledger),
                records::put_reservation(&claim.backend, &claim.node_name, &claim.id),
                records::put_claim(claim),
            ],
            failure: vec![],
        };
        self.write_new(op, txn).await
    }

    async fn write_new(&self, op: &Operation, txn: Txn) -> Result<Written, Error> {
        if self.store().txn(txn).await?.succeeded {
            return Ok(Written::Created);
        }
        Ok(match self.op_for_key(&op.idempotency_key).await? {
            Some(existing) => Written::Exists(existing),
            None => Written::Raced,
        })
    }

    /// Read-modify-write of a claim as the leader: `edit` returns false to leave it unchanged.
    /// Returns the claim as stored afterwards. A claim turning terminal releases its name.
    pub async fn update_claim(
        &self,
        leadership: &Leadership,
        id: &str,
        mut edit: impl FnMut(&mut NodeClaim) -> bool,
    ) -> Result<NodeClaim, Error> {
        for _ in 0..20 {
            let (mut claim, revision) = self.claim(id).await?;
            let reserved = claim.node_name.clone();
            if !edit(&mut claim) {
                return Ok(claim);
            }
            let mut success = vec![records::put_claim(&claim)];
            // The node registered under a name of its backend's choosing: the reservation
            // moves with it.
            if claim.node_name != reserved {
                success.push(records::delete_reservation(&claim.backend, &reserved));
                if !claim.phase.is_terminal() {
                    success.push(records::put_reservation(
                        &claim.backend,
                        &claim.node_name,
                        &claim.id,
                    ));
                }
            }
            if claim.phase.is_terminal() {
                success.push(records::delete_reservation(
                    &claim.backend,
                    &claim.node_name,
                ));
            }
            let outcome = leadership
                .fenced_txn(Txn {
                    compares: vec![Compare::ModRevision {
                        key: keys::claim(id),
                        revision,
                    }],
                    success,
                    failure: vec![],
                })
                .await?;
            if outcome.succeeded {
                return Ok(claim);
            }
        }
        Err(Error::Contended(format!("claim {id}")))
    }

    /// Writes an operation as the leader.
    pub async fn put_op(&self, leadership: &Leadership, op: &Operation) -> Result<(), Error> {
        leadership
            .fenced_txn(Txn {
                compares: vec![],
                success: vec![records::put_operation(op)],
                failure: vec![],
            })
            .await?;
        Ok(())
    }

    /// Drops a name reservation.
    pub async fn release_name(&self, backend: &str, name: &str) -> Result<(), Error> {
        self.store()
            .delete(&keys::reserved_id(backend, name))
            .await?;
        Ok(())
    }

    /// Names reserved on `backend`.
    pub async fn reserved_names(&self, backend: &str) -> Result<HashSet<String>, Error> {
        Ok(self
            .records
            .reservations()
            .await?
            .into_iter()
            .filter(|r| r.backend == backend)
            .map(|r| r.id)
            .collect())
    }
}

fn key_unused(op: &Operation) -> Compare {
    Compare::CreateRevision {
        key: keys::idempotency(&op.idempotency_key),
        revision: 0,
    }
}
