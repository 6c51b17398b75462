//! The decider's state in the store: NodePools (`pools/<name>`, protobuf, revisioned), the
//! decision history (`decisions/<ms>-<id>`, protobuf, bounded), the planner's history
//! (`decider/history`, JSON) and the pause switch (`decider/paused`, JSON). Pool writes are
//! compare-and-swap on the caller's revision; leader writes are fenced by the caller.

use std::time::SystemTime;

use prost::Message;
use serde::{Deserialize, Serialize};
use shoal_core::{ValidationErrors, pool::Pool, snapshot::timestamp};
use shoal_proto::v1 as pb;
use shoal_state::{Compare, KeyValue, SharedStore, StoreError, Txn, TxnOp, keys};

use crate::planner::History;

/// Why a decider store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
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
    /// The pool is invalid.
    #[error("invalid NodePool: {0}")]
    Invalid(#[from] ValidationErrors),
    /// No such pool.
    #[error("pool {0} not found")]
    NotFound(String),
    /// The pool changed since the revision the caller read.
    #[error("pool {name} is at revision {actual}, not {expected}: read it again and retry")]
    Conflict {
        /// Pool.
        name: String,
        /// Caller's revision.
        expected: i64,
        /// Stored revision (0: absent).
        actual: i64,
    },
    /// The pool still has nodes.
    #[error(
        "pool {name} still has {count} live node claim(s) ({examples}); let it scale to zero (minNodes: 0) before deleting it"
    )]
    InUse {
        /// Pool.
        name: String,
        /// Live claims.
        count: usize,
        /// A few claim ids.
        examples: String,
    },
}

/// The pause switch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseRecord {
    /// Paused.
    pub paused: bool,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Since (Unix ms).
    #[serde(default)]
    pub since_ms: u64,
}

/// A stored pool with its revision filled in.
pub fn decode_pool(kv: &KeyValue) -> Result<pb::NodePool, Error> {
    let mut pool = pb::NodePool::decode(kv.value.as_slice()).map_err(|e| Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    pool.revision = kv.mod_revision;
    Ok(pool)
}

/// A stored decision.
pub fn decode_decision(kv: &KeyValue) -> Result<pb::Decision, Error> {
    pb::Decision::decode(kv.value.as_slice()).map_err(|e| Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

/// Valid pools among stored ones; invalid ones are logged and skipped (they were valid when
/// written, so this means a newer version wrote them).
pub fn valid_pools(kvs: &[KeyValue]) -> Vec<Pool> {
    kvs.iter()
        .filter_map(|kv| match decode_pool(kv) {
            Ok(p) => match Pool::from_proto(&p) {
                Ok(pool) => Some(pool),
                Err(err) => {
                    tracing::warn!(pool = %p.name, error = %err, "stored pool is invalid; ignored");
                    None
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "stored pool is unreadable; ignored");
                None
            }
        })
        .collect()
}

/// Store access for the decider.
#[derive(Clone)]
pub struct DeciderStore {
    store: SharedStore,
}

impl DeciderStore {
    /// Over `store`.
    pub fn new(store: SharedStore) -> DeciderStore {
        DeciderStore { store }
    }

    /// The raw store.
    pub fn raw(&self) -> &SharedStore {
        &self.store
    }

    /// Every stored pool.
    pub async fn list_pools(&self) -> Result<Vec<pb::NodePool>, Error> {
        self.store
            .range(keys::POOLS)
            .await?
            .kvs
            .iter()
            .map(decode_pool)
            .collect()
    }

    /// One pool.
    pub async fn get_pool(&self, name: &str) -> Result<pb::NodePool, Error> {
        match self.store.get(&keys::pool(name)).await? {
            Some(kv) => decode_pool(&kv),
            None => Err(Error::NotFound(name.to_string())),
        }
    }

    /// Validates and stores `pool`. With `expected_revision` non-zero the write happens only if
    /// the stored revision still equals it (0 = create only if absent is *not* implied: use the
    /// revision you read). An unchanged spec is not rewritten.
    pub async fn apply_pool(
        &self,
        mut pool: pb::NodePool,
        expected_revision: i64,
    ) -> Result<pb::NodePool, Error> {
        Pool::from_proto(&pool)?;
        let key = keys::pool(&pool.name);
        let current = self.store.get(&key).await?;
        let actual = current.as_ref().map_or(0, |kv| kv.mod_revision);
        if expected_revision != 0 && expected_revision != actual {
            return Err(Error::Conflict {
                name: pool.name.clone(),
                expected: expected_revision,
                actual,
            });
        }
        if let Some(kv) = &current {
            let stored = decode_pool(kv)?;
            if stored.spec == pool.spec {
                return Ok(stored);
            }
        }
        pool.revision = 0;
        pool.updated_at = Some(timestamp(SystemTime::now()));
        let outcome = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: actual,
                }],
                success: vec![TxnOp::Put {
                    key,
                    value: pool.encode_to_vec(),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if !outcome.succeeded {
            let now = self
                .store
                .get(&keys::pool(&pool.name))
                .await?
                .map_or(0, |kv| kv.mod_revision);
            return Err(Error::Conflict {
                name: pool.name,
                expected: actual,
                actual: now,
            });
        }
        pool.revision = outcome.revision;
        Ok(pool)
    }

    /// Deletes a pool that has no live claims.
    pub async fn delete_pool(&self, name: &str, expected_revision: i64) -> Result<(), Error> {
        let key = keys::pool(name);
        let Some(current) = self.store.get(&key).await? else {
            return Err(Error::NotFound(name.to_string()));
        };
        if expected_revision != 0 && expected_revision != current.mod_revision {
            return Err(Error::Conflict {
                name: name.to_string(),
                expected: expected_revision,
                actual: current.mod_revision,
            });
        }
        let live: Vec<String> = shoal_state::records::Records::new(self.store.clone())
            .claims()
            .await?
            .into_iter()
            .filter(|c| c.pool == name && !c.phase.is_terminal())
            .map(|c| c.id)
            .collect();
        if !live.is_empty() {
            return Err(Error::InUse {
                name: name.to_string(),
                count: live.len(),
                examples: live.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let outcome = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision {
                    key: key.clone(),
                    revision: current.mod_revision,
                }],
                success: vec![TxnOp::Delete { key }],
                failure: vec![],
            })
            .await?;
        if outcome.succeeded {
            Ok(())
        } else {
            Err(Error::Conflict {
                name: name.to_string(),
                expected: current.mod_revision,
                actual: -1,
            })
        }
    }

    /// The planner history (empty when none is stored).
    pub async fn history(&self) -> Result<History, Error> {
        match self.store.get(keys::DECIDER_HISTORY).await? {
            Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                key: kv.key,
                reason: e.to_string(),
            }),
            None => Ok(History::default()),
        }
    }

    /// The pause switch.
    pub async fn paused(&self) -> Result<PauseRecord, Error> {
        match self.store.get(keys::DECIDER_PAUSED).await? {
            Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
                key: kv.key,
                reason: e.to_string(),
            }),
            None => Ok(PauseRecord::default()),
        }
    }

    /// Sets the pause switch.
    pub async fn set_paused(&self, record: &PauseRecord) -> Result<(), Error> {
        let value = serde_json::to_vec(record).map_err(|e| Error::Corrupt {
            key: keys::DECIDER_PAUSED.into(),
            reason: e.to_string(),
        })?;
        self.store.put(keys::DECIDER_PAUSED, value, None).await?;
        Ok(())
    }

    /// Stored decisions, oldest first.
    pub async fn decisions(&self) -> Result<Vec<(String, pb::Decision)>, Error> {
        self.store
            .range(keys::DECISIONS)
            .await?
            .kvs
            .iter()
            .map(|kv| Ok((kv.key.clone(), decode_decision(kv)?)))
            .collect()
    }
}
