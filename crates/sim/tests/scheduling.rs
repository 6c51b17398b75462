//! Scheduling in the simulator, as a user sees it: a Deployment that does not fit leaves pods
//! Unschedulable with the real scheduler's message; a node from the sim cloud makes them run.

mod common;

use common::{add_node, eventually_some as eventually, start};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn deployment(name: &str, replicas: i32, cpu: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [ { "name": "app", "image": "busybox", "resources": { "requests": { "cpu": cpu, "memory": "256Mi" } } } ] }
            }
        }
    }))
    .expect("deployment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_until_a_cloud_node_arrives_then_running() {
    let (sim, client, _shutdown) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");

    // One small node and one tainted node: neither can take 3 pods of 1.5 CPU.
    add_node(
        &sim,
        "small-1",
        "2",
        json!({ "pool": "general" }),
        json!([]),
    )
    .await;
    add_node(
        &sim,
        "gpu-1",
        "8",
        json!({ "pool": "gpu" }),
        json!([{ "key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule" }]),
    )
    .await;
    eventually("two ready nodes", async || {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let list = nodes.list(&ListParams::default()).await.ok()?;
        (list.items.len() == 2
            && list.items.iter().all(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            }))
        .then_some(())
    })
    .await;

    deployments
        .create(&PostParams::default(), &deployment("web", 3, "1500m"))
        .await
        .expect("create deployment");
    let message = eventually("two unschedulable pods", async || {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let stuck: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| {
                let c = p
                    .status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
                (c.reason.as_deref() == Some("Unschedulable"))
                    .then(|| c.message.clone().unwrap_or_default())
            })
            .collect();
        (list.items.len() == 3 && stuck.len() == 2).then(|| stuck[0].clone())
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {nvidia.com/gpu: true}."
    );

    // A new general node arrives through the cloud API: everything runs.
    add_node(
        &sim,
        "general-2",
        "4",
        json!({ "pool": "general" }),
        json!([]),
    )
    .await;
    eventually("all three running", async || {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        (running == 3).then_some(())
    })
    .await;
    // The Deployment's status follows its ReplicaSet's.
    eventually("the deployment reports 3 ready", async || {
        let d = deployments.get("web").await.ok()?;
        (d.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)).then_some(())
    })
    .await;

    // Scale down through the scale subresource; the controller removes pods.
    deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 1 } })),
        )
        .await
        .expect("scale");
    eventually("one pod left", async || {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (list.items.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_rejects_bad_requests_and_injects_faults() {
    let (sim, _client, _shutdown) = start().await;
    let http = reqwest::Client::new();
    let bad = http
        .post(format!("{}/cloud/v1/instances", sim.url()))
        .json(&json!({ "capacity": { "cpu": "lots", "memory": "8Gi" } }))
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status(), 400);
    assert!(
        bad.text()
            .await
            .unwrap_or_default()
            .contains("capacity.cpu")
    );
    let faults = http
        .put(format!("{}/cloud/v1/faults", sim.url()))
        .json(&json!({ "errorRate": 1.0 }))
        .send()
        .await
        .expect("faults");
    assert_eq!(faults.status(), 200);
    let failing = http
        .get(format!("{}/cloud/v1/instances", sim.url()))
        .send()
        .await
        .expect("list");
    assert_eq!(failing.status(), 503);
    let invalid = http
        .put(format!("{}/cloud/v1/faults", sim.url()))
        .json(&json!({ "errorRate": 2.0 }))
        .send()
        .await
        .expect("faults");
    assert_eq!(invalid.status(), 400);
}

/// The PodScheduled=False messages of the pods matching `selector`, once there are `count`.
async fn unschedulable_messages(
    pods: &Api<Pod>,
    selector: &str,
    count: usize,
) -> Option<Vec<String>> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .ok()?;
    let stuck: Vec<String> = list
        .items
        .iter()
        .filter_map(|p| {
            let c = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            c.message.clone()
        })
        .collect();
    (stuck.len() == count).then_some(stuck)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_nodes_at_all_pods_are_unschedulable_with_the_schedulers_message() {
    // A cluster whose pools start at zero: the pods must still be marked, or no autoscaler
    // would ever see them pending.
    let (_sim, client, _shutdown) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("lonely", 2, "500m"))
        .await
        .expect("create deployment");
    let messages = eventually("two unschedulable pods", async || {
        unschedulable_messages(&pods, "app=lonely", 2).await
    })
    .await;
    assert!(
        messages
            .iter()
            .all(|m| m == "no nodes available to schedule pods"),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_back_by_the_backoff_is_written_when_the_backoff_ends() {
    // Pods marked while the cluster is empty, then again while a new node is not yet ready: the
    // node turning Ready changes why they do not fit while their rewrite is backing off. With
    // nothing else changing, the condition must still come to say the real reason, as
    // kube-scheduler's retry after the backoff does (an autoscaler reads it).
    let (sim, client, _shutdown) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("wide", 2, "3"))
        .await
        .expect("create deployment");
    let messages = async || unschedulable_messages(&pods, "app=wide", 2).await;
    eventually("two pods marked on an empty cluster", async || {
        messages()
            .await
            .filter(|m| m.iter().all(|m| m.starts_with("no nodes available")))
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    add_node(
        &sim,
        "small-1",
        "2",
        json!({ "pool": "general" }),
        json!([]),
    )
    .await;
    let mut last = Vec::new();
    for _ in 0..100 {
        if let Some(now) = messages().await {
            if now.iter().all(|m| m.contains("Insufficient cpu")) {
                return;
            }
            last = now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("10 s after a 2-CPU node became Ready the 3-CPU pods still say {last:?}");
}
