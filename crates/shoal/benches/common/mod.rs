//! What the burst and soak benches share: Shoal's services as `shoal run <service>` processes,
//! the simulator in the bench process with a kubeconfig on disk, the bench's own etcd client, and
//! a NodePool written to the store.

#![allow(dead_code)] // each bench uses its part

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use prost::Message;
use shoal_sim::{Sim, SimConfig, cloud::BootTiming, kubelet::KubeletTiming};
use shoal_state::{EtcdConfig, EtcdStore, StateStore, keys};
use tokio_util::sync::CancellationToken;

/// A service as its own process; killed on drop.
pub struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shoal run <service>` (release build) on loopback ports against `etcd`, as instance
/// `<bench>-<service>`, plaintext unless `extra` sets `grpc.tls`.
pub fn start(
    bench: &str,
    service: &str,
    grpc: u16,
    admin: u16,
    etcd: &str,
    extra: &[String],
) -> Service {
    start_with_env(bench, service, grpc, admin, etcd, extra, &[])
}

/// [`start`] with more environment (e.g. credentials).
pub fn start_with_env(
    bench: &str,
    service: &str,
    grpc: u16,
    admin: u16,
    etcd: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> Service {
    let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .envs(env.iter().copied())
        .args(["run", service])
        .env("SHOAL_GRPC__PLAINTEXT", "true")
        .arg(format!("--grpc-addr=127.0.0.1:{grpc}"))
        .arg(format!("--admin-addr=127.0.0.1:{admin}"))
        .arg(format!("--etcd-endpoints={etcd}"))
        .arg(format!("--instance-id={bench}-{service}"))
        .arg("--log-level=warn")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start shoal run {service}: {e}"));
    Service(child)
}

/// The simulator in this process (no boot jitter) and its kubeconfig in `dir`.
pub async fn simulator(
    boot: Duration,
    kubelet: Duration,
    dir: &std::path::Path,
    shutdown: &CancellationToken,
) -> (Sim, PathBuf) {
    let sim = Sim::start(
        SimConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            boot: BootTiming {
                delay: boot,
                jitter: Duration::ZERO,
            },
            kubelet: KubeletTiming {
                node_ready_delay: kubelet,
                pod_start_delay: kubelet,
            },
            ..SimConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .expect("sim");
    let kubeconfig = dir.join("kubeconfig");
    shoal_sim::kubeconfig::write(&kubeconfig, &sim.url()).expect("kubeconfig");
    (sim, kubeconfig)
}

/// The bench's own client of `endpoint`, in Shoal's namespace.
pub async fn store(endpoint: String, timeout: Duration) -> EtcdStore {
    EtcdStore::connect(&EtcdConfig {
        endpoints: vec![endpoint],
        namespace: keys::DEFAULT_NAMESPACE.into(),
        request_timeout: timeout,
        ..EtcdConfig::default()
    })
    .await
    .expect("etcd")
}

/// Writes the NodePool `yaml` (validated as ApplyPool would) to the store.
pub async fn put_pool(store: &EtcdStore, yaml: &str) {
    let (pool, _) = shoal_core::pool::Pool::from_yaml(yaml).expect("bench pool");
    store
        .put(&keys::pool(&pool.name), pool.encode_to_vec(), None)
        .await
        .expect("pool");
}

/// `name` from the environment, parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A unary call with grpcurl (plaintext), answered as JSON; panics on an error.
pub fn grpcurl(addr: &str, method: &str, body: serde_json::Value) -> serde_json::Value {
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-d", &body.to_string(), addr, method])
        .output()
        .expect("grpcurl (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits until the provisioner whose admin port is `admin` leads.
pub fn wait_provisioner_leads(admin: u16) {
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    shoal_testkit::wait_for(Duration::from_secs(30), || {
        matches!(shoal_testkit::http_get(admin, "/metrics"), Ok((200, body)) if body.contains("shoal_leader{service=\"provisioner\"} 1"))
            .then_some(())
    })
    .expect("the provisioner leads");
}

/// Waits until the provisioner at `addr` lists `count` claims of `pool` Ready (panics on a
/// Failed one) and returns when.
pub fn wait_pool_ready(addr: &str, pool: &str, count: u32) -> std::time::Instant {
    shoal_testkit::wait_for(Duration::from_secs(3600), || {
        let claims = grpcurl(
            addr,
            "shoal.v1.ProvisionerService/ListNodeClaims",
            serde_json::json!({ "pool": pool }),
        );
        let all = claims["claims"].as_array().cloned().unwrap_or_default();
        let failed = all.iter().find(|c| c["phase"] == "CLAIM_PHASE_FAILED");
        assert!(failed.is_none(), "a claim failed: {failed:?}");
        (all.iter()
            .filter(|c| c["phase"] == "CLAIM_PHASE_READY")
            .count()
            == count as usize)
            .then(std::time::Instant::now)
    })
    .expect("every claim Ready")
}

/// A metric's value (summed over its series) from a service's admin `/metrics`; 0 when absent.
pub fn metric(admin: u16, name: &str) -> f64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    shoal_testkit::http_get(addr, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// The `p` quantile (0..1) of `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `nodes` full Nodes of pool `base` in the simulator (3 CPU, 30 running pods of 100m each).
pub fn full_cluster(sim: &Sim, nodes: usize) {
    use serde_json::json;
    let (node_kind, pod_kind) = (
        shoal_sim::resources::by_kind("Node").expect("nodes"),
        shoal_sim::resources::by_kind("Pod").expect("pods"),
    );
    for i in 0..nodes {
        let node = json!({ "metadata": { "name": format!("base-{i:05}"), "labels": { "shoal.dev/pool": "base" } },
            "status": { "allocatable": { "cpu": "3", "memory": "64Gi", "pods": "110" }, "capacity": { "cpu": "3", "memory": "64Gi", "pods": "110" },
                "conditions": [ { "type": "Ready", "status": "True" } ] } });
        sim.store.create(node_kind, "", node).expect("node");
    }
    for i in 0..nodes * 30 {
        let pod = json!({ "metadata": { "name": format!("base-{i:06}"), "labels": { "app": format!("app-{}", i % 100) } },
            "spec": { "nodeName": format!("base-{:05}", i % nodes), "containers": [ { "name": "app", "image": "x",
                "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } } } ] },
            "status": { "phase": "Running" } });
        sim.store.create(pod_kind, "default", pod).expect("pod");
    }
}
