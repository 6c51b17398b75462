//! AWS bench: how long N EC2 instances take from one `CreateNodes` to N Ready nodes, when every
//! instance boots in `AWS_BENCH_BOOT` seconds (default 2), against moto's EC2 server (its own
//! process, real HTTP through the fault proxy of tests/fixtures/moto_ec2.py, no faults) with the
//! provisioner as its own process (`shoal run provisioner`, release build) and real etcd. moto
//! boots nothing: the bench plays the machines, running a simulated kubelet (`shoal_sim::agent`)
//! for every running instance once it is `AWS_BENCH_BOOT` old, with the instance's tags as labels.
//!
//! Two cases in one run: the pool's `scaleUp.maxConcurrent: 1` (the same-run baseline) and
//! `maxConcurrent: 50`.
//!
//! `cargo bench -p shoal --bench aws` (`AWS_BENCH_INSTANCES=50`, `AWS_BENCH_BASELINE=20`,
//! `AWS_BENCH_BOOT=2`). Needs scripts/install-deps.sh (moto in its venv).

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use shoal_testkit::{EtcdServer, free_port, http_get, wait_for};
use tokio_util::sync::CancellationToken;

mod common;

/// moto + the fault proxy, killed on drop.
struct Moto(Child, u16, Value);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> Moto {
    let port = free_port();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/moto_ec2.py");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut child = Command::new(shoal_testkit::fakepve::python())
        .arg(&script)
        .arg(format!("--port={port}"))
        .arg("--sim-binary=/nonexistent")
        .stdout(log.reopen().expect("log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("python (scripts/install-deps.sh makes the venv)");
    let setup = wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(log.path())
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("ready "))
            .and_then(|j| serde_json::from_str::<Value>(j).ok())
    });
    let Some(setup) = setup else {
        let _ = child.kill();
        panic!("moto's EC2 server did not start (scripts/install-deps.sh installs moto[server])");
    };
    Moto(child, port, setup)
}

/// Runs a simulated kubelet for every running instance `boot` after it first showed, until `stop`.
fn play_machines(
    moto: std::net::SocketAddr,
    api: String,
    boot: Duration,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let started: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
        while !stop.is_cancelled() {
            let instances: Vec<Value> = match http_get(moto, "/_shoal/instances?brief") {
                Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
                _ => Vec::new(),
            };
            for i in instances {
                let id = i["id"].as_str().unwrap_or_default().to_string();
                let Some(name) = i["tags"]["shoal.dev/node"].as_str() else {
                    continue;
                };
                if i["state"] != "running" || started.lock().expect("lock").contains(&id) {
                    continue;
                }
                let seen = *first_seen.entry(id.clone()).or_insert_with(Instant::now);
                if seen.elapsed() < boot {
                    continue;
                }
                let labels: BTreeMap<String, String> = i["tags"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| k.as_str() != "Name" && k.as_str() != "shoal.dev/node")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let agent = shoal_sim::agent::AgentConfig {
                    api: api.clone(),
                    name: name.to_string(),
                    cpu: "2".into(),
                    memory: "4Gi".into(),
                    pods: 110,
                    labels,
                    taints: Vec::new(),
                    heartbeat_interval: Duration::from_secs(5),
                    pod_start_delay: Duration::from_millis(200),
                    provider_id: format!("aws:///{}/{id}", i["zone"].as_str().unwrap_or_default()),
                };
                started.lock().expect("lock").insert(id);
                runtime.spawn(shoal_sim::agent::run(agent, stop.clone()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// One case: `count` instances under `maxConcurrent: max_concurrent`. Returns the time from
/// CreateNodes to every claim Ready.
fn run_case(
    runtime: &tokio::runtime::Runtime,
    count: u32,
    max_concurrent: u32,
    boot: Duration,
) -> Duration {
    let etcd = EtcdServer::start();
    let moto = moto();
    let dir = tempfile::tempdir().expect("dir");
    let shutdown = CancellationToken::new();
    let (sim, kubeconfig) = runtime.block_on(common::simulator(
        Duration::ZERO,
        Duration::from_millis(200),
        dir.path(),
        &shutdown,
    ));
    let pool = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: ec2 }}\nspec:\n  provider: {{ backend: aws }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: {count} }}\n  scaleUp: {{ maxConcurrent: {max_concurrent}, batchSize: {count} }}\n"
    );
    runtime.block_on(async {
        let store = common::store(etcd.endpoint(), Duration::from_secs(5)).await;
        common::put_pool(&store, &pool).await;
    });
    let s = &moto.2;
    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends:\n    aws:\n      region: us-east-1\n      endpoint: http://127.0.0.1:{}\n      classes:\n        default:\n          launchTemplate: {{ id: {} }}\n          instanceTypes: [m5.large]\n          subnets: [{}, {}]\n  resilience: {{ callTimeout: 60s, attempts: 3 }}\n  nodeTtl: 3600s\n  instanceCheckInterval: 1s\n",
            kubeconfig.display(),
            moto.1,
            s["launchTemplateId"].as_str().unwrap_or_default(),
            s["subnets"][0].as_str().unwrap_or_default(),
            s["subnets"][1].as_str().unwrap_or_default(),
        ),
    )
    .expect("config");
    let (grpc, admin) = (free_port(), free_port());
    let _provisioner = common::start_with_env(
        "awsbench",
        "provisioner",
        grpc,
        admin,
        &etcd.endpoint(),
        &[format!("--config={}", config.display())],
        &[
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
        ],
    );
    common::wait_provisioner_leads(admin);
    let machines = play_machines(
        std::net::SocketAddr::from(([127, 0, 0, 1], moto.1)),
        sim.url(),
        boot,
        runtime.handle().clone(),
        shutdown.clone(),
    );
    let addr = format!("127.0.0.1:{grpc}");
    let started = Instant::now();
    common::grpcurl(
        &addr,
        "shoal.v1.ProvisionerService/CreateNodes",
        json!({ "pool": "ec2", "count": count, "idempotencyKey": "bench" }),
    );
    let ready = common::wait_pool_ready(&addr, "ec2", count);
    shutdown.cancel();
    let _ = machines.join();
    ready.duration_since(started)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let count = common::env_or("AWS_BENCH_INSTANCES", 50u32);
    let baseline = common::env_or("AWS_BENCH_BASELINE", 20u32);
    let boot = Duration::from_secs_f64(common::env_or("AWS_BENCH_BOOT", 2.0f64));
    println!(
        "aws bench: moto EC2 through its proxy, every instance boots in {:.1} s",
        boot.as_secs_f64()
    );
    let base = run_case(&runtime, baseline, 1, boot);
    println!(
        "  maxConcurrent 1:  {baseline} instances Ready in {:.1} s ({:.2} s per instance)",
        base.as_secs_f64(),
        base.as_secs_f64() / baseline as f64
    );
    let fast = run_case(&runtime, count, 50, boot);
    println!(
        "  maxConcurrent 50: {count} instances Ready in {:.1} s",
        fast.as_secs_f64()
    );
    let per = base.as_secs_f64() / baseline as f64;
    println!(
        "  → {:.1}× faster than one at a time (baseline scaled to {count}: {:.0} s); target: all {count} Ready < 10 s",
        per * count as f64 / fast.as_secs_f64(),
        per * count as f64
    );
}
