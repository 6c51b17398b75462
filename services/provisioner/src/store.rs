//! The provisioner's records in the state store: operations (`ops/<id>`), NodeClaims
//! (`claims/<id>`), idempotency keys (`idempotency/<key>` → op id) and node-name reservations
//! (`ids/<backend>/<name>` → claim id). A new operation, its claims, its key and its names are
//! written in one transaction *before* any backend is called; every later claim change is a
//! compare-and-swap on the claim's revision, fenced by the leader's term.

use std::collections::{BTreeMap, BTreeSet};

use shoal_core::claim::{NodeClaim, Operation};
use shoal_state::{Compare, KeyValue, Leadership, SharedStore, StoreError, Txn, TxnOp, keys};

/// Why a provisioner store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (or leadership was lost mid-write: fenced).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value could not be decoded.
    #[error("{key} holds an unreadable value: {reason}")]
    Corrupt {
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
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
    /// Another writer took one of the names or changed a claim first: allocate again.
    Raced,
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
    serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes claims, skipping (and logging) unreadable ones.
pub fn decode_claims(kvs: &[KeyValue]) -> Vec<NodeClaim> {
    kvs.iter()
        .filter_map(|kv| match decode::<NodeClaim>(kv) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable claim ignored");
                None
            }
        })
        .collect()
}

/// Decodes operations, skipping (and logging) unreadable ones.
pub fn decode_ops(kvs: &[KeyValue]) -> Vec<Operation> {
    kvs.iter()
        .filter_map(|kv| match decode::<Operation>(kv) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable operation ignored");
                None
            }
        })
        .collect()
}

/// The writes of a new operation: its key (only if the key is unused) and the record.
fn new_operation(op: &Operation) -> (Vec<Compare>, Vec<TxnOp>) {
    let compares = vec![Compare::CreateRevision {
        key: keys::idempotency(&op.idempotency_key),
        revision: 0,
    }];
    let success = vec![
        TxnOp::Put {
            key: keys::idempotency(&op.idempotency_key),
            value: op.id.as_bytes().to_vec(),
            lease: None,
        },
        TxnOp::Put {
            key: keys::operation(&op.id),
            value: encode(op),
            lease: None,
        },
    ];
    (compares, success)
}

/// The puts of a claim and of its name reservation (`ids/<backend>/<name>` → claim id).
fn claim_with_name(backend: &str, claim: &NodeClaim) -> [TxnOp; 2] {
    [
        TxnOp::Put {
            key: keys::reserved_id(backend, &claim.node_name),
            value: claim.id.as_bytes().to_vec(),
            lease: None,
        },
        TxnOp::Put {
            key: keys::claim(&claim.id),
            value: encode(claim),
            lease: None,
        },
    ]
}

/// Store access for the provisioner.
#[derive(Clone)]
pub struct ClaimStore {
    store: SharedStore,
}

impl ClaimStore {
    /// Over `store`.
    pub fn new(store: SharedStore) -> ClaimStore {
        ClaimStore { store }
    }

    /// The operation an idempotency key names, if any.
    pub async fn op_for_key(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(self
            .store
            .get(&keys::idempotency(key))
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// One operation.
    pub async fn op(&self, id: &str) -> Result<Operation, Error> {
        match self.store.get(&keys::operation(id)).await? {
            Some(kv) => decode(&kv),
            None => Err(Error::NotFound(format!("operation {id}"))),
        }
    }

    /// One claim and its revision.
    pub async fn claim(&self, id: &str) -> Result<(NodeClaim, i64), Error> {
        match self.store.get(&keys::claim(id)).await? {
            Some(kv) => Ok((decode(&kv)?, kv.mod_revision)),
            None => Err(Error::NotFound(format!("claim {id}"))),
        }
    }

    /// Names reserved on `backend` (a name stays reserved until its claim is Deleted or Failed
    /// and its instance is gone).
    pub async fn reserved_names(&self, backend: &str) -> Result<BTreeSet<String>, Error> {
        let prefix = keys::reserved_id(backend, "");
        Ok(self
            .store
            .range(&prefix)
            .await?
            .kvs
            .into_iter()
            .map(|kv| kv.key[prefix.len()..].to_string())
            .collect())
    }

    /// Writes a new create operation with its claims, key and name reservations, all or nothing.
    pub async fn create(
        &self,
        op: &Operation,
        claims: &[NodeClaim],
        backend: &str,
    ) -> Result<Written, Error> {
        let (mut compares, mut success) = new_operation(op);
        for claim in claims {
            let name_key = keys::reserved_id(backend, &claim.node_name);
            compares.push(Compare::CreateRevision {
                key: name_key,
                revision: 0,
            });
            success.extend(claim_with_name(backend, claim));
        }
        self.write_new(op, compares, success).await
    }

    /// Writes an adopted claim with its create operation, all or nothing: the claim must not
    /// exist, and its name must be free or still reserved for the same claim id.
    pub async fn adopt(
        &self,
        op: &Operation,
        claim: &NodeClaim,
        backend: &str,
    ) -> Result<Written, Error> {
        let (mut compares, mut success) = new_operation(op);
        let name_key = keys::reserved_id(backend, &claim.node_name);
        let reserved = match self.store.get(&name_key).await? {
            None => 0,
            Some(kv) if kv.value == claim.id.as_bytes() => kv.mod_revision,
            Some(_) => return Ok(Written::Raced),
        };
        // Revision 0: still absent.
        compares.push(Compare::ModRevision {
            key: name_key,
            revision: reserved,
        });
        compares.push(Compare::CreateRevision {
            key: keys::claim(&claim.id),
            revision: 0,
        });
        success.extend(claim_with_name(backend, claim));
        self.write_new(op, compares, success).await
    }

    /// Writes a new delete operation and moves its claims to Draining, all or nothing: each
    /// claim must still be at the revision the caller read.
    pub async fn delete(
        &self,
        op: &Operation,
        claims: &[(NodeClaim, i64)],
    ) -> Result<Written, Error> {
        let (mut compares, mut success) = new_operation(op);
        for (claim, revision) in claims {
            compares.push(Compare::ModRevision {
                key: keys::claim(&claim.id),
                revision: *revision,
            });
            success.push(TxnOp::Put {
                key: keys::claim(&claim.id),
                value: encode(claim),
                lease: None,
            });
        }
        self.write_new(op, compares, success).await
    }

    async fn write_new(
        &self,
        op: &Operation,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
    ) -> Result<Written, Error> {
        let outcome = self
            .store
            .txn(Txn {
                compares,
                success,
                failure: vec![],
            })
            .await?;
        if outcome.succeeded {
            return Ok(Written::Created);
        }
        Ok(match self.op_for_key(&op.idempotency_key).await? {
            Some(existing) => Written::Exists(existing),
            None => Written::Raced,
        })
    }

    /// Read-modify-write of a claim as the leader: `edit` returns false to leave it unchanged.
    /// Returns the claim as stored afterwards. `release` also drops its name reservation.
    pub async fn update_claim(
        &self,
        leadership: &Leadership,
        id: &str,
        mut edit: impl FnMut(&mut NodeClaim) -> bool,
    ) -> Result<NodeClaim, Error> {
        for _ in 0..20 {
            let (mut claim, revision) = self.claim(id).await?;
            if !edit(&mut claim) {
                return Ok(claim);
            }
            let mut success = vec![TxnOp::Put {
                key: keys::claim(id),
                value: encode(&claim),
                lease: None,
            }];
            if claim.phase.is_terminal() {
                success.push(TxnOp::Delete {
                    key: keys::reserved_id(&claim.backend, &claim.node_name),
                });
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
            .fenced_put(&keys::operation(&op.id), encode(op))
            .await?;
        Ok(())
    }

    /// Drops a name reservation.
    pub async fn release_name(&self, backend: &str, name: &str) -> Result<(), Error> {
        self.store.delete(&keys::reserved_id(backend, name)).await?;
        Ok(())
    }

    /// Every claim, by id.
    pub async fn all_claims(&self) -> Result<BTreeMap<String, NodeClaim>, Error> {
        Ok(decode_claims(&self.store.range(keys::CLAIMS).await?.kvs)
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect())
    }
}
