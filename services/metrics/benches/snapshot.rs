//! Metrics service benchmark at 1k nodes / 30k pods (the same-run baseline) and 10k / 300k.
//!
//! - **Snapshot build time**: `ClusterState::snapshot` over caches filled from real Kubernetes
//!   objects (median of 21 builds; target < 50 ms at 10k/300k).
//! - **Encoded snapshot size** (protobuf; target < 8 MB at 10k/300k), beside the JSON the API
//!   server holds for the same nodes and pods (what a cache of whole objects would hold).
//! - **Resident memory of the service** (target < 1 GiB at 10k/300k): the real `shoal-metrics`
//!   process, synced against a simulator (in this process) holding the objects, read from
//!   `/proc/<pid>/status`; plus its time to the first complete snapshot and `GetSnapshot`
//!   latency over gRPC.
//!
//! `cargo bench -p shoal-metrics --bench snapshot` (`METRICS_BENCH_SIZES=1000x30000` picks sizes).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use prost::Message;
use serde_json::{Value, json};
use shoal_metrics::{
    facts::{NodeFacts, PodFacts},
    state::{ClusterState, Utilization},
};
use shoal_proto::v1::{GetSnapshotRequest, metrics_service_client::MetricsServiceClient};
use shoal_sim::{Sim, SimConfig, resources::by_kind};
use tokio_util::sync::CancellationToken;

// The allocator the service binaries use, so that build times are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PODS_PER_DEPLOYMENT: usize = 100;

fn node_json(i: usize) -> Value {
    json!({ "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": format!("node-{i:05}"), "labels": {
            "shoal.dev/pool": format!("pool-{}", i % 10), "kubernetes.io/hostname": format!("node-{i:05}"),
            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": format!("zone-{}", i % 3) } },
        "spec": { "taints": if i % 10 == 9 { json!([{ "key": "dedicated", "value": "gpu", "effect": "NoSchedule" }]) } else { json!([]) } },
        "status": { "allocatable": { "cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "100Gi" },
            "capacity": { "cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "100Gi" },
            "conditions": [ { "type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z" } ] } })
}

/// Pod `i` of `pods` on `nodes` nodes: deployments of 100 pods with their own requests; 1 % of
/// pods unschedulable, the rest bound 30 to a node.
fn pod_json(i: usize, nodes: usize) -> Value {
    let deployment = i / PODS_PER_DEPLOYMENT;
    let cpu = 100 + (deployment % 20) * 50;
    let memory = 128 + (deployment % 16) * 64;
    let mut pod = json!({ "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": format!("app-{deployment}-{i}"), "namespace": format!("team-{}", deployment % 20),
            "labels": { "app": format!("app-{deployment}"), "tier": "web", "pod-template-hash": format!("h{deployment}") },
            "ownerReferences": [ { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{deployment}-h"),
                "uid": format!("uid-{deployment}"), "controller": true } ] },
        "spec": { "containers": [ { "name": "app", "image": "registry.example/app:1",
            "resources": { "requests": { "cpu": format!("{cpu}m"), "memory": format!("{memory}Mi") } } } ] },
        "status": { "phase": "Pending" } });
    if i % 100 == 99 {
        pod["status"]["conditions"] = json!([{ "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/10 nodes are available: 10 Insufficient cpu.", "lastTransitionTime": "2026-01-01T00:00:00Z" }]);
    } else {
        pod["spec"]["nodeName"] = json!(format!("node-{:05}", i % nodes));
        pod["status"]["phase"] = json!("Running");
    }
    pod
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Figures {
    nodes: usize,
    pods: usize,
    build_ms: f64,
    bytes: usize,
    json_bytes: usize,
    rss_mib: f64,
    sync_s: f64,
    get_ms: f64,
}

fn in_process(nodes: usize, pods: usize) -> (f64, usize, usize) {
    let mut state = ClusterState::new("shoal.dev/pool");
    let mut json_bytes = 0;
    let node_facts: Vec<NodeFacts> = (0..nodes)
        .map(|i| {
            let v = node_json(i);
            json_bytes += v.to_string().len();
            let node: Node = serde_json::from_value(v).expect("node");
            NodeFacts::from_node(&node)
        })
        .collect();
    let pod_facts: Vec<PodFacts> = (0..pods)
        .map(|i| {
            let v = pod_json(i, nodes);
            json_bytes += v.to_string().len();
            let pod: Pod = serde_json::from_value(v).expect("pod");
            PodFacts::from_pod(&pod)
        })
        .collect();
    state.replace_nodes(node_facts);
    state.replace_pods(pod_facts);
    state.replace_pdbs(Vec::new());
    let usage = Utilization::default();
    let mut times = Vec::new();
    let mut bytes = 0;
    let builds = std::env::var("METRICS_BENCH_BUILDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(21);
    for sequence in 0..builds {
        let started = Instant::now();
        let snapshot = state.snapshot(
            sequence,
            std::time::SystemTime::now(),
            &usage,
            String::new(),
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = snapshot.encoded_len();
        assert_eq!(snapshot.nodes.len(), nodes);
    }
    (median(times), bytes, json_bytes)
}

fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn as_a_process(nodes: usize, pods: usize) -> (f64, f64, f64) {
    let shutdown = CancellationToken::new();
    let config = SimConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        ..SimConfig::default()
    };
    let sim = Sim::start(config, shutdown.clone()).await.expect("sim");
    let (node_kind, pod_kind) = (
        by_kind("Node").expect("nodes"),
        by_kind("Pod").expect("pods"),
    );
    let ns_kind = by_kind("Namespace").expect("namespaces");
    for team in 0..20 {
        let ns = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": format!("team-{team}") } });
        sim.store.create(ns_kind, "", ns).expect("namespace");
    }
    for i in 0..nodes {
        sim.store.create(node_kind, "", node_json(i)).expect("node");
    }
    for i in 0..pods {
        let pod = pod_json(i, nodes);
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        sim.store.create(pod_kind, &ns, pod).expect("pod");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    shoal_sim::kubeconfig::write(&kubeconfig, &sim.url()).expect("kubeconfig");
    let grpc = free_port();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-metrics"))
        .arg(format!("--grpc-addr=127.0.0.1:{grpc}"))
        .arg(format!("--admin-addr=127.0.0.1:{}", free_port()))
        .arg(format!(
            "--set=service.kube.kubeconfig={}",
            kubeconfig.display()
        ))
        .arg("--log-level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("shoal-metrics starts");
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut client = loop {
        match MetricsServiceClient::connect(endpoint.clone()).await {
            Ok(c) => break c.max_decoding_message_size(256 << 20),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    loop {
        if let Ok(s) = client.get_snapshot(GetSnapshotRequest::default()).await {
            let s = s.into_inner();
            let bound: i32 = s.nodes.iter().flat_map(|n| &n.pods).map(|c| c.count).sum();
            let pending: i32 = s.pending.iter().map(|p| p.count).sum();
            if s.nodes.len() == nodes && (bound + pending) as usize == pods {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sync_s = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        let _ = client
            .get_snapshot(GetSnapshotRequest::default())
            .await
            .expect("snapshot");
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let rss = rss_of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    shutdown.cancel();
    (rss, sync_s, median(latencies))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes =
        std::env::var("METRICS_BENCH_SIZES").unwrap_or_else(|_| "1000x30000,10000x300000".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows: Vec<Figures> = Vec::new();
    for size in sizes.split(',') {
        let Some((n, p)) = size.split_once('x') else {
            continue;
        };
        let (nodes, pods): (usize, usize) = (n.parse().expect("nodes"), p.parse().expect("pods"));
        eprintln!("== {nodes} nodes / {pods} pods");
        let (build_ms, bytes, json_bytes) = in_process(nodes, pods);
        eprintln!(
            "   build {build_ms:.1} ms (median of 21), snapshot {bytes} B, objects as JSON {json_bytes} B"
        );
        if std::env::var_os("METRICS_BENCH_BUILD_ONLY").is_some() {
            continue;
        }
        let (rss_mib, sync_s, get_ms) = runtime.block_on(as_a_process(nodes, pods));
        eprintln!(
            "   service RSS {rss_mib:.0} MiB, synced in {sync_s:.1} s, GetSnapshot {get_ms:.1} ms"
        );
        rows.push(Figures {
            nodes,
            pods,
            build_ms,
            bytes,
            json_bytes,
            rss_mib,
            sync_s,
            get_ms,
        });
    }
    println!(
        "| case | build (median) | snapshot size | objects as JSON | size ratio | service RSS | first sync | GetSnapshot over gRPC |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {}k nodes / {}k pods | {:.1} ms | {:.2} MB | {:.0} MB | 1/{:.0} | {:.0} MiB | {:.1} s | {:.1} ms |",
            r.nodes / 1000,
            r.pods / 1000,
            r.build_ms,
            r.bytes as f64 / 1e6,
            r.json_bytes as f64 / 1e6,
            r.json_bytes as f64 / r.bytes as f64,
            r.rss_mib,
            r.sync_s,
            r.get_ms
        );
    }
    if rows.len() >= 2 {
        let (a, b) = (&rows[0], &rows[rows.len() - 1]);
        println!(
            "| ratio (×{} objects) | ×{:.1} | ×{:.1} | ×{:.1} | | ×{:.1} | ×{:.1} | ×{:.1} |",
            b.pods / a.pods.max(1),
            b.build_ms / a.build_ms,
            b.bytes as f64 / a.bytes as f64,
            b.json_bytes as f64 / a.json_bytes as f64,
            b.rss_mib / a.rss_mib,
            b.sync_s / a.sync_s,
            b.get_ms / a.get_ms
        );
    }
}
