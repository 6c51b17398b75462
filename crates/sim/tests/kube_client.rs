//! The simulator against the real `kube` crate: CRUD with the right errors, selectors, and a
//! kube-runtime reflector that stays consistent through thousands of changes and a forced 410.

mod common;

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Client,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde_json::json;
use shoal_sim::{Sim, SimConfig};
use tokio_util::sync::CancellationToken;

async fn start(watch_history: usize) -> (Sim, Client, CancellationToken) {
    common::start_with(SimConfig {
        watch_history,
        ..common::fast_config()
    })
    .await
}

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": { "containers": [ { "name": "app", "image": "busybox", "resources": { "requests": { "cpu": "100m" } } } ] }
    }))
    .expect("pod")
}

fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_selectors_and_errors() {
    let (_sim, client, _shutdown) = start(10_000).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = pods
        .create(
            &PostParams::default(),
            &pod("web-1", json!({ "app": "web" })),
        )
        .await
        .expect("create");
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    pods.create(&PostParams::default(), &pod("db-1", json!({ "app": "db" })))
        .await
        .expect("create");

    let err = pods
        .create(&PostParams::default(), &pod("web-1", json!({})))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(409), "{err}");
    let err = pods
        .create(&PostParams::default(), &pod("Bad_Name", json!({})))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(422), "{err}");
    let err = pods.get("missing").await.unwrap_err();
    assert_eq!(status_code(&err), Some(404), "{err}");

    let web = pods
        .list(&ListParams::default().labels("app in (web,api)"))
        .await
        .expect("list");
    assert_eq!(
        web.items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["web-1"]
    );

    // Stale update → 409; patch works.
    let mut stale = created.clone();
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "tier": "front" } } })),
    )
    .await
    .expect("merge patch");
    stale.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
    let err = pods
        .replace("web-1", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(409), "{err}");
    let patched = pods
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(json!({ "spec": { "nodeName": "n1" } })),
        )
        .await
        .expect("strategic patch");
    assert_eq!(
        patched.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("n1")
    );
    assert_eq!(
        patched
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("front")
    );

    let on_n1 = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .expect("field selector");
    assert_eq!(on_n1.items.len(), 1);
    let err = pods
        .list(&ListParams::default().fields("spec.schedulerName=x"))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(400), "{err}");

    pods.delete("web-1", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(
        status_code(&pods.get("web-1").await.unwrap_err()),
        Some(404)
    );

    // Cluster-scoped objects and pagination.
    let nodes: Api<Node> = Api::all(client);
    for i in 0..7 {
        let node: Node =
            serde_json::from_value(json!({ "metadata": { "name": format!("node-{i}") } }))
                .expect("node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("node create");
    }
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(3);
    loop {
        let page = nodes.list(&params).await.expect("page");
        names.extend(page.items.iter().filter_map(|n| n.metadata.name.clone()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names.len(), 7, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_stays_consistent_through_10k_changes_and_a_forced_relist() {
    let (sim, client, _shutdown) = start(2_000).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (reader, writer) = reflector::store::<Pod>();
    let relists = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = relists.clone();
    let stream = reflector(
        writer,
        watcher(pods.clone(), watcher::Config::default().any_semantic()),
    )
    .inspect(move |event| {
        if matches!(event, Ok(watcher::Event::Init)) {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .default_backoff()
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(stream);
    reader.wait_until_ready().await.expect("reflector ready");

    // 10k changes through the API: creates, label updates, deletes, with a compaction in the
    // middle that forces every watch to resume from a compacted version (410) and re-list.
    let mut changes = 0;
    let mut round = 0;
    while changes < 10_000 {
        let name = format!("p-{}", round % 400);
        match pods.get_opt(&name).await.expect("get") {
            None => {
                pods.create(
                    &PostParams::default(),
                    &pod(&name, json!({ "round": round.to_string() })),
                )
                .await
                .expect("create");
            }
            Some(_) if round % 3 == 0 => {
                pods.delete(&name, &DeleteParams::default())
                    .await
                    .expect("delete");
            }
            Some(_) => {
                let patch = json!({ "metadata": { "labels": { "round": round.to_string() } } });
                pods.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .expect("patch");
            }
        }
        changes += 1;
        round += 1;
        if changes == 5_000 {
            // Other writers change things while the API server restarts and etcd compacts.
            let store = sim.store.clone();
            sim.store
                .restart_with_compaction(async move {
                    let kind = shoal_sim::resources::by_kind("Pod").expect("pods");
                    for i in 0..50 {
                        let object = json!({ "metadata": { "name": format!("during-restart-{i}") }, "spec": { "containers": [] } });
                        store.create(kind, "default", object).expect("create during restart");
                    }
                })
                .await;
        }
    }

    // The reflector converges on exactly the server's state (names and resourceVersions). The
    // server's state is read again each time: the scheduler still marks the newest pods
    // Unschedulable after the writes stop, and each mark is a new resourceVersion.
    let mut converged = false;
    let mut truth = BTreeMap::new();
    for _ in 0..100 {
        truth = pods
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|p| {
                (
                    p.metadata.name.unwrap_or_default(),
                    p.metadata.resource_version.unwrap_or_default(),
                )
            })
            .collect::<BTreeMap<String, String>>();
        let seen: BTreeMap<String, String> = reader
            .state()
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
        if seen == truth {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        converged,
        "reflector has {} objects, server {}",
        reader.state().len(),
        truth.len()
    );
    assert!(
        relists.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the compaction forced a re-list (initial list + at least one more)"
    );
}
