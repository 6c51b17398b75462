//! Shared by the simulator's integration tests: an in-process simulator with fast timings, a
//! kube client for it, polling with a deadline, and nodes from the sim cloud.
#![allow(dead_code)] // each test binary uses a different part

use std::time::Duration;

use kube::{Client, Config};
use serde_json::json;
use shoal_sim::{
    Sim, SimConfig, cloud::BootTiming, kubelet::KubeletTiming, lifecycle::LifecycleTiming,
};
use tokio_util::sync::CancellationToken;

/// Timings fast enough for tests: nodes Ready and pods Running within ~100 ms, instances boot
/// in 100 ms, a silent node is NotReady after 1 s and its pods are evicted 1 s later.
pub fn fast_config() -> SimConfig {
    SimConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        bookmark_interval: Duration::from_millis(500),
        kubelet: KubeletTiming {
            node_ready_delay: Duration::from_millis(100),
            pod_start_delay: Duration::from_millis(100),
        },
        boot: BootTiming {
            delay: Duration::from_millis(100),
            jitter: Duration::ZERO,
        },
        lifecycle: LifecycleTiming {
            heartbeat_interval: Duration::from_millis(200),
            grace_period: Duration::from_secs(1),
            eviction_timeout: Duration::from_secs(1),
        },
        ..SimConfig::default()
    }
}

/// Starts a simulator with `config` and a kube client for it.
pub async fn start_with(config: SimConfig) -> (Sim, Client, CancellationToken) {
    let shutdown = CancellationToken::new();
    let sim = Sim::start(config, shutdown.clone())
        .await
        .expect("the simulator starts");
    let mut kube_config = Config::new(sim.url().parse().expect("url"));
    kube_config.default_namespace = "default".into();
    let client = Client::try_from(kube_config).expect("kube client");
    (sim, client, shutdown)
}

/// Starts a simulator with [`fast_config`].
pub async fn start() -> (Sim, Client, CancellationToken) {
    start_with(fast_config()).await
}

/// Polls `check` every 100 ms for up to 10 s; panics naming `what` if it never holds.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Like [`eventually`], returning what `check` found.
pub async fn eventually_some<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Creates an instance in the sim cloud (it registers as a node) and returns its JSON.
pub async fn add_node(
    sim: &Sim,
    name: &str,
    cpu: &str,
    labels: serde_json::Value,
    taints: serde_json::Value,
) -> serde_json::Value {
    let mut client = reqwest::Client::builder();
    if let Some(ca) = &sim.ca_pem {
        client =
            client.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"));
    }
    let response = client
        .build()
        .expect("client")
        .post(format!("{}/cloud/v1/instances", sim.url()))
        .json(&json!({ "name": name, "labels": labels, "taints": taints, "capacity": { "cpu": cpu, "memory": "8Gi" } }))
        .send()
        .await
        .expect("sim cloud answers");
    assert_eq!(response.status(), 201, "instance {name} created");
    response.json().await.expect("instance JSON")
}

/// The installed kubectl, pointed at a simulator.
pub struct Kubectl {
    /// The kubeconfig file.
    pub kubeconfig: tempfile::NamedTempFile,
}

impl Kubectl {
    /// A kubeconfig for `sim`.
    pub fn new(sim: &Sim) -> Kubectl {
        let kubeconfig = tempfile::NamedTempFile::new().expect("temp kubeconfig");
        shoal_sim::kubeconfig::write(kubeconfig.path(), &sim.url()).expect("write kubeconfig");
        Kubectl { kubeconfig }
    }

    /// kubectl with (a copy of) the kubeconfig at `path`.
    pub fn from_file(path: &std::path::Path) -> Kubectl {
        let kubeconfig = tempfile::NamedTempFile::new().expect("temp kubeconfig");
        std::fs::copy(path, kubeconfig.path()).expect("copy kubeconfig");
        Kubectl { kubeconfig }
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let binary = shoal_testkit::require_tool("kubectl", "install kubectl");
        let mut command = tokio::process::Command::new(binary);
        command
            .env("KUBECONFIG", self.kubeconfig.path())
            .env("HOME", std::env::temp_dir())
            .args(args);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("kubectl starts");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().await.expect("kubectl output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and expects success; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args, None).await;
        assert!(ok, "kubectl {args:?} failed:\n{stdout}\n{stderr}");
        stdout
    }

    /// `kubectl apply -f -` of `manifest`, expected to succeed.
    pub async fn apply(&self, manifest: &str) -> String {
        let (ok, stdout, stderr) = self.run(&["apply", "-f", "-"], Some(manifest)).await;
        assert!(ok, "kubectl apply failed:\n{stdout}\n{stderr}");
        stdout
    }
}
