//! Scale-up: min-node enforcement, then pending pods onto existing and in-flight capacity (as the
//! scheduler would place them), then the rest bin-packed onto new nodes of the pools that can
//! host them, chosen by the expander chain, within maxNodes, resource limits, batch size,
//! cooldowns, stabilization windows and the pending-pods threshold; then the usage-threshold
//! rules. Every pending class ends with its outcome and, if unhelped, why per pool.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::SystemTime,
};

use shoal_core::{
    Resources,
    fit::{Misfit, PodDemand, Taint, constraint_misfit},
    pool::taint_text,
    snapshot,
};
use shoal_proto::v1 as pb;

use super::{
    Bin, BinKind, Cluster, History, PlanInput,
    expander::{self, ScaleOption},
    from_ms, human, ms,
    packing::{self, Item, fit_count, size_key, take},
    rfc3339,
};

/// What scale-up decided.
pub(crate) struct UpResult {
    /// (pool, nodes to add, reason).
    pub actions: Vec<(String, u32, String)>,
    pub reasons: Vec<String>,
    pub outcomes: Vec<pb::ClassOutcome>,
    pub pending_pods: i64,
    pub helped_pods: i64,
    pub batch_capped: bool,
    pub oldest_helped_since: Option<SystemTime>,
    /// Pools that grow in this decision.
    pub scaling: Vec<bool>,
    /// Pools that could host pending pods this decision leaves pending.
    pub wanted: Vec<bool>,
}

struct PendingClass {
    class: usize,
    count: i64,
    since: Option<SystemTime>,
}

/// Interns taint sets so bins can share constraint answers.
#[derive(Default)]
struct TaintSets {
    ids: HashMap<Vec<Taint>, usize>,
}

impl TaintSets {
    fn id(&mut self, taints: &[Taint]) -> usize {
        let next = self.ids.len();
        *self.ids.entry(taints.to_vec()).or_insert(next)
    }
}

fn describe_misfit(
    m: &Misfit,
    demand: &PodDemand,
    capacity: &Resources,
    labels: &BTreeMap<String, String>,
    taints: &[Taint],
) -> String {
    match m {
        Misfit::Unschedulable => "nodes are cordoned".into(),
        Misfit::Affinity => {
            let missing: Vec<String> = demand
                .node_selector
                .iter()
                .filter(|(k, v)| labels.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if missing.is_empty() {
                "required node affinity does not match the pool's labels".into()
            } else {
                format!(
                    "nodeSelector {} does not match the pool's labels",
                    missing.join(",")
                )
            }
        }
        Misfit::Taint(key, value) => {
            let text = taints
                .iter()
                .find(|t| &t.key == key && &t.value == value)
                .map(taint_text)
                .unwrap_or_else(|| key.clone());
            format!("taint {text} not tolerated")
        }
        Misfit::Insufficient(resource) => {
            let (want, have) = match resource.as_str() {
                "cpu" => (
                    format!("{}m", demand.requests.cpu_millis),
                    format!("{}m", capacity.cpu_millis),
                ),
                "memory" => (
                    bytes(demand.requests.memory_bytes),
                    bytes(capacity.memory_bytes),
                ),
                "pods" => ("1 pod slot".into(), format!("{} slots", capacity.pods)),
                "ephemeral-storage" => (
                    bytes(demand.requests.ephemeral_storage_bytes),
                    bytes(capacity.ephemeral_storage_bytes),
                ),
                other => (
                    demand
                        .requests
                        .extended
                        .get(other)
                        .copied()
                        .unwrap_or(0)
                        .to_string(),
                    capacity
                        .extended
                        .get(other)
                        .copied()
                        .unwrap_or(0)
                        .to_string(),
                ),
            };
            format!("a pod requests {resource} {want}, a node has {have}")
        }
    }
}

/// Bytes as people write them (GiB/MiB).
pub(crate) fn bytes(b: i64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}Gi", b >> 30)
    } else if b >= 1 << 20 {
        format!("{}Mi", b >> 20)
    } else {
        format!("{b}")
    }
}

/// Why pool `p` cannot grow by another node, if it cannot.
fn max_reason(cluster: &Cluster<'_>, p: usize) -> String {
    let pool = &cluster.pools[p];
    let bounds = &cluster.bounds[p];
    let window = bounds
        .window
        .as_ref()
        .map(|w| format!(" (schedule {w})"))
        .unwrap_or_default();
    let by_nodes = pool
        .schedule
        .iter()
        .find(|w| Some(&w.name) == bounds.window.as_ref())
        .and_then(|w| w.max_nodes)
        .unwrap_or(pool.max_nodes);
    if bounds.max < by_nodes {
        format!("resource limits allow {} node(s), reached", bounds.max)
    } else {
        format!("maxNodes {}{window} reached", bounds.max)
    }
}

pub(crate) fn plan(
    cluster: &Cluster<'_>,
    bins: &mut Vec<Bin>,
    input: &PlanInput<'_>,
    history: &mut History,
) -> UpResult {
    let pools = cluster.pools;
    let now = cluster.now;
    let np = pools.len();
    let mut added = vec![0u32; np];
    let mut pool_reasons: Vec<Vec<String>> = vec![Vec::new(); np];

    // --- min-node enforcement (ignores cooldowns, stabilization and the batch size) ---
    for (p, pool) in pools.iter().enumerate() {
        let total = cluster.live[p] + cluster.in_flight[p];
        let min = cluster.bounds[p].min;
        if total < min {
            let add = min - total;
            added[p] += add;
            for _ in 0..add {
                bins.push(Bin {
                    free: pool.capacity.clone(),
                    kind: BinKind::New(p),
                });
            }
            let window = cluster.bounds[p]
                .window
                .as_ref()
                .map(|w| format!(" (schedule {w})"))
                .unwrap_or_default();
            pool_reasons[p].push(format!("below minNodes {min}{window} with {total} node(s)"));
        }
    }

    // --- pending classes, largest first ---
    let mut pending: Vec<PendingClass> = input
        .snapshot
        .pending
        .iter()
        .filter(|p| p.count > 0)
        .filter_map(|p| {
            Some(PendingClass {
                class: *cluster.class_index.get(&p.class_id)?,
                count: p.count as i64,
                since: p.unschedulable_since.as_ref().map(snapshot::system_time),
            })
        })
        .collect();
    let reference = pools
        .iter()
        .map(|p| &p.capacity)
        .chain(cluster.nodes.iter().map(|n| &n.facts.allocatable))
        .fold(Resources::default(), |acc, r| Resources {
            cpu_millis: acc.cpu_millis.max(r.cpu_millis),
            memory_bytes: acc.memory_bytes.max(r.memory_bytes),
            ..acc
        });
    pending.sort_by(|a, b| {
        let ka = size_key(&cluster.classes[a.class].demand.requests, &reference);
        let kb = size_key(&cluster.classes[b.class].demand.requests, &reference);
        kb.total_cmp(&ka).then(a.class.cmp(&b.class))
    });
    let pending_pods: i64 = pending.iter().map(|p| p.count).sum();
    let mut remaining: Vec<i64> = pending.iter().map(|p| p.count).collect();
    let mut placed_existing = vec![0i64; pending.len()];
    let mut placed_new: Vec<BTreeMap<usize, i64>> = vec![BTreeMap::new(); pending.len()];

    // --- onto existing, in-flight and min-enforcement capacity ---
    place_on_bins(
        cluster,
        bins,
        &pending,
        &mut remaining,
        &mut placed_existing,
        &mut placed_new,
    );

    // --- per (class, pool): can a new node of the pool host it? ---
    let compat: Vec<Vec<Option<String>>> = pending
        .iter()
        .map(|pc| {
            let demand = &cluster.classes[pc.class].demand;
            pools
                .iter()
                .enumerate()
                .map(|(p, pool)| {
                    let template = &cluster.template[p];
                    if let Some(m) =
                        constraint_misfit(demand, &template.labels, &template.taints, false)
                    {
                        return Some(describe_misfit(
                            &m,
                            demand,
                            &pool.capacity,
                            &template.labels,
                            &template.taints,
                        ));
                    }
                    if fit_count(&pool.capacity, &demand.requests) < 1 {
                        let misfits = shoal_core::fit::misfits(demand, template);
                        let m = misfits
                            .first()
                            .cloned()
                            .unwrap_or(Misfit::Insufficient("cpu".into()));
                        return Some(describe_misfit(
                            &m,
                            demand,
                            &pool.capacity,
                            &template.labels,
                            &template.taints,
                        ));
                    }
                    None
                })
                .collect()
        })
        .collect();
    let stabilized = |i: usize, p: usize| -> Option<String> {
        let window = pools[p].scale_up.stabilization_window;
        if window.is_zero() {
            return None;
        }
        let since = pending[i].since.unwrap_or(now);
        let waited = now.duration_since(since).unwrap_or_default();
        (waited < window).then(|| {
            format!(
                "stabilization window {}: unschedulable for {}",
                human(window),
                human(waited)
            )
        })
    };

    // --- pool gates: cooldown, room, pending threshold ---
    let total = |p: usize, added: &[u32]| cluster.live[p] + cluster.in_flight[p] + added[p];
    let mut gate: Vec<Option<String>> = (0..np)
        .map(|p| {
            let pool = &pools[p];
            if let Some(last) = history
                .pools
                .get(&pool.name)
                .and_then(|h| h.last_scale_up_ms)
                && !pool.scale_up.cooldown.is_zero()
            {
                let until = from_ms(last) + pool.scale_up.cooldown;
                if until > now {
                    return Some(format!("scale-up cooldown until {}", rfc3339(until)));
                }
            }
            if total(p, &added) >= cluster.bounds[p].max {
                return Some(max_reason(cluster, p));
            }
            None
        })
        .collect();
    for (p, pool) in pools.iter().enumerate() {
        if gate[p].is_some() || pool.scale_up.pending_pods <= 1 {
            continue;
        }
        let wanting: i64 = (0..pending.len())
            .filter(|i| compat[*i][p].is_none() && stabilized(*i, p).is_none())
            .map(|i| remaining[i])
            .sum();
        if wanting > 0 && wanting < pool.scale_up.pending_pods as i64 {
            gate[p] = Some(format!(
                "pendingPods threshold {} not reached ({wanting} pending)",
                pool.scale_up.pending_pods
            ));
        }
    }
    let headroom = |p: usize, added: &[u32]| -> (i64, bool) {
        let by_max = cluster.bounds[p].max as i64 - total(p, added) as i64;
        let by_batch = pools[p].scale_up.batch_size as i64 - added[p] as i64;
        (by_max.min(by_batch).max(0), by_batch < by_max)
    };

    // --- rounds: every eligible pool bids, the expander chain picks one ---
    let mut done = vec![false; np];
    let mut capped_by_batch = vec![false; np];
    let mut batch_capped = false;
    let mut cached: HashMap<usize, Option<(ScaleOption, Vec<i64>, usize)>> = HashMap::new();
    let mut round = 0u64;
    loop {
        let mut options: Vec<ScaleOption> = Vec::new();
        let mut details: Vec<(usize, Vec<i64>, usize)> = Vec::new();
        for p in 0..np {
            if done[p] || gate[p].is_some() {
                continue;
            }
            let (room, _) = headroom(p, &added);
            if room <= 0 {
                continue;
            }
            let entry = cached.entry(p).or_insert_with(|| {
                let picks: Vec<usize> = (0..pending.len())
                    .filter(|i| {
                        remaining[*i] > 0 && compat[*i][p].is_none() && stabilized(*i, p).is_none()
                    })
                    .collect();
                if picks.is_empty() {
                    return None;
                }
                let items: Vec<Item<'_>> = picks
                    .iter()
                    .map(|i| Item {
                        class: *i,
                        request: &cluster.classes[pending[*i].class].demand.requests,
                        count: remaining[*i],
                    })
                    .collect();
                let capacity = &pools[p].capacity;
                let packed = packing::first_fit_decreasing(&items, capacity, room as usize);
                if packed.pods() == 0 {
                    return None;
                }
                let mut placed = vec![0i64; pending.len()];
                for (k, i) in picks.iter().enumerate() {
                    placed[*i] = packed.placed[k];
                }
                let n = packed.nodes.len();
                let frac = |free: i64, cap: i64| {
                    if cap > 0 {
                        free as f64 / cap as f64
                    } else {
                        0.0
                    }
                };
                let waste = packed
                    .nodes
                    .iter()
                    .map(|f| {
                        (frac(f.cpu_millis, capacity.cpu_millis)
                            + frac(f.memory_bytes, capacity.memory_bytes))
                            / 2.0
                    })
                    .sum::<f64>()
                    / n.max(1) as f64;
                Some((
                    ScaleOption {
                        pool: pools[p].name.clone(),
                        nodes: n,
                        pods: packed.pods(),
                        waste,
                        price_per_pod: pools[p].price * n as f64 / packed.pods() as f64,
                        weight: pools[p].weight,
                    },
                    placed,
                    n,
                ))
            });
            if let Some((option, placed, n)) = entry.clone() {
                options.push(option);
                details.push((p, placed, n));
            }
        }
        let Some((chosen, why)) =
            expander::choose(&options, input.expanders, input.seed.wrapping_add(round))
        else {
            break;
        };
        round += 1;
        let (p, placed, n) = details.swap_remove(chosen);
        let (_, batch_binds) = headroom(p, &added);
        added[p] += n as u32;
        done[p] = true;
        let mut helped: Vec<String> = Vec::new();
        let mut pods = 0;
        let mut touched: HashSet<usize> = HashSet::new();
        for (i, count) in placed.iter().enumerate() {
            if *count > 0 {
                remaining[i] -= count;
                *placed_new[i].entry(p).or_default() += count;
                pods += count;
                touched.insert(i);
                helped.push(format!(
                    "{} ×{count}",
                    cluster.classes[pending[i].class].label
                ));
            }
        }
        let left_for_pool = (0..pending.len())
            .any(|i| remaining[i] > 0 && compat[i][p].is_none() && stabilized(i, p).is_none());
        if left_for_pool && batch_binds {
            capped_by_batch[p] = true;
            batch_capped = true;
        }
        helped.truncate(5);
        pool_reasons[p].push(format!(
            "{pods} pending pod(s) ({}){}; {why}",
            helped.join(", "),
            if capped_by_batch[p] {
                format!(", batch size {} reached", pools[p].scale_up.batch_size)
            } else {
                String::new()
            }
        ));
        // Options of other pools that packed these classes are out of date.
        cached.retain(|_, entry| {
            entry.as_ref().is_none_or(|(_, placed, _)| {
                !placed
                    .iter()
                    .enumerate()
                    .any(|(i, c)| *c > 0 && touched.contains(&i))
            })
        });
    }

    // --- usage thresholds (the seed systems' rules) ---
    for (p, pool) in pools.iter().enumerate() {
        let up = &pool.scale_up;
        let h = history.pools.entry(pool.name.clone()).or_default();
        if up.cpu_above <= 0.0 && up.memory_above <= 0.0 {
            h.cpu_above_since_ms = None;
            h.memory_above_since_ms = None;
            continue;
        }
        let usages: Vec<&pb::NodeUsage> = cluster
            .nodes
            .iter()
            .filter(|n| n.pool == Some(p) && n.ready && !n.deleting)
            .filter_map(|n| n.info.usage.as_ref())
            .collect();
        if input.snapshot.utilization_stale || usages.is_empty() {
            if !usages.is_empty() || cluster.live[p] > 0 {
                pool_reasons[p]
                    .push("usage thresholds not evaluated: utilization is stale or unknown".into());
            }
            continue;
        }
        let n = usages.len() as f64;
        let cpu = usages.iter().map(|u| u.cpu).sum::<f64>() / n * 100.0;
        let memory = usages.iter().map(|u| u.memory).sum::<f64>() / n * 100.0;
        let mut want = 0i64;
        let mut why = Vec::new();
        for (name, field, value, threshold, since) in [
            (
                "CPU",
                "cpuAbove",
                cpu,
                up.cpu_above,
                &mut h.cpu_above_since_ms,
            ),
            (
                "memory",
                "memoryAbove",
                memory,
                up.memory_above,
                &mut h.memory_above_since_ms,
            ),
        ] {
            if threshold <= 0.0 || value <= threshold {
                *since = None;
                continue;
            }
            let started = *since.get_or_insert(ms(now));
            let held = now.duration_since(from_ms(started)).unwrap_or_default();
            if held < up.stabilization_window {
                why.push(format!(
                    "average {name} {value:.0}% > {threshold:.0}% for {} of the {} stabilization window",
                    human(held),
                    human(up.stabilization_window)
                ));
                continue;
            }
            let target = (n * value / threshold).ceil() as i64;
            want = want.max((target - n as i64).max(1));
            why.push(format!(
                "average {name} {value:.0}% > {field} {threshold:.0}%"
            ));
        }
        if want == 0 {
            if !why.is_empty() {
                pool_reasons[p].push(why.join("; "));
            }
            continue;
        }
        if added[p] > 0 {
            continue; // already growing for pending pods or minNodes
        }
        if cluster.in_flight[p] > 0 {
            pool_reasons[p].push(format!(
                "{}; waiting for {} node(s) in flight",
                why.join("; "),
                cluster.in_flight[p]
            ));
            continue;
        }
        if let Some(g) = &gate[p] {
            pool_reasons[p].push(format!("{}; but {g}", why.join("; ")));
            continue;
        }
        let (room, _) = headroom(p, &added);
        let add = want.min(room);
        if add > 0 {
            added[p] += add as u32;
            pool_reasons[p].push(why.join("; "));
        }
    }

    // --- outcomes and reasons ---
    let mut helped_pods = 0;
    let mut oldest_helped_since: Option<SystemTime> = None;
    let mut outcomes = Vec::with_capacity(pending.len());
    let mut unhelped: Vec<String> = Vec::new();
    let mut unhelped_pods = 0;
    let mut wanted = vec![false; np];
    for (i, pc) in pending.iter().enumerate() {
        let new_total: i64 = placed_new[i].values().sum();
        if new_total > 0 {
            helped_pods += new_total;
            if let Some(since) = pc.since {
                oldest_helped_since =
                    Some(oldest_helped_since.map_or(since, |o: SystemTime| o.min(since)));
            }
        }
        let mut verdicts = Vec::new();
        if remaining[i] > 0 {
            unhelped_pods += remaining[i];
            for (p, pool) in pools.iter().enumerate() {
                let reason = if let Some(r) = &compat[i][p] {
                    r.clone()
                } else {
                    wanted[p] = true;
                    if let Some(g) = &gate[p] {
                        g.clone()
                    } else if let Some(s) = stabilized(i, p) {
                        s
                    } else if capped_by_batch[p] {
                        format!(
                            "batch size {} reached in this decision",
                            pool.scale_up.batch_size
                        )
                    } else if total(p, &added) >= cluster.bounds[p].max {
                        max_reason(cluster, p)
                    } else {
                        "not chosen: other pending pods took the room this decision allows".into()
                    }
                };
                verdicts.push(pb::PoolVerdict {
                    pool: pool.name.clone(),
                    fits: compat[i][p].is_none(),
                    reason,
                });
            }
            if pools.is_empty() {
                verdicts.push(pb::PoolVerdict {
                    pool: String::new(),
                    fits: false,
                    reason: "no NodePools are defined".into(),
                });
            }
            let label = &cluster.classes[pc.class].label;
            let first = verdicts
                .iter()
                .map(|v| format!("pool {}: {}", v.pool, v.reason))
                .collect::<Vec<_>>()
                .join("; ");
            unhelped.push(format!("{label} ×{} ({first})", remaining[i]));
        } else {
            for (p, count) in &placed_new[i] {
                verdicts.push(pb::PoolVerdict {
                    pool: pools[*p].name.clone(),
                    fits: true,
                    reason: format!("takes {count} pod(s) on new nodes"),
                });
            }
        }
        outcomes.push(pb::ClassOutcome {
            class_id: cluster.classes[pc.class].proto.id,
            count: pc.count as i32,
            placed_existing: placed_existing[i] as i32,
            placed_new: placed_new[i]
                .iter()
                .map(|(p, c)| (pools[*p].name.clone(), *c as i32))
                .collect(),
            unplaced: remaining[i] as i32,
            verdicts,
        });
    }
    let mut actions = Vec::new();
    let mut reasons = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        if added[p] > 0 {
            let reason = format!("+{} node(s): {}", added[p], pool_reasons[p].join("; "));
            reasons.push(format!("pool {}: {reason}", pool.name));
            actions.push((pool.name.clone(), added[p], reason));
        } else if !pool_reasons[p].is_empty() {
            reasons.push(format!(
                "pool {}: {}",
                pool.name,
                pool_reasons[p].join("; ")
            ));
        }
    }
    let on_existing: i64 = placed_existing.iter().sum();
    if on_existing > 0 {
        reasons.push(format!(
            "{on_existing} pending pod(s) fit on existing or in-flight nodes (the scheduler will bind them)"
        ));
    }
    if unhelped_pods > 0 {
        unhelped.truncate(10);
        reasons.push(format!(
            "{unhelped_pods} pending pod(s) cannot be helped: {}",
            unhelped.join(" | ")
        ));
    }
    UpResult {
        actions,
        reasons,
        outcomes,
        pending_pods,
        helped_pods,
        batch_capped,
        oldest_helped_since,
        scaling: added.iter().map(|a| *a > 0).collect(),
        wanted,
    }
}

/// First fit of pending pods onto the bins, as the scheduler would find room.
fn place_on_bins(
    cluster: &Cluster<'_>,
    bins: &mut [Bin],
    pending: &[PendingClass],
    remaining: &mut [i64],
    placed_existing: &mut [i64],
    placed_new: &mut [BTreeMap<usize, i64>],
) {
    if pending.is_empty() || bins.is_empty() {
        return;
    }
    let min_cpu = pending
        .iter()
        .map(|p| cluster.classes[p.class].demand.requests.cpu_millis)
        .min()
        .unwrap_or(0);
    let min_memory = pending
        .iter()
        .map(|p| cluster.classes[p.class].demand.requests.memory_bytes)
        .min()
        .unwrap_or(0);
    let has_room = |free: &Resources| {
        free.pods > 0 && free.cpu_millis >= min_cpu && free.memory_bytes >= min_memory
    };
    let mut active: Vec<usize> = (0..bins.len())
        .filter(|b| has_room(&bins[*b].free))
        .collect();
    if active.is_empty() {
        return;
    }
    // Overestimates of the most free capacity (they only shrink): classes bigger than these
    // fit nowhere and are skipped at once.
    let max_cpu = active
        .iter()
        .map(|b| bins[*b].free.cpu_millis)
        .max()
        .unwrap_or(0);
    let max_memory = active
        .iter()
        .map(|b| bins[*b].free.memory_bytes)
        .max()
        .unwrap_or(0);
    let mut sets = TaintSets::default();
    let taint_id: Vec<usize> = bins
        .iter()
        .map(|b| sets.id(&cluster.bin_facts(b.kind).taints))
        .collect();
    let mut nowhere: HashSet<&PodDemand> = HashSet::new();
    for (i, pc) in pending.iter().enumerate() {
        let demand = &cluster.classes[pc.class].demand;
        let request = &demand.requests;
        if request.cpu_millis > max_cpu
            || request.memory_bytes > max_memory
            || nowhere.contains(demand)
        {
            continue;
        }
        // Without selectors or affinity, only taints (and cordons) matter: answer per taint set.
        let label_free = demand.node_selector.is_empty() && demand.required_affinity.is_empty();
        let mut by_taints: HashMap<usize, bool> = HashMap::new();
        let mut placed_any = false;
        let mut k = 0;
        while k < active.len() && remaining[i] > 0 {
            let b = active[k];
            let n = fit_count(&bins[b].free, request).min(remaining[i]);
            if n > 0 {
                let facts = cluster.bin_facts(bins[b].kind);
                let ok = if label_free {
                    *by_taints.entry(taint_id[b]).or_insert_with(|| {
                        constraint_misfit(demand, &facts.labels, &facts.taints, facts.unschedulable)
                            .is_none()
                    })
                } else {
                    constraint_misfit(demand, &facts.labels, &facts.taints, facts.unschedulable)
                        .is_none()
                };
                if ok {
                    take(&mut bins[b].free, request, n);
                    remaining[i] -= n;
                    placed_any = true;
                    match bins[b].kind {
                        BinKind::New(p) => *placed_new[i].entry(p).or_default() += n,
                        _ => placed_existing[i] += n,
                    }
                }
            }
            if has_room(&bins[b].free) {
                k += 1;
            } else {
                active.swap_remove(k);
            }
        }
        if !placed_any {
            nowhere.insert(demand);
        }
    }
}
