//! Shoal's durable state: the [`StateStore`] trait with an etcd implementation ([`EtcdStore`])
//! and an in-memory one of the same semantics ([`MemoryStore`]), plus per-service leader
//! election whose every write is fenced ([`election`]).
//!
//! Keys are relative to the store's namespace (default `/shoal/v1/`); see [`keys`]. The
//! records under them (claims, operations, reservations, ledgers, retention) are read and
//! written through [`records`].

pub mod cache;
pub mod election;
mod etcd;
pub mod keys;
mod memory;
pub mod records;

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;

pub use cache::PrefixCache;
pub use election::{Election, ElectionConfig, Leadership};
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use memory::MemoryStore;

/// An etcd-style revision: a store-wide counter bumped by every write.
pub type Revision = i64;

/// A lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// One stored key with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key relative to the store namespace.
    pub key: String,
    /// Raw value (versioned JSON or protobuf, never ad-hoc strings).
    pub value: Vec<u8>,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last change.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after create).
    pub version: i64,
    /// Lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// Result of a prefix range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Matching keys, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Store revision the read was served at (watch from `revision + 1` to follow on).
    pub revision: Revision,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's create revision equals `revision` (0 means the key does not exist).
    CreateRevision {
        /// Key relative to the namespace.
        key: String,
        /// Expected create revision.
        revision: Revision,
    },
    /// The key's last modification revision equals `revision` (0 means the key does not exist).
    ModRevision {
        /// Key relative to the namespace.
        key: String,
        /// Expected mod revision.
        revision: Revision,
    },
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Create or overwrite a key.
    Put {
        /// Key relative to the namespace.
        key: String,
        /// Value to store.
        value: Vec<u8>,
        /// Attach to this lease.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no-op when absent).
    Delete {
        /// Key relative to the namespace.
        key: String,
    },
}

/// All-or-nothing: if every compare holds, apply `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes applied when they hold.
    pub success: Vec<TxnOp>,
    /// Writes applied when they do not.
    pub failure: Vec<TxnOp>,
}

/// Most compares, and most writes per branch, one transaction may hold: etcd's default
/// `--max-txn-ops`. Both stores refuse bigger transactions, so code that writes more splits
/// its writes ([`chunks`]).
pub const MAX_TXN_OPS: usize = 128;

impl Txn {
    /// Refuses a transaction etcd (with default limits) would refuse.
    pub fn check_size(&self) -> Result<(), StoreError> {
        let largest = self
            .compares
            .len()
            .max(self.success.len())
            .max(self.failure.len());
        if largest > MAX_TXN_OPS {
            return Err(StoreError::Rejected(format!(
                "too many operations in txn request ({largest} > {MAX_TXN_OPS})"
            )));
        }
        Ok(())
    }
}

/// Splits `items` into groups whose writes fit one transaction, when each item takes
/// `ops_per_item` operations and the transaction has `reserved` of its own.
pub fn chunks<T>(items: &[T], ops_per_item: usize, reserved: usize) -> std::slice::Chunks<'_, T> {
    let per_txn = (MAX_TXN_OPS.saturating_sub(reserved) / ops_per_item.max(1)).max(1);
    items.chunks(per_txn)
}

/// Outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether the compares held.
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: Revision,
}

/// Kind of change a watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (explicitly, or by lease expiry).
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for deletes only `key` and `mod_revision` are meaningful.
    pub kv: KeyValue,
}

/// Events in revision order. An `Err` ends the stream; resume with `watch(prefix, last + 1)`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Errors of a state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; retrying may succeed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The requested watch revision has been compacted away; re-read and watch from the present.
    #[error("revision {requested} is compacted (oldest available: {compact_revision})")]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// Oldest revision still available.
        compact_revision: Revision,
    },
    /// The lease does not exist (it expired or was revoked).
    #[error("lease {0:?} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A leader's write was rejected because it no longer holds its election key.
    #[error("fenced: {service} leadership (term {term}) is no longer held by this replica")]
    Fenced {
        /// Service whose election this was.
        service: String,
        /// The revision that identified the lost term.
        term: Revision,
    },
    /// A request the store refused (bad key, too large, …).
    #[error("state store rejected the request: {0}")]
    Rejected(String),
    /// A stored value could not be decoded.
    #[error("value at {key} could not be decoded: {source}")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// True when retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Durable key-value state with revisions, transactions, watches and leases (etcd's model).
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Reads every key starting with `prefix`, sorted by key.
    async fn range(&self, prefix: &str) -> Result<Range, StoreError>;
    /// The keys (no values) starting with `prefix`, sorted: for trimming histories whose
    /// values are large.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .range(prefix)
            .await?
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect())
    }
    /// Writes a key; returns the new store revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;
    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Runs a compare-and-swap transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// Follows changes under `prefix` starting at `from` (inclusive; `None` = from now on).
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream, StoreError>;
    /// Creates a lease that expires after `ttl` without keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Refreshes a lease; returns its TTL as granted again.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    /// Revokes a lease, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Drops the history of every key before `revision` (watches from earlier revisions then
    /// fail with [`StoreError::Compacted`]). Compacting an already compacted revision succeeds.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
    /// The store's current revision.
    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.range(keys::CLUSTER).await?.revision)
    }
    /// How big the store's database is (etcd: the largest member's), when it can tell.
    async fn size(&self) -> Result<Option<StoreSize>, StoreError> {
        Ok(None)
    }
    /// Rewrites the database compactly, member by member, giving back the space compactions
    /// freed (etcd's defragmentation; each member pauses while it runs).
    async fn defragment(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The size of a store's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSize {
    /// Bytes the database file takes.
    pub file_bytes: i64,
    /// Bytes of it in use (the rest is free space left by compactions).
    pub in_use_bytes: i64,
}

/// A shared store handle.
pub type SharedStore = Arc<dyn StateStore>;
