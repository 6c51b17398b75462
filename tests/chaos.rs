//! Chaos: while a seeded scenario scales a pool up and down through the provisioner, the
//! provisioner and the reconciler are killed with SIGKILL and restarted, the sim cloud fails
//! calls and boots, and instances are deleted by hand. At the end, after one reconciliation
//! pass, backend instances = live claims = our Nodes, with no duplicates and nothing orphaned.
//!
//! `SHOAL_CHAOS_SECS` (default 60) sets the chaos time per seed; `SHOAL_CHAOS_SEEDS`
//! (default `11,23`) the seeds. A failure names its seed, so it can be replayed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running, grpcurl, grpcurl_ok, sim_get};
use shoal_testkit::{EtcdServer, SimServer, http_request, wait_for};

const MAX_NODES: usize = 10;

fn pool() -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: general }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: {MAX_NODES} }}\n  scaleUp: {{ maxConcurrent: 5 }}\n"
    )
}

/// What the run did, printed at the end.
#[derive(Default, Debug)]
struct Tally {
    creates: u32,
    deletes: u32,
    refused: u32,
    provisioner_kills: u32,
    reconciler_kills: u32,
    fault_windows: u32,
    hand_deletes: u32,
}

struct Chaos {
    etcd: EtcdServer,
    sim: SimServer,
    store: EtcdReader,
    provisioner_config: std::path::PathBuf,
    provisioner: Running,
    reconciler: Running,
    restarts: u32,
    rng: StdRng,
    tally: Tally,
    _dir: tempfile::TempDir,
}

impl Chaos {
    fn start(seed: u64) -> Chaos {
        let etcd = EtcdServer::start();
        let sim = SimServer::start(&[
            "--boot-delay=500ms",
            "--boot-jitter=500ms",
            // Longer than the simulated kubelets' heartbeat, or nodes would flap.
            "--node-grace-period=12s",
        ]);
        let store = EtcdReader::new(&etcd);
        store.put_pool(&pool());
        let dir = tempfile::tempdir().expect("dir");
        let provisioner_config = shoal_e2e::sim_provisioner_config(
            dir.path(),
            &sim,
            "election: { leaseTtl: 2s, recordInterval: 500ms }\n",
            "  resilience: { callTimeout: 2s, attempts: 3, retryMinDelay: 50ms, retryMaxDelay: 400ms, breakerFailures: 5, breakerRecovery: 2s }\n  nodeTtl: 20s\n  instanceCheckInterval: 2s\n  drainPollInterval: 200ms\n",
        );
        let provisioner = start_provisioner(&etcd, &provisioner_config, "prov-0", None);
        let reconciler = start_reconciler(&etcd, &sim, &provisioner, "rec-0", None);
        Chaos {
            etcd,
            sim,
            store,
            provisioner_config,
            provisioner,
            reconciler,
            restarts: 0,
            rng: StdRng::seed_from_u64(seed),
            tally: Tally::default(),
            _dir: dir,
        }
    }

    /// kill -9, then a new process on the same ports (as a restarted pod behind a Service).
    fn restart_provisioner(&mut self) {
        self.provisioner.process.kill();
        self.restarts += 1;
        self.provisioner = start_provisioner(
            &self.etcd,
            &self.provisioner_config,
            &format!("prov-{}", self.restarts),
            Some((self.provisioner.grpc, self.provisioner.admin)),
        );
        self.tally.provisioner_kills += 1;
    }

    fn restart_reconciler(&mut self) {
        self.reconciler.process.kill();
        self.restarts += 1;
        self.reconciler = start_reconciler(
            &self.etcd,
            &self.sim,
            &self.provisioner,
            &format!("rec-{}", self.restarts),
            Some((self.reconciler.grpc, self.reconciler.admin)),
        );
        self.tally.reconciler_kills += 1;
    }

    fn provisioner_call(&self, method: &str, body: Value) -> Result<Value, String> {
        let out = grpcurl(&[
            "-plaintext",
            "-max-time",
            "10",
            "-d",
            &body.to_string(),
            &self.provisioner.grpc.to_string(),
            &format!("shoal.v1.ProvisionerService/{method}"),
        ]);
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn claims(&self) -> Vec<Value> {
        self.store.json_under("claims/")
    }

    fn set_faults(&self, error_rate: f64, boot_failure_rate: f64) {
        let body =
            json!({ "errorRate": error_rate, "bootFailureRate": boot_failure_rate }).to_string();
        let (code, answer) = http_request(self.sim.addr(), "PUT", "/cloud/v1/faults", Some(&body))
            .unwrap_or_else(|e| panic!("sim faults: {e}"));
        assert!(code < 300, "setting faults: {code} {answer}");
    }

    /// One random step of the scenario.
    fn step(&mut self, key: &mut u32) {
        let roll: f64 = self.rng.random();
        if roll < 0.45 {
            *key += 1;
            let live: Vec<Value> = self
                .claims()
                .into_iter()
                .filter(|c| !matches!(c["phase"].as_str(), Some("Deleted" | "Failed")))
                .collect();
            let up = self.rng.random_bool(0.55);
            let result = if up {
                let room = MAX_NODES.saturating_sub(live.len());
                let count = self.rng.random_range(1..=3).min(room.max(1));
                self.tally.creates += 1;
                self.provisioner_call(
                    "CreateNodes",
                    json!({ "pool": "general", "count": count, "idempotencyKey": format!("chaos-{key}"), "reason": "chaos scale-up" }),
                )
            } else {
                let ready: Vec<String> = live
                    .iter()
                    .filter(|c| c["phase"] == "Ready")
                    .filter_map(|c| c["nodeName"].as_str().map(String::from))
                    .collect();
                if ready.is_empty() {
                    return;
                }
                let count = self.rng.random_range(1..=2).min(ready.len());
                let start = self.rng.random_range(0..ready.len());
                let nodes: Vec<&String> = ready.iter().cycle().skip(start).take(count).collect();
                self.tally.deletes += 1;
                self.provisioner_call(
                    "DeleteNodes",
                    json!({ "nodes": nodes, "idempotencyKey": format!("chaos-{key}"), "reason": "chaos scale-down" }),
                )
            };
            if let Err(e) = result {
                // Over maxNodes, a node already being removed, the backend down: refused with
                // a reason, nothing half-written (checked at the end).
                self.tally.refused += 1;
                println!("  refused: {}", e.lines().last().unwrap_or_default());
            }
        } else if roll < 0.55 {
            println!("  kill -9 provisioner");
            self.restart_provisioner();
        } else if roll < 0.65 {
            println!("  kill -9 reconciler");
            self.restart_reconciler();
        } else if roll < 0.75 {
            let error_rate = [0.0, 0.3, 0.6][self.rng.random_range(0..3)];
            let boot_failures = [0.0, 0.2][self.rng.random_range(0..2)];
            println!("  faults: errorRate {error_rate}, bootFailureRate {boot_failures}");
            self.set_faults(error_rate, boot_failures);
            self.tally.fault_windows += 1;
        } else if roll < 0.85 {
            // The sim cloud's injected errors apply to us too: a failed listing skips the step.
            let listed = shoal_testkit::http_get(
                self.sim.addr(),
                &format!(
                    "/cloud/v1/instances?labelSelector=shoal.dev%2Fcluster%3D{}",
                    self.store.cluster_id()
                ),
            );
            let instances: Vec<Value> = match listed {
                Ok((200, body)) => serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["instances"].as_array().cloned()),
                _ => None,
            }
            .unwrap_or_default();
            if instances.is_empty() {
                return;
            }
            let victim = instances[self.rng.random_range(0..instances.len())].clone();
            let id = victim["id"].as_str().unwrap_or_default().to_string();
            for _ in 0..5 {
                if let Ok((204 | 404, _)) = http_request(
                    self.sim.addr(),
                    "DELETE",
                    &format!("/cloud/v1/instances/{id}"),
                    None,
                ) {
                    println!("  deleted instance {id} ({}) by hand", victim["name"]);
                    self.tally.hand_deletes += 1;
                    break;
                }
            }
        }
    }
}

type Ports = Option<(std::net::SocketAddr, std::net::SocketAddr)>;

fn start(binary: &str, instance: &str, ports: Ports, etcd: &EtcdServer, args: &[&str]) -> Running {
    let mut r = match ports {
        Some(ports) => Running::start_at(binary, instance, ports, Some(etcd), args, &[]),
        None => Running::start(binary, instance, Some(etcd), args, &[]),
    };
    r.wait_ready();
    r
}

fn start_provisioner(
    etcd: &EtcdServer,
    config: &std::path::Path,
    instance: &str,
    ports: Ports,
) -> Running {
    start(
        "shoal-provisioner",
        instance,
        ports,
        etcd,
        &[&format!("--config={}", config.display())],
    )
}

fn start_reconciler(
    etcd: &EtcdServer,
    sim: &SimServer,
    provisioner: &Running,
    instance: &str,
    ports: Ports,
) -> Running {
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let upstream = format!("--set=service.provisionerAddr=http://{}", provisioner.grpc);
    start(
        "shoal-reconciler",
        instance,
        ports,
        etcd,
        &[
            &kube,
            &upstream,
            "--set=election.leaseTtl=2s",
            "--set=service.interval=3s",
            "--set=service.orphanGrace=5s",
            "--set=service.notReadyGrace=5s",
            "--set=service.launchTtl=60s",
            "--set=service.removalTtl=60s",
            "--set=service.operationGrace=10s",
        ],
    )
}

/// Instances of `cluster` in the sim cloud.
fn instances(sim: &SimServer, cluster: &str) -> Vec<Value> {
    sim_get(
        sim.addr(),
        &format!("/cloud/v1/instances?labelSelector=shoal.dev%2Fcluster%3D{cluster}"),
    )["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn run(seed: u64, secs: u64) {
    println!("chaos seed {seed}, {secs} s");
    let mut chaos = Chaos::start(seed);
    let started = Instant::now();
    let mut key = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        chaos.step(&mut key);
        let pause = chaos.rng.random_range(300..1200);
        std::thread::sleep(Duration::from_millis(pause));
    }

    // Calm: no faults, both services up and leading, every operation finished.
    chaos.set_faults(0.0, 0.0);
    let leading = wait_for(Duration::from_secs(20), || {
        (chaos
            .provisioner
            .metric("shoal_leader{service=\"provisioner\"}")
            == Some(1.0)
            && chaos
                .reconciler
                .metric("shoal_leader{service=\"reconciler\"}")
                == Some(1.0))
        .then_some(())
    });
    assert!(
        leading.is_some(),
        "seed {seed}: the restarted services lead"
    );
    let settled = wait_for(Duration::from_secs(90), || {
        let running = chaos
            .store
            .json_under("ops/")
            .iter()
            .filter(|o| o["state"] == "Running")
            .count();
        let moving = chaos
            .claims()
            .iter()
            .filter(|c| {
                matches!(
                    c["phase"].as_str(),
                    Some("Pending" | "Launched" | "Registered" | "Draining" | "Terminating")
                )
            })
            .count();
        (running == 0 && moving == 0).then_some(())
    });
    assert!(
        settled.is_some(),
        "seed {seed}: every operation finishes once the chaos stops\n{}",
        chaos.provisioner.process.logs()
    );

    // One pass.
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{}",
        &chaos.reconciler.grpc.to_string(),
        "shoal.v1.ReconcilerService/Reconcile",
    ]);
    let report: Value = serde_json::from_str(&out).expect("report");
    let mut drift_counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in report["drifts"].as_array().into_iter().flatten() {
        *drift_counts
            .entry(format!("{}/{}", d["type"], d["repairResult"]))
            .or_default() += 1;
    }

    // Instances = live claims = our Nodes; no duplicates; nothing orphaned.
    let instances = instances(&chaos.sim, &chaos.store.cluster_id());
    let claims = chaos.claims();
    let live: Vec<&Value> = claims
        .iter()
        .filter(|c| !matches!(c["phase"].as_str(), Some("Deleted" | "Failed")))
        .collect();
    let instance_names: Vec<String> = instances
        .iter()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    let unique: BTreeSet<&String> = instance_names.iter().collect();
    assert_eq!(
        unique.len(),
        instance_names.len(),
        "seed {seed}: duplicate instances {instance_names:?}"
    );
    let instance_claims: BTreeSet<String> = instances
        .iter()
        .filter_map(|i| i["labels"]["shoal.dev/claim"].as_str().map(String::from))
        .collect();
    let live_ids: BTreeSet<String> = live
        .iter()
        .filter_map(|c| c["id"].as_str().map(String::from))
        .collect();
    let live_names: BTreeSet<String> = live
        .iter()
        .filter_map(|c| c["nodeName"].as_str().map(String::from))
        .collect();
    let nodes: BTreeSet<String> = sim_get(
        chaos.sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim",
    )["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .collect();
    let phases = claims
        .iter()
        .fold(BTreeMap::<String, usize>::new(), |mut m, c| {
            *m.entry(c["phase"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
    // What the reconciler found and repaired during the chaos (its records survive its kills).
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    for bytes in chaos.store.values_under("drifts/") {
        use prost::Message;
        if let Ok(d) = shoal_proto::v1::Drift::decode(bytes.as_slice()) {
            let kind = format!(
                "{}/{}",
                d.r#type().as_str_name(),
                d.repair_result().as_str_name()
            );
            *recorded.entry(kind).or_default() += 1;
            if !d.repair_error.is_empty() {
                println!(
                    "  repair failed: {} {}: {}",
                    d.subject, d.repair_action, d.repair_error
                );
            }
        }
    }
    println!(
        "seed {seed}: {:?}\n  drifts recorded during the run: {recorded:?}\n  final pass drifts: {drift_counts:?}\n  claims by phase: {phases:?}\n  instances {} = live claims {} = nodes {}",
        chaos.tally,
        instances.len(),
        live.len(),
        nodes.len()
    );
    assert_eq!(
        instance_claims, live_ids,
        "seed {seed}: instances' claims = live claims ({report:#})"
    );
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        live_names,
        "seed {seed}: instance names = live claims' node names"
    );
    assert_eq!(
        nodes, live_names,
        "seed {seed}: Nodes = live claims' node names"
    );
    assert!(
        live.iter().all(|c| c["phase"] == "Ready"),
        "seed {seed}: every live claim is Ready"
    );
    let reservations: Vec<Value> = chaos.store.json_under("ids/");
    assert_eq!(
        reservations.len(),
        live.len(),
        "seed {seed}: no leaked name reservations ({} for {} live claims)",
        reservations.len(),
        live.len()
    );
    assert!(
        chaos.tally.provisioner_kills + chaos.tally.reconciler_kills > 0
            && chaos.tally.creates > 0
            && chaos.tally.deletes > 0,
        "seed {seed}: the scenario exercised kills and scaling both ways: {:?}",
        chaos.tally
    );
}

#[test]
fn after_chaos_one_pass_leaves_instances_claims_and_nodes_equal() {
    let secs: u64 = std::env::var("SHOAL_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seeds: Vec<u64> = std::env::var("SHOAL_CHAOS_SEEDS")
        .unwrap_or_else(|_| "11,23".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert!(!seeds.is_empty(), "SHOAL_CHAOS_SEEDS names no seed");
    for seed in seeds {
        run(seed, secs);
    }
}
