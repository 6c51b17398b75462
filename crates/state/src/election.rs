//! Leader election per service over any [`StateStore`], with fencing.
//!
//! A candidate becomes leader by creating `election/<service>` (attached to its lease) only if
//! the key does not exist. The key's create revision is the leader's *term*. Every write a leader
//! makes ([`Leadership::fenced_txn`]) also compares the election key's create revision with its
//! term, so a deposed leader — whose lease expired while it was paused, partitioned or slow — can
//! never write. A leader also stops acting on its own the moment its lease may have lapsed: when
//! no keep-alive succeeded within the TTL, when the lease is gone, or when its key changes
//! hands. [`Leadership::lost`] is cancelled at that moment.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Revision, SharedStore, StoreError, Txn, TxnOp,
    TxnOutcome, keys,
};

/// Timing of an election.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Lease TTL: how long a dead leader keeps the key (default 5 s).
    pub lease_ttl: Duration,
    /// Pause after a failed store call before retrying.
    pub retry_interval: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            lease_ttl: Duration::from_secs(5),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// What the election key says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderRecord {
    /// Identity of the leading replica.
    pub holder: String,
    /// When it became leader (Unix milliseconds).
    pub since_unix_ms: u64,
    /// The term: create revision of the election key (0 inside the stored value).
    #[serde(default)]
    pub term: Revision,
    /// The leader's advertised gRPC address (`http://host:port`), where standbys forward
    /// leader-only calls. Empty from replicas that advertise none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
}

/// One service's election, campaigned for by one replica.
#[derive(Clone)]
pub struct Election {
    store: SharedStore,
    service: String,
    candidate: String,
    address: String,
    config: ElectionConfig,
}

/// Held leadership. Clones share it; it ends for all of them at once.
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Held>,
}

struct Held {
    store: SharedStore,
    service: String,
    key: String,
    term: Revision,
    lease: LeaseId,
    record: LeaderRecord,
    lost: CancellationToken,
    /// Local deadline after which the lease may have expired at the store.
    deadline: Mutex<Instant>,
    reason: Mutex<Option<String>>,
}

const RESIGNED: &str = "resigned";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Attempt {
    Acquired(Leadership),
    HeldBy(KeyValue),
}

impl Election {
    /// An election for `service` in which this replica is `candidate`.
    pub fn new(
        store: SharedStore,
        service: impl Into<String>,
        candidate: impl Into<String>,
        config: ElectionConfig,
    ) -> Self {
        Election {
            store,
            service: service.into(),
            candidate: candidate.into(),
            address: String::new(),
            config,
        }
    }

    /// Advertises `address` (`http://host:port`) in the leader record while this replica leads.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// The service this election is for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The current leader according to the store, if any.
    pub async fn current_leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        let Some(kv) = self.store.get(&keys::election(&self.service)).await? else {
            return Ok(None);
        };
        let mut record: LeaderRecord =
            serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
                key: kv.key.clone(),
                source,
            })?;
        record.term = kv.create_revision;
        Ok(Some(record))
    }

    /// Campaigns until this replica leads (`Some`) or `cancel` fires (`None`). Store outages are
    /// retried; they never end the campaign.
    pub async fn campaign(&self, cancel: &CancellationToken) -> Option<Leadership> {
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            match self.try_acquire().await {
                Ok(Attempt::Acquired(leadership)) => return Some(leadership),
                Ok(Attempt::HeldBy(kv)) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = self.wait_for_release(&kv) => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(service = %self.service, error = %err, "election: store call failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(self.config.retry_interval) => {}
                    }
                }
            }
        }
    }

    async fn try_acquire(&self) -> Result<Attempt, StoreError> {
        let key = keys::election(&self.service);
        // Cheap check first, so waiting replicas do not churn leases.
        if let Some(kv) = self.store.get(&key).await? {
            return Ok(Attempt::HeldBy(kv));
        }
        let granted_at = Instant::now();
        let lease = self.store.lease_grant(self.config.lease_ttl).await?;
        let record = LeaderRecord {
            holder: self.candidate.clone(),
            since_unix_ms: unix_ms(),
            term: 0,
            address: self.address.clone(),
        };
        let value = serde_json::to_vec(&record).map_err(|source| StoreError::Decode {
            key: key.clone(),
            source,
        })?;
        let txn = Txn {
            compares: vec![Compare::CreateRevision {
                key: key.clone(),
                revision: 0,
            }],
            success: vec![TxnOp::Put {
                key: key.clone(),
                value,
                lease: Some(lease),
            }],
            failure: vec![],
        };
        let outcome = match self.store.txn(txn).await {
            Ok(outcome) => outcome,
            Err(err) => {
                let _ = self.store.lease_revoke(lease).await;
                return Err(err);
            }
        };
        if !outcome.succeeded {
            let _ = self.store.lease_revoke(lease).await;
            return match self.store.get(&key).await? {
                Some(kv) => Ok(Attempt::HeldBy(kv)),
                // Released in between: go round again at once.
                None => Err(StoreError::Unavailable(
                    "election key changed hands; retrying".into(),
                )),
            };
        }
        let term = outcome.revision;
        let held = Arc::new(Held {
            store: self.store.clone(),
            service: self.service.clone(),
            key,
            term,
            lease,
            record: LeaderRecord { term, ..record },
            lost: CancellationToken::new(),
            deadline: Mutex::new(granted_at + self.config.lease_ttl),
            reason: Mutex::new(None),
        });
        tokio::spawn(keep_lease_alive(held.clone(), self.config.lease_ttl));
        tokio::spawn(watch_own_key(held.clone(), self.config.retry_interval));
        tracing::info!(service = %self.service, candidate = %self.candidate, term, "election: became leader");
        Ok(Attempt::Acquired(Leadership { inner: held }))
    }

    /// Returns once the key held in `kv` is deleted or replaced (or after one TTL, to re-check).
    async fn wait_for_release(&self, kv: &KeyValue) {
        let recheck = tokio::time::sleep(self.config.lease_ttl);
        tokio::pin!(recheck);
        let mut events = match self.store.watch(&kv.key, Some(kv.mod_revision + 1)).await {
            Ok(events) => events,
            Err(_) => {
                tokio::time::sleep(self.config.retry_interval).await;
                return;
            }
        };
        loop {
            tokio::select! {
                _ = &mut recheck => return,
                event = events.next() => match event {
                    Some(Ok(e)) if e.kv.key == kv.key && e.kind == EventKind::Delete => return,
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        tokio::time::sleep(self.config.retry_interval).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Keeps the lease alive at a third of its TTL and ends leadership the moment the lease may have
/// lapsed (no successful keep-alive within the TTL) or is gone.
async fn keep_lease_alive(held: Arc<Held>, ttl: Duration) {
    let interval = ttl / 3;
    loop {
        let deadline = *held.deadline.lock().unwrap_or_else(|p| p.into_inner());
        tokio::select! {
            _ = held.lost.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {
                held.lose(format!("no successful lease keep-alive within {ttl:?}"));
                return;
            }
            (sent, result) = async {
                tokio::time::sleep(interval).await;
                let sent = Instant::now();
                (sent, held.store.lease_keep_alive(held.lease).await)
            } => match result {
                // Measured from when the request left: the store's clock started no earlier.
                Ok(granted) => *held.deadline.lock().unwrap_or_else(|p| p.into_inner()) = sent + granted,
                Err(StoreError::LeaseNotFound(_)) => {
                    held.lose("lease expired at the store".to_string());
                    return;
                }
                Err(err) => tracing::warn!(service = %held.service, error = %err, "election: keep-alive failed"),
            }
        }
    }
}

/// Ends leadership when the election key is deleted or re-created by someone else.
async fn watch_own_key(held: Arc<Held>, retry: Duration) {
    let mut from = held.term + 1;
    while !held.lost.is_cancelled() {
        let mut events = match held.store.watch(&held.key, Some(from)).await {
            Ok(events) => events,
            Err(_) => {
                tokio::select! {
                    _ = held.lost.cancelled() => return,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = held.lost.cancelled() => return,
                event = events.next() => match event {
                    Some(Ok(e)) => {
                        from = e.kv.mod_revision + 1;
                        if e.kv.key != held.key { continue; }
                        if e.kind == EventKind::Delete || e.kv.create_revision != held.term {
                            held.lose("election key was deleted or taken over".to_string());
                            return;
                        }
                    }
                    Some(Err(_)) | None => {
                        tokio::select! {
                            _ = held.lost.cancelled() => return,
                            _ = tokio::time::sleep(retry) => break,
                        }
                    }
                }
            }
        }
    }
}

impl Held {
    fn lose(&self, reason: String) {
        if self.lost.is_cancelled() {
            return;
        }
        if reason == RESIGNED {
            tracing::info!(service = %self.service, term = self.term, "election: resigned leadership");
        } else {
            tracing::warn!(service = %self.service, term = self.term, %reason, "election: leadership lost; stopping at once");
        }
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.lost.cancel();
    }
}

impl Leadership {
    /// The term: the election key's create revision.
    pub fn term(&self) -> Revision {
        self.inner.term
    }

    /// The record stored in the election key.
    pub fn record(&self) -> &LeaderRecord {
        &self.inner.record
    }

    /// Cancelled the moment leadership ends; pass it (or a child) to everything the leader runs.
    pub fn lost(&self) -> &CancellationToken {
        &self.inner.lost
    }

    /// Why leadership ended, once it has.
    pub fn lost_reason(&self) -> Option<String> {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True while the lease is surely still alive and the key is ours as far as we know.
    pub fn is_held(&self) -> bool {
        !self.inner.lost.is_cancelled()
            && Instant::now()
                < *self
                    .inner
                    .deadline
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `txn` only if this replica still holds the election key with its term. A write that
    /// finds the term gone ends leadership and returns [`StoreError::Fenced`].
    pub async fn fenced_txn(&self, mut txn: Txn) -> Result<TxnOutcome, StoreError> {
        let fenced = || StoreError::Fenced {
            service: self.inner.service.clone(),
            term: self.inner.term,
        };
        if !self.is_held() {
            self.inner
                .lose("leadership lapsed before a write".to_string());
            return Err(fenced());
        }
        txn.compares.push(Compare::CreateRevision {
            key: self.inner.key.clone(),
            revision: self.inner.term,
        });
        let outcome = self.inner.store.txn(txn).await?;
        if outcome.succeeded {
            return Ok(outcome);
        }
        // The compares failed: find out whether it was the fence or the caller's own conditions.
        let still_ours = self
            .inner
            .store
            .get(&self.inner.key)
            .await?
            .is_some_and(|kv| kv.create_revision == self.inner.term);
        if still_ours {
            Ok(outcome)
        } else {
            self.inner
                .lose("a fenced write found the election key held by another term".to_string());
            Err(fenced())
        }
    }

    /// A fenced single put; returns the new revision.
    pub async fn fenced_put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        let txn = Txn {
            compares: vec![],
            success: vec![TxnOp::Put {
                key: key.to_string(),
                value,
                lease: None,
            }],
            failure: vec![],
        };
        Ok(self.fenced_txn(txn).await?.revision)
    }

    /// Gives leadership up: stops acting at once and revokes the lease so a standby takes over
    /// without waiting for the TTL.
    pub async fn resign(&self) {
        self.inner.lose(RESIGNED.to_string());
        if let Err(err) = self.inner.store.lease_revoke(self.inner.lease).await {
            tracing::debug!(service = %self.inner.service, error = %err, "election: lease revoke on resign failed");
        }
    }
}
