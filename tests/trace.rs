//! One call chain across services is one trace: the decider's GetStatus calls the metrics and
//! provisioner services, and an in-process OTLP receiver sees spans from all three processes
//! under the caller's trace id.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
};
use shoal_e2e::{Running, grpcurl_ok};
use shoal_testkit::{EtcdServer, SimServer, free_port, wait_for};

/// (service.name, span kind "server"/"client"/"internal", trace id hex, parent span id hex,
/// span id hex, span name)
type SeenSpan = (String, String, String, String, String, String);

fn kind(kind: i32) -> String {
    match opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(kind) {
        Ok(opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server) => "server".into(),
        Ok(opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client) => "client".into(),
        _ => "internal".into(),
    }
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<SeenSpan>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((
                        service.clone(),
                        kind(span.kind),
                        hex(&span.trace_id),
                        hex(&span.parent_span_id),
                        hex(&span.span_id),
                        span.name.clone(),
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn a_scale_up_is_one_trace_from_the_snapshot_to_the_reconciler() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (receiver, endpoint) = receiver(&runtime);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=500ms"]);
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let dir = tempfile::tempdir().expect("dir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 4 }\n").expect("pools");
    let mut metrics = Running::start("shoal-metrics", "metrics-t", None, &[&kube], &env);
    let config = shoal_e2e::sim_provisioner_config(dir.path(), &sim, "", "");
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "provisioner-t",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &env,
    );
    metrics.wait_ready();
    provisioner.wait_ready();
    let mut decider = Running::start(
        "shoal-decider",
        "decider-t",
        Some(&etcd),
        &[
            &format!("--set=service.metricsAddr=http://{}", metrics.grpc),
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            &format!("--set=service.poolFiles={}", pools.display()),
        ],
        &env,
    );
    let mut reconciler = Running::start(
        "shoal-reconciler",
        "reconciler-t",
        Some(&etcd),
        &[
            &kube,
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            "--set=service.interval=2s",
        ],
        &env,
    );
    decider.wait_ready();
    reconciler.wait_ready();

    shoal_e2e::kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &shoal_e2e::deployment_yaml("web", 4, "500m", "256Mi", None),
    );
    let running = wait_for(Duration::from_secs(40), || {
        (shoal_e2e::running_pods(sim.addr(), "/api/v1/namespaces/default/pods") == 4).then_some(())
    });
    assert!(
        running.is_some(),
        "the pods run\n{}",
        decider.process.logs()
    );
    // The reconciler's next pass (every 2 s) checks the finished operation.
    std::thread::sleep(Duration::from_secs(5));
    for service in [
        &mut decider,
        &mut metrics,
        &mut provisioner,
        &mut reconciler,
    ] {
        service.process.signal(Signal::SIGTERM);
        let _ = service.process.wait_exit(Duration::from_secs(15));
    }
    let wanted = [
        "shoal-decider",
        "shoal-metrics",
        "shoal-provisioner",
        "shoal-reconciler",
    ];
    let found = wait_for(Duration::from_secs(5), || {
        let spans = receiver
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut by_trace: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for s in &spans {
            by_trace.entry(s.2.clone()).or_default().insert(s.0.clone());
        }
        let trace = by_trace
            .into_iter()
            .find(|(_, services)| wanted.iter().all(|w| services.contains(*w)))?;
        Some((trace.0, spans))
    });
    let Some((trace, spans)) = found else {
        let spans = receiver
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let names: std::collections::BTreeSet<(String, String)> =
            spans.iter().map(|s| (s.0.clone(), s.5.clone())).collect();
        panic!("no trace has spans of all four services; spans seen: {names:#?}");
    };
    let ours: Vec<(String, String)> = spans
        .iter()
        .filter(|s| s.2 == trace)
        .map(|s| (s.0.clone(), s.5.clone()))
        .collect();
    println!("scale-up trace {trace}: {ours:#?}");
    assert!(
        ours.iter().any(
            |(s, n)| s == "shoal-provisioner" && n == "shoal.v1.ProvisionerService/CreateNodes"
        ),
        "CreateNodes is in the trace"
    );
    assert!(
        ours.iter()
            .any(|(s, n)| s == "shoal-reconciler" && n == "reconciler.verify_operation"),
        "the reconciler's check is in the trace"
    );
}

/// An OTLP/gRPC trace receiver on a free port, run by `runtime`; returns it and its endpoint.
fn receiver(runtime: &tokio::runtime::Runtime) -> (Receiver, String) {
    let receiver = Receiver::default();
    let otlp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve(otlp),
    );
    (receiver, format!("http://{otlp}"))
}

#[test]
fn a_call_across_three_services_is_one_trace() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (receiver, endpoint) = receiver(&runtime);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];

    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    let kube_flag = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let mut metrics = Running::start("shoal-metrics", "metrics-0", None, &[&kube_flag], &env);
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "provisioner-0",
        Some(&etcd),
        &[&kube_flag],
        &env,
    );
    metrics.wait_ready();
    provisioner.wait_ready();
    let metrics_flag = format!("--set=service.metricsAddr=http://{}", metrics.grpc);
    let provisioner_flag = format!("--set=service.provisionerAddr=http://{}", provisioner.grpc);
    let mut decider = Running::start(
        "shoal-decider",
        "decider-0",
        Some(&etcd),
        &[&metrics_flag, &provisioner_flag],
        &env,
    );
    decider.wait_ready();

    // The caller starts the trace, as an external scheduler or shoalctl with tracing would.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01");
    let status = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &traceparent,
        &decider.grpc.to_string(),
        "shoal.v1.DeciderService/GetStatus",
    ]);
    assert_eq!(
        status.matches("\"SERVING\"").count(),
        2,
        "both upstreams answered: {status}"
    );

    // Flush on shutdown, then look.
    for service in [&mut decider, &mut metrics, &mut provisioner] {
        service.process.signal(Signal::SIGTERM);
        assert!(
            service
                .process
                .wait_exit(Duration::from_secs(15))
                .is_some_and(|s| s.success())
        );
    }
    let spans = wait_for(Duration::from_secs(5), || {
        let spans = receiver
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let services: std::collections::BTreeSet<_> = spans
            .iter()
            .filter(|s| s.2 == trace_id)
            .map(|s| s.0.clone())
            .collect();
        (services.len() == 3).then_some(spans)
    });
    let all = receiver
        .spans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let spans = spans
        .unwrap_or_else(|| panic!("spans of all three services under {trace_id}; got {all:#?}"));
    let ours: Vec<&SeenSpan> = spans.iter().filter(|s| s.2 == trace_id).collect();
    let by_service: BTreeMap<&str, Vec<&str>> = ours.iter().fold(BTreeMap::new(), |mut map, s| {
        map.entry(s.0.as_str()).or_default().push(s.5.as_str());
        map
    });
    println!("trace {trace_id}: {by_service:#?}");
    let has = |service: &str, kind: &str, name: &str| {
        ours.iter()
            .any(|s| s.0 == service && s.1 == kind && s.5 == name)
    };
    assert!(
        has(
            "shoal-decider",
            "server",
            "shoal.v1.DeciderService/GetStatus"
        ),
        "{by_service:?}"
    );
    assert!(
        has("shoal-decider", "client", "grpc.health.v1.Health/Check"),
        "{by_service:?}"
    );
    assert!(
        has("shoal-metrics", "server", "grpc.health.v1.Health/Check"),
        "{by_service:?}"
    );
    assert!(
        has("shoal-provisioner", "server", "grpc.health.v1.Health/Check"),
        "{by_service:?}"
    );
    assert!(
        all.iter()
            .all(|s| s.1 != "internal" || !s.5.contains("Framed")),
        "transport internals must not be exported: {all:?}"
    );

    // Linked, not just tagged: each server span in metrics/provisioner is a child of a decider
    // client span, and the decider's server span is a child of the caller's span.
    let decider_clients: Vec<&str> = ours
        .iter()
        .filter(|s| s.0 == "shoal-decider" && s.1 == "client")
        .map(|s| s.4.as_str())
        .collect();
    for s in ours
        .iter()
        .filter(|s| s.0 != "shoal-decider" && s.1 == "server")
    {
        assert!(
            decider_clients.contains(&s.3.as_str()),
            "{} server span's parent {} is a decider client span",
            s.0,
            s.3
        );
    }
    assert!(
        ours.iter()
            .any(|s| s.0 == "shoal-decider" && s.1 == "server" && s.3 == "00f067aa0ba902b7")
    );
}
