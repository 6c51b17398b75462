//! Scale-up: min-node enforcement, then pending pods onto existing and in-flight capacity (as the
//! scheduler would place them), then the rest bin-packed onto new nodes of the pools that can
//! host them, chosen by the expander chain, within maxNodes, resource limits, batch size,
//! cooldowns, stabilization windows and the pending-pods threshold; then the usage-threshold
//! rules. Every pending class ends with its outcome and, if unhelped, why per pool.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
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
    from_ms, human, ms, node_cost,
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
    /// Per pool that grows for pending pods: how its new nodes were packed.
    pub packing: HashMap<String, pb::PackingReport>,
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
    let mut up = ScaleUp::new(cluster, input);
    up.enforce_min_nodes(bins);
    place_on_bins(
        cluster,
        bins,
        &up.pending,
        &mut up.remaining,
        &mut up.placed_existing,
        &mut up.placed_new,
    );
    up.check_pools(history);
    up.grow_for_pending(input);
    up.usage_thresholds(input, history);
    up.finish()
}

/// Scale-up's working state, step by step: [`ScaleUp::enforce_min_nodes`], placing pending pods
/// on existing capacity ([`place_on_bins`]), [`ScaleUp::check_pools`] (which pools could host
/// each class, and which may grow at all), [`ScaleUp::grow_for_pending`] (packing and the
/// expander chain), [`ScaleUp::usage_thresholds`], and [`ScaleUp::finish`] (outcomes and
/// reasons).
struct ScaleUp<'c, 'a> {
    cluster: &'c Cluster<'a>,
    /// Pending classes, largest first.
    pending: Vec<PendingClass>,
    pending_pods: i64,
    /// Pods of each pending class not placed yet.
    remaining: Vec<i64>,
    placed_existing: Vec<i64>,
    /// Per pending class: pool → pods on new nodes of it.
    placed_new: Vec<BTreeMap<usize, i64>>,
    /// Nodes this plan adds per pool.
    added: Vec<u32>,
    pool_reasons: Vec<Vec<String>>,
    /// Per (pending class, pool): why a new node of the pool cannot host the class.
    compat: Vec<Vec<Option<String>>>,
    /// Per pool: why it cannot grow in this decision (cooldown, maxNodes, pendingPods).
    gate: Vec<Option<String>>,
    capped_by_batch: Vec<bool>,
    batch_capped: bool,
    packing: HashMap<String, pb::PackingReport>,
    /// Per pool: the failed-launch backoff holding it, if one does.
    backoff: Vec<Option<String>>,
    /// The plan answers a capacity request: no cooldown, window, threshold or batch size.
    request: bool,
}

/// A pool's bid for pending pods: what the expander compares, and what the packer placed.
#[derive(Clone)]
struct Bid {
    option: ScaleOption,
    /// Pods per pending class.
    placed: Vec<i64>,
    /// What goes on each new node: (pending class, pods).
    contents: Vec<Vec<(usize, i64)>>,
    report: pb::PackingReport,
}

impl<'c, 'a> ScaleUp<'c, 'a> {
    fn new(cluster: &'c Cluster<'a>, input: &PlanInput<'_>) -> Self {
        let np = cluster.pools.len();
        let mut pending: Vec<PendingClass> = input
            .snapshot
            .pending
            .iter()
            .filter(|p| p.count > 0 && !input.bookings.consumes(p.class_id))
            .filter_map(|p| {
                Some(PendingClass {
                    class: *cluster.class_index.get(&p.class_id)?,
                    count: p.count as i64,
                    since: p.unschedulable_since.as_ref().map(snapshot::system_time),
                })
            })
            .collect();
        let reference = cluster
            .pools
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
        let n = pending.len();
        ScaleUp {
            cluster,
            pending_pods: pending.iter().map(|p| p.count).sum(),
            remaining: pending.iter().map(|p| p.count).collect(),
            pending,
            placed_existing: vec![0; n],
            placed_new: vec![BTreeMap::new(); n],
            added: vec![0; np],
            pool_reasons: vec![Vec::new(); np],
            compat: Vec::new(),
            gate: vec![None; np],
            capped_by_batch: vec![false; np],
            batch_capped: false,
            packing: HashMap::new(),
            backoff: cluster
                .pools
                .iter()
                .map(|p| input.backoff.holds(&p.name, input.claims, input.now))
                .collect(),
            request: input.bookings.request,
        }
    }

    /// Nodes of pool `p` that exist, are coming, or this plan adds.
    fn total(&self, p: usize) -> u32 {
        self.cluster.live[p] + self.cluster.in_flight[p] + self.added[p]
    }

    /// How many more nodes pool `p` may get in this decision, and whether the batch size (not
    /// maxNodes or limits) is what binds.
    fn headroom(&self, p: usize) -> (i64, bool) {
        let by_max = self.cluster.bounds[p].max as i64 - self.total(p) as i64;
        let by_batch = if self.request {
            i64::MAX
        } else {
            self.cluster.pools[p].scale_up.batch_size as i64 - self.added[p] as i64
        };
        (by_max.min(by_batch).max(0), by_batch < by_max)
    }

    /// Why pending class `i` must still wait before pool `p` grows for it, if it must.
    fn stabilized(&self, i: usize, p: usize) -> Option<String> {
        let window = self.cluster.pools[p].scale_up.stabilization_window;
        if window.is_zero() || self.request {
            return None;
        }
        let now = self.cluster.now;
        let since = self.pending[i].since.unwrap_or(now);
        let waited = now.duration_since(since).unwrap_or_default();
        (waited < window).then(|| {
            format!(
                "stabilization window {}: unschedulable for {}",
                human(window),
                human(waited)
            )
        })
    }

    /// Pending class `i` still wants a new node of pool `p`.
    fn wants(&self, i: usize, p: usize) -> bool {
        self.remaining[i] > 0 && self.compat[i][p].is_none() && self.stabilized(i, p).is_none()
    }

    /// Min-node enforcement: ignores cooldowns, stabilization and the batch size.
    fn enforce_min_nodes(&mut self, bins: &mut Vec<Bin>) {
        let cluster = self.cluster;
        for (p, pool) in cluster.pools.iter().enumerate() {
            let total = cluster.live[p] + cluster.in_flight[p];
            let min = cluster.bounds[p].min;
            if total >= min {
                continue;
            }
            if let Some(why) = &self.backoff[p] {
                self.pool_reasons[p]
                    .push(format!("below minNodes {min} with {total} node(s), {why}"));
                continue;
            }
            let add = min - total;
            self.added[p] += add;
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
            self.pool_reasons[p].push(format!("below minNodes {min}{window} with {total} node(s)"));
        }
    }

    /// Which pools' new nodes could host each pending class, and which pools may grow at all
    /// (cooldown, maxNodes and limits, the pendingPods threshold).
    fn check_pools(&mut self, history: &History) {
        let cluster = self.cluster;
        let pools = cluster.pools;
        self.compat = self
            .pending
            .iter()
            .map(|pc| {
                let demand = &cluster.classes[pc.class].demand;
                (0..pools.len())
                    .map(|p| new_node_misfit(cluster, demand, p))
                    .collect()
            })
            .collect();
        let now = cluster.now;
        for (p, pool) in pools.iter().enumerate() {
            if let Some(why) = &self.backoff[p] {
                self.gate[p] = Some(why.clone());
                continue;
            }
            if let Some(last) = history
                .pools
                .get(&pool.name)
                .and_then(|h| h.last_scale_up_ms)
                && !pool.scale_up.cooldown.is_zero()
                && !self.request
            {
                let until = from_ms(last) + pool.scale_up.cooldown;
                if until > now {
                    self.gate[p] = Some(format!("scale-up cooldown until {}", rfc3339(until)));
                    continue;
                }
            }
            if self.total(p) >= cluster.bounds[p].max {
                self.gate[p] = Some(max_reason(cluster, p));
                continue;
            }
            if pool.scale_up.pending_pods <= 1 || self.request {
                continue;
            }
            let wanting: i64 = (0..self.pending.len())
                .filter(|i| self.compat[*i][p].is_none() && self.stabilized(*i, p).is_none())
                .map(|i| self.remaining[i])
                .sum();
            if wanting > 0 && wanting < pool.scale_up.pending_pods as i64 {
                self.gate[p] = Some(format!(
                    "pendingPods threshold {} not reached ({wanting} pending)",
                    pool.scale_up.pending_pods
                ));
            }
        }
    }

    /// Pool `p`'s bid: the pending pods it could host, packed onto as few new nodes as the
    /// packer finds within `budget`.
    fn bid(&self, p: usize, room: i64, budget: Duration, seed: u64) -> Option<Bid> {
        let cluster = self.cluster;
        let picks: Vec<usize> = (0..self.pending.len())
            .filter(|i| self.wants(*i, p))
            .collect();
        if picks.is_empty() {
            return None;
        }
        let items: Vec<Item<'_>> = picks
            .iter()
            .map(|i| Item {
                class: *i,
                request: &cluster.classes[self.pending[*i].class].demand.requests,
                count: self.remaining[*i],
            })
            .collect();
        let pool = &cluster.pools[p];
        let capacity = &pool.capacity;
        let packed = packing::pack(&items, capacity, room as usize, budget, seed);
        let pods = packed.packing.pods();
        if pods == 0 {
            return None;
        }
        let mut placed = vec![0i64; self.pending.len()];
        for (k, i) in picks.iter().enumerate() {
            placed[*i] = packed.packing.placed[k];
        }
        let contents: Vec<Vec<(usize, i64)>> = packed
            .contents
            .iter()
            .map(|node| node.iter().map(|(k, n)| (picks[*k], *n)).collect())
            .collect();
        let n = packed.packing.nodes.len();
        let frac = |free: i64, cap: i64| {
            if cap > 0 {
                free as f64 / cap as f64
            } else {
                0.0
            }
        };
        let waste = packed
            .packing
            .nodes
            .iter()
            .map(|f| {
                (frac(f.cpu_millis, capacity.cpu_millis)
                    + frac(f.memory_bytes, capacity.memory_bytes))
                    / 2.0
            })
            .sum::<f64>()
            / n.max(1) as f64;
        // The bound and FFD for the pods placed (all of them unless the room binds).
        let lower_bound = if pods == items.iter().map(|i| i.count).sum::<i64>() {
            packed.lower_bound
        } else {
            n as i64
        };
        Some(Bid {
            option: ScaleOption {
                pool: pool.name.clone(),
                nodes: n,
                pods,
                waste,
                price_per_pod: pool.price * n as f64 / pods as f64,
                weight: pool.weight,
            },
            placed,
            contents,
            report: pb::PackingReport {
                nodes: n as i32,
                pods: pods as i32,
                lower_bound: lower_bound as i32,
                first_fit_decreasing: packed.first_fit_decreasing as i32,
            },
        })
    }

    /// Rounds: every pool that may grow bids for the pending pods it could host; the expander
    /// chain picks one; its pods are taken; the others bid again for what is left.
    fn grow_for_pending(&mut self, input: &PlanInput<'_>) {
        let cluster = self.cluster;
        let pools = cluster.pools;
        let np = pools.len();
        let started = Instant::now();
        let mut done = vec![false; np];
        let mut cached: HashMap<usize, Option<Bid>> = HashMap::new();
        let mut round = 0u64;
        loop {
            let eligible: Vec<usize> = (0..np)
                .filter(|p| !done[*p] && self.gate[*p].is_none() && self.headroom(*p).0 > 0)
                .collect();
            // The decision's packing budget, shared by the bids still to make.
            let to_make = eligible.iter().filter(|p| !cached.contains_key(p)).count();
            let left = input.packing_budget.saturating_sub(started.elapsed());
            let share = left / to_make.max(1) as u32;
            let mut options: Vec<ScaleOption> = Vec::new();
            let mut bids: Vec<(usize, Bid)> = Vec::new();
            for p in eligible {
                if let std::collections::hash_map::Entry::Vacant(slot) = cached.entry(p) {
                    let (room, _) = self.headroom(p);
                    slot.insert(self.bid(p, room, share, input.seed.wrapping_add(p as u64)));
                }
                if let Some(Some(bid)) = cached.get(&p) {
                    options.push(bid.option.clone());
                    bids.push((p, bid.clone()));
                }
            }
            let Some((chosen, why)) =
                expander::choose(&options, input.expanders, input.seed.wrapping_add(round))
            else {
                break;
            };
            round += 1;
            let (p, mut bid) = bids.swap_remove(chosen);
            done[p] = true;
            let mut touched = self.cheaper_nodes(p, &mut bid);
            if bid.option.nodes > 0 {
                touched.extend(self.take_bid(p, &bid, &why));
            }
            // Bids of other pools that packed these classes are out of date.
            cached.retain(|_, entry| {
                entry.as_ref().is_none_or(|b| {
                    !b.placed
                        .iter()
                        .enumerate()
                        .any(|(i, c)| *c > 0 && touched.contains(&i))
                })
            });
        }
    }

    /// The mix of node types: each new node of the chosen pool `p` whose pods one node of a
    /// cheaper pool holds (by price when both pools have one, else by size: the smaller node
    /// wastes less) goes to the cheapest such pool instead. Takes those nodes out of `bid` and
    /// adds them to their pools; returns the pending classes they took pods of.
    fn cheaper_nodes(&mut self, p: usize, bid: &mut Bid) -> HashSet<usize> {
        let cluster = self.cluster;
        let pools = cluster.pools;
        let cost = |q: usize| node_cost(pools, p, q);
        let own = cost(p).unwrap_or(f64::INFINITY);
        let mut touched = HashSet::new();
        if bid.contents.len() != bid.option.nodes {
            return touched; // a packing without contents (first-fit decreasing under a cap)
        }
        let mut taken = vec![0i64; pools.len()];
        let mut kept = Vec::new();
        for node in std::mem::take(&mut bid.contents) {
            let best = (0..pools.len())
                .filter(|q| *q != p && self.gate[*q].is_none())
                .filter(|q| self.headroom(*q).0 > taken[*q])
                .filter(|q| node.iter().all(|(i, _)| self.wants(*i, *q)))
                .filter(|q| {
                    let mut free = pools[*q].capacity.clone();
                    node.iter().all(|(i, n)| {
                        let request = &cluster.classes[self.pending[*i].class].demand.requests;
                        let fits = fit_count(&free, request) >= *n;
                        take(&mut free, request, *n);
                        fits
                    })
                })
                .filter_map(|q| cost(q).map(|c| (q, c)))
                .filter(|(_, c)| *c < own - 1e-9)
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            let Some((q, c)) = best else {
                kept.push(node);
                continue;
            };
            taken[q] += 1;
            let pods: i64 = node.iter().map(|(_, n)| n).sum();
            for (i, n) in &node {
                bid.placed[*i] -= n;
                self.remaining[*i] -= n;
                *self.placed_new[*i].entry(q).or_default() += n;
                touched.insert(*i);
            }
            self.added[q] += 1;
            let why = if pools[p].price > 0.0 {
                format!("price {c} < {own} of pool {}", pools[p].name)
            } else {
                format!("a smaller node than pool {}'s", pools[p].name)
            };
            self.pool_reasons[q].push(format!(
                "{pods} pending pod(s) packed for pool {} fit one node of this pool: {why}",
                pools[p].name
            ));
        }
        // The report keeps describing the whole packing; the reasons say where nodes went.
        let moved = bid.option.nodes - kept.len();
        bid.option.nodes = kept.len();
        bid.option.pods = bid.placed.iter().sum();
        bid.contents = kept;
        if moved > 0 {
            self.pool_reasons[p].push(format!(
                "{moved} node(s) of this packing go to cheaper pools"
            ));
        }
        touched
    }

    /// Carries out pool `p`'s chosen bid; returns the pending classes it took pods of.
    fn take_bid(&mut self, p: usize, bid: &Bid, why: &str) -> HashSet<usize> {
        let cluster = self.cluster;
        let pool = &cluster.pools[p];
        let (_, batch_binds) = self.headroom(p);
        self.added[p] += bid.option.nodes as u32;
        let mut helped: Vec<String> = Vec::new();
        let mut touched: HashSet<usize> = HashSet::new();
        for (i, count) in bid.placed.iter().enumerate() {
            if *count > 0 {
                self.remaining[i] -= count;
                *self.placed_new[i].entry(p).or_default() += count;
                touched.insert(i);
                helped.push(format!(
                    "{} ×{count}",
                    cluster.classes[self.pending[i].class].label
                ));
            }
        }
        let left_for_pool = (0..self.pending.len()).any(|i| self.wants(i, p));
        if left_for_pool && batch_binds {
            self.capped_by_batch[p] = true;
            self.batch_capped = true;
        }
        helped.truncate(5);
        let report = &bid.report;
        let packed = if report.nodes as i64 > report.lower_bound as i64
            || report.first_fit_decreasing != report.nodes
        {
            format!(
                " on {} node(s) (lower bound {}, first-fit decreasing {})",
                report.nodes, report.lower_bound, report.first_fit_decreasing
            )
        } else {
            String::new()
        };
        self.pool_reasons[p].push(format!(
            "{} pending pod(s) ({}){packed}{}; {why}",
            report.pods,
            helped.join(", "),
            if self.capped_by_batch[p] {
                format!(", batch size {} reached", pool.scale_up.batch_size)
            } else {
                String::new()
            }
        ));
        self.packing.insert(pool.name.clone(), *report);
        touched
    }

    /// The usage-threshold rules (the seed systems'): average CPU or memory above a threshold
    /// for the stabilization window adds nodes, unless the pool grows anyway.
    fn usage_thresholds(&mut self, input: &PlanInput<'_>, history: &mut History) {
        let cluster = self.cluster;
        let now = cluster.now;
        for (p, pool) in cluster.pools.iter().enumerate() {
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
                    self.pool_reasons[p].push(
                        "usage thresholds not evaluated: utilization is stale or unknown".into(),
                    );
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
                    self.pool_reasons[p].push(why.join("; "));
                }
                continue;
            }
            if self.added[p] > 0 {
                continue; // already growing for pending pods or minNodes
            }
            if cluster.in_flight[p] > 0 {
                self.pool_reasons[p].push(format!(
                    "{}; waiting for {} node(s) in flight",
                    why.join("; "),
                    cluster.in_flight[p]
                ));
                continue;
            }
            if let Some(g) = &self.gate[p] {
                self.pool_reasons[p].push(format!("{}; but {g}", why.join("; ")));
                continue;
            }
            let (room, _) = self.headroom(p);
            let add = want.min(room);
            if add > 0 {
                self.added[p] += add as u32;
                self.pool_reasons[p].push(why.join("; "));
            }
        }
    }

    /// Why pending class `i` is left pending by pool `p`.
    fn verdict(&self, i: usize, p: usize) -> String {
        let pool = &self.cluster.pools[p];
        if let Some(r) = &self.compat[i][p] {
            r.clone()
        } else if let Some(g) = &self.gate[p] {
            g.clone()
        } else if let Some(s) = self.stabilized(i, p) {
            s
        } else if self.capped_by_batch[p] {
            format!(
                "batch size {} reached in this decision",
                pool.scale_up.batch_size
            )
        } else if self.total(p) >= self.cluster.bounds[p].max {
            max_reason(self.cluster, p)
        } else {
            "not chosen: other pending pods took the room this decision allows".into()
        }
    }

    /// Per-class outcomes, actions and reasons.
    fn finish(self) -> UpResult {
        let cluster = self.cluster;
        let pools = cluster.pools;
        let np = pools.len();
        let mut helped_pods = 0;
        let mut oldest_helped_since: Option<SystemTime> = None;
        let mut outcomes = Vec::with_capacity(self.pending.len());
        let mut unhelped: Vec<String> = Vec::new();
        let mut unhelped_pods = 0;
        let mut wanted = vec![false; np];
        for (i, pc) in self.pending.iter().enumerate() {
            let new_total: i64 = self.placed_new[i].values().sum();
            if new_total > 0 {
                helped_pods += new_total;
                if let Some(since) = pc.since {
                    oldest_helped_since =
                        Some(oldest_helped_since.map_or(since, |o: SystemTime| o.min(since)));
                }
            }
            let mut verdicts = Vec::new();
            if self.remaining[i] > 0 {
                unhelped_pods += self.remaining[i];
                for (p, pool) in pools.iter().enumerate() {
                    if self.compat[i][p].is_none() {
                        wanted[p] = true;
                    }
                    verdicts.push(pb::PoolVerdict {
                        pool: pool.name.clone(),
                        fits: self.compat[i][p].is_none(),
                        reason: self.verdict(i, p),
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
                unhelped.push(format!("{label} ×{} ({first})", self.remaining[i]));
            } else {
                for (p, count) in &self.placed_new[i] {
                    verdicts.push(pb::PoolVerdict {
                        pool: pools[*p].name.clone(),
                        fits: true,
                        reason: format!("takes {count} pod(s) on new nodes"),
                    });
                }
                // Pools that could have taken them but may not grow now (a backoff, say).
                for (p, pool) in pools.iter().enumerate() {
                    if let (None, Some(g), false) = (
                        &self.compat[i][p],
                        &self.gate[p],
                        self.placed_new[i].contains_key(&p),
                    ) {
                        verdicts.push(pb::PoolVerdict {
                            pool: pool.name.clone(),
                            fits: true,
                            reason: g.clone(),
                        });
                    }
                }
            }
            outcomes.push(pb::ClassOutcome {
                class_id: cluster.classes[pc.class].proto.id,
                count: pc.count as i32,
                placed_existing: self.placed_existing[i] as i32,
                placed_new: self.placed_new[i]
                    .iter()
                    .map(|(p, c)| (pools[*p].name.clone(), *c as i32))
                    .collect(),
                unplaced: self.remaining[i] as i32,
                verdicts,
            });
        }
        let mut actions = Vec::new();
        let mut reasons = Vec::new();
        for (p, pool) in pools.iter().enumerate() {
            if self.added[p] > 0 {
                let reason = format!(
                    "+{} node(s): {}",
                    self.added[p],
                    self.pool_reasons[p].join("; ")
                );
                reasons.push(format!("pool {}: {reason}", pool.name));
                actions.push((pool.name.clone(), self.added[p], reason));
            } else if !self.pool_reasons[p].is_empty() {
                reasons.push(format!(
                    "pool {}: {}",
                    pool.name,
                    self.pool_reasons[p].join("; ")
                ));
            } else if let Some(why) = &self.backoff[p]
                && self.compat.iter().any(|c| c[p].is_none())
            {
                // Said even when other pools took the pods: it is the pool's status.
                reasons.push(format!("pool {}: {why}", pool.name));
            }
        }
        let on_existing: i64 = self.placed_existing.iter().sum();
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
            pending_pods: self.pending_pods,
            helped_pods,
            batch_capped: self.batch_capped,
            oldest_helped_since,
            scaling: self.added.iter().map(|a| *a > 0).collect(),
            wanted,
            packing: self.packing,
        }
    }
}

/// Why a new node of pool `p` cannot host pods of `demand` (labels, taints, size), if it cannot.
fn new_node_misfit(cluster: &Cluster<'_>, demand: &PodDemand, p: usize) -> Option<String> {
    let pool = &cluster.pools[p];
    let template = &cluster.template[p];
    let misfit =
        constraint_misfit(demand, &template.labels, &template.taints, false).or_else(|| {
            (fit_count(&pool.capacity, &demand.requests) < 1).then(|| {
                shoal_core::fit::misfits(demand, template)
                    .first()
                    .cloned()
                    .unwrap_or(Misfit::Insufficient("cpu".into()))
            })
        })?;
    Some(describe_misfit(
        &misfit,
        demand,
        &pool.capacity,
        &template.labels,
        &template.taints,
    ))
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
