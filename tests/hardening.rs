//! What makes Shoal hold on a real cluster, as separate processes against real etcd: a loop that
//! panics is restarted and the service is NOT_SERVING meanwhile; a Kubernetes API that accepts
//! connections and never answers holds neither a drain nor a reconciliation pass; a silently
//! dropped `WatchSnapshots` connection is noticed within 30 s; leader-only calls made to one
//! address in front of two replicas reach the leader, and a standby never repairs.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running, grpcurl, grpcurl_ok};
use shoal_testkit::{EtcdServer, SimServer, TcpProxy, http_get, wait_for};

const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 5 }\n  scaleDown: { drainTimeout: 4s }\n";

fn call(addr: &str, method: &str, body: Value) -> Value {
    let out = grpcurl_ok(&["-plaintext", "-d", &body.to_string(), addr, method]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
}

fn health(addr: SocketAddr) -> String {
    let out = grpcurl(&[
        "-plaintext",
        &addr.to_string(),
        "grpc.health.v1.Health/Check",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubeconfig like the simulator's, but through `proxy`.
fn kubeconfig_via(sim: &SimServer, proxy: &TcpProxy, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(sim.kubeconfig()).expect("sim kubeconfig");
    let path = dir.join("kubeconfig-proxy");
    std::fs::write(&path, text.replace(&sim.url(), &proxy.url())).expect("write kubeconfig");
    path
}

fn provisioner_config(dir: &Path, kubeconfig: &Path, sim: &SimServer, extra: &str) -> PathBuf {
    let path = dir.join("provisioner.yaml");
    std::fs::write(
        &path,
        format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {}, requestTimeout: 2s }}\n  backends: {{ sim: {{ url: {} }} }}\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n{extra}",
            kubeconfig.display(),
            sim.url()
        ),
    )
    .expect("config");
    path
}

fn wait_metric(r: &Running, sample: &str, want: impl Fn(f64) -> bool, within: Duration) -> f64 {
    wait_for(within, || r.metric(sample).filter(|v| want(*v)))
        .unwrap_or_else(|| panic!("{sample} = {:?}\n{}", r.metric(sample), r.process.logs()))
}

#[test]
fn a_panic_in_the_control_loop_makes_the_decider_not_serving_until_it_is_restarted() {
    let etcd = EtcdServer::start();
    let store = EtcdReader::new(&etcd);
    let decider = Running::start(
        "shoal-decider",
        "dec-panic",
        Some(&etcd),
        &["--set=election.leaseTtl=2s"],
        &[("SHOAL_TEST_PANIC_ONCE", "control-loop")],
    );
    // The loop panics as soon as the decider leads: /readyz says which loop and why.
    let down = wait_for(Duration::from_secs(20), || {
        let (code, body) = http_get(decider.admin, "/readyz").ok()?;
        (code == 503 && body.contains("loop control-loop is down: it panicked")).then_some(body)
    })
    .unwrap_or_else(|| panic!("never NOT_SERVING\n{}", decider.process.logs()));
    assert!(down.contains("injected panic at control-loop"), "{down}");
    assert!(
        health(decider.grpc).contains("NOT_SERVING"),
        "gRPC health follows"
    );
    // A replica whose loop is down does not lead.
    assert_eq!(
        decider.metric("shoal_leader{service=\"decider\"}"),
        Some(0.0),
        "{}",
        decider.metrics_text()
    );
    assert!(
        store
            .leader("decider")
            .is_none_or(|l| l.holder != "dec-panic"),
        "leadership was given up"
    );

    // Restarted after the backoff: serving and leading again, the restart counted.
    let up = wait_for(Duration::from_secs(10), || {
        matches!(http_get(decider.admin, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(up.is_some(), "ready again\n{}", decider.process.logs());
    assert!(health(decider.grpc).contains("\"SERVING\""));
    wait_metric(
        &decider,
        "shoal_leader{service=\"decider\"}",
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        decider.metric("shoal_loop_restarts_total{loop=\"control-loop\",service=\"decider\"}"),
        Some(1.0),
        "{}",
        decider.metrics_text()
    );
}

#[test]
fn a_kubernetes_api_that_never_answers_holds_neither_a_drain_nor_a_pass() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=200ms", "--boot-jitter=100ms"]);
    let store = EtcdReader::new(&etcd);
    store.put_pool(POOL);
    let api = TcpProxy::start(sim.addr());
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = kubeconfig_via(&sim, &api, dir.path());
    let config = provisioner_config(dir.path(), &kubeconfig, &sim, "");
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "prov-hang",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    provisioner.wait_ready();
    let p = provisioner.grpc.to_string();
    let mut reconciler = Running::start(
        "shoal-reconciler",
        "rec-hang",
        Some(&etcd),
        &[
            &format!("--set=service.kube.kubeconfig={}", kubeconfig.display()),
            // The pass's own deadline must act, not the client's.
            "--set=service.kube.requestTimeout=60s",
            "--set=service.passTimeout=3s",
            "--set=service.interval=1h",
            &format!("--set=service.provisionerAddr=http://{p}"),
            "--set=election.leaseTtl=2s",
        ],
        &[],
    );
    reconciler.wait_ready();
    wait_metric(
        &provisioner,
        "shoal_leader{service=\"provisioner\"}",
        |v| v == 1.0,
        Duration::from_secs(15),
    );
    wait_metric(
        &reconciler,
        "shoal_leader{service=\"reconciler\"}",
        |v| v == 1.0,
        Duration::from_secs(15),
    );

    let op = call(
        &p,
        "shoal.v1.ProvisionerService/CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "one" }),
    );
    let id = op["id"].as_str().expect("id").to_string();
    let ready = wait_for(Duration::from_secs(20), || {
        let op = call(
            &p,
            "shoal.v1.ProvisionerService/GetOperation",
            json!({ "id": id }),
        );
        (op["state"] == "OPERATION_STATE_SUCCEEDED").then_some(())
    });
    assert!(ready.is_some(), "{}", provisioner.process.logs());

    // The API server now accepts connections and never answers.
    api.black_hole();
    let started = Instant::now();
    let op = call(
        &p,
        "shoal.v1.ProvisionerService/DeleteNodes",
        json!({ "nodes": ["general-1"], "idempotencyKey": "down" }),
    );
    let id = op["id"].as_str().expect("id").to_string();
    let done = wait_for(Duration::from_secs(30), || {
        let op = call(
            &p,
            "shoal.v1.ProvisionerService/GetOperation",
            json!({ "id": id }),
        );
        (op["state"] != "OPERATION_STATE_RUNNING").then_some(op)
    })
    .unwrap_or_else(|| panic!("the drain never ended\n{}", provisioner.process.logs()));
    let took = started.elapsed();
    println!(
        "drain against a hung API ended after {took:?}: {}",
        done["error"]
    );
    assert!(
        took < Duration::from_secs(4 + 5),
        "drainTimeout 4s + 5s, took {took:?}"
    );
    assert_eq!(done["state"], "OPERATION_STATE_FAILED", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap_or("")
            .contains("drain timed out"),
        "{done}"
    );

    let started = Instant::now();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &reconciler.grpc.to_string(),
        "shoal.v1.ReconcilerService/Reconcile",
    ]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("pass against a hung API ended after {took:?}: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("DeadlineExceeded") && stderr.contains("passTimeout"),
        "{stderr}"
    );
    assert!(
        took < Duration::from_secs(3 + 2),
        "passTimeout 3s, took {took:?}"
    );
    assert_eq!(
        reconciler.metric("shoal_reconciliation_timeouts_total"),
        Some(1.0)
    );

    // When the API answers again, the node a failed uncordon left cordoned is healed.
    api.forward();
    let healed = wait_for(Duration::from_secs(20), || {
        let node = shoal_e2e::sim_get(sim.addr(), "/api/v1/nodes/general-1");
        let tainted = node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "shoal.dev/disrupted");
        (!tainted && node["spec"]["unschedulable"] != true).then_some(())
    });
    assert!(
        healed.is_some(),
        "uncordoned once the API answers\n{}",
        provisioner.process.logs()
    );
}

#[test]
fn a_silently_dropped_watch_snapshots_connection_is_noticed_within_30_seconds() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    let mut metrics = Running::start(
        "shoal-metrics",
        "metrics-drop",
        None,
        &[
            &format!(
                "--set=service.kube.kubeconfig={}",
                sim.kubeconfig().display()
            ),
            "--set=service.scanInterval=1s",
        ],
        &[],
    );
    metrics.wait_ready();
    let link = TcpProxy::start(metrics.grpc);
    let mut decider = Running::start(
        "shoal-decider",
        "dec-drop",
        Some(&etcd),
        &[
            &format!("--set=service.metricsAddr={}", link.url()),
            "--set=service.dryRun=true",
            "--set=election.leaseTtl=2s",
        ],
        &[],
    );
    decider.wait_ready();
    let decisions = || -> f64 {
        decider
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("shoal_decider_decisions_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let flowing = wait_for(Duration::from_secs(20), || {
        (decisions() >= 2.0).then_some(())
    });
    assert!(
        flowing.is_some(),
        "snapshots reach the decider\n{}",
        decider.process.logs()
    );
    let errors = |d: &Running| -> f64 {
        d.metrics_text()
            .lines()
            .filter(|l| l.starts_with("shoal_decider_snapshot_stream_errors_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let before = errors(&decider);

    // The connection goes silent: nothing is closed, nothing arrives.
    link.freeze_existing();
    let frozen_at = Instant::now();
    let seen_at = decisions();
    let noticed = wait_for(Duration::from_secs(35), || {
        (errors(&decider) > before).then(|| frozen_at.elapsed())
    })
    .unwrap_or_else(|| panic!("the dead stream went unnoticed\n{}", decider.process.logs()));
    println!("dropped WatchSnapshots noticed after {noticed:?}");
    assert!(noticed < Duration::from_secs(30), "{noticed:?}");
    // The decider follows snapshots again on a new connection.
    let resumed = wait_for(Duration::from_secs(20), || {
        (decisions() > seen_at).then_some(())
    });
    assert!(resumed.is_some(), "{}", decider.process.logs());
}

#[test]
fn leader_only_calls_to_one_address_in_front_of_two_replicas_reach_the_leader() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=200ms", "--boot-jitter=100ms"]);
    let store = EtcdReader::new(&etcd);
    store.put_pool(POOL);
    let dir = tempfile::tempdir().expect("dir");
    let config = provisioner_config(dir.path(), &sim.kubeconfig(), &sim, "");
    let provisioners: Vec<Running> = ["prov-a", "prov-b"]
        .iter()
        .map(|name| {
            let mut p = Running::start(
                "shoal-provisioner",
                name,
                Some(&etcd),
                &[&format!("--config={}", config.display())],
                &[],
            );
            p.wait_ready();
            p
        })
        .collect();
    let provisioner_lb = TcpProxy::round_robin(&[provisioners[0].grpc, provisioners[1].grpc]);
    let reconcilers: Vec<Running> = ["rec-a", "rec-b"]
        .iter()
        .map(|name| {
            let mut r = Running::start(
                "shoal-reconciler",
                name,
                Some(&etcd),
                &[
                    &format!(
                        "--set=service.kube.kubeconfig={}",
                        sim.kubeconfig().display()
                    ),
                    "--set=service.interval=1h",
                    &format!("--set=service.provisionerAddr={}", provisioner_lb.url()),
                    "--set=election.leaseTtl=2s",
                ],
                &[],
            );
            r.wait_ready();
            r
        })
        .collect();
    let reconciler_lb = TcpProxy::round_robin(&[reconcilers[0].grpc, reconcilers[1].grpc]);
    let leaders = wait_for(Duration::from_secs(15), || {
        let p = provisioners
            .iter()
            .position(|p| p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0))?;
        let r = reconcilers
            .iter()
            .position(|r| r.metric("shoal_leader{service=\"reconciler\"}") == Some(1.0))?;
        Some((p, r))
    });
    let (leading_p, leading_r) = leaders.expect("a leader of each");

    // The leader record carries the address standbys forward to.
    let status = call(
        &reconcilers[1 - leading_r].grpc.to_string(),
        "shoal.v1.ReconcilerService/GetStatus",
        json!({}),
    );
    assert_eq!(
        status["leader"]["address"],
        format!("http://{}", reconcilers[leading_r].grpc),
        "{status}"
    );

    // Reconcile through the one address, six times (each call a new connection: both replicas
    // answer some). Every call succeeds, and every pass ran on the leader.
    let lb = reconciler_lb.addr().to_string();
    for _ in 0..6 {
        let report = call(&lb, "shoal.v1.ReconcilerService/Reconcile", json!({}));
        assert!(
            report["passId"].as_str().is_some_and(|id| !id.is_empty()),
            "{report}"
        );
    }
    assert!(reconciler_lb.accepted() >= 6);
    assert_eq!(
        reconcilers[leading_r].metric("shoal_reconciliation_cycles_total"),
        Some(6.0)
    );
    assert_eq!(
        reconcilers[1 - leading_r].metric("shoal_reconciliation_cycles_total"),
        Some(0.0),
        "a standby never runs a pass"
    );

    // A leader-only repair through the provisioners' one address reaches the leader too.
    let op = call(
        &provisioner_lb.addr().to_string(),
        "shoal.v1.ProvisionerService/CreateNodes",
        json!({ "pool": "general", "count": 1, "idempotencyKey": "one" }),
    );
    let id = op["id"].as_str().expect("id").to_string();
    let lb = provisioner_lb.addr().to_string();
    let finished = wait_for(Duration::from_secs(20), || {
        let op = call(
            &lb,
            "shoal.v1.ProvisionerService/GetOperation",
            json!({ "id": id }),
        );
        (op["state"] == "OPERATION_STATE_SUCCEEDED").then_some(())
    });
    assert!(finished.is_some());
    for _ in 0..4 {
        call(
            &lb,
            "shoal.v1.ProvisionerService/Repair",
            json!({ "passId": "t", "reason": "test", "settleOperation": id }),
        );
    }
    let standby = &provisioners[1 - leading_p];
    assert!(
        standby.metric("shoal_grpc_server_handled_total{code=\"OK\",method=\"Repair\",service=\"shoal.v1.ProvisionerService\"}")
            .is_some_and(|n| n >= 1.0),
        "some repairs reached the standby and were forwarded: {}",
        standby.metrics_text()
    );
}
