//! The provisioner as its own process, with real etcd and the simulator's cloud as the `sim`
//! backend: bad requests, parallel creation to Ready, idempotency, PDB-honouring drains, and
//! crash safety under `kill -9` at the three dangerous points.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running, add_sim_node, grpcurl, grpcurl_ok, kubectl, sim_get};
use shoal_testkit::{EtcdServer, SimServer, wait_for};

fn pool_yaml(extra: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: general }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    labels: {{ role: worker }}\n    startupTaints: [{{ key: shoal.dev/unregistered, effect: NoSchedule }}]\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: 5 }}\n  permanentNodes: [general-keep]\n  scaleUp: {{ maxConcurrent: 10 }}\n  scaleDown: {{ drainTimeout: 3s }}\n{extra}"
    )
}

struct Fixture {
    etcd: EtcdServer,
    sim: SimServer,
    store: EtcdReader,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_ttl("60s")
    }

    fn with_ttl(ttl: &str) -> Fixture {
        Fixture::with(ttl, &pool_yaml(""), "")
    }

    /// A fixture whose store holds `pool` and whose provisioner config has `service` (lines
    /// indented by two spaces) besides the usual.
    fn with(ttl: &str, pool: &str, service: &str) -> Fixture {
        let etcd = EtcdServer::start();
        let sim = SimServer::start(&["--boot-delay=300ms", "--boot-jitter=200ms"]);
        let store = EtcdReader::new(&etcd);
        store.put_pool(pool);
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("provisioner.yaml");
        let yaml = format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n  resilience: {{ callTimeout: 2s, attempts: 4, retryMinDelay: 50ms, retryMaxDelay: 400ms, breakerFailures: 5, breakerRecovery: 3s }}\n  nodeTtl: {ttl}\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n{service}",
            sim.kubeconfig().display(),
            sim.url()
        );
        std::fs::write(&config, yaml).expect("write config");
        Fixture {
            etcd,
            sim,
            store,
            config,
            _dir: dir,
        }
    }

    fn provisioner(&self, instance: &str, env: &[(&str, &str)]) -> Running {
        let config = format!("--config={}", self.config.display());
        let mut p = Running::start(
            "shoal-provisioner",
            instance,
            Some(&self.etcd),
            &[&config],
            env,
        );
        p.wait_ready();
        let leads = wait_for(Duration::from_secs(15), || {
            (p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
        });
        assert!(leads.is_some(), "{instance} leads\n{}", p.process.logs());
        p
    }

    /// A second replica; it stands by while another leads.
    fn provisioner_standby(&self, instance: &str) -> Running {
        self.provisioner_standby_with(instance, &[])
    }

    fn provisioner_standby_with(&self, instance: &str, env: &[(&str, &str)]) -> Running {
        let config = format!("--config={}", self.config.display());
        let mut p = Running::start(
            "shoal-provisioner",
            instance,
            Some(&self.etcd),
            &[&config],
            env,
        );
        p.wait_ready();
        p
    }

    fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        kubectl(&self.sim.kubeconfig(), args, stdin)
    }

    /// Instances in the sim cloud owned by this cluster.
    fn instances(&self) -> Vec<Value> {
        sim_get(
            self.sim.addr(),
            &format!(
                "/cloud/v1/instances?labelSelector=shoal.dev%2Fcluster%3D{}",
                self.store.cluster_id()
            ),
        )["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn claims(&self) -> Vec<Value> {
        self.store.json_under("claims/")
    }

    fn live_claims(&self) -> Vec<Value> {
        self.claims()
            .into_iter()
            .filter(|c| !matches!(c["phase"].as_str(), Some("Deleted" | "Failed")))
            .collect()
    }

    /// Node names carrying a claim label.
    fn claimed_nodes(&self) -> Vec<String> {
        sim_get(
            self.sim.addr(),
            "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim",
        )["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
            .collect()
    }

    /// Every instance belongs to a live claim, every live claim that launched has exactly one
    /// instance and one Node, and no name appears twice.
    fn assert_consistent(&self) {
        let instances = self.instances();
        let live = self.live_claims();
        let names: Vec<String> = instances
            .iter()
            .filter_map(|i| i["name"].as_str().map(String::from))
            .collect();
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicate instances: {names:?}");
        assert_eq!(
            instances.len(),
            live.len(),
            "instances {names:?} vs live claims {live:#?}"
        );
        let mut nodes = self.claimed_nodes();
        nodes.sort();
        let mut claimed: Vec<String> = live
            .iter()
            .filter_map(|c| c["nodeName"].as_str().map(String::from))
            .collect();
        claimed.sort();
        assert_eq!(nodes, claimed, "nodes vs live claims");
    }
}

fn call(p: &Running, method: &str, body: Value) -> Value {
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &body.to_string(),
        &p.grpc.to_string(),
        &format!("shoal.v1.ProvisionerService/{method}"),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
}

/// grpcurl's error text for a call that must fail.
fn refused(addr: SocketAddr, method: &str, body: Value) -> String {
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &body.to_string(),
        &addr.to_string(),
        &format!("shoal.v1.ProvisionerService/{method}"),
    ]);
    assert!(!out.status.success(), "{method} {body} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for an operation to finish; returns it.
fn wait_op(p: &Running, id: &str, timeout: Duration) -> Value {
    let done = wait_for(timeout, || {
        let op = call(p, "GetOperation", json!({ "id": id }));
        (op["state"] != "OPERATION_STATE_RUNNING").then_some(op)
    });
    done.unwrap_or_else(|| {
        panic!(
            "operation {id} did not finish within {timeout:?}\n{}",
            p.process.logs()
        )
    })
}

fn node(f: &Fixture, name: &str) -> Value {
    sim_get(f.sim.addr(), &format!("/api/v1/nodes/{name}"))
}

#[test]
fn creates_in_parallel_refuses_bad_requests_and_drains_honouring_pdbs() {
    let f = Fixture::new();
    let p = f.provisioner("prov-1", &[]);
    let addr = p.grpc;

    // Bad requests: the right code and the reason.
    let e = refused(addr, "CreateNodes", json!({ "pool": "nope", "count": 1 }));
    assert!(
        e.contains("NotFound") && e.contains("pool nope not found"),
        "{e}"
    );
    let e = refused(
        addr,
        "CreateNodes",
        json!({ "pool": "general", "count": 0 }),
    );
    assert!(e.contains("InvalidArgument") && e.contains("count"), "{e}");
    let e = refused(
        addr,
        "CreateNodes",
        json!({ "pool": "general", "count": 6 }),
    );
    assert!(
        e.contains("InvalidArgument") && e.contains("above its maxNodes 5"),
        "{e}"
    );

    // Three nodes in parallel: all Ready, startup taint gone, one op for a repeated key.
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 3, "idempotencyKey": "d1/general", "reason": "test" }),
    );
    let again = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 3, "idempotencyKey": "d1/general" }),
    );
    assert_eq!(
        op["id"], again["id"],
        "a repeated key returns the same operation"
    );
    let id = op["id"].as_str().expect("op id").to_string();
    let done = wait_op(&p, &id, Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    let claims = call(&p, "ListNodeClaims", json!({ "pool": "general" }));
    let claims = claims["claims"].as_array().cloned().unwrap_or_default();
    assert_eq!(claims.len(), 3);
    assert!(
        claims.iter().all(|c| c["phase"] == "CLAIM_PHASE_READY"),
        "{claims:#?}"
    );
    for n in 1..=3 {
        let node = node(&f, &format!("general-{n}"));
        let taints = node["spec"]["taints"].to_string();
        assert!(!taints.contains("shoal.dev/unregistered"), "{taints}");
        assert_eq!(node["metadata"]["labels"]["shoal.dev/pool"], "general");
    }
    f.assert_consistent();
    let ready = p.metric("shoal_node_ready_seconds_count{pool=\"general\"}");
    assert_eq!(ready, Some(3.0), "node ready time is measured");

    // Deleting an unknown, a permanent or a foreign node is refused.
    let e = refused(addr, "DeleteNodes", json!({ "nodes": ["ghost"] }));
    assert!(e.contains("NotFound") && e.contains("ghost"), "{e}");
    let e = refused(addr, "DeleteNodes", json!({ "nodes": ["general-keep"] }));
    assert!(
        e.contains("FailedPrecondition") && e.contains("permanent"),
        "{e}"
    );
    add_sim_node(f.sim.addr(), "static-1", "", "2", "4Gi");
    wait_for(Duration::from_secs(10), || {
        matches!(
            shoal_testkit::http_get(f.sim.addr(), "/api/v1/nodes/static-1"),
            Ok((200, _))
        )
        .then_some(())
    })
    .expect("static-1 registers");
    let e = refused(addr, "DeleteNodes", json!({ "nodes": ["static-1"] }));
    assert!(
        e.contains("FailedPrecondition") && e.contains("not created by Shoal"),
        "{e}"
    );

    // A PDB that allows no disruption blocks the drain; after drainTimeout the operation
    // fails and the node is back in service.
    f.kubectl(
        &["apply", "-f", "-"],
        &shoal_e2e::deployment_yaml("web", 4, "500m", "256Mi", None),
    );
    f.kubectl(
        &["apply", "-f", "-"],
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: { name: web, namespace: default }\nspec:\n  minAvailable: 4\n  selector: { matchLabels: { app: web } }\n",
    );
    let victim = wait_for(Duration::from_secs(20), || {
        let pods = sim_get(f.sim.addr(), "/api/v1/namespaces/default/pods");
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let running = items
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        if running < 4 {
            return None;
        }
        items
            .iter()
            .filter_map(|p| p["spec"]["nodeName"].as_str())
            .find(|n| n.starts_with("general-"))
            .map(String::from)
    })
    .expect("web pods run on a general node");
    let op = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": [victim], "idempotencyKey": "d2", "reason": "test drain" }),
    );
    let failed = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(20));
    assert_eq!(failed["state"], "OPERATION_STATE_FAILED", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("drain timed out"),
        "{failed}"
    );
    let back = node(&f, &victim);
    assert_ne!(back["spec"]["unschedulable"], true, "uncordoned: {back}");
    assert!(
        !back["spec"]["taints"]
            .to_string()
            .contains("shoal.dev/disrupted")
    );
    assert!(
        p.metric("shoal_provisioner_evictions_total{result=\"blocked\"}")
            .is_some_and(|v| v >= 1.0)
    );

    // Without the PDB the same node drains and goes: instance, Node and claim.
    f.kubectl(&["delete", "pdb", "web"], "");
    let op = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": [victim], "idempotencyKey": "d3", "reason": "test drain" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    assert_eq!(f.live_claims().len(), 2);
    assert!(!f.claimed_nodes().contains(&victim));
    f.assert_consistent();
    let running = wait_for(Duration::from_secs(20), || {
        let pods = sim_get(f.sim.addr(), "/api/v1/namespaces/default/pods");
        let n = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["spec"]["nodeName"] != victim.as_str()
            })
            .count();
        (n == 4).then_some(())
    });
    assert!(running.is_some(), "evicted pods run elsewhere");
}

fn wait_log(p: &Running, text: &str) {
    let seen = wait_for(Duration::from_secs(20), || {
        p.process.logs().contains(text).then_some(())
    });
    assert!(seen.is_some(), "{text:?} not logged:\n{}", p.process.logs());
}

#[test]
fn kill_9_at_any_point_leaves_nothing_orphaned_or_duplicated() {
    let f = Fixture::new();

    // (a) after the claims are written, before the backend call.
    let mut p = f.provisioner(
        "prov-a",
        &[("SHOAL_TEST_PAUSE_AT", "before-backend-create")],
    );
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 2, "idempotencyKey": "a" }),
    );
    wait_log(&p, "crash point before-backend-create reached");
    p.process.kill();
    assert_eq!(f.live_claims().len(), 2, "claims were written ahead");
    assert_eq!(f.instances().len(), 0, "nothing was created yet");
    let p = f.provisioner("prov-a2", &[]);
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    f.assert_consistent();
    assert_eq!(f.instances().len(), 2);
    drop(p);

    // (b) after the backend created the instance, before the claim was updated.
    let mut p = f.provisioner("prov-b", &[("SHOAL_TEST_PAUSE_AT", "after-backend-create")]);
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "b" }),
    );
    wait_log(&p, "crash point after-backend-create reached");
    p.process.kill();
    assert_eq!(f.instances().len(), 3, "the instance exists");
    let p = f.provisioner("prov-b2", &[]);
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    f.assert_consistent();
    assert_eq!(f.instances().len(), 3, "adopted, not created twice");
    drop(p);

    // (c) mid-drain.
    f.kubectl(
        &["apply", "-f", "-"],
        &shoal_e2e::deployment_yaml("app", 2, "250m", "128Mi", None),
    );
    let mut p = f.provisioner("prov-c", &[("SHOAL_TEST_PAUSE_AT", "mid-drain")]);
    let op = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": ["general-1"], "idempotencyKey": "c" }),
    );
    wait_log(&p, "crash point mid-drain reached");
    p.process.kill();
    assert_eq!(
        node(&f, "general-1")["spec"]["unschedulable"],
        true,
        "cordoned"
    );
    let p = f.provisioner("prov-c2", &[]);
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    f.assert_consistent();
    assert_eq!(f.instances().len(), 2);
    let phases: Vec<String> = f
        .claims()
        .iter()
        .map(|c| c["phase"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        phases.iter().all(|p| p == "Ready" || p == "Deleted"),
        "every claim is Ready or Deleted: {phases:?}"
    );
    drop(p);

    // (d) a request that wrote its operation (the intent) and died before writing its claims,
    // on a standby replica: the leader writes them from the operation and finishes it.
    let leader = f.provisioner("prov-d", &[]);
    let mut standby = f.provisioner_standby_with(
        "prov-d-standby",
        &[("SHOAL_TEST_PAUSE_AT", "after-create-intent")],
    );
    let addr = standby.grpc.to_string();
    let caller = std::thread::spawn(move || {
        grpcurl(&[
            "-plaintext",
            "-d",
            &json!({ "pool": "general", "count": 1, "idempotencyKey": "d" }).to_string(),
            &addr,
            "shoal.v1.ProvisionerService/CreateNodes",
        ])
    });
    wait_log(&standby, "crash point after-create-intent reached");
    standby.process.kill();
    let _ = caller.join();
    // The same key names the operation the dead request wrote.
    let op = call(
        &leader,
        "CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "d" }),
    );
    let done = wait_op(
        &leader,
        op["id"].as_str().expect("id"),
        Duration::from_secs(30),
    );
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    f.assert_consistent();
    assert_eq!(f.instances().len(), 3, "exactly the one node asked for");
    println!(
        "after four kill -9s: {} instances, {} live claims, nodes {:?}",
        f.instances().len(),
        f.live_claims().len(),
        f.claimed_nodes()
    );
}

fn set_faults(f: &Fixture, error_rate: f64) {
    let body = json!({ "errorRate": error_rate }).to_string();
    let (code, answer) =
        shoal_testkit::http_request(f.sim.addr(), "PUT", "/cloud/v1/faults", Some(&body))
            .unwrap_or_else(|e| panic!("sim faults: {e}"));
    assert!(code < 300, "setting faults: {code} {answer}");
}

fn breaker(p: &Running) -> String {
    let status = call(p, "GetBackendStatus", json!({}));
    status["backends"][0]["breaker"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn backend_failures_are_retried_break_the_circuit_and_are_never_silent() {
    // A node TTL shorter than the 30 s outage: a claim that cannot launch fails visibly.
    let f = Fixture::with_ttl("20s");
    let p = f.provisioner("prov-faults", &[]);

    // 50 % of cloud calls fail: retries carry most creations through.
    set_faults(&f, 0.5);
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 4, "idempotencyKey": "half" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    let claims = f.claims();
    let ready = claims.iter().filter(|c| c["phase"] == "Ready").count();
    for c in &claims {
        assert!(
            c["phase"] == "Ready"
                || (c["phase"] == "Failed"
                    && !c["failureReason"].as_str().unwrap_or("").is_empty()),
            "a claim is Ready or Failed with a reason: {c}"
        );
    }
    assert!(ready >= 1, "retries got nodes through 50 % errors: {done}");
    let retries = p
        .metric("shoal_provisioner_backend_retries_total{backend=\"sim\",op=\"create\"}")
        .unwrap_or(0.0)
        + p.metric("shoal_provisioner_backend_retries_total{backend=\"sim\",op=\"list\"}")
            .unwrap_or(0.0);
    assert!(retries >= 1.0, "retries are counted\n{}", p.metrics_text());

    // 100 % for 30 s: the breaker opens, the request fails visibly.
    set_faults(&f, 1.0);
    let outage = std::time::Instant::now();
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "down" }),
    );
    let opened = wait_for(Duration::from_secs(20), || {
        (breaker(&p) == "BREAKER_STATE_OPEN").then_some(())
    });
    assert!(opened.is_some(), "breaker opens\n{}", p.process.logs());
    assert_eq!(
        p.metric("shoal_provisioner_breaker_state{backend=\"sim\"}"),
        Some(1.0)
    );
    let failed = wait_for(Duration::from_secs(30), || {
        f.claims()
            .into_iter()
            .find(|c| c["operationId"] == op["id"] && c["phase"] == "Failed")
    });
    // The claim fails only once its rollback could check the backend; during the outage it
    // may still be Pending — but never silently Ready.
    if let Some(c) = &failed {
        assert!(
            c["failureReason"].as_str().unwrap_or("").contains("sim"),
            "{c}"
        );
    }
    let status = call(&p, "GetBackendStatus", json!({}));
    assert!(
        status["backends"][0]["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("503"),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));

    // Healthy again: the half-open probe closes the breaker; everything settles consistently.
    set_faults(&f, 0.0);
    let closed = wait_for(Duration::from_secs(20), || {
        (breaker(&p) == "BREAKER_STATE_CLOSED").then_some(())
    });
    assert!(closed.is_some(), "breaker closes\n{}", p.process.logs());
    let settled = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    assert_eq!(settled["state"], "OPERATION_STATE_FAILED", "{settled}");
    let down = f
        .claims()
        .into_iter()
        .find(|c| c["operationId"] == op["id"])
        .expect("the outage's claim");
    let reason = down["failureReason"].as_str().unwrap_or("");
    assert!(
        down["phase"] == "Failed"
            && reason.contains("not launched within the node TTL")
            && reason.contains("sim"),
        "the claim that could not launch fails with the backend's reason: {down}"
    );
    assert!(
        p.metric("shoal_provisioner_claims_failed_total{pool=\"general\"}")
            .is_some_and(|v| v >= 1.0)
            || settled["state"] == "OPERATION_STATE_SUCCEEDED",
        "failures are counted\n{}",
        p.metrics_text()
    );
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "after" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(30));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    f.assert_consistent();
    println!(
        "faults: {} claims, {} Ready, {} Failed, retries {retries}",
        f.claims().len(),
        f.claims().iter().filter(|c| c["phase"] == "Ready").count(),
        f.claims().iter().filter(|c| c["phase"] == "Failed").count()
    );
}

fn docker_available() -> bool {
    let up = std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var("SHOAL_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "SHOAL_REQUIRE_DOCKER=1 but no Docker engine answers `docker info`"
        );
        eprintln!("SKIPPED: no Docker engine answers; the docker backend test did not run");
    }
    up
}

fn sh(script: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An image holding `shoal-sim` and the libraries it links (no image can be pulled here).
fn agent_image() -> String {
    let binary = shoal_testkit::process::bin_path("shoal-sim");
    let tag = "shoal-sim-agent:test";
    sh(&format!(
        "set -e; d=$(mktemp -d); cp {bin} $d/shoal-sim; old=$(docker images -q {tag}); \
         for lib in $(ldd {bin} | grep -o '/[^ ]*'); do mkdir -p $d$(dirname $lib); cp -L $lib $d$lib; done; \
         tar -C $d -cf - . | docker import --change 'ENTRYPOINT [\"/shoal-sim\"]' - {tag} >/dev/null; rm -rf $d; \
         if [ -n \"$old\" ] && [ \"$old\" != \"$(docker images -q {tag})\" ]; then docker rmi $old >/dev/null 2>&1 || true; fi",
        bin = binary.display()
    ));
    tag.to_string()
}

fn containers(cluster: &str) -> Vec<String> {
    let out = sh(&format!(
        "docker ps -a --filter label=shoal.dev/cluster={cluster} --format '{{{{.Names}}}} {{{{.State}}}}'"
    ));
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    v
}

#[test]
fn docker_backend_runs_nodes_as_containers_that_register_with_the_simulator() {
    if !docker_available() {
        return;
    }
    let image = agent_image();
    let cluster = format!("dtest-{}", std::process::id());
    let etcd = EtcdServer::start();
    let sim = SimServer::start_on(std::net::IpAddr::from([0, 0, 0, 0]), &[]);
    let gateway = sh("ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1");
    let store = EtcdReader::new(&etcd);
    store.put_pool("apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: dock }\nspec:\n  provider: { backend: docker, class: agent }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 3 }\n");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "cluster: {cluster}\nelection: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {kc} }}\n  backends:\n    docker:\n      classes:\n        agent:\n          image: {image}\n          command: [agent, --api, \"http://{gateway}:{port}\", --name, \"{{name}}\", --cpu, \"{{cpu}}\", --memory, \"{{memory}}\", --label, \"{{labels}}\", --heartbeat-interval, 2s]\n          privileged: false\n          tmpfs: {{}}\n          restartPolicy: \"no\"\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n",
            kc = sim.kubeconfig().display(),
            port = sim.port(),
        ),
    )
    .expect("config");
    let cleanup = format!(
        "docker rm -f $(docker ps -aq --filter label=shoal.dev/cluster={cluster}) >/dev/null 2>&1 || true"
    );
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("sh")
                .args(["-c", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(cleanup);
    let mut p = Running::start(
        "shoal-provisioner",
        "prov-docker",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    p.wait_ready();

    // 0 → 3: three containers, three Ready nodes registered by the agents inside them.
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "dock", "count": 3, "idempotencyKey": "up" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(90));
    assert_eq!(
        done["state"],
        "OPERATION_STATE_SUCCEEDED",
        "{done}\n{}",
        p.process.logs()
    );
    assert_eq!(
        containers(&cluster),
        ["dock-1 running", "dock-2 running", "dock-3 running"]
    );
    let ready_nodes = || -> Vec<String> {
        let nodes = sim_get(
            sim.addr(),
            "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Ddock",
        );
        let mut v: Vec<String> = nodes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    assert_eq!(ready_nodes(), ["dock-1", "dock-2", "dock-3"]);

    // A container Shoal did not make (as the k3s server's would be): Repair refuses to delete
    // it, and it is still there.
    let stranger = format!("stranger-{}", std::process::id());
    let stranger_id = sh(&format!(
        "docker create --name {stranger} {image} agent --help"
    ));
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", &self.0])
                .output();
        }
    }
    let _remove = Remove(stranger.clone());
    let e = refused(
        p.grpc,
        "Repair",
        json!({ "passId": "t", "reason": "test", "deleteInstance": format!("docker/{stranger_id}") }),
    );
    assert!(
        e.contains("FailedPrecondition") && e.contains("not this cluster's"),
        "{e}"
    );
    assert_eq!(
        sh(&format!("docker inspect -f '{{{{.Name}}}}' {stranger}")),
        format!("/{stranger}"),
        "the container is still there"
    );

    // 3 → 1: drained and removed; containers and Nodes match.
    let op = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": ["dock-3", "dock-2"], "idempotencyKey": "down" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    assert_eq!(containers(&cluster), ["dock-1 running"]);
    let gone = wait_for(Duration::from_secs(10), || {
        (ready_nodes() == ["dock-1"]).then_some(())
    });
    assert!(gone.is_some(), "nodes: {:?}", ready_nodes());

    // A container removed by hand: `list` no longer reports it and its claim does not stay Ready.
    sh("docker rm -f dock-1 >/dev/null");
    let listed = call(&p, "ListInstances", json!({ "backend": "docker" }));
    assert!(
        listed["instances"].as_array().is_none_or(|v| v.is_empty()),
        "{listed}"
    );
    let failed = wait_for(Duration::from_secs(15), || {
        let claims = call(&p, "ListNodeClaims", json!({ "pool": "dock" }));
        claims["claims"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["nodeName"] == "dock-1" && c["phase"] == "CLAIM_PHASE_FAILED")
            .cloned()
    });
    let failed = failed.unwrap_or_else(|| panic!("dock-1's claim fails\n{}", p.process.logs()));
    assert!(
        failed["failureReason"]
            .as_str()
            .unwrap_or("")
            .contains("disappeared"),
        "{failed}"
    );
    assert!(ready_nodes().is_empty(), "its Node is removed too");
}

#[test]
fn one_call_creates_500_nodes_and_one_deletes_them_on_etcd_with_default_limits() {
    // etcd refuses transactions of more than 128 operations; one CreateNodes of 500 and one
    // DeleteNodes of 500 must still work, and retention then trims the finished records in
    // chunks.
    let f = Fixture::with(
        "120s",
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: big }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"1\", memory: 1Gi }\n  limits: { minNodes: 0, maxNodes: 500 }\n  scaleDown: { drainTimeout: 30s }\n",
        "  retention: { claims: { maxAge: 1h, maxCount: 100 }, operations: { maxAge: 1h, maxCount: 1 }, interval: 1s }\n",
    );
    let p = f.provisioner("prov-big", &[]);
    let started = std::time::Instant::now();
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "big", "count": 500, "idempotencyKey": "big-up" }),
    );
    assert_eq!(op["claimIds"].as_array().map(Vec::len), Some(500), "{op}");
    let again = call(
        &p,
        "CreateNodes",
        json!({ "pool": "big", "count": 500, "idempotencyKey": "big-up" }),
    );
    assert_eq!(
        again["id"], op["id"],
        "the same key names the same operation"
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(240));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    println!("500 nodes Ready after {:?}", started.elapsed());
    assert_eq!(f.instances().len(), 500);
    assert_eq!(f.claimed_nodes().len(), 500);
    let names: BTreeSet<String> = f
        .live_claims()
        .iter()
        .filter_map(|c| c["nodeName"].as_str().map(String::from))
        .collect();
    assert_eq!(names.len(), 500, "500 distinct node names");
    // The pool is full: one more is refused, atomically with the count.
    let e = refused(p.grpc, "CreateNodes", json!({ "pool": "big", "count": 1 }));
    assert!(
        e.contains("FailedPrecondition") && e.contains("above its maxNodes 500"),
        "{e}"
    );

    let started = std::time::Instant::now();
    let all: Vec<&String> = names.iter().collect();
    let op = call(
        &p,
        "DeleteNodes",
        json!({ "nodes": all, "idempotencyKey": "big-down" }),
    );
    assert_eq!(op["claimIds"].as_array().map(Vec::len), Some(500), "{op}");
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(240));
    assert_eq!(done["state"], "OPERATION_STATE_SUCCEEDED", "{done}");
    println!("500 nodes deleted after {:?}", started.elapsed());
    let empty = wait_for(Duration::from_secs(20), || {
        (f.instances().is_empty() && f.claimed_nodes().is_empty()).then_some(())
    });
    assert!(empty.is_some(), "no instance or Node is left");

    // Retention: at most 100 finished claims and 1 finished operation (with its key) remain.
    let trimmed = wait_for(Duration::from_secs(20), || {
        let claims = f.store.values_under("claims/").len();
        let ops = f.store.values_under("ops/").len();
        let keys = f.store.values_under("idempotency/").len();
        (claims <= 100 && ops == 1 && keys == 1).then_some((claims, ops, keys))
    });
    assert!(
        trimmed.is_some(),
        "retention trims: claims {}, ops {}, keys {}",
        f.store.values_under("claims/").len(),
        f.store.values_under("ops/").len(),
        f.store.values_under("idempotency/").len()
    );
    assert!(
        p.metric("shoal_provisioner_records_removed_total{kind=\"claim\"}")
            .is_some_and(|n| n >= 400.0),
        "{}",
        p.metrics_text()
    );
    f.assert_consistent();
}

#[test]
fn concurrent_creates_on_two_replicas_never_pass_max_nodes() {
    // Room for 5 (maxNodes 5); 20 CreateNodes of one node each, at once, half to each replica.
    let f = Fixture::new();
    let a = f.provisioner("prov-a", &[]);
    let b = f.provisioner_standby("prov-b");
    let addrs = [a.grpc, b.grpc];
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let addr = addrs[i % 2];
                scope.spawn(move || {
                    let out = grpcurl(&[
                        "-plaintext",
                        "-d",
                        &json!({ "pool": "general", "count": 1, "idempotencyKey": format!("race-{i}") })
                            .to_string(),
                        &addr.to_string(),
                        "shoal.v1.ProvisionerService/CreateNodes",
                    ]);
                    if out.status.success() {
                        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).into_owned())
                    }
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("call thread"))
            .collect()
    });
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(accepted, 5, "exactly the room: {results:#?}");
    for refusal in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            refusal.contains("FailedPrecondition") && refusal.contains("above its maxNodes 5"),
            "{refusal}"
        );
    }
    let ready = wait_for(Duration::from_secs(30), || {
        let live = f.live_claims();
        (live.len() == 5 && live.iter().all(|c| c["phase"] == "Ready")).then_some(())
    });
    assert!(ready.is_some(), "five Ready claims: {:#?}", f.live_claims());
    assert_eq!(f.instances().len(), 5);
    f.assert_consistent();
}

#[test]
fn repair_refuses_instances_and_nodes_this_cluster_does_not_own() {
    let f = Fixture::new();
    let p = f.provisioner("prov-1", &[]);
    // An instance in the same cloud without our cluster id (another cluster's, or a server
    // someone runs there), and a Node nobody labelled.
    let body = json!({ "name": "not-ours", "labels": { "shoal.dev/pool": "general" }, "capacity": { "cpu": "2", "memory": "4Gi" } }).to_string();
    let (code, created) =
        shoal_testkit::http_request(f.sim.addr(), "POST", "/cloud/v1/instances", Some(&body))
            .expect("create");
    assert_eq!(code, 201, "{created}");
    let id = serde_json::from_str::<Value>(&created).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let bare = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "hand-made" } })
        .to_string();
    let (code, answer) =
        shoal_testkit::http_request(f.sim.addr(), "POST", "/api/v1/nodes", Some(&bare))
            .expect("node");
    assert_eq!(code, 201, "{answer}");

    let e = refused(
        p.grpc,
        "Repair",
        json!({ "passId": "t", "reason": "test", "deleteInstance": format!("sim/{id}") }),
    );
    assert!(
        e.contains("FailedPrecondition") && e.contains("not this cluster's"),
        "{e}"
    );
    let e = refused(
        p.grpc,
        "Repair",
        json!({ "passId": "t", "reason": "test", "deleteNode": "hand-made" }),
    );
    assert!(
        e.contains("FailedPrecondition") && e.contains("Shoal did not create it"),
        "{e}"
    );
    assert_eq!(
        sim_get(f.sim.addr(), &format!("/cloud/v1/instances/{id}"))["id"],
        id.as_str(),
        "the instance is still there"
    );
    assert_eq!(
        node(&f, "hand-made")["metadata"]["name"],
        "hand-made",
        "the Node is still there"
    );
}
