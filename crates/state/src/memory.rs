//! In-memory [`StateStore`] with etcd's semantics (revisions, compare-on-revision transactions,
//! ordered watches from a revision, leases that delete their keys). Used by `shoal demo` and unit
//! tests; the conformance suite holds it to the same behaviour as etcd.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Range, Revision, StateStore, StoreError, Txn, TxnOp,
    TxnOutcome, WatchEvent, WatchStream,
};

/// How many past events are kept for watches that resume from a revision.
const DEFAULT_HISTORY: usize = 100_000;

/// An in-memory store; clones share the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchEvent, StoreError>>,
}

struct Inner {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Highest revision no longer in `history`.
    compacted: Revision,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    watchers: Vec<Watcher>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store at revision 1 (as a fresh etcd), keeping the default watch history.
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// An empty store keeping at most `history_limit` past events for resuming watches.
    pub fn with_history(history_limit: usize) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            revision: 1,
            kvs: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 1,
            leases: HashMap::new(),
            next_lease: 0x5_0000,
            watchers: Vec::new(),
        }));
        // Leases must expire (and watchers hear of it) even when nobody calls the store.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(reap_expired_leases(Arc::downgrade(&inner)));
        }
        MemoryStore { inner }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in this module; the data is still
        // consistent because every mutation is applied in full before any event is sent.
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        inner.expire_leases(Instant::now());
        inner
    }
}

async fn reap_expired_leases(inner: Weak<Mutex<Inner>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut guard = inner.lock().unwrap_or_else(|poison| poison.into_inner());
        guard.expire_leases(Instant::now());
    }
}

impl Inner {
    fn expire_leases(&mut self, now: Instant) {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let ops: Vec<TxnOp> = lease
            .keys
            .into_iter()
            .map(|key| TxnOp::Delete { key })
            .collect();
        // Cannot fail: deletes never reference a lease.
        let _ = self.apply(&ops);
        true
    }

    /// Forgets that `key` is attached to `lease`.
    fn detach(&mut self, lease: Option<LeaseId>, key: &str) {
        if let Some(l) = lease.and_then(|lease| self.leases.get_mut(&lease.0)) {
            l.keys.remove(key);
        }
    }

    fn check(&self, compare: &Compare) -> bool {
        match compare {
            Compare::CreateRevision { key, revision } => {
                self.kvs.get(key).map_or(0, |kv| kv.create_revision) == *revision
            }
            Compare::ModRevision { key, revision } => {
                self.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *revision
            }
        }
    }

    /// Applies writes atomically at one new revision (none if nothing changes).
    fn apply(&mut self, ops: &[TxnOp]) -> Result<Revision, StoreError> {
        for op in ops {
            if let TxnOp::Put {
                lease: Some(lease), ..
            } = op
                && !self.leases.contains_key(&lease.0)
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        let changes = ops.iter().any(|op| match op {
            TxnOp::Put { .. } => true,
            TxnOp::Delete { key } => self.kvs.contains_key(key),
        });
        if !changes {
            return Ok(self.revision);
        }
        self.revision += 1;
        let rev = self.revision;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let old = self.kvs.get(key);
                    let (create_revision, version) =
                        old.map_or((rev, 1), |kv| (kv.create_revision, kv.version + 1));
                    let old_lease = old.and_then(|kv| kv.lease);
                    if old_lease != *lease {
                        self.detach(old_lease, key);
                    }
                    if let Some(l) = lease.and_then(|lease| self.leases.get_mut(&lease.0)) {
                        l.keys.insert(key.clone());
                    }
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: rev,
                        version,
                        lease: *lease,
                    };
                    self.kvs.insert(key.clone(), kv.clone());
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                TxnOp::Delete { key } => {
                    if let Some(old) = self.kvs.remove(key) {
                        self.detach(old.lease, key);
                        let kv = KeyValue {
                            key: key.clone(),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: rev,
                            version: 0,
                            lease: None,
                        };
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv,
                        });
                    }
                }
            }
        }
        for event in events {
            self.watchers.retain(|w| {
                !event.kv.key.starts_with(&w.prefix) || w.tx.send(Ok(event.clone())).is_ok()
            });
            self.history.push_back(event);
            while self.history.len() > self.history_limit {
                if let Some(old) = self.history.pop_front() {
                    self.compacted = old.kv.mod_revision;
                }
            }
        }
        Ok(rev)
    }
}

#[async_trait::async_trait]
impl StateStore for MemoryStore {
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if revision > inner.revision {
            return Err(StoreError::Rejected(format!(
                "cannot compact to revision {revision}: the store is at {}",
                inner.revision
            )));
        }
        while inner
            .history
            .front()
            .is_some_and(|e| e.kv.mod_revision < revision)
        {
            inner.history.pop_front();
        }
        inner.compacted = inner.compacted.max(revision - 1);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let inner = self.lock();
        let kvs = inner
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Range {
            kvs,
            revision: inner.revision,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.lock().apply(&[TxnOp::Put {
            key: key.to_string(),
            value,
            lease,
        }])
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let existed = inner.kvs.contains_key(key);
        inner.apply(&[TxnOp::Delete {
            key: key.to_string(),
        }])?;
        Ok(existed)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.check_size()?;
        let mut inner = self.lock();
        let succeeded = txn.compares.iter().all(|c| inner.check(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let revision = inner.apply(ops)?;
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream, StoreError> {
        let mut inner = self.lock();
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(from) = from {
            if from <= inner.compacted {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: inner.compacted + 1,
                });
            }
            for event in inner
                .history
                .iter()
                .filter(|e| e.kv.mod_revision >= from && e.kv.key.starts_with(prefix))
            {
                // The receiver is alive: we hold it.
                let _ = tx.send(Ok(event.clone()));
            }
        }
        inner.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl < Duration::from_secs(1) {
            return Err(StoreError::Rejected(format!(
                "lease TTL {ttl:?} is below the 1s minimum"
            )));
        }
        let mut inner = self.lock();
        inner.next_lease += 1;
        let id = inner.next_lease;
        inner.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(LeaseId(id))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut inner = self.lock();
        let l = inner
            .leases
            .get_mut(&lease.0)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.lock().revoke(lease.0) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }
}
