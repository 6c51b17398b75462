//! The decider as its own process against real etcd: pools managed with grpcurl, `Evaluate` on a
//! JSON snapshot, and the whole path simulator → metrics → decider (dry run) producing a
//! scale-up decision for a Deployment that does not fit.

use std::{
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;
use shoal_e2e::{
    Running, add_sim_node, deployment_yaml, grpcurl, grpcurl_ok, kubectl, sim_get, wait_settled,
};
use shoal_proto::v1::{WatchDecisionsRequest, decider_service_client::DeciderServiceClient};
use shoal_testkit::{EtcdServer, SimServer, wait_for};

const GENERAL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    labels: { role: worker }\n    capacity: { cpu: \"4\", memory: 8Gi }\n  limits: { minNodes: 1, maxNodes: 10 }\n";
const GPU: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: gpu }\nspec:\n  provider: { backend: sim }\n  template:\n    labels: { accelerator: a100 }\n    taints: [{ key: nvidia.com/gpu, value: \"true\", effect: NoSchedule }]\n    capacity: { cpu: \"8\", memory: 32Gi }\n  limits: { maxNodes: 4 }\n";

fn apply_pool(decider: &Running, yaml: &str) -> Value {
    let body = serde_json::json!({ "yaml": yaml }).to_string();
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &body,
        &decider.grpc.to_string(),
        "shoal.v1.PoolService/ApplyPool",
    ]);
    serde_json::from_str(&out).expect("pool JSON")
}

fn wait_leader(decider: &Running) {
    let leads = wait_for(Duration::from_secs(15), || {
        (decider.metric("shoal_leader{service=\"decider\"}") == Some(1.0)).then_some(())
    });
    assert!(
        leads.is_some(),
        "the decider leads\n{}",
        decider.process.logs()
    );
}

#[test]
fn pools_are_validated_and_evaluate_explains_a_json_snapshot() {
    let etcd = EtcdServer::start();
    let mut decider = Running::start("shoal-decider", "decider-eval", Some(&etcd), &[], &[]);
    decider.wait_ready();
    let addr = decider.grpc.to_string();

    // A bad pool is refused with every field and reason, as text and as BadRequest details.
    let bad = GENERAL
        .replace("backend: sim", "backend: openstack")
        .replace("minNodes: 1", "minNodes: 20")
        .replace("memory: 8Gi", "memory: 8Gb");
    let body = serde_json::json!({ "yaml": bad }).to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "shoal.v1.PoolService/ApplyPool",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("spec.template.capacity.memory"), "{stderr}");
    let bad = GENERAL
        .replace("backend: sim", "backend: openstack")
        .replace("minNodes: 1", "minNodes: 20");
    let body = serde_json::json!({ "yaml": bad }).to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "shoal.v1.PoolService/ApplyPool",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.provider.backend") && stderr.contains("spec.limits.minNodes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("google.rpc.BadRequest"),
        "field violations as details: {stderr}"
    );

    // Bounds: a 10,000-year cooldown, a hundred million nodes and a backend this build does
    // not have are refused, each with its field path (and the backends it does have).
    let absurd = GENERAL
        .replace("maxNodes: 10", "maxNodes: 100000000")
        .replace("backend: sim", "backend: gcp")
        + "  scaleUp: { cooldown: 87600000h }\n";
    let body = serde_json::json!({ "yaml": absurd }).to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "shoal.v1.PoolService/ApplyPool",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "spec.limits.maxNodes: 100000000 is not between 1 and 10000",
        "spec.scaleUp.cooldown: 3650000d is longer than the most allowed, 1d",
        "spec.provider.backend: \"gcp\" is not a backend this build has (it has: aws, docker, proxmox, sim, plugin:<name> and externalgrpc:<name>)",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }

    let general = apply_pool(&decider, GENERAL);
    assert_eq!(general["name"], "general");
    assert!(
        general["revision"].as_str().is_some_and(|r| r != "0"),
        "{general}"
    );
    apply_pool(&decider, GPU);
    let listed = grpcurl_ok(&["-plaintext", &addr, "shoal.v1.PoolService/ListPools"]);
    assert!(
        listed.contains("\"general\"") && listed.contains("\"gpu\""),
        "{listed}"
    );
    // Optimistic concurrency: a stale revision is refused.
    let stale = serde_json::json!({ "yaml": GENERAL.replace("maxNodes: 10", "maxNodes: 9"), "expectedRevision": "1" }).to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &stale,
        &addr,
        "shoal.v1.PoolService/ApplyPool",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Aborted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What-if: one full node, five pending 1-CPU pods, a GPU job nobody tolerates.
    let snapshot = serde_json::json!({
        "snapshot": {
            "sequence": "1",
            "nodes": [ { "name": "general-1", "pool": "general", "readiness": "NODE_READINESS_READY",
                "allocatable": { "cpuMillis": "4000", "memoryBytes": "8589934592", "pods": "110", "ephemeralStorageBytes": "107374182400" },
                "requested": { "cpuMillis": "4000", "memoryBytes": "4294967296", "pods": "4" },
                "labels": { "shoal.dev/pool": "general", "role": "worker" },
                "pods": [ { "classId": "1", "count": 4 } ] } ],
            "classes": [
                { "id": "1", "namespace": "default", "owner": { "kind": "Deployment", "name": "web" },
                  "requests": { "cpuMillis": "1000", "memoryBytes": "1073741824", "pods": "1" } },
                { "id": "2", "namespace": "ml", "owner": { "kind": "Job", "name": "train" },
                  "requests": { "cpuMillis": "2000", "memoryBytes": "4294967296", "pods": "1" },
                  "nodeSelector": { "accelerator": "a100" } } ],
            "pending": [ { "classId": "1", "count": 5 }, { "classId": "2", "count": 1 } ]
        }
    })
    .to_string();
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &snapshot,
        &addr,
        "shoal.v1.DeciderService/Evaluate",
    ]);
    let decision: Value = serde_json::from_str(&out).expect("decision JSON");
    let actions = decision["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 1, "{decision:#}");
    assert_eq!(actions[0]["scaleUp"]["pool"], "general", "{decision:#}");
    assert_eq!(
        actions[0]["scaleUp"]["count"], 2,
        "five 1-CPU pods need two 4-CPU nodes: {decision:#}"
    );
    assert_eq!(decision["dryRun"], true);
    let reasons: Vec<&str> = decision["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("5 pending pod(s) (default/web ×5)")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("taint nvidia.com/gpu=true:NoSchedule not tolerated")),
        "{reasons:?}"
    );
    let train = decision["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .find(|o| o["classId"] == "2")
        .expect("train outcome");
    assert_eq!(train["unplaced"], 1);
    let verdicts: Vec<(String, String)> = train["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .map(|v| {
            (
                v["pool"].as_str().unwrap_or("").to_string(),
                v["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        verdicts.contains(&(
            "general".into(),
            "nodeSelector accelerator=a100 does not match the pool's labels".into()
        )),
        "{verdicts:?}"
    );

    // A snapshot that contradicts itself is refused with the field.
    let broken =
        serde_json::json!({ "snapshot": { "pending": [ { "classId": "9", "count": 1 } ] } })
            .to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &broken,
        &addr,
        "shoal.v1.DeciderService/Evaluate",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("snapshot.pending[0].classId"),
        "{stderr}"
    );

    // Deleting a pool, and a pool that is not there.
    grpcurl_ok(&[
        "-plaintext",
        "-d",
        r#"{"name":"gpu"}"#,
        &addr,
        "shoal.v1.PoolService/DeletePool",
    ]);
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"name":"gpu"}"#,
        &addr,
        "shoal.v1.PoolService/GetPool",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

/// Polls the simulator until a pod of `app` is marked Unschedulable; returns when that was seen.
fn watch_unschedulable(
    sim: std::net::SocketAddr,
    app: &'static str,
) -> Arc<Mutex<Option<Instant>>> {
    let seen = Arc::new(Mutex::new(None));
    let out = seen.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let pods = sim_get(
                sim,
                &format!("/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"),
            );
            let any = pods["items"].as_array().into_iter().flatten().any(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["reason"] == "Unschedulable")
            });
            if any {
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    seen
}

#[test]
fn a_deployment_that_does_not_fit_gets_a_scale_up_decision_within_a_second() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    add_sim_node(sim.addr(), "general-1", "general", "4", "8Gi");
    wait_settled(&sim, 1, 0);
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    // A shorter batching window than the default 1 s, so that batching plus planning fit in the
    // second the acceptance allows.
    let mut metrics = Running::start(
        "shoal-metrics",
        "metrics-d",
        None,
        &[&kube, "--set=service.batchIdle=200ms"],
        &[],
    );
    metrics.wait_ready();
    let dir = tempfile::tempdir().expect("dir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, format!("{GENERAL}---\n{GPU}")).expect("pools file");
    let metrics_flag = format!("--set=service.metricsAddr=http://{}", metrics.grpc);
    let pools_flag = format!("--set=service.poolFiles={}", pools.display());
    let mut decider = Running::start(
        "shoal-decider",
        "decider-loop",
        Some(&etcd),
        &[&metrics_flag, &pools_flag, "--set=service.dryRun=true"],
        &[],
    );
    decider.wait_ready();
    wait_leader(&decider);
    let addr = decider.grpc.to_string();
    // The pools from the file are in the store, and a first (no-action) decision exists.
    let first = wait_for(Duration::from_secs(20), || {
        let out = grpcurl_ok(&[
            "-plaintext",
            "-d",
            "{}",
            &addr,
            "shoal.v1.DeciderService/ListDecisions",
        ]);
        out.contains("\"reasons\"").then_some(out)
    })
    .unwrap_or_else(|| panic!("a first decision\n{}", decider.process.logs()));
    assert!(
        first.contains("no pending pods") || first.contains("no action"),
        "{first}"
    );

    // Follow decisions as a client would.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (tx, decisions) = mpsc::channel();
    let endpoint = format!("http://{}", decider.grpc);
    runtime.spawn(async move {
        let mut client = DeciderServiceClient::connect(endpoint)
            .await
            .expect("connect");
        let mut stream = client
            .watch_decisions(WatchDecisionsRequest {})
            .await
            .expect("watch")
            .into_inner();
        while let Ok(Some(d)) = stream.message().await {
            if tx.send((Instant::now(), d)).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // Six 1.5-CPU pods: two fit on general-1, four wait; two more 4-CPU nodes take them.
    let seen = watch_unschedulable(sim.addr(), "web");
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 6, "1500m", "1Gi", None),
    );
    let (arrived, decision) = loop {
        let (at, d) = decisions
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("a scale-up decision\n{}", decider.process.logs()));
        if !d.actions.is_empty() {
            break (at, d);
        }
    };
    let unschedulable = seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .expect("the pods were seen unschedulable");
    let latency = arrived.saturating_duration_since(unschedulable);
    eprintln!("pods unschedulable → scale-up decision received: {latency:?}");
    let up = match &decision.actions[0].action {
        Some(shoal_proto::v1::scale_action::Action::ScaleUp(up)) => up.clone(),
        other => panic!("expected a scale-up, got {other:?}"),
    };
    assert_eq!(up.pool, "general", "{decision:?}");
    assert_eq!(up.count, 2, "{decision:?}");
    assert!(decision.dry_run);
    assert!(
        decision.reasons.iter().any(|r| r.starts_with("dry run")),
        "{:?}",
        decision.reasons
    );
    assert!(
        decision
            .reasons
            .iter()
            .any(|r| r.contains("default/web-") && r.contains(" ×4")),
        "{:?}",
        decision.reasons
    );
    assert!(latency < Duration::from_secs(1), "{latency:?} ≥ 1 s");

    // The decision is in the history, by id; and the metrics say so.
    let got = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &format!("{{\"id\":\"{}\"}}", decision.id),
        &addr,
        "shoal.v1.DeciderService/GetDecision",
    ]);
    assert!(got.contains("\"general\""), "{got}");
    let text = decider.metrics_text();
    assert!(text.contains("shoal_decider_decisions_total{action=\"scale_up\",pool=\"general\",reason=\"pending_pods\"}"), "{text}");
    assert!(
        text.contains("shoal_decider_pending_to_decision_seconds_count"),
        "{text}"
    );

    // Pause: decisions are still made and recorded as paused.
    let paused = grpcurl_ok(&[
        "-plaintext",
        "-d",
        r#"{"reason":"maintenance"}"#,
        &addr,
        "shoal.v1.DeciderService/Pause",
    ]);
    assert!(
        paused.contains("\"paused\": true") && paused.contains("maintenance"),
        "{paused}"
    );
    let resumed = grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{}",
        &addr,
        "shoal.v1.DeciderService/Resume",
    ]);
    assert!(!resumed.contains("\"paused\": true"), "{resumed}");
    drop(runtime);
}

/// Not a dry run: decisions go to a real provisioner, nodes boot in the simulator's cloud and the
/// pods run. While the nodes boot, later snapshots count them as in flight: exactly the nodes
/// the first decision asked for are created, no more.
#[test]
fn decisions_reach_the_provisioner_and_the_pods_run() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=1s", "--boot-jitter=200ms"]);
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let mut metrics = Running::start(
        "shoal-metrics",
        "metrics-l",
        None,
        &[&kube, "--set=service.batchIdle=200ms"],
        &[],
    );
    metrics.wait_ready();
    let dir = tempfile::tempdir().expect("dir");
    let config =
        shoal_e2e::sim_provisioner_config(dir.path(), &sim, "", "  instanceCheckInterval: 1s\n");
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "provisioner-l",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    provisioner.wait_ready();
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, GENERAL.replace("minNodes: 1", "minNodes: 0")).expect("pools file");
    let mut decider = Running::start(
        "shoal-decider",
        "decider-l",
        Some(&etcd),
        &[
            &format!("--set=service.metricsAddr=http://{}", metrics.grpc),
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            &format!("--set=service.poolFiles={}", pools.display()),
        ],
        &[],
    );
    decider.wait_ready();
    wait_leader(&decider);

    // Six pods of 1 CPU on 4-CPU nodes: two nodes.
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("batch", 6, "1", "512Mi", None),
    );
    let running = wait_for(Duration::from_secs(45), || {
        let n = shoal_e2e::running_pods(
            sim.addr(),
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dbatch",
        );
        (n == 6).then_some(())
    });
    assert!(
        running.is_some(),
        "all pods run\n{}\n{}",
        decider.process.logs(),
        provisioner.process.logs()
    );
    // Settle a few snapshots more: nothing else is created.
    std::thread::sleep(Duration::from_secs(3));
    let claims = grpcurl_ok(&[
        "-plaintext",
        "-d",
        r#"{"pool":"general"}"#,
        &provisioner.grpc.to_string(),
        "shoal.v1.ProvisionerService/ListNodeClaims",
    ]);
    let claims: Value = serde_json::from_str(&claims).expect("claims JSON");
    let claims = claims["claims"].as_array().cloned().unwrap_or_default();
    assert_eq!(claims.len(), 2, "exactly two nodes: {claims:#?}");
    assert!(claims.iter().all(|c| c["phase"] == "CLAIM_PHASE_READY"));
    let created =
        decider.metric("shoal_decider_provisioner_calls_total{op=\"create\",result=\"ok\"}");
    assert!(
        created.is_some_and(|n| n >= 1.0),
        "{}",
        decider.metrics_text()
    );
}
