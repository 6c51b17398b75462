//! Proxmox bench: how long N VMs take from one `CreateNodes` to N Ready nodes, when every PVE task
//! (clone, config, resize, start) takes `PVE_BENCH_TASK_LATENCY` seconds (default 2, as a small
//! template's full clone does on local storage), against fakepve (its own process over HTTPS)
//! with the provisioner as its own process (`shoal run provisioner`, release build) and real etcd.
//! fakepve boots nothing: the bench plays the guests, running a simulated kubelet
//! (`shoal_sim::agent`) for every VM fakepve reports running, registering with the labels the
//! VM's SMBIOS serial carries.
//!
//! Two cases in one run: the pool's `scaleUp.maxConcurrent: 1` (the same-run baseline: one VM at
//! a time) and `maxConcurrent: 50`.
//!
//! `cargo bench -p shoal --bench proxmox` (`PVE_BENCH_VMS=50`, `PVE_BENCH_BASELINE_VMS=50`,
//! `PVE_BENCH_TASK_LATENCY=2`). Needs scripts/install-deps.sh (fakepve in its venv).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use shoal_testkit::{EtcdServer, PveServer, free_port, http_get};
use tokio_util::sync::CancellationToken;

mod common;

/// Runs a simulated kubelet for every running VM of `pve` until `stop`.
fn play_guests(
    pve_control: std::net::SocketAddr,
    api: String,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let started: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        while !stop.is_cancelled() {
            let vms: Vec<Value> = match http_get(pve_control, "/vms") {
                Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
                _ => Vec::new(),
            };
            for vm in vms
                .iter()
                .filter(|v| v["status"] == "running" && v["template"] != true)
            {
                let vmid = vm["vmid"].as_u64().unwrap_or_default();
                if started.lock().expect("lock").contains(&vmid) {
                    continue;
                }
                let config = &vm["config"];
                let Some(flags) = shoal_testkit::fakepve::registration_flags(config) else {
                    continue;
                };
                let words: Vec<&str> = flags.split_whitespace().collect();
                let mut labels = std::collections::BTreeMap::new();
                let mut taints = Vec::new();
                for pair in words.chunks(2) {
                    match pair {
                        ["--node-label", l] => {
                            if let Some((k, v)) = l.split_once('=') {
                                labels.insert(k.to_string(), v.to_string());
                            }
                        }
                        ["--node-taint", t] => taints.push(t.to_string()),
                        _ => {}
                    }
                }
                let agent = shoal_sim::agent::AgentConfig {
                    api: api.clone(),
                    name: vm["name"].as_str().unwrap_or_default().to_string(),
                    cpu: config["cores"].as_str().unwrap_or("1").to_string(),
                    memory: format!("{}Mi", config["memory"].as_str().unwrap_or("1024")),
                    pods: 110,
                    labels,
                    taints,
                    heartbeat_interval: Duration::from_secs(5),
                    pod_start_delay: Duration::from_millis(200),
                    provider_id: String::new(),
                };
                started.lock().expect("lock").insert(vmid);
                runtime.spawn(shoal_sim::agent::run(agent, stop.clone()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// One case: `count` VMs under `maxConcurrent: max_concurrent`. Returns the time from
/// CreateNodes to every claim Ready, and the VMs' PVE nodes.
fn run_case(
    runtime: &tokio::runtime::Runtime,
    count: u32,
    max_concurrent: u32,
    latency: f64,
) -> (Duration, BTreeSet<String>) {
    let etcd = EtcdServer::start();
    let pve = PveServer::start(&["pve1", "pve2", "pve3"], 1.0, latency);
    let dir = tempfile::tempdir().expect("dir");
    let shutdown = CancellationToken::new();
    let (sim, kubeconfig) = runtime.block_on(common::simulator(
        Duration::ZERO,
        Duration::from_millis(200),
        dir.path(),
        &shutdown,
    ));
    let pool = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: vms }}\nspec:\n  provider: {{ backend: proxmox }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n    overhead: {{ memory: 512Mi }}\n  limits: {{ minNodes: 0, maxNodes: {count} }}\n  scaleUp: {{ maxConcurrent: {max_concurrent}, batchSize: {count} }}\n"
    );
    runtime.block_on(async {
        let store = common::store(etcd.endpoint(), Duration::from_secs(5)).await;
        common::put_pool(&store, &pool).await;
    });
    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends:\n    proxmox:\n      url: {}\n      token: \"{}\"\n      tls: {{ fingerprint: \"{}\" }}\n      vmidRange: {{ first: 10000, last: 10999 }}\n      taskPollInterval: 200ms\n      classes:\n        default: {{ template: k3s-template, nodes: [pve1, pve2, pve3], disk: {{ size: 32G }} }}\n  resilience: {{ callTimeout: 300s, attempts: 2 }}\n  nodeTtl: 3600s\n  instanceCheckInterval: 1s\n",
            kubeconfig.display(),
            pve.url,
            pve.token,
            pve.fingerprint
        ),
    )
    .expect("config");
    let (grpc, admin) = (free_port(), free_port());
    let _provisioner = common::start(
        "pvebench",
        "provisioner",
        grpc,
        admin,
        &etcd.endpoint(),
        &[format!("--config={}", config.display())],
    );
    common::wait_provisioner_leads(admin);
    let guests = play_guests(
        pve.control,
        sim.url(),
        runtime.handle().clone(),
        shutdown.clone(),
    );
    let addr = format!("127.0.0.1:{grpc}");
    let started = Instant::now();
    common::grpcurl(
        &addr,
        "shoal.v1.ProvisionerService/CreateNodes",
        json!({ "pool": "vms", "count": count, "idempotencyKey": "bench" }),
    );
    let ready = common::wait_pool_ready(&addr, "vms", count);
    let nodes: BTreeSet<String> = pve
        .vms()
        .iter()
        .filter_map(|v| v["node"].as_str().map(String::from))
        .collect();
    shutdown.cancel();
    let _ = guests.join();
    (ready.duration_since(started), nodes)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let count = common::env_or("PVE_BENCH_VMS", 50u32);
    let baseline = common::env_or("PVE_BENCH_BASELINE_VMS", 50u32);
    let latency = common::env_or("PVE_BENCH_TASK_LATENCY", 2.0f64);
    println!(
        "proxmox bench: every PVE task takes {latency} s (clone, config, resize, start: 4 tasks per VM)"
    );
    let (base, base_nodes) = run_case(&runtime, baseline, 1, latency);
    println!(
        "  maxConcurrent 1:  {baseline} VMs Ready in {:.1} s ({:.2} s per VM; PVE nodes {base_nodes:?})",
        base.as_secs_f64(),
        base.as_secs_f64() / baseline as f64
    );
    let (fast, nodes) = run_case(&runtime, count, 50, latency);
    println!(
        "  maxConcurrent 50: {count} VMs Ready in {:.1} s (PVE nodes {nodes:?})",
        fast.as_secs_f64()
    );
    let per_vm_base = base.as_secs_f64() / baseline as f64;
    println!(
        "  → {:.1}× faster than one at a time (baseline scaled to {count} VMs: {:.0} s); target: all {count} Ready < 15 s",
        per_vm_base * count as f64 / fast.as_secs_f64(),
        per_vm_base * count as f64
    );
}
