//! Each service started alone, as a user would: reachable with grpcurl through reflection,
//! SERVING on grpc.health.v1, `shoal_` metrics on the admin port, clean exit on SIGTERM.

use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_e2e::{Running, grpcurl, grpcurl_ok};
use shoal_testkit::{EtcdServer, SimServer, http_get};

/// (binary, gRPC services it serves, whether it needs the store)
const SERVICES: [(&str, &[&str], bool); 4] = [
    ("shoal-metrics", &["shoal.v1.MetricsService"], false),
    (
        "shoal-decider",
        &["shoal.v1.DeciderService", "shoal.v1.PoolService"],
        true,
    ),
    ("shoal-provisioner", &["shoal.v1.ProvisionerService"], true),
    ("shoal-reconciler", &["shoal.v1.ReconcilerService"], true),
];

fn check_service(binary: &str, served: &[&str], needs_store: bool) {
    let etcd = needs_store.then(EtcdServer::start);
    // Services that talk to a Kubernetes API get a simulated cluster.
    let sim = matches!(
        binary,
        "shoal-metrics" | "shoal-provisioner" | "shoal-reconciler"
    )
    .then(|| SimServer::start(&[]));
    let kube_flag = sim.as_ref().map(|sim| {
        format!(
            "--set=service.kube.kubeconfig={}",
            sim.kubeconfig().display()
        )
    });
    let extra: Vec<&str> = kube_flag.iter().map(String::as_str).collect();
    let mut service = Running::start(binary, binary, etcd.as_ref(), &extra, &[]);
    service.wait_ready();
    let addr = service.grpc.to_string();

    // Reflection: exactly what this port serves.
    let listed: Vec<String> = grpcurl_ok(&["-plaintext", &addr, "list"])
        .lines()
        .map(str::to_string)
        .collect();
    let mut expected: Vec<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .iter()
    .chain(served)
    // Every service with a store also serves its audit log.
    .chain(needs_store.then_some(&"shoal.v1.AuditService"))
    .map(|s| s.to_string())
    .collect();
    expected.sort();
    assert_eq!(listed, expected, "{binary}: grpcurl list");

    // Reflection describes our messages, so grpcurl can build requests from JSON.
    let described = grpcurl_ok(&["-plaintext", &addr, "describe", served[0]]);
    assert!(
        described.contains("rpc "),
        "{binary}: describe {}: {described}",
        served[0]
    );

    // A read method, called with nothing but what reflection tells grpcurl.
    let (method, expect) = match binary {
        "shoal-metrics" => ("shoal.v1.MetricsService/GetSnapshot", "\"sequence\""),
        "shoal-decider" => ("shoal.v1.PoolService/ListPools", "{"),
        "shoal-provisioner" => ("shoal.v1.ProvisionerService/GetBackendStatus", "{"),
        _ => ("shoal.v1.ReconcilerService/ListDrifts", "{"),
    };
    let answer = grpcurl_ok(&["-plaintext", "-d", "{}", &addr, method]);
    assert!(
        answer.contains(expect),
        "{binary}: {method} answers with {expect}: {answer}"
    );

    // Health: overall and per service.
    assert!(
        grpcurl_ok(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).contains("\"SERVING\"")
    );
    for name in served {
        let request = format!("{{\"service\":\"{name}\"}}");
        let answer = grpcurl_ok(&[
            "-plaintext",
            "-d",
            &request,
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(
            answer.contains("\"SERVING\""),
            "{binary}: health of {name}: {answer}"
        );
    }
    let unknown = grpcurl(&[
        "-plaintext",
        "-d",
        "{\"service\":\"shoal.v1.Nope\"}",
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(
        !unknown.status.success(),
        "{binary}: health of an unknown service must be NOT_FOUND"
    );

    // Admin port.
    let metrics = service.metrics_text();
    assert!(
        metrics.contains(&format!(
            "shoal_ready{{service=\"{}\"}} 1",
            binary.trim_start_matches("shoal-")
        )),
        "{metrics}"
    );
    assert!(metrics.contains("shoal_grpc_server_handled_total{code=\"OK\",method=\"Check\",service=\"grpc.health.v1.Health\"}"), "{metrics}");
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );
    assert_eq!(
        http_get(service.admin, "/healthz")
            .map(|(code, _)| code)
            .ok(),
        Some(200)
    );

    // SIGTERM: drain and exit 0.
    service.process.signal(Signal::SIGTERM);
    let status = service.process.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "{binary}: exit after SIGTERM: {status:?}\n{}",
        service.process.logs()
    );
}

#[test]
fn metrics_alone() {
    let (binary, served, store) = SERVICES[0];
    check_service(binary, served, store);
}

#[test]
fn decider_alone() {
    let (binary, served, store) = SERVICES[1];
    check_service(binary, served, store);
}

#[test]
fn provisioner_alone() {
    let (binary, served, store) = SERVICES[2];
    check_service(binary, served, store);
}

#[test]
fn reconciler_alone() {
    let (binary, served, store) = SERVICES[3];
    check_service(binary, served, store);
}

/// Status RPCs answer with leadership; a method that needs a missing upstream says which.
#[test]
fn status_rpcs_report_leadership_and_missing_upstreams_say_so() {
    let etcd = EtcdServer::start();
    let mut decider = Running::start("shoal-decider", "decider-solo", Some(&etcd), &[], &[]);
    let sim = SimServer::start(&[]);
    let kube_flag = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let mut reconciler = Running::start(
        "shoal-reconciler",
        "reconciler-solo",
        Some(&etcd),
        &[&kube_flag],
        &[],
    );
    decider.wait_ready();
    reconciler.wait_ready();
    // The single replica of each becomes leader.
    let leads = shoal_testkit::wait_for(Duration::from_secs(10), || {
        (decider.metric("shoal_leader{service=\"decider\"}") == Some(1.0)
            && reconciler.metric("shoal_leader{service=\"reconciler\"}") == Some(1.0))
        .then_some(())
    });
    assert!(
        leads.is_some(),
        "both lead:\n{}\n{}",
        decider.process.logs(),
        reconciler.process.logs()
    );

    let status = grpcurl_ok(&[
        "-plaintext",
        &decider.grpc.to_string(),
        "shoal.v1.DeciderService/GetStatus",
    ]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["leader"]["isLeader"], true, "{status}");
    assert_eq!(status["leader"]["leaderId"], "decider-solo", "{status}");
    // No metrics or provisioner is running: the decider says so instead of pretending.
    let upstreams = status["upstreams"].as_array().expect("upstreams");
    assert_eq!(upstreams.len(), 2, "{status}");
    assert!(
        upstreams.iter().all(|u| u["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("UNREACHABLE"))),
        "{status}"
    );

    let status = grpcurl_ok(&[
        "-plaintext",
        &reconciler.grpc.to_string(),
        "shoal.v1.ReconcilerService/GetStatus",
    ]);
    assert!(
        status.contains("\"leaderId\": \"reconciler-solo\""),
        "{status}"
    );

    let out = grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &decider.grpc.to_string(),
        "shoal.v1.DeciderService/Evaluate",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("Unavailable")
            && stderr.contains("metrics service"),
        "{stderr}"
    );
}
