//! Planner time (criterion), pinned to one core.
//!
//! - 1k nodes / 30k pods / 1k pending / 10 pools (target p50 < 20 ms), the same-run baseline;
//! - 10k nodes / 300k pods / 10k pending / 50 pools (target p50 < 300 ms).
//!
//! The cluster is shaped like a busy one: nodes of 32 CPU / 128 GiB holding 30 pods of 30
//! different deployments each (the metrics bench's shape), one node in ten nearly empty and
//! unneeded for an hour (so scale-down simulates draining them), 1 % of capacity in flight as
//! launched claims, and pending deployments: most need new `batch` nodes (node selector), some
//! the tainted `gpu` pools, some fit existing capacity. Each run prints what the plan decided, so
//! the timed work is visibly the whole planner: scale-up by simulation and packing, expanders,
//! scale-down with drain simulation.
//!
//! `cargo bench -p shoal-decider --bench plan` (`PLAN_BENCH_SIZES=1000x30000x1000x10` picks sizes).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use criterion::{BenchmarkId, Criterion};
use shoal_core::{ClaimPhase, claim::NodeClaim, pool::Pool, snapshot::timestamp};
use shoal_decider::planner::{Expander, History, PlanInput, PoolHistory, plan};
use shoal_proto::v1 as pb;

// The allocator the service binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MI: i64 = 1 << 20;
const GI: i64 = 1 << 30;
const PODS_PER_NODE: usize = 30;
const PODS_PER_DEPLOYMENT: usize = 100;

/// One benchmark size.
#[derive(Clone, Copy)]
struct Size {
    nodes: usize,
    pods: usize,
    pending: usize,
    pools: usize,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{}x{}",
            self.nodes, self.pods, self.pending, self.pools
        )
    }
}

struct World {
    snapshot: pb::ClusterSnapshot,
    pools: Vec<Pool>,
    claims: Vec<NodeClaim>,
    history: History,
    now: SystemTime,
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

fn pool_kind(p: usize) -> &'static str {
    match p % 10 {
        0 | 5 => "batch",
        9 => "gpu",
        _ => "general",
    }
}

fn pool(p: usize, max_nodes: usize) -> Pool {
    let kind = pool_kind(p);
    let taints = if kind == "gpu" {
        "    taints: [{ key: dedicated, value: gpu, effect: NoSchedule }]\n"
    } else {
        ""
    };
    let yaml = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: pool-{p} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    labels: {{ tier: {kind} }}\n{taints}    capacity: {{ cpu: \"32\", memory: 128Gi, pods: \"110\" }}\n    price: {price}\n  limits: {{ minNodes: 1, maxNodes: {max_nodes} }}\n  scaleUp: {{ batchSize: 10000, maxConcurrent: 100 }}\n  scaleDown: {{ utilizationBelow: 0.5, unneededFor: 10m, cooldown: 0s, maxConcurrent: 1000 }}\n",
        price = 1.0 + (p % 7) as f64 / 10.0,
    );
    Pool::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("bench pool: {e}\n{yaml}"))
        .1
}

fn resources(cpu: i64, memory: i64, pods: i64) -> pb::Resources {
    pb::Resources {
        cpu_millis: cpu,
        memory_bytes: memory,
        pods,
        ..Default::default()
    }
}

fn class(id: u64, cpu: i64, memory: i64) -> pb::PodClass {
    pb::PodClass {
        id,
        namespace: format!("team-{}", id % 20),
        owner: Some(pb::OwnerRef {
            kind: "ReplicaSet".into(),
            name: format!("app-{id}"),
        }),
        requests: Some(resources(cpu, memory, 1)),
        ..Default::default()
    }
}

fn world(size: Size) -> World {
    let now = now();
    let per_pool = size.nodes / size.pools;
    let pools: Vec<Pool> = (0..size.pools).map(|p| pool(p, per_pool * 3)).collect();

    // Running deployments: 30 classes per node, spread so neighbouring nodes differ.
    let deployments = size.pods / PODS_PER_DEPLOYMENT;
    let mut classes: Vec<pb::PodClass> = (0..deployments)
        .map(|d| {
            class(
                d as u64,
                900 + (d % 3) as i64 * 50,
                (1 + (d % 6) as i64) * 512 * MI,
            )
        })
        .collect();
    let mut nodes = Vec::with_capacity(size.nodes);
    let mut unneeded = vec![BTreeMap::new(); size.pools];
    for n in 0..size.nodes {
        let p = n % size.pools;
        let name = format!("pool-{p}-{n:05}");
        // One node in ten is nearly empty: two pods (scale-down candidates).
        let count = if (n / size.pools) % 10 == 3 {
            2
        } else {
            PODS_PER_NODE
        };
        let mut requested = resources(0, 0, 0);
        let mut pods = Vec::with_capacity(count);
        for k in 0..count {
            let d = (n * 7 + k * 13) % deployments;
            let r = classes[d].requests.clone().unwrap_or_default();
            requested.cpu_millis += r.cpu_millis;
            requested.memory_bytes += r.memory_bytes;
            requested.pods += 1;
            pods.push(pb::ClassCount {
                class_id: d as u64,
                count: 1,
            });
        }
        if count == 2 {
            unneeded[p].insert(name.clone(), crate_ms(now) - 3_600_000);
        }
        let kind = pool_kind(p);
        let mut labels: BTreeMap<String, String> = [
            ("shoal.dev/pool", format!("pool-{p}")),
            ("kubernetes.io/hostname", name.clone()),
            ("tier", kind.to_string()),
            ("topology.kubernetes.io/zone", format!("zone-{}", n % 3)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        labels.insert("kubernetes.io/os".into(), "linux".into());
        nodes.push(pb::NodeInfo {
            name: name.clone(),
            pool: format!("pool-{p}"),
            claim_id: format!("claim-{n}"),
            allocatable: Some(resources(32_000, 128 * GI, 110)),
            requested: Some(requested),
            labels,
            taints: if kind == "gpu" {
                vec![pb::Taint {
                    key: "dedicated".into(),
                    value: "gpu".into(),
                    effect: pb::TaintEffect::NoSchedule as i32,
                }]
            } else {
                vec![]
            },
            readiness: pb::NodeReadiness::Ready as i32,
            created_at: Some(timestamp(now - Duration::from_secs(86_400))),
            ready_since: Some(timestamp(now - Duration::from_secs(86_000))),
            pods,
            ..Default::default()
        });
    }

    // Pending deployments: three in five need `batch` nodes and 6–8 CPU (new nodes), one in
    // five tolerates and selects the `gpu` pools with 2 CPU, one in five is 500 m and unconstrained
    // (fits existing capacity, so the general pools can still shrink).
    let mut pending = Vec::new();
    for k in 0..size.pending / PODS_PER_DEPLOYMENT {
        let id = (deployments + k) as u64;
        let c = match k % 5 {
            0..=2 => {
                let mut c = class(id, 6000 + (k % 3) as i64 * 1000, (4 + (k % 4) as i64) * GI);
                c.node_selector.insert("tier".into(), "batch".into());
                c
            }
            3 => {
                let mut c = class(id, 2000, 4 * GI);
                c.node_selector.insert("tier".into(), "gpu".into());
                c.tolerations.push(pb::Toleration {
                    key: "dedicated".into(),
                    operator: "Equal".into(),
                    value: "gpu".into(),
                    effect: pb::TaintEffect::NoSchedule as i32,
                    ..Default::default()
                });
                c
            }
            _ => class(id, 500, GI),
        };
        classes.push(c);
        pending.push(pb::PendingPods {
            class_id: id,
            count: PODS_PER_DEPLOYMENT as i32,
            unschedulable_since: Some(timestamp(now - Duration::from_secs(2))),
            scheduler_message: "0/1 nodes are available: 1 Insufficient cpu.".into(),
        });
    }

    // 1 % of the node count in flight: launched claims not yet registered.
    let claims = (0..size.nodes / 100)
        .map(|i| NodeClaim {
            version: 1,
            id: format!("inflight-{i}"),
            pool: format!("pool-{}", i % size.pools),
            phase: ClaimPhase::Launched,
            backend: "sim".into(),
            instance_id: format!("i-{i}"),
            node_name: format!("pool-{}-new-{i}", i % size.pools),
            operation_id: "op-1".into(),
            created_at_ms: crate_ms(now) - 5_000,
            updated_at_ms: crate_ms(now) - 4_000,
            failure_reason: String::new(),
            history: vec![],
            labels: BTreeMap::new(),
        })
        .collect();

    let history = History {
        pools: unneeded
            .into_iter()
            .enumerate()
            .map(|(p, since)| {
                (
                    format!("pool-{p}"),
                    PoolHistory {
                        unneeded_since_ms: since,
                        ..Default::default()
                    },
                )
            })
            .collect(),
    };
    World {
        snapshot: pb::ClusterSnapshot {
            sequence: 1,
            taken_at: Some(timestamp(now)),
            nodes,
            classes,
            pending,
            ..Default::default()
        },
        pools,
        claims,
        history,
        now,
    }
}

fn crate_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sizes() -> Vec<Size> {
    let spec = std::env::var("PLAN_BENCH_SIZES")
        .unwrap_or_else(|_| "1000x30000x1000x10,10000x300000x10000x50".into());
    spec.split(',')
        .map(|s| {
            let v: Vec<usize> = s
                .split('x')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("PLAN_BENCH_SIZES: NODESxPODSxPENDINGxPOOLS")
                })
                .collect();
            assert_eq!(v.len(), 4, "PLAN_BENCH_SIZES: NODESxPODSxPENDINGxPOOLS");
            Size {
                nodes: v[0],
                pods: v[1],
                pending: v[2],
                pools: v[3],
            }
        })
        .collect()
}

/// The planner is single-threaded; pinning makes "one core" literal on a shared machine.
fn pin_to_one_core() {
    let mut set = nix::sched::CpuSet::new();
    if set.set(0).is_ok()
        && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok()
    {
        eprintln!("plan bench: pinned to CPU 0");
    } else {
        eprintln!("plan bench: could not pin to one CPU; timing on whatever the OS gives");
    }
}

fn summary(world: &World) -> String {
    let input = PlanInput {
        snapshot: &world.snapshot,
        pools: &world.pools,
        claims: &world.claims,
        history: &world.history,
        now: world.now,
        expanders: &[Expander::LeastWaste],
        seed: 1,
        packing_budget: shoal_decider::planner::packing::DEFAULT_BUDGET,
        backoff: Default::default(),
        bookings: Default::default(),
    };
    let p = plan(&input);
    if std::env::var_os("PLAN_BENCH_VERBOSE").is_some() {
        eprintln!("{}", p.decision.reasons.join("\n"));
    }
    let mut up = 0;
    let mut up_pools = 0;
    let mut down = 0;
    for a in &p.decision.actions {
        match &a.action {
            Some(pb::scale_action::Action::ScaleUp(u)) => {
                up += u.count;
                up_pools += 1;
            }
            Some(pb::scale_action::Action::ScaleDown(d)) => down += d.nodes.len(),
            None => {}
        }
    }
    let unhelped = p
        .decision
        .outcomes
        .iter()
        .filter(|c| c.unplaced > 0)
        .count();
    format!(
        "+{up} nodes in {up_pools} pools, -{down} nodes, {} reasons, {unhelped} pending classes not fully helped",
        p.decision.reasons.len()
    )
}

fn main() {
    pin_to_one_core();
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    let mut group = c.benchmark_group("plan");
    for size in sizes() {
        let world = world(size);
        eprintln!("plan bench {size}: {}", summary(&world));
        group.bench_with_input(BenchmarkId::from_parameter(size), &world, |b, w| {
            b.iter(|| {
                plan(&PlanInput {
                    snapshot: &w.snapshot,
                    pools: &w.pools,
                    claims: &w.claims,
                    history: &w.history,
                    now: w.now,
                    expanders: &[Expander::LeastWaste],
                    seed: 1,
                    packing_budget: shoal_decider::planner::packing::DEFAULT_BUDGET,
                    backoff: Default::default(),
                    bookings: Default::default(),
                })
            });
        });
    }
    group.finish();
    c.final_summary();
}
