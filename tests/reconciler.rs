//! The reconciler as its own process: drift created for real behind the system's back, found
//! and repaired in one pass through the provisioner, checked on the backend, in etcd and in
//! Kubernetes.

use std::time::Duration;

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running, grpcurl_ok, sim_get};
use shoal_testkit::{EtcdServer, SimServer, wait_for};

const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 5 }\n";

fn call(addr: &str, method: &str, body: Value) -> Value {
    let out = grpcurl_ok(&["-plaintext", "-d", &body.to_string(), addr, method]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
}

#[test]
fn orphan_instances_orphan_nodes_vanished_instances_and_leaked_ids_are_repaired_in_one_pass() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=200ms", "--boot-jitter=100ms"]);
    let store = EtcdReader::new(&etcd);
    store.put_pool(POOL);
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n  instanceCheckInterval: 60s\n",
            sim.kubeconfig().display(),
            sim.url()
        ),
    )
    .expect("config");
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "prov-r",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    provisioner.wait_ready();
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let mut reconciler = Running::start(
        "shoal-reconciler",
        "rec-r",
        Some(&etcd),
        &[
            &kube,
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            "--set=service.orphanGrace=0s",
            "--set=service.notReadyGrace=0s",
            "--set=service.interval=1h",
        ],
        &[],
    );
    reconciler.wait_ready();
    let p = provisioner.grpc.to_string();
    let r = reconciler.grpc.to_string();
    let leads = wait_for(Duration::from_secs(15), || {
        (provisioner.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
    });
    assert!(leads.is_some());

    // Two good nodes.
    let op = call(
        &p,
        "shoal.v1.ProvisionerService/CreateNodes",
        json!({ "pool": "general", "count": 2, "idempotencyKey": "k" }),
    );
    let done = wait_for(Duration::from_secs(30), || {
        let op = call(
            &p,
            "shoal.v1.ProvisionerService/GetOperation",
            json!({ "id": op["id"] }),
        );
        (op["state"] == "OPERATION_STATE_SUCCEEDED").then_some(())
    });
    assert!(done.is_some(), "{}", provisioner.process.logs());

    // A clean pass finds nothing.
    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    assert!(
        report["drifts"].as_array().is_none_or(|d| d.is_empty()),
        "{report}"
    );

    // Drift, made for real: a rogue instance with our labels (it registers as a Node too);
    // an instance deleted behind the system's back; a leaked name reservation.
    let rogue = json!({ "name": "rogue-1", "labels": { "shoal.dev/cluster": "default", "shoal.dev/pool": "general", "shoal.dev/claim": "c-nobody" }, "capacity": { "cpu": "2", "memory": "4Gi" } }).to_string();
    let (code, _) =
        shoal_testkit::http_request(sim.addr(), "POST", "/cloud/v1/instances", Some(&rogue))
            .expect("rogue");
    assert_eq!(code, 201);
    let instances = sim_get(sim.addr(), "/cloud/v1/instances")["instances"].clone();
    let victim = instances
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == "general-2")
        .expect("general-2 instance")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, _) = shoal_testkit::http_request(
        sim.addr(),
        "DELETE",
        &format!("/cloud/v1/instances/{victim}"),
        None,
    )
    .expect("delete");
    assert_eq!(code, 204);
    store.put_raw("ids/sim/general-9", b"c-gone");
    wait_for(Duration::from_secs(10), || {
        matches!(
            shoal_testkit::http_get(sim.addr(), "/api/v1/nodes/rogue-1"),
            Ok((200, _))
        )
        .then_some(())
    })
    .expect("rogue node registers");

    // One pass repairs all of it.
    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    let drifts = report["drifts"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<(String, String)> = drifts
        .iter()
        .map(|d| {
            (
                d["type"].as_str().unwrap_or("").to_string(),
                d["repairResult"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    println!("drifts: {kinds:?}");
    for kind in [
        "DRIFT_TYPE_ORPHAN_INSTANCE",
        "DRIFT_TYPE_MISSING_INSTANCE",
        "DRIFT_TYPE_LEAKED_ID",
    ] {
        assert!(
            kinds.contains(&(kind.to_string(), "REPAIR_RESULT_REPAIRED".to_string())),
            "{kind} repaired: {report:#}"
        );
    }
    // Backend: only general-1 is left. Store: general-2's claim Failed, the leaked id gone.
    let names: Vec<String> = sim_get(sim.addr(), "/cloud/v1/instances")["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, ["general-1"]);
    let claims = store.json_under("claims/");
    let failed = claims
        .iter()
        .find(|c| c["nodeName"] == "general-2")
        .expect("claim");
    assert_eq!(failed["phase"], "Failed", "{failed}");
    assert!(store.json_under("ids/sim/general-9").is_empty());
    // Kubernetes: the rogue Node went with its instance; no Node without a live claim.
    let nodes: Vec<String> = sim_get(sim.addr(), "/api/v1/nodes")["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect();
    assert_eq!(nodes, ["general-1"]);
    // Recorded, counted, and a second pass is clean.
    let listed = call(&r, "shoal.v1.ReconcilerService/ListDrifts", json!({}));
    assert!(
        listed["drifts"].as_array().is_some_and(|d| d.len() >= 3),
        "{listed}"
    );
    assert!(
        reconciler
            .metric("shoal_reconciliation_drifts_total{type=\"OrphanInstance\"}")
            .is_some_and(|v| v >= 1.0),
        "{}",
        reconciler.metrics_text()
    );
    let again = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    assert!(
        again["drifts"].as_array().is_none_or(|d| d.is_empty()),
        "{again}"
    );
}
