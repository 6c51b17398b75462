//! Simulator scale benchmark: loads N nodes and M pods, then measures a full paginated list of
//! pods over HTTP, watch event latency to 4 concurrent HTTP watchers at 1,000 changes/s, scheduler
//! throughput (pods bound per second), and resident memory.
//!
//! Runs the 1k nodes / 30k pods case as the same-run baseline, then 10k / 300k (targets: watch
//! p99 < 100 ms at 1,000 changes/s, memory < 4 GiB).
//!
//! `cargo bench -p shoal-sim --bench scale` (set `SIM_BENCH_SIZES=1000x30000` to pick sizes).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use serde_json::{Value, json};
use shoal_sim::{Sim, SimConfig, kubelet::KubeletTiming, resources::by_kind};
use tokio_util::sync::CancellationToken;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Figures {
    nodes: usize,
    pods: usize,
    load_s: f64,
    rss_mib: f64,
    list_s: f64,
    watch_p50_ms: f64,
    watch_p99_ms: f64,
    watch_events: usize,
    bound_per_s: f64,
}

async fn run(nodes: usize, pods: usize) -> Figures {
    let shutdown = CancellationToken::new();
    let config = SimConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        watch_history: 200_000,
        kubelet: KubeletTiming {
            node_ready_delay: Duration::from_millis(10),
            pod_start_delay: Duration::from_millis(10),
        },
        ..SimConfig::default()
    };
    let sim = Sim::start(config, shutdown.clone()).await.expect("sim");
    let (node_kind, pod_kind) = (
        by_kind("Node").expect("nodes"),
        by_kind("Pod").expect("pods"),
    );

    // Load: Ready nodes, and pods already bound and running (as a steady cluster has them).
    let started = Instant::now();
    for i in 0..nodes {
        let node = json!({ "metadata": { "name": format!("node-{i:05}"), "labels": { "shoal.dev/pool": format!("pool-{}", i % 10) } },
            "status": { "allocatable": { "cpu": "32", "memory": "128Gi", "pods": "110" }, "capacity": { "cpu": "32", "memory": "128Gi", "pods": "110" },
                "conditions": [ { "type": "Ready", "status": "True" } ] } });
        sim.store.create(node_kind, "", node).expect("node");
    }
    for i in 0..pods {
        let pod = json!({ "metadata": { "name": format!("pod-{i:06}"), "labels": { "app": format!("app-{}", i % 100) } },
            "spec": { "nodeName": format!("node-{:05}", i % nodes), "containers": [ { "name": "app", "image": "x",
                "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } } } ] },
            "status": { "phase": "Running" } });
        sim.store.create(pod_kind, "default", pod).expect("pod");
    }
    let load_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // let controllers catch up
    let rss = rss_mib();

    // Full paginated list over HTTP.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let url = format!(
            "{}/api/v1/namespaces/default/pods?limit=500{}",
            sim.url(),
            if token.is_empty() {
                String::new()
            } else {
                format!("&continue={token}")
            }
        );
        let page: Value = http
            .get(url)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        listed += page["items"].as_array().map_or(0, Vec::len);
        token = page["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if token.is_empty() {
            break;
        }
    }
    let list_s = started.elapsed().as_secs_f64();
    assert_eq!(listed, pods, "the paginated list returned every pod once");

    // Watch latency: 4 HTTP watchers, 1,000 changes/s for 5 s.
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let rv = sim.store.rv();
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let url = format!(
            "{}/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}",
            sim.url()
        );
        let response = http.get(url).send().await.expect("watch");
        let latencies = latencies.clone();
        watchers.push(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut buffer = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let received = unix_nanos();
                    let sent = serde_json::from_slice::<Value>(&line)
                        .ok()
                        .and_then(|event| {
                            event
                                .pointer("/object/metadata/annotations/bench.shoal.dev~1sent")
                                .and_then(Value::as_str)
                                .and_then(|s| s.parse::<u128>().ok())
                        });
                    if let Some(sent) = sent {
                        latencies
                            .lock()
                            .expect("latencies")
                            .push((received.saturating_sub(sent)) as f64 / 1e6);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let changes = 5_000;
    for i in 0..changes {
        ticker.tick().await;
        let name = format!("pod-{:06}", (i * 7919) % pods);
        let _ = sim.store.modify(pod_kind, "default", &name, false, |pod| {
            pod["metadata"]["annotations"] =
                json!({ "bench.shoal.dev/sent": unix_nanos().to_string() });
            true
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for w in &watchers {
        w.abort();
    }
    let mut lat = latencies.lock().expect("latencies").clone();
    lat.sort_by(|a, b| a.total_cmp(b));

    // Scheduler throughput: 10 % more pods, pending, that fit.
    let extra = pods / 10;
    let (_, mut live) = sim.store.subscribe(&[]);
    let started = Instant::now();
    let creator = {
        let store = sim.store.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..extra {
                let pod = json!({ "metadata": { "name": format!("new-{i:06}") }, "spec": { "containers": [ { "name": "app", "image": "x",
                    "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } } } ] } });
                let _ = store.create(pod_kind, "default", pod);
            }
        })
    };
    let mut bound = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound < extra && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), live.recv()).await {
            Ok(Ok(change)) => {
                let newly_bound = change.plural == "pods"
                    && change.object.name.starts_with("new-")
                    && change
                        .object
                        .field("spec.nodeName")
                        .is_some_and(|n| !n.is_empty())
                    && change
                        .prev
                        .as_ref()
                        .is_some_and(|p| p.field("spec.nodeName").is_none_or(|n| n.is_empty()));
                if newly_bound {
                    bound += 1;
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                // Count from the store instead.
                bound = sim
                    .store
                    .list(pod_kind, &Default::default(), &|p| {
                        p.name.starts_with("new-")
                            && p.field("spec.nodeName").is_some_and(|n| !n.is_empty())
                    })
                    .items
                    .len();
            }
            _ => break,
        }
    }
    let bound_per_s = bound as f64 / started.elapsed().as_secs_f64();
    let _ = creator.await;
    shutdown.cancel();
    Figures {
        nodes,
        pods,
        load_s,
        rss_mib: rss,
        list_s,
        watch_p50_ms: percentile(&lat, 0.5),
        watch_p99_ms: percentile(&lat, 0.99),
        watch_events: lat.len(),
        bound_per_s,
    }
}

fn main() {
    let sizes: Vec<(usize, usize)> = std::env::var("SIM_BENCH_SIZES")
        .unwrap_or_else(|_| "1000x30000,10000x300000".into())
        .split(',')
        .filter_map(|s| {
            let (n, p) = s.split_once('x')?;
            Some((n.trim().parse().ok()?, p.trim().parse().ok()?))
        })
        .collect();
    let mut results = Vec::new();
    for (nodes, pods) in sizes {
        // A fresh runtime per size so one case's tasks cannot slow the next.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let figures = runtime.block_on(run(nodes, pods));
        runtime.shutdown_timeout(Duration::from_secs(5));
        println!(
            "{:>6} nodes {:>7} pods | load {:6.1} s | RSS {:7.0} MiB | full list {:6.2} s | watch p50 {:6.2} ms p99 {:7.2} ms ({} events) | scheduler {:7.0} pods/s",
            figures.nodes,
            figures.pods,
            figures.load_s,
            figures.rss_mib,
            figures.list_s,
            figures.watch_p50_ms,
            figures.watch_p99_ms,
            figures.watch_events,
            figures.bound_per_s
        );
        results.push(figures);
    }
    if results.len() == 2 {
        let (a, b) = (&results[0], &results[1]);
        println!(
            "ratio large/small: pods x{:.0} | full list x{:.1} | watch p99 x{:.2} | RSS x{:.1} | scheduler rate x{:.2}",
            b.pods as f64 / a.pods as f64,
            b.list_s / a.list_s,
            b.watch_p99_ms / a.watch_p99_ms,
            b.rss_mib / a.rss_mib,
            b.bound_per_s / a.bound_per_s
        );
    }
}
