//! Consolidation end to end, every piece its own process (etcd, the simulated cluster,
//! Prometheus, metrics, decider, provisioner): two half-empty nodes become one. While a
//! PodDisruptionBudget allows no disruption of the pod that would move, nothing is removed and
//! the decisions say why; once it allows it, the pod is evicted and rescheduled onto the other
//! node, and the node is removed. The other node's pod is annotated `karpenter.sh/do-not-disrupt`:
//! it is never evicted and keeps its node. Three nodes with one pod each consolidate onto one,
//! one node at a time under a disruption budget of 1 although `maxConcurrent` allows three.

use std::time::Duration;

use serde_json::Value;
use shoal_e2e::{Running, grpcurl_ok, kubectl, sim_get};
use shoal_testkit::{EtcdServer, PrometheusServer, SimServer, wait_for};

fn pool(min_nodes: u32, max_concurrent: u32) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: general }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: {min_nodes}, maxNodes: 4 }}\n  scaleDown: {{ unneededFor: 5s, cooldown: 0s, maxConcurrent: {max_concurrent}, disruptionBudget: \"1\", drainTimeout: 30s }}\n"
    )
}

fn apply_pool(decider: &Running, yaml: &str) {
    let body = serde_json::json!({ "yaml": yaml }).to_string();
    grpcurl_ok(&[
        "-plaintext",
        "-d",
        &body,
        &decider.grpc.to_string(),
        "shoal.v1.PoolService/ApplyPool",
    ]);
}

fn ready_claims(provisioner: &Running) -> usize {
    shoal_e2e::node_claims(provisioner, "general")
        .iter()
        .filter(|c| c["phase"] == "CLAIM_PHASE_READY")
        .count()
}

fn labelled_nodes(sim: &SimServer) -> Vec<String> {
    sim_get(sim.addr(), "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim")["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect()
}

/// Running pods of an app: (name, uid, node).
fn running(sim: &SimServer, app: &str) -> Vec<(String, String, String)> {
    sim_get(
        sim.addr(),
        &format!("/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"),
    )["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Running")
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&p["metadata"]["name"]),
                s(&p["metadata"]["uid"]),
                s(&p["spec"]["nodeName"]),
            )
        })
        .collect()
}

fn deployment(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  replicas: 1\n  selector: {{ matchLabels: {{ app: {name} }} }}\n  template:\n    metadata:\n      labels: {{ app: {name} }}\n      annotations: {{ {annotations} }}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/app:1\n        resources: {{ requests: {{ cpu: 500m, memory: 256Mi }} }}\n"
    )
}

const PDB: &str = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: { name: web, namespace: default }\nspec:\n  minAvailable: 1\n  selector: { matchLabels: { app: web } }\n";

fn decisions(decider: &Running) -> String {
    grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{\"limit\": 20}",
        &decider.grpc.to_string(),
        "shoal.v1.DeciderService/ListDecisions",
    ])
}

/// Every process of the loop but the reconciler, the decider leading with no pools yet.
struct Loop {
    _etcd: EtcdServer,
    sim: SimServer,
    _prometheus: PrometheusServer,
    _metrics: Running,
    provisioner: Running,
    decider: Running,
    _dir: tempfile::TempDir,
}

fn start(name: &str) -> Loop {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=1s"]);
    let prometheus = PrometheusServer::start(&[sim.addr()]);
    let dir = tempfile::tempdir().expect("dir");
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let mut metrics = Running::start(
        "shoal-metrics",
        &format!("{name}-metrics"),
        None,
        &[
            &kube,
            &format!("--set=service.prometheus.url={}", prometheus.url()),
            "--set=service.batchIdle=500ms",
        ],
        &[],
    );
    metrics.wait_ready();
    let config = shoal_e2e::sim_provisioner_config(
        dir.path(),
        &sim,
        "election: { leaseTtl: 3s }\n",
        "  instanceCheckInterval: 2s\n  drainPollInterval: 200ms\n",
    );
    let mut provisioner = Running::start(
        "shoal-provisioner",
        &format!("{name}-provisioner"),
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    provisioner.wait_ready();
    let mut decider = Running::start(
        "shoal-decider",
        &format!("{name}-decider"),
        Some(&etcd),
        &[
            &format!("--set=service.metricsAddr=http://{}", metrics.grpc),
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            "--set=election.leaseTtl=3s",
        ],
        &[],
    );
    decider.wait_ready();
    let leads = wait_for(Duration::from_secs(15), || {
        (decider.metric("shoal_leader{service=\"decider\"}") == Some(1.0)).then_some(())
    });
    assert!(
        leads.is_some(),
        "the decider leads\n{}",
        decider.process.logs()
    );
    Loop {
        _etcd: etcd,
        sim,
        _prometheus: prometheus,
        _metrics: metrics,
        provisioner,
        decider,
        _dir: dir,
    }
}

#[test]
fn two_half_empty_nodes_become_one_honouring_pdbs_and_do_not_disrupt() {
    let Loop {
        sim,
        provisioner,
        decider,
        ..
    } = &start("consolidation");
    // Two nodes (minNodes 2), then one small pod on each: the scheduler spreads them.
    apply_pool(decider, &pool(2, 2));
    let two = wait_for(Duration::from_secs(30), || {
        (ready_claims(provisioner) == 2 && labelled_nodes(sim).len() == 2).then_some(())
    });
    assert!(two.is_some(), "two nodes\n{}", decider.process.logs());
    kubectl(&sim.kubeconfig(), &["apply", "-f", "-"], PDB);
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment("guarded", "karpenter.sh/do-not-disrupt: \"true\""),
    );
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment("web", ""),
    );
    let placed = wait_for(Duration::from_secs(30), || {
        let (g, w) = (running(sim, "guarded"), running(sim, "web"));
        (g.len() == 1 && w.len() == 1).then(|| (g[0].clone(), w[0].clone()))
    });
    let Some((guarded, web)) = placed else {
        panic!("both pods run: {:?}", sim_get(sim.addr(), "/api/v1/pods"));
    };
    assert_ne!(
        guarded.2, web.2,
        "least-allocated scheduling spreads the two pods over the two nodes"
    );

    // minNodes 0: both nodes are 25 % used, so one can go — but the PDB holds web in place and
    // the guarded pod may not be disrupted.
    apply_pool(decider, &pool(0, 2));
    let explained = wait_for(Duration::from_secs(30), || {
        let text = decisions(decider);
        (text.contains("PodDisruptionBudget default/web allows 0 disruption")
            && text.contains("annotated do-not-disrupt"))
        .then_some(())
    });
    assert!(
        explained.is_some(),
        "decisions say why both nodes stay: {}",
        decisions(decider)
    );
    assert_eq!(
        ready_claims(provisioner),
        2,
        "nothing removed while blocked"
    );
    assert_eq!(running(sim, "web")[0].1, web.1, "web was not evicted");

    // The PDB goes: web is evicted, rescheduled onto the guarded pod's node, and its node goes.
    kubectl(
        &sim.kubeconfig(),
        &["delete", "poddisruptionbudget", "web", "-n", "default"],
        "",
    );
    let consolidated = wait_for(Duration::from_secs(60), || {
        let nodes = labelled_nodes(sim);
        let w = running(sim, "web");
        (ready_claims(provisioner) == 1 && nodes.len() == 1 && w.len() == 1)
            .then(|| (nodes, w[0].clone()))
    });
    let Some((nodes, moved)) = consolidated else {
        panic!(
            "consolidated to one node: {:?}\n{}",
            labelled_nodes(sim),
            decider.process.logs()
        );
    };
    assert_eq!(
        nodes.as_slice(),
        std::slice::from_ref(&guarded.2),
        "the guarded pod's node stays"
    );
    assert_eq!(moved.2, guarded.2, "web runs on the remaining node");
    assert_ne!(moved.1, web.1, "web was evicted and re-created");
    let still = running(sim, "guarded");
    assert_eq!(still.len(), 1);
    assert_eq!(
        still[0].1, guarded.1,
        "the do-not-disrupt pod was never evicted"
    );
    assert!(
        decisions(decider).contains("fit on other nodes"),
        "{}",
        decisions(decider)
    );
}

/// Claims of the pool in Draining or Terminating.
fn disrupting(provisioner: &Running) -> usize {
    shoal_e2e::node_claims(provisioner, "general")
        .iter()
        .filter(|c| c["phase"] == "CLAIM_PHASE_DRAINING" || c["phase"] == "CLAIM_PHASE_TERMINATING")
        .count()
}

#[test]
fn a_disruption_budget_of_one_consolidates_one_node_at_a_time() {
    let Loop {
        sim,
        provisioner,
        decider,
        ..
    } = &start("budget");
    apply_pool(decider, &pool(3, 3));
    let three = wait_for(Duration::from_secs(40), || {
        (ready_claims(provisioner) == 3 && labelled_nodes(sim).len() == 3).then_some(())
    });
    assert!(three.is_some(), "three nodes\n{}", decider.process.logs());
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &shoal_e2e::deployment_yaml("web", 3, "500m", "256Mi", None),
    );
    let spread = wait_for(Duration::from_secs(30), || {
        let pods = running(sim, "web");
        let nodes: std::collections::BTreeSet<String> = pods.iter().map(|p| p.2.clone()).collect();
        (pods.len() == 3).then_some(nodes.len())
    });
    assert_eq!(
        spread,
        Some(3),
        "least-allocated scheduling: one pod per node"
    );

    // minNodes 0: two nodes can go, maxConcurrent allows three, the budget one at a time.
    apply_pool(decider, &pool(0, 3));
    let mut most = 0;
    let done = wait_for(Duration::from_secs(90), || {
        most = most.max(disrupting(provisioner));
        (ready_claims(provisioner) == 1
            && labelled_nodes(sim).len() == 1
            && running(sim, "web").len() == 3)
            .then_some(())
    });
    assert!(
        done.is_some(),
        "consolidated onto one node: {:?}\n{}",
        labelled_nodes(sim),
        decider.process.logs()
    );
    assert!(
        most <= 1,
        "at most one node disrupted at a time, saw {most}"
    );
    let actions = grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{\"limit\": 50, \"actionsOnly\": true}",
        &decider.grpc.to_string(),
        "shoal.v1.DeciderService/ListDecisions",
    ]);
    let listed: Value = serde_json::from_str(&actions).expect("decisions JSON");
    let downs: Vec<usize> = listed["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["actions"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["scaleDown"]["nodes"].as_array().map(|n| n.len()))
        .collect();
    assert_eq!(downs, [1, 1], "two scale-downs of one node each: {actions}");
}
