//! The installed kubectl against the simulator: apply/re-apply (with kubectl's default strict
//! validation, done server-side), scale, get, cordon, drain blocked by a PodDisruptionBudget (as
//! real kubectl fails it), drain after the PDB is gone, delete, and `get --watch`.

mod common;

use common::{Kubectl, add_node, eventually, start};
use std::{process::Command, time::Duration};

use serde_json::json;

fn deployment(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: nginx\n        resources:\n          requests: {{cpu: 500m, memory: 128Mi}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_the_simulator() {
    let (sim, _client, _shutdown) = start().await;
    let kubectl = Kubectl::new(&sim);
    for name in ["node-a", "node-b"] {
        add_node(&sim, name, "4", json!({}), json!([])).await;
    }
    eventually("nodes listed", async || {
        kubectl
            .ok(&["get", "nodes", "-o", "name"])
            .await
            .lines()
            .count()
            == 2
    })
    .await;

    // apply, then re-apply with a new replica count.
    assert!(
        kubectl
            .apply(&deployment(2))
            .await
            .contains("deployment.apps/web created")
    );
    assert!(
        kubectl
            .apply(&deployment(3))
            .await
            .contains("deployment.apps/web configured")
    );
    // A typo is refused by kubectl's default (strict) validation, which the server performs.
    let (ok, _, stderr) = kubectl
        .run(
            &["apply", "-f", "-"],
            Some(&deployment(3).replace("replicas: 3", "replica: 3")),
        )
        .await;
    assert!(
        !ok && stderr.contains("unknown field \"spec.replica\""),
        "{stderr}"
    );
    let running = async || {
        let out = kubectl
            .ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
            ])
            .await;
        out.lines().filter(|l| *l == "Running").count()
    };
    eventually("3 pods running", async || running().await == 3).await;
    kubectl
        .ok(&["scale", "deployment", "web", "--replicas=2"])
        .await;
    eventually("2 pods", async || {
        kubectl
            .ok(&["get", "pods", "-l", "app=web", "-o", "name"])
            .await
            .lines()
            .count()
            == 2
    })
    .await;
    eventually("2 running", async || running().await == 2).await;

    let wide = kubectl.ok(&["get", "pods", "-A", "-o", "wide"]).await;
    let header = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        header.starts_with("NAMESPACE NAME READY STATUS RESTARTS AGE IP NODE"),
        "{wide}"
    );
    assert!(
        wide.lines()
            .filter(|l| l.contains("web-") && l.contains("Running") && l.contains("1/1"))
            .count()
            == 2,
        "{wide}"
    );
    let nodes = kubectl.ok(&["get", "nodes"]).await;
    assert!(
        nodes
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .eq(["NAME", "STATUS", "ROLES", "AGE", "VERSION"]),
        "{nodes}"
    );
    assert_eq!(
        nodes.lines().filter(|l| l.contains(" Ready ")).count(),
        2,
        "{nodes}"
    );
    let described = kubectl.ok(&["describe", "node", "node-a"]).await;
    assert!(described.contains("node-a"), "{described}");

    kubectl.ok(&["cordon", "node-b"]).await;
    assert_eq!(
        kubectl
            .ok(&[
                "get",
                "node",
                "node-b",
                "-o",
                "jsonpath={.spec.unschedulable}"
            ])
            .await,
        "true"
    );
    kubectl.ok(&["uncordon", "node-b"]).await;

    // A PDB that allows no disruption: drain fails as real kubectl does, after its timeout.
    let node_of_a_pod = kubectl
        .ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[0].spec.nodeName}",
        ])
        .await;
    kubectl.apply("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: web\nspec:\n  minAvailable: 2\n  selector:\n    matchLabels: {app: web}\n").await;
    eventually("pdb status", async || {
        kubectl
            .ok(&[
                "get",
                "pdb",
                "web",
                "-o",
                "jsonpath={.status.disruptionsAllowed}",
            ])
            .await
            == "0"
    })
    .await;
    let (ok, stdout, stderr) = kubectl
        .run(
            &[
                "drain",
                &node_of_a_pod,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout=3s",
            ],
            None,
        )
        .await;
    assert!(
        !ok,
        "drain must fail while the PDB forbids evictions:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("disruption budget"), "{stderr}");
    assert_eq!(running().await, 2, "nothing was evicted");

    // Without the PDB the drain goes through; the controller re-creates the pod elsewhere.
    kubectl.ok(&["delete", "pdb", "web"]).await;
    let drained = kubectl
        .ok(&[
            "drain",
            &node_of_a_pod,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=20s",
        ])
        .await;
    assert!(drained.contains("drained"), "{drained}");
    eventually("pods moved off the drained node", async || {
        let nodes = kubectl
            .ok(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
            ])
            .await;
        running().await == 2 && !nodes.lines().any(|n| n == node_of_a_pod)
    })
    .await;

    // --watch sees a new pod, then deletions clean up.
    let binary = shoal_testkit::require_tool("kubectl", "install kubectl");
    let mut watcher = Command::new(binary)
        .env("KUBECONFIG", kubectl.kubeconfig.path())
        .args(["get", "pods", "--watch", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    tokio::time::sleep(Duration::from_millis(500)).await;
    kubectl.apply("apiVersion: v1\nkind: Pod\nmetadata:\n  name: lonely\nspec:\n  containers:\n  - name: c\n    image: busybox\n").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = watcher.kill();
    let watched = watcher.wait_with_output().expect("watch output");
    assert!(
        String::from_utf8_lossy(&watched.stdout).contains("pod/lonely"),
        "{}",
        String::from_utf8_lossy(&watched.stdout)
    );

    kubectl.ok(&["delete", "pod", "lonely"]).await;
    kubectl.ok(&["delete", "deployment", "web"]).await;
    eventually("pods gone", async || {
        kubectl
            .ok(&["get", "pods", "-o", "name"])
            .await
            .trim()
            .is_empty()
    })
    .await;
    kubectl.ok(&["delete", "node", "node-a"]).await;
    assert_eq!(
        kubectl.ok(&["get", "nodes", "-o", "name"]).await.trim(),
        "node/node-b"
    );
}
