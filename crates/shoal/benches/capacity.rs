//! Capacity-request bench: external schedulers asking for room at once. Every service is its own
//! process (`shoal run <service>`, release build) against real etcd and the simulator (in this
//! process; 2 s simulated boot, no jitter).
//!
//! The cluster: N full nodes (3 CPU, 30 pods of 100m each), and a pool of empty 4-CPU/16Gi
//! nodes. Then R concurrent `RequestCapacity` calls (best-effort-atomic-scale-up), each for 10
//! pods whose size depends on the request (500m–1500m CPU, 1–3 GiB). Reported: per request, the
//! time from the call to its answer (Provisioned=True or Failed=True, seen on
//! `WatchCapacityRequests`) as p50 / p99 / max against the target of boot time + 5 s, and the
//! nodes created against the packing lower bound of all the pods (target: within 2 %). The
//! baseline, in the same run and on the same cluster size, is one request alone.
//!
//! `cargo bench -p shoal --bench capacity` (`CAPACITY_BENCH_NODES=1000`,
//! `CAPACITY_BENCH_REQUESTS=100`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use shoal_proto::v1::{self as pb, decider_service_client::DeciderServiceClient};
use shoal_state::records::Records;
use shoal_testkit::{EtcdServer, free_port};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Service, env_or, full_cluster, metric, percentile, put_pool, simulator, store};

const BOOT: Duration = Duration::from_secs(2);
const GI: i64 = 1 << 30;

fn start(service: &str, grpc: u16, admin: u16, etcd: &str, extra: &[String]) -> Service {
    common::start("capacity", service, grpc, admin, etcd, extra)
}

/// Request `k`'s pods: (CPU millis, memory bytes) each.
fn shape(k: usize) -> (i64, i64) {
    const CPU: [i64; 5] = [500, 1000, 1500, 700, 1200];
    const MEM: [i64; 3] = [GI, 2 * GI, 3 * GI];
    (CPU[k % 5], MEM[k % 3])
}

struct Figures {
    requests: usize,
    answered: usize,
    provisioned: usize,
    p50: f64,
    p99: f64,
    max: f64,
    created: usize,
    bound: i64,
    /// Decisions that planned requests.
    decisions: usize,
}

async fn run(nodes: usize, requests: usize) -> Figures {
    let etcd = EtcdServer::start();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (sim, kubeconfig) =
        simulator(BOOT, Duration::from_millis(100), dir.path(), &shutdown).await;
    full_cluster(&sim, nodes);
    let store = store(etcd.endpoint(), Duration::from_secs(5)).await;
    let pool = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: burst }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"4\", memory: 16Gi }\n  limits: { minNodes: 0, maxNodes: 2000 }\n  scaleDown: { enabled: false }\n";
    put_pool(&store, pool).await;
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
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let endpoint = etcd.endpoint();
    let kube = format!("--set=service.kube.kubeconfig={}", kubeconfig.display());
    let _metrics = start("metrics", ports[0], ports[1], &endpoint, &[kube]);
    let _provisioner = start(
        "provisioner",
        ports[2],
        ports[3],
        &endpoint,
        &[format!("--config={}", provisioner_config.display())],
    );
    let _decider = start(
        "decider",
        ports[4],
        ports[5],
        &endpoint,
        &[
            format!("--set=service.metricsAddr=http://127.0.0.1:{}", ports[0]),
            format!(
                "--set=service.provisionerAddr=http://127.0.0.1:{}",
                ports[2]
            ),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(ports[5], "shoal_decider_decisions_total") < 1.0
        || metric(ports[3], "shoal_leader{service=\"provisioner\"}") < 1.0
    {
        assert!(Instant::now() < deadline, "services did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ports[4]))
        .expect("endpoint")
        .connect()
        .await
        .expect("decider");
    let client = DeciderServiceClient::new(channel);

    // Answers as the watch sees them.
    let mut watch = client
        .clone()
        .watch_capacity_requests(pb::WatchCapacityRequestsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel::<(String, Instant, bool)>();
    tokio::spawn(async move {
        while let Ok(Some(r)) = watch.message().await {
            let done = |kind: &str| {
                r.conditions
                    .iter()
                    .any(|c| c.r#type == kind && c.status == "True")
            };
            if done("Provisioned") || done("Failed") {
                let _ = tx.send((r.id.clone(), Instant::now(), done("Provisioned")));
            }
        }
    });

    let mut asked: HashMap<String, Instant> = HashMap::new();
    let mut calls = Vec::new();
    for k in 0..requests {
        let key = format!("bench-{k}");
        let id = shoal_decider::capacity::request_id("bench", &key);
        let (cpu, mem) = shape(k);
        let mut client = client.clone();
        asked.insert(id, Instant::now());
        calls.push(tokio::spawn(async move {
            client
                .request_capacity(pb::RequestCapacityRequest {
                    requester: "bench".into(),
                    pods: vec![pb::CapacityRequestItem {
                        pod: Some(pb::PodClass {
                            requests: Some(pb::Resources {
                                cpu_millis: cpu,
                                memory_bytes: mem,
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        count: 10,
                    }],
                    class: pb::CapacityClass::AtomicScaleUp as i32,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
        }));
    }
    for call in calls {
        call.await.expect("task").expect("RequestCapacity");
    }
    let mut seen: HashMap<String, (f64, bool)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < requests && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), answers.recv()).await {
            Ok(Some((id, at, ok))) => {
                if let Some(start) = asked.get(&id) {
                    seen.entry(id).or_insert(((at - *start).as_secs_f64(), ok));
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let decisions = client
        .clone()
        .list_decisions(pb::ListDecisionsRequest {
            limit: 1000,
            actions_only: false,
        })
        .await
        .expect("decisions")
        .into_inner()
        .decisions
        .iter()
        .filter(|d| {
            d.reasons
                .iter()
                .any(|r| r.starts_with("capacity requested by"))
        })
        .count();
    let mut times: Vec<f64> = seen.values().map(|(t, _)| *t).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let claims = Records::new(std::sync::Arc::new(store.clone()))
        .claims()
        .await
        .expect("claims");
    let created = claims.iter().filter(|c| c.pool == "burst").count();
    let (mut cpu, mut mem) = (0i64, 0i64);
    for k in 0..requests {
        let (c, m) = shape(k);
        cpu += 10 * c;
        mem += 10 * m;
    }
    let bound = ((cpu + 3999) / 4000).max((mem + 16 * GI - 1) / (16 * GI));
    shutdown.cancel();
    Figures {
        requests,
        answered: seen.len(),
        provisioned: seen.values().filter(|(_, ok)| *ok).count(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        max: percentile(&times, 1.0),
        created,
        bound,
        decisions,
    }
}

fn main() {
    let nodes: usize = env_or("CAPACITY_BENCH_NODES", 1000);
    let requests: usize = env_or("CAPACITY_BENCH_REQUESTS", 100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let target = (BOOT + Duration::from_secs(5)).as_secs_f64();
    println!(
        "capacity requests of 10 pods each on {nodes} full nodes, 2 s boot; target: every one answered within {target:.0} s, nodes within 2 % of the packing bound"
    );
    println!(
        "| requests | answered | provisioned | answer p50 | p99 | max | nodes created | packing bound | over bound | decisions |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut baseline = None;
    for r in [1, requests] {
        let f = runtime.block_on(run(nodes, r));
        let over = (f.created as f64 / f.bound as f64 - 1.0) * 100.0;
        println!(
            "| {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {} | {} | {:+.1} % | {} |",
            f.requests,
            f.answered,
            f.provisioned,
            f.p50,
            f.p99,
            f.max,
            f.created,
            f.bound,
            over,
            f.decisions
        );
        match baseline {
            None => baseline = Some(f.p50),
            Some(alone) => println!(
                "{} concurrent requests: median answer {:.2}× the single request's ({:.2} s vs {alone:.2} s); slowest {:.2} s {} the {target:.0} s target",
                f.requests,
                f.p50 / alone,
                f.p50,
                f.max,
                if f.max <= target { "within" } else { "BEYOND" }
            ),
        }
    }
}
