//! Node lifecycle: a node whose kubelet stops heartbeating goes NotReady (Unknown) and gets the
//! unreachable taint after the grace period, its pods are evicted after the eviction timeout and
//! re-created elsewhere; a revived kubelet makes it Ready again. `shoal-sim agent` runs a node as
//! its own process, and killing that process takes the node down the same way.

mod common;

use common::{eventually, start};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

async fn ready(nodes: &Api<Node>, name: &str) -> Option<String> {
    let node = nodes.get(name).await.ok()?;
    node.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status)
}

async fn tainted_unreachable(nodes: &Api<Node>, name: &str) -> bool {
    nodes
        .get(name)
        .await
        .ok()
        .and_then(|n| n.spec?.taints)
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoExecute")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_goes_not_ready_and_its_pods_move() {
    let (sim, client, _shutdown) = start().await;
    let http = reqwest::Client::new();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["node-a", "node-b"] {
        http.post(format!("{}/cloud/v1/instances", sim.url()))
            .json(&json!({ "name": name, "capacity": { "cpu": "4", "memory": "8Gi" } }))
            .send()
            .await
            .expect("cloud");
    }
    eventually("both ready", async || {
        ready(&nodes, "node-a").await.as_deref() == Some("True")
            && ready(&nodes, "node-b").await.as_deref() == Some("True")
    })
    .await;
    // Keep node-b out of the way so the pod lands on node-a.
    let cordon = json!({ "spec": { "unschedulable": true } });
    nodes
        .patch(
            "node-b",
            &Default::default(),
            &kube::api::Patch::Merge(cordon),
        )
        .await
        .expect("cordon");
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "replicas": 1, "selector": { "matchLabels": { "app": "web" } },
            "template": { "metadata": { "labels": { "app": "web" } }, "spec": { "containers": [ { "name": "c", "image": "x" } ] } } }
    }))
    .expect("deployment");
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");
    let node_of = async || {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let pod = list.items.first()?;
        (pod.status.as_ref()?.phase.as_deref() == Some("Running"))
            .then(|| pod.spec.as_ref()?.node_name.clone())?
    };
    eventually("pod running on node-a", async || {
        node_of().await.as_deref() == Some("node-a")
    })
    .await;
    nodes
        .patch(
            "node-b",
            &Default::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "unschedulable": false } })),
        )
        .await
        .expect("uncordon");

    // node-a's kubelet stops.
    let killed = http
        .post(format!("{}/sim/v1/nodes/node-a/kill", sim.url()))
        .send()
        .await
        .expect("kill");
    assert!(killed.status().is_success());
    eventually("node-a Unknown and tainted", async || {
        ready(&nodes, "node-a").await.as_deref() == Some("Unknown")
            && tainted_unreachable(&nodes, "node-a").await
    })
    .await;
    eventually("the pod re-created and running on node-b", async || {
        node_of().await.as_deref() == Some("node-b")
    })
    .await;

    // It comes back.
    http.post(format!("{}/sim/v1/nodes/node-a/revive", sim.url()))
        .send()
        .await
        .expect("revive");
    eventually("node-a Ready again, untainted", async || {
        ready(&nodes, "node-a").await.as_deref() == Some("True")
            && !tainted_unreachable(&nodes, "node-a").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_is_a_node_until_it_dies() {
    let (sim, client, _shutdown) = start().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .args([
            "agent",
            "--api",
            &sim.url(),
            "--name",
            "agent-1",
            "--cpu",
            "2",
            "--memory",
            "4Gi",
            "--label",
            "shoal.dev/pool=docker",
            "--heartbeat-interval",
            "200ms",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent starts");
    eventually("agent-1 registered and Ready", async || {
        ready(&nodes, "agent-1").await.as_deref() == Some("True")
    })
    .await;
    let node = nodes.get("agent-1").await.expect("node");
    assert_eq!(
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("shoal.dev/pool"))
            .map(String::as_str),
        Some("docker")
    );

    let pod: Pod = serde_json::from_value(json!({ "metadata": { "name": "on-agent" },
        "spec": { "nodeSelector": { "kubernetes.io/hostname": "agent-1" }, "containers": [ { "name": "c", "image": "x" } ] } }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    eventually("the agent runs its pod", async || {
        pods.get("on-agent")
            .await
            .ok()
            .and_then(|p| p.status?.phase)
            .as_deref()
            == Some("Running")
    })
    .await;

    let _ = agent.kill();
    let _ = agent.wait();
    eventually("agent-1 NotReady after its process died", async || {
        ready(&nodes, "agent-1").await.as_deref() == Some("Unknown")
    })
    .await;
}

#[test]
fn agent_rejects_bad_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .args([
            "agent",
            "--api",
            "http://127.0.0.1:1",
            "--name",
            "x",
            "--taint",
            "gpu=true",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--taint \"gpu=true\""));
}

/// Every shipped scenario parses, and `shoal-sim serve --scenario` refuses a broken one with the
/// file and the problem.
#[test]
fn shipped_scenarios_load_and_broken_ones_are_refused() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/scenarios");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/scenarios") {
        let path = entry.expect("entry").path();
        shoal_sim::scenario::Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        count += 1;
    }
    assert!(count >= 3);
    let bad = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(
        bad.path(),
        "name: x\nsteps:\n- { at: 1s, scale: { deployment: web } }\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .args(["serve", "--addr", "127.0.0.1:0", "--scenario"])
        .arg(bad.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("replicas") && stderr.contains(&bad.path().display().to_string()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_drives_the_cluster() {
    let (sim, client, shutdown) = start().await;
    let http = reqwest::Client::new();
    http.post(format!("{}/cloud/v1/instances", sim.url()))
        .json(&json!({ "name": "worker", "capacity": { "cpu": "8", "memory": "16Gi" } }))
        .send()
        .await
        .expect("cloud");
    let scenario = shoal_sim::scenario::Scenario::parse(
        "inline",
        "name: quick\nsteps:\n\
         - { at: 0s, createDeployment: { name: app, replicas: 2, cpu: 100m, memory: 64Mi, usage: { cpu: 50m } } }\n\
         - { at: 300ms, scale: { deployment: app, replicas: 4 } }\n\
         - { at: 600ms, setUsage: { deployment: app, usage: { cpu: 80m } } }\n",
    )
    .expect("scenario");
    sim.play(scenario, shutdown.clone()).await.expect("played");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    eventually("4 running pods with the new usage", async || {
        let Ok(list) = pods.list(&ListParams::default().labels("app=app")).await else {
            return false;
        };
        list.items.len() == 4
            && list.items.iter().all(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && p.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("sim.shoal.dev/cpu-usage"))
                        .map(String::as_str)
                        == Some("80m")
            })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_a_node_terminate_gracefully() {
    let (sim, client, _shutdown) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, selector: serde_json::Value| -> Pod {
        serde_json::from_value(json!({ "metadata": { "name": name }, "spec": { "nodeSelector": selector, "containers": [ { "name": "c", "image": "x" } ] } }))
            .expect("pod")
    };
    // Unbound: deleted at once.
    pods.create(
        &PostParams::default(),
        &pod("nowhere", json!({ "pool": "none" })),
    )
    .await
    .expect("create");
    pods.delete("nowhere", &Default::default())
        .await
        .expect("delete");
    assert!(pods.get_opt("nowhere").await.expect("get").is_none());

    reqwest::Client::new()
        .post(format!("{}/cloud/v1/instances", sim.url()))
        .json(&json!({ "name": "w", "capacity": { "cpu": "2", "memory": "4Gi" } }))
        .send()
        .await
        .expect("cloud");
    for name in ["graceful", "forced"] {
        pods.create(&PostParams::default(), &pod(name, json!({})))
            .await
            .expect("create");
    }
    eventually("both running", async || {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        list.iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count()
            == 2
    })
    .await;

    // Bound: Terminating first, gone once the kubelet has stopped it.
    let deleted = pods
        .delete("graceful", &Default::default())
        .await
        .expect("delete");
    let terminating = deleted.left().expect("the pod comes back, terminating");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    eventually("graceful pod gone", async || {
        pods.get_opt("graceful").await.ok().flatten().is_none()
    })
    .await;

    // Grace 0 deletes at once.
    pods.delete(
        "forced",
        &kube::api::DeleteParams::default().grace_period(0),
    )
    .await
    .expect("delete");
    assert!(pods.get_opt("forced").await.expect("get").is_none());
}
