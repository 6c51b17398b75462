//! Burst bench: how fast a burst of pending pods becomes running pods, with every service its
//! own process (`shoal run <service>`, release build) against real etcd and the simulator (in
//! this process, so every pod's transitions are timed exactly from its change stream).
//!
//! Each size is a cluster of N full nodes (3 CPU, 30 pods of 100m each) plus a Deployment of M
//! pending 1-CPU pods that fit nowhere; a pool of 4-CPU nodes (2 s simulated boot, batchSize
//! 10,000, default maxConcurrent) takes them: M/4 new nodes. Per size it reports, per pod,
//! Unschedulable → the `CreateNodes` that covers it (the operation's write-ahead time) as p50 /
//! p99, the time until every burst pod runs, the nodes created against the M/4 needed, and the
//! number of decisions. The first size is the same-run baseline.
//!
//! `cargo bench -p shoal --bench burst` (`BURST_BENCH_SIZES=100x100,1000x1000,10000x10000`,
//! nodes × pending pods).
//!
//! `BURST_BENCH_MTLS=1` runs each size twice, plaintext then mTLS between every pair of services
//! (certificates from scripts/dev-certs.sh, roles enforced), and also times `GetSnapshot` (median
//! of 21, a client with a certificate in mTLS) before the burst: the mTLS overhead as a ratio to
//! plaintext in the same run.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use shoal_sim::resources::by_kind;
use shoal_state::records::Records;
use shoal_testkit::{EtcdServer, free_port};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Service, full_cluster, metric, percentile, put_pool, simulator, store};

fn start(service: &str, grpc: u16, admin: u16, etcd: &str, extra: &[String]) -> Service {
    common::start("bench", service, grpc, admin, etcd, extra)
}

/// Certificates (scripts/dev-certs.sh) when the services speak mTLS.
#[derive(Clone)]
struct Mtls {
    dir: std::path::PathBuf,
}

impl Mtls {
    fn new(dir: &std::path::Path) -> Mtls {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/dev-certs.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(dir)
            .stdout(Stdio::null())
            .status()
            .expect("dev-certs.sh runs");
        assert!(status.success(), "dev-certs.sh");
        Mtls {
            dir: dir.to_path_buf(),
        }
    }

    /// Flags giving `service` its certificate and the roles of its callers.
    fn flags(&self, service: &str) -> Vec<String> {
        let d = self.dir.display();
        let mut flags = vec![
            format!("--set=grpc.tls.certFile={d}/{service}.crt"),
            format!("--set=grpc.tls.keyFile={d}/{service}.key"),
            format!("--set=grpc.tls.caFile={d}/ca.crt"),
            "--set=grpc.auth.identities.shoal-operator=admin".to_string(),
        ];
        let callers: &[(&str, &str)] = match service {
            "metrics" => &[("shoal-decider", "viewer")],
            "provisioner" => &[("shoal-decider", "admin"), ("shoal-reconciler", "admin")],
            _ => &[],
        };
        for (identity, role) in callers {
            flags.push(format!("--set=grpc.auth.identities.{identity}={role}"));
        }
        flags
    }
}

/// `http(s)://127.0.0.1:port`.
fn address(mtls: Option<&Mtls>, port: u16) -> String {
    let scheme = if mtls.is_some() { "https" } else { "http" };
    format!("{scheme}://127.0.0.1:{port}")
}

/// A client channel to `port`, with the operator certificate in mTLS.
async fn client(mtls: Option<&Mtls>, port: u16) -> tonic::transport::Channel {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(address(mtls, port)).expect("endpoint");
    if let Some(m) = mtls {
        let read = |f: &str| std::fs::read(m.dir.join(f)).expect("certificate file");
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")))
                    .identity(tonic::transport::Identity::from_pem(
                        read("operator.crt"),
                        read("operator.key"),
                    ))
                    .domain_name("localhost"),
            )
            .expect("tls");
    }
    endpoint.connect().await.expect("connect")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Figures {
    nodes: usize,
    pending: usize,
    to_request_p50: f64,
    to_request_p99: f64,
    all_running: f64,
    created: usize,
    needed: usize,
    decisions: f64,
    load: f64,
    /// GetSnapshot, median of 21 (ms).
    snapshot_ms: f64,
}

async fn run(nodes: usize, pending: usize, mtls: Option<&Mtls>) -> Figures {
    let etcd = EtcdServer::start();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (sim, kubeconfig) = simulator(
        Duration::from_secs(2),
        Duration::from_millis(100),
        dir.path(),
        &shutdown,
    )
    .await;

    // The full cluster: Ready nodes with their pods bound and running.
    let started = Instant::now();
    full_cluster(&sim, nodes);
    let load = started.elapsed().as_secs_f64();

    // The pool, then the services.
    let store = store(etcd.endpoint(), Duration::from_secs(5)).await;
    let max = pending / 4 + 10;
    let pool = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: burst }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"4\", memory: 16Gi }}\n  limits: {{ minNodes: 0, maxNodes: {max} }}\n  scaleUp: {{ batchSize: 10000 }}\n  scaleDown: {{ enabled: false }}\n"
    );
    put_pool(&store, &pool).await;
    let provisioner_config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &provisioner_config,
        format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n",
            kubeconfig.display(),
            sim.url()
        ),
    )
    .expect("config");
    let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
    let endpoint = etcd.endpoint();
    let kube = format!("--set=service.kube.kubeconfig={}", kubeconfig.display());
    let tls = |service: &str| mtls.map(|m| m.flags(service)).unwrap_or_default();
    let _metrics = start(
        "metrics",
        ports[0],
        ports[1],
        &endpoint,
        &[vec![kube.clone()], tls("metrics")].concat(),
    );
    let _provisioner = start(
        "provisioner",
        ports[2],
        ports[3],
        &endpoint,
        &[
            vec![format!("--config={}", provisioner_config.display())],
            tls("provisioner"),
        ]
        .concat(),
    );
    let _decider = start(
        "decider",
        ports[4],
        ports[5],
        &endpoint,
        &[
            vec![
                format!("--set=service.metricsAddr={}", address(mtls, ports[0])),
                format!("--set=service.provisionerAddr={}", address(mtls, ports[2])),
            ],
            tls("decider"),
        ]
        .concat(),
    );
    let _reconciler = start(
        "reconciler",
        ports[6],
        ports[7],
        &endpoint,
        &[
            vec![
                kube.clone(),
                format!("--set=service.provisionerAddr={}", address(mtls, ports[2])),
            ],
            tls("reconciler"),
        ]
        .concat(),
    );
    // Every service up, the decider leading and planning.
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(ports[5], "shoal_decider_decisions_total") < 1.0
        || metric(ports[3], "shoal_leader{service=\"provisioner\"}") < 1.0
    {
        assert!(Instant::now() < deadline, "services did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decisions_before = metric(ports[5], "shoal_decider_decisions_total");

    // GetSnapshot of the whole cluster, as the decider calls it (a fresh client, warmed up).
    let mut snapshots = shoal_proto::v1::metrics_service_client::MetricsServiceClient::new(
        client(mtls, ports[0]).await,
    )
    .max_decoding_message_size(256 << 20);
    let mut samples = Vec::new();
    for i in 0..23 {
        let t = Instant::now();
        snapshots
            .get_snapshot(shoal_proto::v1::GetSnapshotRequest::default())
            .await
            .expect("GetSnapshot");
        if i >= 2 {
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let snapshot_ms = percentile(&samples, 0.5);

    // The burst: every pod's Unschedulable and Running instants, from the store's changes.
    let (_, mut changes) = sim.store.subscribe(&[]);
    let deployments = by_kind("Deployment").expect("deployments");
    let burst = json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "burst", "namespace": "default" },
        "spec": { "replicas": pending, "selector": { "matchLabels": { "app": "burst" } },
            "template": { "metadata": { "labels": { "app": "burst" } },
                "spec": { "containers": [ { "name": "app", "image": "x", "resources": { "requests": { "cpu": "1", "memory": "1Gi" } } } ] } } } });
    let created = Instant::now();
    let created_ms = unix_ms();
    sim.store
        .create(deployments, "default", burst)
        .expect("deployment");
    let mut registered: HashMap<String, u64> = HashMap::new();
    let mut node_ready: HashMap<String, u64> = HashMap::new();
    let mut unschedulable: HashMap<String, u64> = HashMap::new();
    let mut running: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut lagged = 0u64;
    while running.len() < pending {
        assert!(
            Instant::now() < deadline,
            "only {} of {pending} burst pods run after 600 s",
            running.len()
        );
        let change = match tokio::time::timeout(Duration::from_secs(5), changes.recv()).await {
            Ok(Ok(change)) => change,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                lagged += n;
                continue;
            }
            Ok(Err(_)) => break,
            Err(_) => continue,
        };
        if change.plural == "nodes" && change.object.name.starts_with("burst-") {
            let now = unix_ms();
            registered.entry(change.object.name.clone()).or_insert(now);
            let ready = change.object.value()["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                node_ready.entry(change.object.name.clone()).or_insert(now);
            }
            continue;
        }
        if change.plural != "pods" || !change.object.name.starts_with("burst-") {
            continue;
        }
        let now = unix_ms();
        let pod = change.object.value();
        let name = change.object.name.clone();
        if pod["status"]["phase"] == "Running" {
            running.entry(name.clone()).or_insert(now);
        }
        let refused = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable");
        if refused {
            unschedulable.entry(name).or_insert(now);
        }
    }
    let all_running = created.elapsed().as_secs_f64();
    assert_eq!(
        lagged, 0,
        "the change stream lagged: timings would be missing"
    );

    // Unschedulable → the CreateNodes that covers the pod: the first create operation written
    // after it turned Unschedulable.
    let ops = Records::new(std::sync::Arc::new(store.clone()))
        .operations()
        .await
        .expect("operations");
    let mut creates: Vec<u64> = ops
        .iter()
        .filter(|o| o.pool == "burst" && o.kind == shoal_core::claim::OperationKind::Create)
        .map(|o| o.created_at_ms)
        .collect();
    creates.sort();
    let mut to_request: Vec<f64> = unschedulable
        .values()
        .filter_map(|at| {
            creates
                .iter()
                .find(|c| **c >= *at)
                .map(|c| (c - at) as f64 / 1000.0)
        })
        .collect();
    to_request.sort_by(|a, b| a.total_cmp(b));
    let claims = Records::new(std::sync::Arc::new(store.clone()))
        .claims()
        .await
        .expect("claims");
    let made = claims.iter().filter(|c| c.pool == "burst").count();
    // Where the time went, relative to the Deployment's creation.
    let rel = |ms: u64| ms.saturating_sub(created_ms) as f64 / 1000.0;
    let spread = |mut v: Vec<f64>| -> String {
        v.sort_by(|a, b| a.total_cmp(b));
        format!(
            "first {:.1} s, median {:.1} s, last {:.1} s",
            percentile(&v, 0.0),
            percentile(&v, 0.5),
            percentile(&v, 1.0)
        )
    };
    let ready: Vec<f64> = claims
        .iter()
        .filter(|c| c.pool == "burst")
        .filter_map(|c| {
            c.history
                .iter()
                .find(|t| t.phase == shoal_core::ClaimPhase::Ready)
                .map(|t| rel(t.at_ms))
        })
        .collect();
    let launched: Vec<f64> = claims
        .iter()
        .filter(|c| c.pool == "burst")
        .filter_map(|c| {
            c.history
                .iter()
                .find(|t| t.phase == shoal_core::ClaimPhase::Launched)
                .map(|t| rel(t.at_ms))
        })
        .collect();
    println!(
        "   timeline: unschedulable {}; creates {:?}; launched {}; Node registered {}; Node Ready {}; claim Ready {}; running {}",
        spread(unschedulable.values().map(|t| rel(*t)).collect()),
        ops.iter()
            .filter(|o| o.pool == "burst")
            .map(|o| format!("{:.1} s ×{}", rel(o.created_at_ms), o.claim_ids.len()))
            .collect::<Vec<_>>(),
        spread(launched),
        spread(registered.values().map(|t| rel(*t)).collect()),
        spread(node_ready.values().map(|t| rel(*t)).collect()),
        spread(ready),
        spread(running.values().map(|t| rel(*t)).collect()),
    );
    let figures = Figures {
        nodes,
        pending,
        to_request_p50: percentile(&to_request, 0.5),
        to_request_p99: percentile(&to_request, 0.99),
        all_running,
        created: made,
        needed: pending.div_ceil(4),
        decisions: metric(ports[5], "shoal_decider_decisions_total") - decisions_before,
        load,
        snapshot_ms,
    };
    assert_eq!(
        to_request.len(),
        unschedulable.len(),
        "every unschedulable pod was covered by a CreateNodes"
    );
    shutdown.cancel();
    figures
}

#[tokio::main]
async fn main() {
    let sizes: Vec<(usize, usize)> = std::env::var("BURST_BENCH_SIZES")
        .unwrap_or_else(|_| "100x100,1000x1000,10000x10000".into())
        .split(',')
        .filter_map(|s| {
            let (n, p) = s.split_once('x')?;
            Some((n.trim().parse().ok()?, p.trim().parse().ok()?))
        })
        .collect();
    let compare_mtls = std::env::var("BURST_BENCH_MTLS").is_ok_and(|v| v == "1");
    let certs = tempfile::tempdir().expect("certs dir");
    let mtls = compare_mtls.then(|| Mtls::new(certs.path()));
    let mut all = Vec::new();
    let mut pairs = Vec::new();
    for (nodes, pending) in sizes {
        let mut modes = vec![None];
        if let Some(m) = &mtls {
            modes.push(Some(m));
        }
        let mut pair = Vec::new();
        for mode in modes {
            println!(
                "== {nodes} full nodes / {} pods + {pending} pending 1-CPU pods ({})",
                nodes * 30,
                if mode.is_some() { "mTLS" } else { "plaintext" }
            );
            let f = run(nodes, pending, mode).await;
            println!(
                "   loaded in {:.1} s; GetSnapshot {:.1} ms; unschedulable → CreateNodes p50 {:.2} s, p99 {:.2} s; all {} running after {:.1} s; nodes created {} (needed {}); decisions {}",
                f.load,
                f.snapshot_ms,
                f.to_request_p50,
                f.to_request_p99,
                f.pending,
                f.all_running,
                f.created,
                f.needed,
                f.decisions
            );
            pair.push((f.snapshot_ms, f.to_request_p50, f.to_request_p99));
            if mode.is_none() {
                all.push(f);
            }
        }
        if pair.len() == 2 {
            pairs.push((nodes, pending, pair[0], pair[1]));
        }
    }
    if !pairs.is_empty() {
        println!(
            "\n| cluster | GetSnapshot plaintext / mTLS | ratio | unsched → CreateNodes p50 plaintext / mTLS | ratio | p99 plaintext / mTLS |"
        );
        println!("|---|---|---|---|---|---|");
        for (nodes, pending, plain, tls) in &pairs {
            println!(
                "| {nodes} nodes + {pending} pending | {:.1} ms / {:.1} ms | {:.2}x | {:.2} s / {:.2} s | {:.2}x | {:.2} s / {:.2} s |",
                plain.0,
                tls.0,
                tls.0 / plain.0,
                plain.1,
                tls.1,
                tls.1 / plain.1,
                plain.2,
                tls.2
            );
        }
    }
    if let Some(base) = all.first() {
        println!(
            "\n| cluster | burst | unsched → CreateNodes p50 / p99 | all Running | nodes created / needed | decisions | vs baseline (all Running) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for f in &all {
            println!(
                "| {} nodes / {} pods | {} pods | {:.2} s / {:.2} s | {:.1} s | {} / {} | {} | {:.2}x |",
                f.nodes,
                f.nodes * 30,
                f.pending,
                f.to_request_p50,
                f.to_request_p99,
                f.all_running,
                f.created,
                f.needed,
                f.decisions,
                f.all_running / base.all_running
            );
        }
    }
}
