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

/// etcd, a simulator, a provisioner on its sim cloud with `nodes` Ready nodes, and a reconciler
/// repairing through it (orphan grace 0 s, no timed passes).
struct World {
    _etcd: EtcdServer,
    sim: SimServer,
    store: EtcdReader,
    _provisioner: Running,
    reconciler: Running,
    _dir: tempfile::TempDir,
}

impl World {
    fn start(sim_flags: &[&str], reconciler_flags: &[&str], nodes: i32) -> World {
        let etcd = EtcdServer::start();
        let mut flags = vec!["--boot-delay=200ms", "--boot-jitter=100ms"];
        flags.extend_from_slice(sim_flags);
        let sim = SimServer::start(&flags);
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
        let upstream = format!("--set=service.provisionerAddr=http://{}", provisioner.grpc);
        let mut args = vec![
            kube.as_str(),
            upstream.as_str(),
            "--set=service.orphanGrace=0s",
            "--set=service.interval=1h",
        ];
        args.extend_from_slice(reconciler_flags);
        let mut reconciler = Running::start("shoal-reconciler", "rec-r", Some(&etcd), &args, &[]);
        reconciler.wait_ready();
        let leads = wait_for(Duration::from_secs(15), || {
            (provisioner.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
        });
        assert!(leads.is_some());
        let p = provisioner.grpc.to_string();
        let op = call(
            &p,
            "shoal.v1.ProvisionerService/CreateNodes",
            json!({ "pool": "general", "count": nodes, "idempotencyKey": "k" }),
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
        World {
            _etcd: etcd,
            sim,
            store,
            _provisioner: provisioner,
            reconciler,
            _dir: dir,
        }
    }
}

#[test]
fn orphan_instances_orphan_nodes_vanished_instances_and_leaked_ids_are_repaired_in_one_pass() {
    let w = World::start(&[], &["--set=service.notReadyGrace=0s"], 2);
    let (sim, store, r) = (&w.sim, &w.store, w.reconciler.grpc.to_string());

    // A clean pass finds nothing.
    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    assert!(
        report["drifts"].as_array().is_none_or(|d| d.is_empty()),
        "{report}"
    );

    // Drift, made for real: a rogue instance with our labels (it registers as a Node too);
    // an instance deleted behind the system's back; a leaked name reservation.
    let cluster = store.cluster_id();
    let rogue = json!({ "name": "rogue-1", "labels": { "shoal.dev/cluster": cluster, "shoal.dev/pool": "general", "shoal.dev/claim": "c-nobody" }, "capacity": { "cpu": "2", "memory": "4Gi" } }).to_string();
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
    // A Node with our labels whose instance and claim are long gone (no kubelet: NotReady).
    let ghost = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "ghost-1", "labels": { "shoal.dev/cluster": cluster, "shoal.dev/pool": "general", "shoal.dev/claim": "c-ghost" } } }).to_string();
    let (code, answer) =
        shoal_testkit::http_request(sim.addr(), "POST", "/api/v1/nodes", Some(&ghost))
            .expect("ghost node");
    assert_eq!(code, 201, "{answer}");
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
        "DRIFT_TYPE_ORPHAN_NODE",
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
        w.reconciler
            .metric("shoal_reconciliation_drifts_total{type=\"OrphanInstance\"}")
            .is_some_and(|v| v >= 1.0),
        "{}",
        w.reconciler.metrics_text()
    );
    let again = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    assert!(
        again["drifts"].as_array().is_none_or(|d| d.is_empty()),
        "{again}"
    );
}

#[test]
fn a_dead_node_agent_a_deleted_claim_key_and_a_stuck_claim_are_repaired_in_one_pass() {
    let w = World::start(
        // Longer than the simulated kubelets' 10 s heartbeat, or every node would flap.
        &["--node-grace-period=12s"],
        &[
            "--set=service.notReadyGrace=1s",
            "--set=service.launchTtl=1s",
        ],
        3,
    );
    let (sim, store, r) = (&w.sim, &w.store, w.reconciler.grpc.to_string());
    let claim_of = |node: &str| -> String {
        store
            .json_under("claims/")
            .into_iter()
            .find(|c| c["nodeName"] == node)
            .and_then(|c| c["id"].as_str().map(String::from))
            .expect("claim")
    };

    // general-1's node agent dies: its Node goes NotReady while the claim says Ready.
    let (code, _) =
        shoal_testkit::http_request(sim.addr(), "POST", "/sim/v1/nodes/general-1/kill", None)
            .expect("kill");
    assert!(code < 300);
    let not_ready = wait_for(Duration::from_secs(40), || {
        let n = sim_get(sim.addr(), "/api/v1/nodes/general-1");
        let ready = n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (!ready).then_some(())
    });
    assert!(not_ready.is_some(), "general-1 goes NotReady");
    std::thread::sleep(Duration::from_millis(1500));
    // general-2's claim key is deleted behind the system's back.
    let c2 = claim_of("general-2");
    store.delete_raw(&format!("claims/{c2}"));
    // A claim nobody drives stays Pending.
    store.put_raw(
        "claims/c-stuck",
        json!({ "id": "c-stuck", "pool": "general", "phase": "Pending", "backend": "sim", "nodeName": "general-7",
                "operationId": "op-gone", "createdAtMs": 1000, "updatedAtMs": 1000,
                "history": [ { "phase": "Pending", "atMs": 1000, "reason": "written by hand" } ] })
        .to_string()
        .as_bytes(),
    );

    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    let drifts = report["drifts"].as_array().cloned().unwrap_or_default();
    let found = |kind: &str, subject: &str| {
        drifts
            .iter()
            .find(|d| {
                d["type"] == kind && d["subject"].as_str().is_some_and(|s| s.contains(subject))
            })
            .cloned()
            .unwrap_or_else(|| panic!("{kind} for {subject}: {report:#}"))
    };
    let c1 = claim_of("general-1");
    for d in &drifts {
        println!("drift {} {} {}", d["type"], d["subject"], d["repairResult"]);
    }
    assert_eq!(
        found("DRIFT_TYPE_PHASE_MISMATCH", &c1)["repairResult"],
        "REPAIR_RESULT_REPAIRED"
    );
    assert_eq!(
        found("DRIFT_TYPE_ORPHAN_INSTANCE", "i-")["repairResult"],
        "REPAIR_RESULT_REPAIRED"
    );
    assert_eq!(
        found("DRIFT_TYPE_STUCK_CLAIM", "c-stuck")["repairResult"],
        "REPAIR_RESULT_REPAIRED"
    );

    // Backend, store and Kubernetes agree: only general-3 is left.
    let names: Vec<String> = sim_get(sim.addr(), "/cloud/v1/instances")["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, ["general-3"]);
    let phases: Vec<(String, String)> = store
        .json_under("claims/")
        .iter()
        .map(|c| {
            (
                c["nodeName"].as_str().unwrap_or("").to_string(),
                c["phase"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        phases.contains(&("general-1".into(), "Failed".into())),
        "{phases:?}"
    );
    assert!(
        phases.contains(&("general-7".into(), "Failed".into())),
        "{phases:?}"
    );
    assert!(
        phases.contains(&("general-3".into(), "Ready".into())),
        "{phases:?}"
    );
    let nodes: Vec<String> = sim_get(sim.addr(), "/api/v1/nodes")["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect();
    assert_eq!(nodes, ["general-3"]);
    println!("drifts: {}", drifts.len());
}

#[test]
fn under_the_adopt_policy_a_lost_claim_is_written_again_and_a_wrong_operation_record_is_settled() {
    let w = World::start(&[], &["--set=service.orphanPolicy=adopt"], 2);
    let (sim, store, r) = (&w.sim, &w.store, w.reconciler.grpc.to_string());
    let claims = store.json_under("claims/");
    let lost = claims
        .iter()
        .find(|c| c["nodeName"] == "general-2")
        .expect("claim of general-2")
        .clone();
    let lost_id = lost["id"].as_str().expect("id").to_string();
    let instance = lost["instanceId"].as_str().expect("instance").to_string();

    // The claim record is lost; its instance and Node live on.
    store.delete_raw(&format!("claims/{lost_id}"));
    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    let drifts = report["drifts"].as_array().cloned().unwrap_or_default();
    for d in &drifts {
        println!(
            "drift {} {} {} {}",
            d["type"], d["subject"], d["repairAction"], d["repairResult"]
        );
    }
    assert_eq!(drifts.len(), 1, "only the orphan instance: {report:#}");
    let adopted = drifts
        .iter()
        .find(|d| d["type"] == "DRIFT_TYPE_ORPHAN_INSTANCE")
        .unwrap_or_else(|| panic!("orphan instance found: {report:#}"));
    assert_eq!(adopted["repairAction"], "adopt instance", "{adopted}");
    assert_eq!(
        adopted["repairResult"], "REPAIR_RESULT_REPAIRED",
        "{adopted}"
    );
    assert!(
        !drifts
            .iter()
            .any(|d| d["type"] == "DRIFT_TYPE_LEAKED_ID" || d["type"] == "DRIFT_TYPE_ORPHAN_NODE"),
        "the name and the Node go with the adopted instance: {report:#}"
    );

    // The claim is back under its id, driven to Ready; instance and Node were kept.
    let back = wait_for(Duration::from_secs(20), || {
        store
            .json_under(&format!("claims/{lost_id}"))
            .into_iter()
            .find(|c| c["phase"] == "Ready")
    })
    .unwrap_or_else(|| panic!("adopted claim Ready: {:?}", store.json_under("claims/")));
    assert_eq!(back["instanceId"], instance.as_str());
    assert_eq!(back["nodeName"], "general-2");
    let mut names: Vec<String> = sim_get(sim.addr(), "/cloud/v1/instances")["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    names.sort();
    assert_eq!(names, ["general-1", "general-2"]);
    assert_eq!(
        sim_get(sim.addr(), "/api/v1/nodes/general-2")["metadata"]["labels"]["shoal.dev/claim"],
        lost_id.as_str()
    );

    // The first operation's record is tampered with: it says Failed though both nodes came up.
    let ops = store.json_under("ops/");
    let mut first = ops
        .iter()
        .find(|o| o["idempotencyKey"] == "k")
        .expect("first op")
        .clone();
    assert_eq!(first["state"], "Succeeded", "{first}");
    first["state"] = json!("Failed");
    first["error"] = json!("written by hand");
    let op_id = first["id"].as_str().expect("op id").to_string();
    store.put_raw(&format!("ops/{op_id}"), first.to_string().as_bytes());
    let report = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    let drifts = report["drifts"].as_array().cloned().unwrap_or_default();
    let settled = drifts
        .iter()
        .find(|d| d["type"] == "DRIFT_TYPE_COUNTER_MISMATCH")
        .unwrap_or_else(|| panic!("counter mismatch found: {report:#}"));
    println!("{settled}");
    assert_eq!(settled["subject"], op_id.as_str());
    assert_eq!(
        settled["repairResult"], "REPAIR_RESULT_REPAIRED",
        "{settled}"
    );
    let fixed = store.json_under(&format!("ops/{op_id}"));
    assert_eq!(fixed[0]["state"], "Succeeded", "{fixed:?}");

    let again = call(&r, "shoal.v1.ReconcilerService/Reconcile", json!({}));
    assert!(
        again["drifts"].as_array().is_none_or(|d| d.is_empty()),
        "{again}"
    );
}
