//! Real Prometheus scrapes the simulator and answers PromQL written for real clusters with the
//! simulated values.

mod common;

use common::{add_node, start};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::PrometheusServer;

fn values_by(body: &str, label: &str) -> Vec<(String, f64)> {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    v.pointer("/data/result")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .filter_map(|r| {
                    let key = r["metric"][label].as_str().unwrap_or_default().to_string();
                    let value = r["value"][1].as_str()?.parse().ok()?;
                    Some((key, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_over_the_simulator_returns_simulated_usage() {
    let (sim, _client, _shutdown) = start().await;
    add_node(&sim, "worker-1", "4", json!({}), json!([])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods = shoal_sim::resources::by_kind("Pod").expect("pods");
    for (name, cpu, memory) in [("busy", "1500m", "1Gi"), ("calm", "500m", "512Mi")] {
        let pod = json!({ "metadata": { "name": name, "annotations": {
                "sim.shoal.dev/cpu-usage": cpu, "sim.shoal.dev/memory-usage": memory } },
            "spec": { "containers": [ { "name": "app", "image": "x", "resources": { "requests": { "cpu": "100m" } } } ] } });
        sim.store.create(pods, "default", pod).expect("pod");
    }

    let prometheus = tokio::task::spawn_blocking({
        let addr = sim.addr;
        move || PrometheusServer::start(&[addr])
    })
    .await
    .expect("prometheus starts");
    // Let it scrape a few times. The windows are 5s rather than the usual [1m]: rate() divides by
    // the whole window, so a [1m] rate only reads true once a minute of samples exists.
    let mut cpu = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let body = tokio::task::block_in_place(|| {
            prometheus.query("sum by (node) (rate(container_cpu_usage_seconds_total[5s]))")
        });
        cpu = values_by(&body, "node");
        if cpu.first().is_some_and(|(_, v)| (v - 2.0).abs() < 0.05) {
            break;
        }
    }
    assert_eq!(cpu.len(), 1, "{cpu:?}");
    assert_eq!(cpu[0].0, "worker-1");
    assert!(
        (cpu[0].1 - 2.0).abs() < 0.05,
        "2 cores busy, PromQL says {}",
        cpu[0].1
    );

    let busy = tokio::task::block_in_place(|| {
        prometheus.query("1 - avg by (instance) (rate(node_cpu_seconds_total{mode=\"idle\"}[5s]))")
    });
    let busy = values_by(&busy, "instance");
    assert!((busy[0].1 - 0.5).abs() < 0.05, "node 50% busy: {busy:?}");

    let available =
        tokio::task::block_in_place(|| prometheus.query("node_memory_MemAvailable_bytes"));
    assert_eq!(
        values_by(&available, "instance"),
        [(
            "worker-1".to_string(),
            (8u64 << 30) as f64 - (1536u64 << 20) as f64
        )]
    );

    let running = tokio::task::block_in_place(|| {
        prometheus.query("sum(kube_pod_status_phase{phase=\"Running\"})")
    });
    assert_eq!(values_by(&running, "none").first().map(|v| v.1), Some(2.0));
    let ready = tokio::task::block_in_place(|| {
        prometheus.query("kube_node_status_condition{condition=\"Ready\",status=\"true\"}")
    });
    assert_eq!(values_by(&ready, "node").len(), 1);
    drop(prometheus);
}
