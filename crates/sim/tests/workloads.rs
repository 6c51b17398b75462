//! Deployments through ReplicaSets, as kube-controller-manager runs them: pods owned by a
//! ReplicaSet the Deployment owns, a rolling update within maxSurge/maxUnavailable when the
//! template changes, old sets kept at zero, and deletion cascading down.

mod common;

use std::time::Duration;

use common::{Kubectl, add_node, eventually, start};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::Pod,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn deployment(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "replicas": 4, "selector": { "matchLabels": { "app": "web" } },
            "strategy": { "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 1 } },
            "template": { "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "app", "image": image, "resources": { "requests": { "cpu": "100m" } } }] } } }
    }))
    .expect("deployment")
}

async fn sets(client: &kube::Client) -> Vec<ReplicaSet> {
    Api::<ReplicaSet>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .expect("ReplicaSets listed")
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_roll_out_through_replica_sets() {
    let (sim, client, _shutdown) = start().await;
    add_node(&sim, "node-a", "8", json!({}), json!([])).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("app:1"))
        .await
        .unwrap();

    eventually(
        "4 pods Running, owned by the first ReplicaSet",
        async || {
            let listed = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items;
            let running = listed
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            let owners: std::collections::BTreeSet<String> = listed
                .iter()
                .filter_map(|p| {
                    p.metadata
                        .owner_references
                        .as_ref()?
                        .first()
                        .map(|o| format!("{}/{}", o.kind, o.name))
                })
                .collect();
            running == 4
                && owners.len() == 1
                && owners.iter().all(|o| o.starts_with("ReplicaSet/web-"))
        },
    )
    .await;
    let first = sets(&client).await;
    assert_eq!(first.len(), 1);
    let first_name = first[0].metadata.name.clone().unwrap();
    let hash = first[0].metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(first_name, format!("web-{hash}"));
    assert_eq!(
        first[0].metadata.owner_references.as_ref().unwrap()[0].kind,
        "Deployment"
    );
    let kubectl = Kubectl::new(&sim);
    let table = kubectl.ok(&["get", "rs"]).await;
    assert!(
        table.contains("DESIRED") && table.contains(&first_name),
        "{table}"
    );

    // A new image: a second set, pods move over within maxSurge 1 / maxUnavailable 1.
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": "app:2", "resources": { "requests": { "cpu": "100m" } } }] } } } })))
        .await
        .unwrap();
    let mut most_pods = 0;
    let mut fewest_running = usize::MAX;
    let mut done = false;
    for _ in 0..200 {
        let listed = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items;
        let live: Vec<&Pod> = listed
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let running = live
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        most_pods = most_pods.max(live.len());
        fewest_running = fewest_running.min(running);
        let on_new = live
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .is_some_and(|s| s.containers[0].image.as_deref() == Some("app:2"))
            })
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if on_new == 4 && live.len() == 4 {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(done, "the rollout completes");
    assert!(
        most_pods <= 5,
        "at most replicas + maxSurge pods at once, saw {most_pods}"
    );
    assert!(
        fewest_running >= 3,
        "at most maxUnavailable pods down at once, saw {fewest_running} running"
    );
    let after = sets(&client).await;
    assert_eq!(after.len(), 2, "the old set is kept for history");
    let old = after
        .iter()
        .find(|rs| rs.metadata.name.as_deref() == Some(first_name.as_str()))
        .unwrap();
    assert_eq!(old.spec.replicas, Some(0));
    eventually("the Deployment reports the rollout complete", async || {
        let d = deployments.get("web").await.unwrap();
        let s = d.status.unwrap_or_default();
        s.updated_replicas == Some(4) && s.ready_replicas == Some(4) && s.replicas == Some(4)
    })
    .await;

    // kubectl scale goes through the Deployment to its current set.
    kubectl
        .ok(&["scale", "deployment", "web", "--replicas=2"])
        .await;
    eventually("scaled to 2", async || {
        pods.list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count()
            == 2
    })
    .await;

    // Deleting the Deployment deletes its sets and their pods.
    deployments
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("sets and pods gone", async || {
        sets(&client).await.is_empty()
            && pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
}
