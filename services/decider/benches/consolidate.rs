//! Consolidation of a fragmented cluster: 1,000 nodes (16 CPU / 64 GiB / 110 pods) filled with
//! pods of 40 deployments by first fit, then 40 % of the pods deleted at random. Decisions are
//! planned and applied (the removed nodes' pods re-placed first-fit on the nodes that stay, as
//! the scheduler would) until a decision removes nothing. Reported: nodes after consolidation
//! against the lower bound (total requests over one node, tightest dimension), decisions taken,
//! and the planner's time per decision (median and max). Same run, same cluster, two settings:
//! `maxConcurrent: 1000` (several nodes per decision) and `maxConcurrent: 1` (node by node, as
//! scale-down worked before consolidation).
//!
//! `cargo bench -p shoal-decider --bench consolidate` (`CONSOLIDATE_BENCH_NODES=1000`)

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use shoal_core::{pool::Pool, snapshot::timestamp};
use shoal_decider::planner::{Expander, History, PlanInput, packing::DEFAULT_BUDGET, plan};
use shoal_proto::v1 as pb;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const GI: i64 = 1 << 30;
const MI: i64 = 1 << 20;
const CPU: i64 = 16_000;
const MEMORY: i64 = 64 * GI;
const SLOTS: i64 = 110;

fn pool(max_concurrent: u32, nodes: usize) -> Pool {
    let yaml = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: general }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"16\", memory: 64Gi, pods: \"110\" }}\n  limits: {{ minNodes: 0, maxNodes: {nodes} }}\n  scaleDown: {{ utilizationBelow: 0.8, unneededFor: 1s, cooldown: 0s, maxConcurrent: {max_concurrent} }}\n"
    );
    Pool::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("bench pool: {e}\n{yaml}"))
        .1
}

/// The fragmented cluster: per node, the pods of each class on it.
fn fragmented(nodes: usize) -> (Vec<pb::PodClass>, Vec<BTreeMap<u64, i32>>) {
    let mut rng = StdRng::seed_from_u64(42);
    let classes: Vec<pb::PodClass> = (0..40u64)
        .map(|id| {
            let cpu = (100.0 * 40f64.powf(rng.random::<f64>().powi(2))) as i64;
            let memory = (128.0 * 128f64.powf(rng.random::<f64>().powi(2))) as i64 * MI;
            pb::PodClass {
                id,
                namespace: "default".into(),
                owner: Some(pb::OwnerRef {
                    kind: "ReplicaSet".into(),
                    name: format!("app-{id}"),
                }),
                requests: Some(pb::Resources {
                    cpu_millis: cpu,
                    memory_bytes: memory,
                    pods: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let mut placed: Vec<BTreeMap<u64, i32>> = vec![BTreeMap::new(); nodes];
    let mut used = vec![(0i64, 0i64, 0i64); nodes];
    // Fill node by node with random pods until a pod does not fit, as a busy cluster grows.
    for n in 0..nodes {
        loop {
            let c = &classes[rng.random_range(0..classes.len())];
            let r = c.requests.as_ref().expect("requests");
            let u = &mut used[n];
            if u.0 + r.cpu_millis > CPU || u.1 + r.memory_bytes > MEMORY || u.2 + 1 > SLOTS {
                break;
            }
            *u = (u.0 + r.cpu_millis, u.1 + r.memory_bytes, u.2 + 1);
            *placed[n].entry(c.id).or_default() += 1;
        }
    }
    // Delete 40 % of the pods at random.
    for node in placed.iter_mut() {
        for count in node.values_mut() {
            *count = (0..*count).filter(|_| rng.random::<f64>() >= 0.4).count() as i32;
        }
        node.retain(|_, c| *c > 0);
    }
    (classes, placed)
}

fn snapshot(
    classes: &[pb::PodClass],
    placed: &BTreeMap<String, BTreeMap<u64, i32>>,
    sequence: u64,
) -> pb::ClusterSnapshot {
    let nodes = placed
        .iter()
        .map(|(name, pods)| {
            let mut requested = pb::Resources::default();
            for (id, count) in pods {
                let r = classes[*id as usize].requests.as_ref().expect("requests");
                requested.cpu_millis += r.cpu_millis * *count as i64;
                requested.memory_bytes += r.memory_bytes * *count as i64;
                requested.pods += *count as i64;
            }
            pb::NodeInfo {
                name: name.clone(),
                pool: "general".into(),
                allocatable: Some(pb::Resources {
                    cpu_millis: CPU,
                    memory_bytes: MEMORY,
                    pods: SLOTS,
                    ..Default::default()
                }),
                requested: Some(requested),
                labels: [("shoal.dev/pool".to_string(), "general".to_string())]
                    .into_iter()
                    .collect(),
                readiness: pb::NodeReadiness::Ready as i32,
                created_at: Some(timestamp(SystemTime::UNIX_EPOCH)),
                pods: pods
                    .iter()
                    .map(|(id, count)| pb::ClassCount {
                        class_id: *id,
                        count: *count,
                    })
                    .collect(),
                ..Default::default()
            }
        })
        .collect();
    pb::ClusterSnapshot {
        sequence,
        nodes,
        classes: classes.to_vec(),
        ..Default::default()
    }
}

/// Re-places the pods of `removed` nodes first-fit on the others (as the scheduler would).
fn apply(
    classes: &[pb::PodClass],
    placed: &mut BTreeMap<String, BTreeMap<u64, i32>>,
    removed: &[String],
) {
    let mut moving: Vec<(u64, i32)> = Vec::new();
    for name in removed {
        if let Some(pods) = placed.remove(name) {
            moving.extend(pods);
        }
    }
    let req = |id: u64| classes[id as usize].requests.clone().expect("requests");
    for (id, mut count) in moving {
        let r = req(id);
        for pods in placed.values_mut() {
            if count == 0 {
                break;
            }
            let used = pods.iter().fold((0, 0, 0), |acc, (c, n)| {
                let q = req(*c);
                (
                    acc.0 + q.cpu_millis * *n as i64,
                    acc.1 + q.memory_bytes * *n as i64,
                    acc.2 + *n as i64,
                )
            });
            let fit = ((CPU - used.0) / r.cpu_millis.max(1))
                .min((MEMORY - used.1) / r.memory_bytes.max(1))
                .min(SLOTS - used.2)
                .min(count as i64)
                .max(0) as i32;
            if fit > 0 {
                *pods.entry(id).or_default() += fit;
                count -= fit;
            }
        }
        assert_eq!(
            count, 0,
            "the planner removed a node whose pods fit nowhere"
        );
    }
}

fn lower_bound(classes: &[pb::PodClass], placed: &BTreeMap<String, BTreeMap<u64, i32>>) -> i64 {
    let mut total = (0i64, 0i64, 0i64);
    for pods in placed.values() {
        for (id, n) in pods {
            let r = classes[*id as usize].requests.as_ref().expect("requests");
            total.0 += r.cpu_millis * *n as i64;
            total.1 += r.memory_bytes * *n as i64;
            total.2 += *n as i64;
        }
    }
    let up = |a: i64, b: i64| (a + b - 1) / b;
    up(total.0, CPU)
        .max(up(total.1, MEMORY))
        .max(up(total.2, SLOTS))
}

fn run(nodes: usize, max_concurrent: u32) {
    let (classes, fragments) = fragmented(nodes);
    let mut placed: BTreeMap<String, BTreeMap<u64, i32>> = fragments
        .into_iter()
        .enumerate()
        .map(|(n, pods)| (format!("general-{n:05}"), pods))
        .collect();
    let bound = lower_bound(&classes, &placed);
    let before = placed.len();
    let pools = [pool(max_concurrent, nodes)];
    let mut history = History::default();
    let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let mut times = Vec::new();
    let mut decisions = 0;
    for sequence in 0..5_000u64 {
        let snap = snapshot(&classes, &placed, sequence);
        let started = Instant::now();
        let planned = plan(&PlanInput {
            snapshot: &snap,
            pools: &pools,
            claims: &[],
            history: &history,
            now,
            expanders: &[Expander::LeastWaste],
            seed: sequence,
            packing_budget: DEFAULT_BUDGET,
            backoff: Default::default(),
            bookings: Default::default(),
        });
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        history = planned.history;
        history.record_executed(&planned.decision, now);
        now += Duration::from_secs(2);
        let removed: Vec<String> = planned
            .decision
            .actions
            .iter()
            .filter_map(|a| match &a.action {
                Some(pb::scale_action::Action::ScaleDown(d)) => Some(d.nodes.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        if removed.is_empty() && sequence > 0 {
            break;
        }
        if !removed.is_empty() {
            decisions += 1;
        }
        apply(&classes, &mut placed, &removed);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "  | maxConcurrent {max_concurrent} | {before} | {} | {bound} | +{:.1} % | {decisions} | {:.1} / {:.1} ms |",
        placed.len(),
        100.0 * (placed.len() as f64 - bound as f64) / bound as f64,
        times[times.len() / 2],
        times[times.len() - 1],
    );
}

fn main() {
    let nodes: usize = std::env::var("CONSOLIDATE_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!(
        "consolidation of {nodes} fragmented nodes (40 % of pods deleted), 16 CPU / 64 GiB / 110 pods:"
    );
    println!(
        "  | setting | nodes before | nodes after | lower bound | after over bound | decisions | plan time p50 / max |"
    );
    run(nodes, 1000);
    run(nodes, 1);
}
