//! Out-of-tree backends: the Python example plugin (examples/plugins/python, grpcio) as its own
//! process, checked by `shoal plugin check` (and a deliberately broken one failed point by point),
//! then used as `plugin:procs` by the provisioner — down when nodes are asked for (the breaker
//! opens, the claims wait), back, nodes Ready, deleted, processes gone.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running};
use shoal_testkit::{EtcdServer, ServiceProcess, SimServer, bin_path, free_port, wait_for};

fn plugin(sim: &SimServer, addr: SocketAddr, misbehave: bool) -> ServiceProcess {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins/python/process_pool.py");
    let mut args = vec![
        script.display().to_string(),
        format!("--listen={addr}"),
        format!("--api={}", sim.url()),
        format!("--sim-binary={}", bin_path("shoal-sim").display()),
    ];
    if misbehave {
        args.push("--misbehave".into());
    }
    let p = ServiceProcess::start_program(
        "process-pool",
        &shoal_testkit::fakepve::python(),
        &args,
        &[],
    );
    let up = wait_for(Duration::from_secs(30), || {
        p.logs().contains("listening on").then_some(())
    });
    assert!(up.is_some(), "the plugin starts: {}", p.logs());
    p
}

fn check(addr: SocketAddr) -> (bool, String) {
    let out = Command::new(bin_path("shoal"))
        .args(["plugin", "check", &format!("http://{addr}"), "--timeout=5s"])
        .output()
        .expect("shoal plugin check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_kit_passes_the_example_and_fails_a_broken_plugin_point_by_point() {
    let sim = SimServer::start(&[]);
    let good = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _good = plugin(&sim, good, false);
    let (ok, out) = check(good);
    assert!(ok, "{out}");
    for point in [
        "describe",
        "create",
        "create-is-idempotent",
        "list-by-labels",
        "invalid-argument",
        "delete",
        "delete-missing-is-ok",
        "deadlines",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("PASS") && l.split_whitespace().nth(1) == Some(point)),
            "{point} passes:\n{out}"
        );
    }

    let bad = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _bad = plugin(&sim, bad, true);
    let (ok, out) = check(bad);
    assert!(!ok, "a broken plugin is not conformant:\n{out}");
    for point in [
        "create-is-idempotent",
        "invalid-argument",
        "delete-missing-is-ok",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(point)),
            "{point} fails:\n{out}"
        );
    }
    assert!(out.contains("NOT conformant: 3 point(s) failed"), "{out}");
}

fn call(p: &Running, method: &str, body: Value) -> Value {
    shoal_e2e::provisioner_call(p, method, body)
}

#[test]
fn a_plugin_down_while_nodes_are_asked_for_is_waited_for_then_used_end_to_end() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--node-grace-period=5s"]);
    let store = EtcdReader::new(&etcd);
    store.put_pool(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: procs }\nspec:\n  provider: { backend: \"plugin:procs\" }\n  template:\n    labels: { role: worker }\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 5 }\n  scaleUp: { maxConcurrent: 5 }\n  scaleDown: { drainTimeout: 5s }\n",
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  backends:\n    plugins:\n      procs: {{ address: \"http://{addr}\" }}\n  resilience: {{ callTimeout: 2s, attempts: 2, retryMinDelay: 50ms, retryMaxDelay: 200ms, breakerFailures: 3, breakerRecovery: 1s }}\n  nodeTtl: 60s\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n",
            sim.kubeconfig().display()
        ),
    )
    .expect("config");
    // The plugin is down (killed) when the nodes are asked for.
    let mut down = plugin(&sim, addr, false);
    down.kill();
    let mut p = Running::start(
        "shoal-provisioner",
        "plug-prov",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    p.wait_ready();
    let leads = wait_for(Duration::from_secs(15), || {
        (p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
    });
    assert!(leads.is_some(), "{}", p.process.logs());
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "procs", "count": 2, "idempotencyKey": "k" }),
    );
    let open = wait_for(Duration::from_secs(20), || {
        let s = call(&p, "GetBackendStatus", json!({}));
        let open = s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["backend"] == "plugin:procs" && b["breaker"] == "BREAKER_STATE_OPEN");
        open.then_some(s)
    });
    assert!(open.is_some(), "the breaker opens\n{}", p.process.logs());
    let phases = |s: &EtcdReader| -> Vec<String> {
        s.json_under("claims/")
            .iter()
            .map(|c| c["phase"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(phases(&store), ["Pending", "Pending"], "the claims wait");

    // Back: the claims complete.
    let _up = plugin(&sim, addr, false);
    let ready = wait_for(Duration::from_secs(40), || {
        (phases(&store) == ["Ready", "Ready"]).then_some(())
    });
    assert!(
        ready.is_some(),
        "{:?}\n{}",
        store.json_under("claims/"),
        p.process.logs()
    );
    let done = call(&p, "GetOperation", json!({ "id": op["id"] }));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    let nodes = shoal_e2e::sim_get(
        sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dprocs",
    );
    assert_eq!(nodes["items"].as_array().map(Vec::len), Some(2), "{nodes}");
    let info = call(&p, "ListInstances", json!({}));
    assert_eq!(
        info.to_string()
            .matches("\"backend\":\"plugin:procs\"")
            .count(),
        2,
        "{info}"
    );

    // Deleted: the plugin's processes go, and so do the Nodes.
    let names: Vec<String> = store
        .json_under("claims/")
        .iter()
        .filter_map(|c| c["nodeName"].as_str().map(String::from))
        .collect();
    let del = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": names, "idempotencyKey": "d" }),
    );
    let gone = wait_for(Duration::from_secs(30), || {
        let op = call(&p, "GetOperation", json!({ "id": del["id"] }));
        let nodes = shoal_e2e::sim_get(
            sim.addr(),
            "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dprocs",
        );
        (op["state"] == "OPERATION_STATE_SUCCEEDED"
            && nodes["items"].as_array().is_some_and(|i| i.is_empty()))
        .then_some(())
    });
    assert!(gone.is_some(), "{}", p.process.logs());
    let listed = call(&p, "ListInstances", json!({}));
    assert!(
        !listed.to_string().contains("plugin:procs"),
        "the plugin lists nothing: {listed}"
    );
    p.process.kill();
}
