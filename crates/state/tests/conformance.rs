#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed assertion
//! One StateStore conformance suite, run against the in-memory store and a real etcd
//! (started by shoal-testkit). Both must behave identically where Shoal depends on it.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use shoal_state::{
    Compare, Election, ElectionConfig, EtcdConfig, EtcdStore, EventKind, LeaseId, MemoryStore,
    SharedStore, StateStore, StoreError, Txn, TxnOp, WatchEvent, WatchStream,
};
use shoal_testkit::EtcdServer;

/// Runs `body` against a fresh in-memory store.
async fn on_memory<F, Fut>(body: F)
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    body(Arc::new(MemoryStore::new())).await;
}

/// Runs `body` against a real etcd in a fresh namespace.
async fn on_etcd<F, Fut>(body: F)
where
    F: FnOnce(SharedStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let etcd = EtcdServer::start();
    let store = EtcdStore::connect(&EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        namespace: "/shoal-conformance/".to_string(),
        request_timeout: Duration::from_secs(5),
        ..EtcdConfig::default()
    })
    .await
    .expect("connect to the test etcd");
    body(Arc::new(store)).await;
    drop(etcd);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::on_memory(super::$name).await }) *
        }
        mod etcd {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::on_etcd(super::$name).await }) *
        }
    };
}

conformance!(
    revisions_count_every_write,
    range_is_by_prefix_and_sorted,
    txn_compare_failure_applies_nothing_of_success,
    txn_is_one_revision,
    watch_is_ordered_and_resumes_from_a_revision,
    lease_expiry_deletes_keys_and_watchers_see_it,
    unknown_lease_is_rejected,
    deposed_leader_cannot_write,
    resigning_hands_over_at_once,
    range_reads_past_one_page_as_one_snapshot,
    txn_over_the_etcd_op_limit_is_refused,
    compaction_drops_history_but_not_keys,
);

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("watch event within 10s")
        .expect("watch stream ended")
        .expect("watch error")
}

async fn revisions_count_every_write(store: SharedStore) {
    assert_eq!(store.get("a").await.unwrap(), None);
    let r1 = store.put("a", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("a", b"2".to_vec(), None).await.unwrap();
    assert_eq!(r2, r1 + 1, "each put bumps the revision by one");
    let kv = store.get("a").await.unwrap().expect("a exists");
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"2"[..], r1, r2, 2)
    );
    assert!(store.delete("a").await.unwrap());
    assert!(
        !store.delete("a").await.unwrap(),
        "deleting an absent key reports false"
    );
    let r3 = store.put("a", b"3".to_vec(), None).await.unwrap();
    assert_eq!(
        r3,
        r2 + 2,
        "the delete took one revision, the absent delete none"
    );
    let kv = store.get("a").await.unwrap().expect("a re-created");
    assert_eq!(
        (kv.create_revision, kv.version),
        (r3, 1),
        "re-creation starts a new life"
    );
}

async fn range_is_by_prefix_and_sorted(store: SharedStore) {
    for key in ["claims/b", "claims/a", "claimsx", "pools/a", "claims/c"] {
        store.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    let range = store.range("claims/").await.unwrap();
    let keys: Vec<_> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["claims/a", "claims/b", "claims/c"]);
    let last = store.get("claims/c").await.unwrap().unwrap().mod_revision;
    assert!(
        range.revision >= last,
        "range reports the store revision it read at"
    );
}

async fn txn_compare_failure_applies_nothing_of_success(store: SharedStore) {
    let rev = store.put("k", b"v1".to_vec(), None).await.unwrap();
    let stale = Txn {
        compares: vec![Compare::ModRevision {
            key: "k".into(),
            revision: rev - 1,
        }],
        success: vec![TxnOp::Put {
            key: "k".into(),
            value: b"lost".to_vec(),
            lease: None,
        }],
        failure: vec![TxnOp::Put {
            key: "conflicts".into(),
            value: b"1".to_vec(),
            lease: None,
        }],
    };
    let outcome = store.txn(stale).await.unwrap();
    assert!(!outcome.succeeded);
    assert_eq!(
        store.get("k").await.unwrap().unwrap().value,
        b"v1",
        "success ops not applied"
    );
    assert!(
        store.get("conflicts").await.unwrap().is_some(),
        "failure ops applied"
    );

    let create_only = Txn {
        compares: vec![Compare::CreateRevision {
            key: "k".into(),
            revision: 0,
        }],
        success: vec![TxnOp::Put {
            key: "k".into(),
            value: b"clobbered".to_vec(),
            lease: None,
        }],
        failure: vec![],
    };
    assert!(
        !store.txn(create_only).await.unwrap().succeeded,
        "create-if-absent fails on an existing key"
    );

    let current = store.get("k").await.unwrap().unwrap().mod_revision;
    let fresh = Txn {
        compares: vec![Compare::ModRevision {
            key: "k".into(),
            revision: current,
        }],
        success: vec![TxnOp::Put {
            key: "k".into(),
            value: b"v2".to_vec(),
            lease: None,
        }],
        failure: vec![],
    };
    assert!(store.txn(fresh).await.unwrap().succeeded);
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v2");
}

async fn txn_is_one_revision(store: SharedStore) {
    store.put("gone", b"x".to_vec(), None).await.unwrap();
    let txn = Txn {
        compares: vec![],
        success: vec![
            TxnOp::Put {
                key: "x".into(),
                value: b"1".to_vec(),
                lease: None,
            },
            TxnOp::Put {
                key: "y".into(),
                value: b"2".to_vec(),
                lease: None,
            },
            TxnOp::Delete { key: "gone".into() },
        ],
        failure: vec![],
    };
    let outcome = store.txn(txn).await.unwrap();
    assert!(outcome.succeeded);
    let x = store.get("x").await.unwrap().unwrap();
    let y = store.get("y").await.unwrap().unwrap();
    assert_eq!(
        (x.mod_revision, y.mod_revision),
        (outcome.revision, outcome.revision)
    );
    assert_eq!(store.get("gone").await.unwrap(), None);
}

async fn watch_is_ordered_and_resumes_from_a_revision(store: SharedStore) {
    let start = store.range("w/").await.unwrap().revision + 1;
    let mut stream = store.watch("w/", Some(start)).await.unwrap();
    store.put("w/a", b"1".to_vec(), None).await.unwrap();
    store.put("other", b"ignored".to_vec(), None).await.unwrap();
    store.put("w/b", b"2".to_vec(), None).await.unwrap();
    store.delete("w/a").await.unwrap();
    store.put("w/a", b"3".to_vec(), None).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_event(&mut stream).await);
    }
    let summary: Vec<_> = seen.iter().map(|e| (e.kind, e.kv.key.as_str())).collect();
    assert_eq!(
        summary,
        [
            (EventKind::Put, "w/a"),
            (EventKind::Put, "w/b"),
            (EventKind::Delete, "w/a"),
            (EventKind::Put, "w/a")
        ]
    );
    assert!(
        seen.windows(2)
            .all(|w| w[0].kv.mod_revision < w[1].kv.mod_revision),
        "strictly increasing revisions"
    );
    assert_eq!(seen[3].kv.value, b"3");
    drop(stream);

    // Resume after the second event: the rest of history, in order, then live events.
    let mut resumed = store
        .watch("w/", Some(seen[1].kv.mod_revision + 1))
        .await
        .unwrap();
    assert_eq!(next_event(&mut resumed).await, seen[2]);
    assert_eq!(next_event(&mut resumed).await, seen[3]);
    store.put("w/c", b"live".to_vec(), None).await.unwrap();
    let live = next_event(&mut resumed).await;
    assert_eq!((live.kind, live.kv.key.as_str()), (EventKind::Put, "w/c"));
}

async fn lease_expiry_deletes_keys_and_watchers_see_it(store: SharedStore) {
    let ttl = Duration::from_secs(2);
    let lease = store.lease_grant(ttl).await.unwrap();
    let rev = store
        .put("leased", b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    assert_eq!(
        store.get("leased").await.unwrap().unwrap().lease,
        Some(lease)
    );
    let mut stream = store.watch("leased", Some(rev + 1)).await.unwrap();

    // Keep-alive holds the key past its TTL.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        store.lease_keep_alive(lease).await.unwrap();
    }
    assert!(
        store.get("leased").await.unwrap().is_some(),
        "kept alive beyond one TTL"
    );

    // Left alone, it expires and the watcher sees the delete.
    let event = next_event(&mut stream).await;
    assert_eq!(
        (event.kind, event.kv.key.as_str()),
        (EventKind::Delete, "leased")
    );
    assert_eq!(store.get("leased").await.unwrap(), None);
    let expired = store.lease_keep_alive(lease).await;
    assert!(
        matches!(expired, Err(StoreError::LeaseNotFound(_))),
        "keep-alive of an expired lease: {expired:?}"
    );

    // Revoking deletes at once.
    let lease = store.lease_grant(ttl).await.unwrap();
    store
        .put("revoked", b"x".to_vec(), Some(lease))
        .await
        .unwrap();
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.get("revoked").await.unwrap(), None);
}

async fn unknown_lease_is_rejected(store: SharedStore) {
    let err = store
        .put("k", b"v".to_vec(), Some(LeaseId(0x7777_7777)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseNotFound(LeaseId(0x7777_7777))),
        "got {err:?}"
    );
    assert_eq!(store.get("k").await.unwrap(), None, "nothing half-applied");
}

fn election(store: &SharedStore, who: &str) -> Election {
    Election::new(
        store.clone(),
        "conformance",
        who,
        ElectionConfig {
            lease_ttl: Duration::from_secs(2),
            retry_interval: Duration::from_millis(100),
        },
    )
}

async fn deposed_leader_cannot_write(store: SharedStore) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let a = election(&store, "a")
        .campaign(&cancel)
        .await
        .expect("a leads");
    a.fenced_put("leaders/record", b"a".to_vec())
        .await
        .expect("the leader writes");
    assert_eq!(
        election(&store, "x")
            .current_leader()
            .await
            .unwrap()
            .unwrap()
            .holder,
        "a"
    );

    // b waits; then a's key disappears behind a's back (as when its lease expires at the store
    // while a is paused), and b takes over.
    let b_election = election(&store, "b");
    let b_task = tokio::spawn({
        let cancel = cancel.clone();
        async move { b_election.campaign(&cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!b_task.is_finished(), "b must not lead while a does");
    store.delete("election/conformance").await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), b_task)
        .await
        .expect("b leads in time")
        .unwrap()
        .unwrap();
    assert!(b.term() > a.term());

    // a's next fenced write is rejected and a steps down.
    let err = a
        .fenced_put("leaders/record", b"stale".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "got {err:?}");
    assert!(a.lost().is_cancelled(), "a stopped acting");
    assert_eq!(
        store.get("leaders/record").await.unwrap().unwrap().value,
        b"a",
        "a's stale write did not land"
    );
    b.fenced_put("leaders/record", b"b".to_vec())
        .await
        .expect("the new leader writes");
}

async fn resigning_hands_over_at_once(store: SharedStore) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let a = election(&store, "a")
        .campaign(&cancel)
        .await
        .expect("a leads");
    let b_election = election(&store, "b");
    let b_task = tokio::spawn({
        let cancel = cancel.clone();
        async move { b_election.campaign(&cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    a.resign().await;
    let b = tokio::time::timeout(Duration::from_secs(5), b_task)
        .await
        .expect("b leads")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "handover took {:?}, not a TTL",
        started.elapsed()
    );
    assert_eq!(b.record().holder, "b");
    assert!(a.lost().is_cancelled());
}

/// The in-memory store reports compaction like etcd when a watch asks for forgotten history.
#[tokio::test]
async fn memory_watch_from_compacted_revision_fails_clearly() {
    let store = MemoryStore::with_history(2);
    for i in 0..5 {
        store.put("k", vec![i], None).await.unwrap();
    }
    let err = match store.watch("k", Some(2)).await {
        Err(err) => err,
        Ok(_) => panic!("watch from a compacted revision must fail"),
    };
    assert!(
        matches!(err, StoreError::Compacted { requested: 2, .. }),
        "got {err:?}"
    );
}

async fn range_reads_past_one_page_as_one_snapshot(store: SharedStore) {
    // More keys than one etcd page (500), written in transactions etcd accepts.
    let keys: Vec<String> = (0..1234).map(|i| format!("claims/c-{i:05}")).collect();
    for chunk in shoal_state::chunks(&keys, 1, 0) {
        let txn = Txn {
            compares: vec![],
            success: chunk
                .iter()
                .map(|k| TxnOp::Put {
                    key: k.clone(),
                    value: k.as_bytes().to_vec(),
                    lease: None,
                })
                .collect(),
            failure: vec![],
        };
        store.txn(txn).await.unwrap();
    }
    store
        .put("claimsx", b"not ours".to_vec(), None)
        .await
        .unwrap();
    let range = store.range("claims/").await.unwrap();
    let read: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(read.len(), 1234, "every key, across pages");
    assert_eq!(read, keys.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(range.kvs.iter().all(|kv| kv.mod_revision <= range.revision));
    assert_eq!(
        store.keys("claims/").await.unwrap(),
        keys,
        "keys only, across pages"
    );
}

async fn txn_over_the_etcd_op_limit_is_refused(store: SharedStore) {
    let put = |i: usize| TxnOp::Put {
        key: format!("big/{i}"),
        value: vec![1],
        lease: None,
    };
    let too_big = Txn {
        compares: vec![],
        success: (0..129).map(put).collect(),
        failure: vec![],
    };
    match store.txn(too_big).await {
        Err(StoreError::Rejected(why)) => assert!(why.contains("too many operations"), "{why}"),
        other => panic!("a 129-op txn must be refused, got {other:?}"),
    }
    assert!(
        store.range("big/").await.unwrap().kvs.is_empty(),
        "nothing applied"
    );
    let fits = Txn {
        compares: vec![],
        success: (0..128).map(put).collect(),
        failure: vec![],
    };
    assert!(store.txn(fits).await.unwrap().succeeded);
    assert_eq!(store.range("big/").await.unwrap().kvs.len(), 128);
}

async fn compaction_drops_history_but_not_keys(store: SharedStore) {
    let first = store.put("k/a", b"1".to_vec(), None).await.unwrap();
    store.put("k/a", b"2".to_vec(), None).await.unwrap();
    let last = store.put("k/b", b"3".to_vec(), None).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), last);
    store.compact(last).await.unwrap();
    store.compact(last).await.unwrap(); // again: nothing to do
    assert_eq!(store.range("k/").await.unwrap().kvs.len(), 2, "keys stay");
    // Refused at once or as the stream's first item, as each store does.
    match store.watch("k/", Some(first)).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(other) => panic!("a watch from before the compaction must fail: {other:?}"),
        Ok(mut old) => match tokio::time::timeout(Duration::from_secs(10), old.next()).await {
            Ok(Some(Err(StoreError::Compacted { .. }))) => {}
            other => panic!("a watch from before the compaction must fail: {other:?}"),
        },
    }
    let mut recent = store.watch("k/", Some(last)).await.unwrap();
    assert_eq!(
        next_event(&mut recent).await.kv.key,
        "k/b",
        "history from the kept revision"
    );
}
