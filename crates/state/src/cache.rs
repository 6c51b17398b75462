//! [`PrefixCache`]: every key under a prefix, kept current by a watch — read once, then follow
//! changes from the next revision; after a compaction or an outage, read again. Readers get a
//! consistent copy without a store round trip.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{EventKind, KeyValue, SharedStore};

#[derive(Default)]
struct Entries {
    kvs: BTreeMap<String, KeyValue>,
    revision: i64,
}

/// The keys under one prefix, followed by a watch.
#[derive(Clone)]
pub struct PrefixCache {
    prefix: String,
    entries: Arc<RwLock<Entries>>,
    /// Bumped on every change (and on every re-read); `0` until the first read.
    version: watch::Receiver<u64>,
}

impl PrefixCache {
    /// Starts following `prefix`; runs until `shutdown`.
    pub fn start(store: SharedStore, prefix: &str, shutdown: CancellationToken) -> PrefixCache {
        let entries: Arc<RwLock<Entries>> = Arc::default();
        let (bump, version) = watch::channel(0u64);
        tokio::spawn(follow(
            store,
            prefix.to_string(),
            entries.clone(),
            bump,
            shutdown,
        ));
        PrefixCache {
            prefix: prefix.to_string(),
            entries,
            version,
        }
    }

    /// The prefix followed.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// True once the prefix has been read.
    pub fn synced(&self) -> bool {
        *self.version.borrow() > 0
    }

    /// Waits until the prefix has been read, up to `timeout`; returns whether it was.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut version = self.version.clone();
        tokio::time::timeout(timeout, version.wait_for(|v| *v > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every key and value, sorted by key.
    pub fn values(&self) -> Vec<KeyValue> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .kvs
            .values()
            .cloned()
            .collect()
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .kvs
            .get(key)
            .cloned()
    }

    /// The store revision the copy reflects.
    pub fn revision(&self) -> i64 {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revision
    }

    /// A receiver that changes whenever the copy does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }
}

async fn follow(
    store: SharedStore,
    prefix: String,
    entries: Arc<RwLock<Entries>>,
    bump: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut version = 0u64;
    let retry = Duration::from_millis(500);
    loop {
        let range = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = store.range(&prefix) => r,
        };
        let range = match range {
            Ok(range) => range,
            Err(err) => {
                tracing::debug!(%prefix, error = %err, "prefix cache: read failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        {
            let mut e = entries.write().unwrap_or_else(|p| p.into_inner());
            e.kvs = range
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect();
            e.revision = range.revision;
        }
        version += 1;
        bump.send_replace(version);
        let mut stream = match store.watch(&prefix, Some(range.revision + 1)).await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    {
                        let mut e = entries.write().unwrap_or_else(|p| p.into_inner());
                        e.revision = event.kv.mod_revision;
                        match event.kind {
                            EventKind::Put => {
                                e.kvs.insert(event.kv.key.clone(), event.kv);
                            }
                            EventKind::Delete => {
                                e.kvs.remove(&event.kv.key);
                            }
                        }
                    }
                    version += 1;
                    bump.send_replace(version);
                }
                // Compacted, or the store went away: read everything again.
                Some(Err(_)) | None => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => break,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn follows_puts_and_deletes() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        store
            .put("pools/a", b"1".to_vec(), None)
            .await
            .expect("put");
        store
            .put("other/x", b"x".to_vec(), None)
            .await
            .expect("put");
        let stop = CancellationToken::new();
        let cache = PrefixCache::start(store.clone(), "pools/", stop.clone());
        assert!(cache.wait_synced(Duration::from_secs(2)).await);
        assert_eq!(cache.values().len(), 1);
        let mut changes = cache.changes();
        store
            .put("pools/b", b"2".to_vec(), None)
            .await
            .expect("put");
        store.delete("pools/a").await.expect("delete");
        for _ in 0..2 {
            let _ = tokio::time::timeout(Duration::from_secs(2), changes.changed()).await;
        }
        let keys: Vec<String> = cache.values().into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["pools/b"]);
        assert_eq!(cache.get("pools/b").map(|kv| kv.value), Some(b"2".to_vec()));
        stop.cancel();
    }
}
