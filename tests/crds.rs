//! Shoal as Kubernetes users meet it: NodePools applied with kubectl drive the decider
//! (`poolSource: crd`), `kubectl get nodepools,nodeclaims` follows a scale-up, pending pods carry
//! TriggeredScaleUp / NotTriggerScaleUp Events with the decision id, scale-down leaves ScaleDown
//! Events, and the official Python client manages NodePools. Every piece is its own process:
//! etcd, the simulator, metrics, decider and provisioner.

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use shoal_e2e::{KubeCluster, deployment_yaml, grpcurl, kubectl};
use shoal_testkit::{SimServer, require_tool, wait_for};

fn pool(name: &str, max: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {name} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: {max} }}\n  scaleDown: {{ unneededFor: 2s, cooldown: 1s, maxConcurrent: 4, drainTimeout: 10s }}\n"
    )
}

/// kubectl that may fail: (success, stdout, stderr).
fn kubectl_try(kubeconfig: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(require_tool("kubectl", "install kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("kubectl output");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// The CRDs as users install them: the checked-in file.
fn install_crds(kubeconfig: &Path) {
    let crds = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/k8s/crds/shoal.dev.yaml"
    ))
    .expect("deploy/k8s/crds/shoal.dev.yaml");
    kubectl(kubeconfig, &["apply", "-f", "-"], &crds);
}

/// The cluster of these tests, with the NodePool and NodeClaim CRDs (the checked-in file) and a
/// pool stored before the switch to `poolSource: crd`, with no NodePool: it goes.
struct Cluster(KubeCluster);

impl std::ops::Deref for Cluster {
    type Target = KubeCluster;
    fn deref(&self) -> &KubeCluster {
        &self.0
    }
}

impl Cluster {
    fn start() -> Cluster {
        Cluster(KubeCluster::start(
            "crd",
            &["shoal.dev.yaml"],
            "  nodeClaims: true\n",
            &["--set=service.poolSource=crd", "--set=service.events=true"],
            |etcd| shoal_e2e::EtcdReader::new(etcd).put_pool(&pool("legacy", "2")),
        ))
    }

    fn kubectl(&self, args: &[&str]) -> String {
        kubectl(&self.kubeconfig(), args, "")
    }

    /// `kubectl get` of one NodePool field (jsonpath).
    fn pool_field(&self, name: &str, path: &str) -> String {
        kubectl_try(
            &self.kubeconfig(),
            &["get", "nodepool", name, "-o", &format!("jsonpath={path}")],
            "",
        )
        .1
    }

    /// Pods of `app` in the given phase.
    fn pods(&self, app: &str, phase: &str) -> Vec<String> {
        self.kubectl(&[
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            &format!("--field-selector=status.phase={phase}"),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect()
    }

    /// `PoolService/ListPools` as JSON text, if the decider answered.
    fn stored_pools(&self) -> Option<String> {
        let out = grpcurl(&[
            "-plaintext",
            "-d",
            "{}",
            &self.decider.grpc.to_string(),
            "shoal.v1.PoolService/ListPools",
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn logs(&self) -> String {
        format!(
            "--- decider\n{}\n--- provisioner\n{}\n--- metrics\n{}",
            self.decider.process.logs(),
            self.provisioner.process.logs(),
            self.metrics.process.logs()
        )
    }
}

#[test]
fn nodepools_applied_with_kubectl_drive_scaling_and_show_it() {
    let cluster = Cluster::start();
    let kubeconfig = cluster.kubeconfig();

    // Work waits before any pool exists; so does a pod no pool will ever take.
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        &deployment_yaml("web", 6, "1500m", "1Gi", None),
    );
    let gpu = "apiVersion: v1\nkind: Pod\nmetadata: { name: wants-gpu, namespace: default, labels: { app: gpu } }\nspec:\n  nodeSelector: { accelerator: h100 }\n  containers:\n  - { name: c, image: x, resources: { requests: { cpu: 100m } } }\n";
    kubectl(&kubeconfig, &["apply", "-f", "-"], gpu);
    let pending = wait_for(Duration::from_secs(10), || {
        (cluster.pods("web", "Pending").len() == 6).then_some(())
    });
    assert!(pending.is_some(), "6 web pods pending");

    // The stored pool without a NodePool is gone once the decider leads.
    let legacy_gone = wait_for(Duration::from_secs(10), || {
        cluster
            .stored_pools()
            .is_some_and(|pools| !pools.contains("legacy"))
            .then_some(())
    });
    assert!(
        legacy_gone.is_some(),
        "a stored pool without a NodePool is deleted\n{}",
        cluster.logs()
    );

    // An invalid NodePool is refused by the schema, with the field path.
    let (ok, _, stderr) = kubectl_try(
        &kubeconfig,
        &["apply", "-f", "-"],
        &pool("broken", "\"six\""),
    );
    assert!(!ok, "a NodePool with maxNodes: \"six\" must be refused");
    assert!(
        stderr.contains("spec.limits.maxNodes") && stderr.contains("integer"),
        "{stderr}"
    );
    // Pools cannot be changed behind the CRDs' back.
    let refused = grpcurl(&[
        "-plaintext",
        "-d",
        &serde_json::json!({ "yaml": pool("sneaky", "3") }).to_string(),
        &cluster.decider.grpc.to_string(),
        "shoal.v1.PoolService/ApplyPool",
    ]);
    let text = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        text.contains("FailedPrecondition") && text.contains("kubectl"),
        "{text}"
    );

    // kubectl apply → the decider plans with it at once.
    let applied = Instant::now();
    kubectl(&kubeconfig, &["apply", "-f", "-"], &pool("general", "3"));
    let first_claim = wait_for(Duration::from_secs(10), || {
        let claims = cluster.kubectl(&["get", "nodeclaims", "-o", "name"]);
        (!claims.trim().is_empty()).then(|| applied.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "no NodeClaim after the NodePool was applied\n{}",
            cluster.logs()
        )
    });
    println!("NodePool applied → first NodeClaim listed: {first_claim:?}");
    assert!(
        first_claim < Duration::from_secs(2),
        "the decider used the new pool for its next decision (took {first_claim:?})"
    );

    // kubectl get nodepools,nodeclaims during the scale-up: counts and phases move.
    let mut phases_seen = std::collections::BTreeSet::new();
    let mut nodes_seen = std::collections::BTreeSet::new();
    let settled = wait_for(Duration::from_secs(30), || {
        let claims = cluster.kubectl(&[
            "get",
            "nodeclaims",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ]);
        phases_seen.extend(claims.split_whitespace().map(str::to_string));
        let nodes = cluster.pool_field("general", "{.status.nodes}/{.status.readyNodes}");
        nodes_seen.insert(nodes.clone());
        (nodes == "3/3" && claims.split_whitespace().filter(|p| *p == "Ready").count() == 3)
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "3 nodes Ready in status; saw nodes {nodes_seen:?}, phases {phases_seen:?}\n{}",
        cluster.logs()
    );
    assert!(
        phases_seen.len() > 1,
        "kubectl get nodeclaims showed the phases moving: {phases_seen:?}"
    );
    let table = cluster.kubectl(&["get", "nodepools,nodeclaims"]);
    println!("{table}");
    for header in [
        "NODES", "MIN", "MAX", "READY", "POOL", "PHASE", "NODE", "INSTANCE",
    ] {
        assert!(table.contains(header), "{header} in\n{table}");
    }
    // The pool is at maxNodes: so says its condition.
    let limit = cluster.pool_field(
        "general",
        "{.status.conditions[?(@.type==\"LimitReached\")].status}",
    );
    assert_eq!(limit, "True");
    let decision = cluster.pool_field("general", "{.status.lastDecisionId}");
    assert!(decision.starts_with('d'), "lastDecisionId {decision:?}");

    // The pods that triggered it say so, with the decision id.
    let running = cluster.pods("web", "Running");
    assert!(!running.is_empty());
    let described = cluster.kubectl(&["describe", "pod", &running[0]]);
    assert!(
        described.contains("TriggeredScaleUp") && described.contains("general +"),
        "{described}"
    );
    assert!(described.contains("(decision d"), "{described}");
    let gpu_described = cluster.kubectl(&["describe", "pod", "wants-gpu"]);
    assert!(
        gpu_described.contains("NotTriggerScaleUp") && gpu_described.contains("general:"),
        "{gpu_described}"
    );
    // kubectl describe nodeclaim shows its phase history.
    let claim = cluster
        .kubectl(&[
            "get",
            "nodeclaims",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .trim()
        .to_string();
    let described = cluster.kubectl(&["describe", "nodeclaim", &claim]);
    for phase in ["Pending", "Launched", "Ready"] {
        assert!(described.contains(phase), "{phase} in\n{described}");
    }

    // A spec the schema accepts but Shoal does not (unknown backend) shows on the resource.
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        &pool("general-2", "2").replace("backend: sim", "backend: vmware"),
    );
    let why = wait_for(Duration::from_secs(10), || {
        let ready = cluster.pool_field(
            "general-2",
            "{.status.conditions[?(@.type==\"Ready\")].reason}:{.status.conditions[?(@.type==\"Ready\")].message}",
        );
        ready.starts_with("InvalidSpec").then_some(ready)
    })
    .unwrap_or_else(|| panic!("general-2 reports its invalid spec\n{}", cluster.logs()));
    assert!(why.contains("spec.provider.backend"), "{why}");

    // Scale down: the work goes, nodes are drained and deleted, NodeClaims go with them.
    cluster.kubectl(&["delete", "deployment", "web"]);
    let gone = wait_for(Duration::from_secs(60), || {
        cluster
            .kubectl(&["get", "nodeclaims", "-o", "name"])
            .trim()
            .is_empty()
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "NodeClaims removed after scale-down\n{}",
        cluster.logs()
    );
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-A",
        "--field-selector=reason=ScaleDown",
        "-o",
        "jsonpath={.items[*].involvedObject.kind}",
    ]);
    assert!(
        events.contains("Node"),
        "ScaleDown Events on nodes: {events:?}"
    );
    let zero = wait_for(Duration::from_secs(5), || {
        (cluster.pool_field("general", "{.status.nodes}") == "0").then_some(())
    });
    assert!(zero.is_some(), "status.nodes back to 0");

    // Deleting the NodePool deletes the pool.
    cluster.kubectl(&["delete", "nodepool", "general", "general-2"]);
    let deleted = wait_for(Duration::from_secs(10), || {
        cluster
            .stored_pools()
            .is_some_and(|pools| !pools.contains("general"))
            .then_some(())
    });
    assert!(
        deleted.is_some(),
        "the pool left the store with its NodePool"
    );
}

#[test]
fn the_python_kubernetes_client_manages_nodepools() {
    let sim = SimServer::start(&[]);
    install_crds(&sim.kubeconfig());
    let python = shoal_testkit::fakepve::python();
    let has_client = Command::new(&python)
        .args(["-c", "import kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_client,
        "{} lacks the kubernetes package: run scripts/install-deps.sh",
        python.display()
    );
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/nodepools_client.py"
        ))
        .arg(sim.kubeconfig())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step in {stdout}"))
            .clone()
    };
    assert!(
        step("version")["git"]
            .as_str()
            .unwrap_or_default()
            .starts_with("v1.")
    );
    assert_eq!(step("created")["name"], "py-pool");
    assert_eq!(step("listed")["names"], serde_json::json!(["py-pool"]));
    assert_eq!(step("watched")["maxNodes"], 6);
    assert_eq!(step("status")["nodes"], 2);
    let refused = step("refused");
    assert_eq!(refused["code"], 422);
    assert!(
        refused["body"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.limits.maxNodes"),
        "{refused}"
    );
}

#[test]
fn a_claim_that_fails_shows_on_its_nodeclaim_and_its_pool() {
    let cluster = Cluster::start();
    let kubeconfig = cluster.kubeconfig();
    // Every instance fails to boot: its claim fails (an unavailable backend would only make
    // claims wait).
    let (code, body) = shoal_testkit::http_request(
        cluster.sim.addr(),
        "PUT",
        "/cloud/v1/faults",
        Some(r#"{"bootFailureRate": 1.0}"#),
    )
    .expect("sim faults");
    assert_eq!(code, 200, "{body}");
    kubectl(&kubeconfig, &["apply", "-f", "-"], &pool("general", "2"));
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        &deployment_yaml("web", 2, "1500m", "1Gi", None),
    );
    let failed = wait_for(Duration::from_secs(60), || {
        let phases = cluster.kubectl(&[
            "get",
            "nodeclaims",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ]);
        phases.contains("Failed").then_some(())
    });
    assert!(
        failed.is_some(),
        "a NodeClaim shows Failed\n{}",
        cluster.logs()
    );
    let events = wait_for(Duration::from_secs(10), || {
        let events = cluster.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector=reason=LaunchFailed",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.kind} {.type} {.message}{\"\\n\"}{end}",
        ]);
        (!events.trim().is_empty()).then_some(events)
    })
    .unwrap_or_else(|| panic!("a LaunchFailed Event\n{}", cluster.logs()));
    assert!(
        events.starts_with("NodeClaim Warning claim for pool general failed on backend sim"),
        "{events}"
    );
    let degraded = wait_for(Duration::from_secs(10), || {
        let d = cluster.pool_field(
            "general",
            "{.status.conditions[?(@.type==\"Degraded\")].status}",
        );
        (d == "True").then_some(())
    });
    assert!(degraded.is_some(), "the pool reports Degraded");
}
