//! Scale-down and consolidation: a node is a candidate when its requests (and, if configured,
//! its measured usage) stay under the pool's thresholds for `unneededFor`, it is not permanent or
//! annotated `shoal.dev/scale-down-disabled` or do-not-disrupt, and every pod on it can be
//! evicted (no blocker — do-not-disrupt and safe-to-evict "false" included — and PDBs allow it)
//! and placed on the nodes that stay, in simulation. Empty nodes go first, in bulk; then nodes
//! with pods, one after another in the pool's order, each drained onto what remains (so several
//! half-empty nodes consolidate onto fewer), up to `maxConcurrent` per decision and the pool's
//! disruption budget (nodes already draining count), and only once the pool's pods have not
//! changed for `consolidateAfter`. Never below minNodes, never during a cooldown, never while
//! the pool grows or pending pods want it. Every candidate kept is explained.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
};

use shoal_core::{fit::constraint_misfit, pool::ScaleDownOrder};
use shoal_proto::v1 as pb;

use super::{
    Bin, BinKind, Cluster, History, PlanInput, from_ms, human, ms, node_cost,
    packing::{fit_count, take},
    rfc3339,
    scale_up::UpResult,
};

/// What scale-down decided.
pub(crate) struct DownResult {
    /// (pool, nodes, reason).
    pub actions: Vec<(String, Vec<String>, String)>,
    pub reasons: Vec<String>,
    /// One line on why nothing is removed, for "no action" decisions.
    pub summary: String,
    /// Replacement nodes to add: (pool, node replaced, why).
    pub replacements: Vec<(String, String, String)>,
}

/// How long a node waits for the replacement added for it before another is considered.
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A cheaper pool whose single new node holds every movable pod of `node` (labels, taints,
/// capacity), and why it is cheaper.
fn replacement(
    cluster: &Cluster<'_>,
    node: usize,
    p: usize,
    can_grow: &[bool],
    replacing: &HashMap<usize, u32>,
) -> Option<(usize, String)> {
    let n = &cluster.nodes[node];
    let own = node_cost(cluster.pools, p, p)?;
    (0..cluster.pools.len())
        .filter(|q| *q != p && can_grow[*q])
        .filter(|q| {
            let taken = replacing.get(q).copied().unwrap_or(0);
            cluster.live[*q] + cluster.in_flight[*q] + taken < cluster.bounds[*q].max
        })
        .filter(|q| {
            let template = &cluster.template[*q];
            let mut free = cluster.pools[*q].capacity.clone();
            n.pods.iter().all(|(c, count)| {
                let class = &cluster.classes[*c];
                if class.node_bound {
                    return true;
                }
                let fits =
                    constraint_misfit(&class.demand, &template.labels, &template.taints, false)
                        .is_none()
                        && fit_count(&free, &class.demand.requests) >= *count;
                take(&mut free, &class.demand.requests, *count);
                fits
            })
        })
        .filter_map(|q| node_cost(cluster.pools, p, q).map(|c| (q, c)))
        .filter(|(_, c)| *c < own - 1e-9)
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(q, c)| {
            let why = if cluster.pools[p].price > 0.0 {
                format!("its pods fit one node of price {c} < {own}")
            } else {
                format!(
                    "its pods fit one smaller node ({:.0}% of this pool's)",
                    c * 50.0
                )
            };
            (q, why)
        })
}

/// Candidates with pods one decision tries to drain per pool (a drain is simulated in full).
const CANDIDATES: usize = 200;

fn blocker_text(b: pb::EvictionBlocker) -> &'static str {
    use pb::EvictionBlocker as B;
    match b {
        B::LocalStorage => "it uses local storage (emptyDir or hostPath)",
        B::NotSafeToEvict => "it is annotated safe-to-evict: \"false\"",
        B::NoController => "no controller would re-create it",
        B::KubeSystem => "it runs in kube-system without a PodDisruptionBudget",
        B::Daemonset | B::Mirror => "it belongs to its node",
        B::Pdb => "its PodDisruptionBudget allows no disruption",
        B::DoNotDisrupt => "it is annotated do-not-disrupt",
        B::Unspecified => "unknown blocker",
    }
}

/// Requested share of the node: the larger of CPU and memory (0..1).
fn utilization(node: &super::Node<'_>) -> f64 {
    let frac = |used: i64, have: i64| {
        if have > 0 {
            used as f64 / have as f64
        } else {
            1.0
        }
    };
    let a = &node.facts.allocatable;
    let r = &node.facts.requested;
    frac(r.cpu_millis, a.cpu_millis).max(frac(r.memory_bytes, a.memory_bytes))
}

/// Why a candidate node stays.
enum Kept {
    /// A pod may not be evicted (blocker, PDB).
    Blocked(String),
    /// Its pods fit on no other node.
    NoRoom(String),
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Blocked(why) | Kept::NoRoom(why) => f.write_str(why),
        }
    }
}

/// Simulates evicting every movable pod of `node` onto other existing nodes; commits the
/// placement and the PDB budget on success, leaves everything as it was on failure.
fn try_drain(
    cluster: &Cluster<'_>,
    bins: &mut [Bin],
    node: usize,
    removed: &HashSet<usize>,
    receivers: &mut HashSet<usize>,
    pdb_left: &mut [i32],
) -> Result<i64, Kept> {
    let n = &cluster.nodes[node];
    let mut pdb_need: HashMap<usize, i32> = HashMap::new();
    for (c, count) in &n.pods {
        let class = &cluster.classes[*c];
        if class.node_bound {
            continue;
        }
        if let Some(b) = class.hard_blockers.first() {
            return Err(Kept::Blocked(format!(
                "pod(s) of {} cannot be evicted: {}",
                class.label,
                blocker_text(*b)
            )));
        }
        if let Some(pdb) = class.pdb {
            *pdb_need.entry(pdb).or_default() += *count as i32;
        }
    }
    for (pdb, need) in &pdb_need {
        let (ns, name, _) = &cluster.pdbs[*pdb];
        if pdb_left[*pdb] < *need {
            return Err(Kept::Blocked(format!(
                "PodDisruptionBudget {ns}/{name} allows {} disruption(s), {need} needed",
                pdb_left[*pdb].max(0)
            )));
        }
    }
    let mut saved: Vec<(usize, shoal_core::Resources)> = Vec::new();
    let mut targets: Vec<usize> = Vec::new();
    let mut moved = 0;
    for (c, count) in &n.pods {
        let class = &cluster.classes[*c];
        if class.node_bound {
            continue;
        }
        let mut left = *count;
        for (b, bin) in bins.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            let BinKind::Existing(other) = bin.kind else {
                continue;
            };
            if other == node || removed.contains(&other) {
                continue;
            }
            let k = fit_count(&bin.free, &class.demand.requests).min(left);
            if k == 0 {
                continue;
            }
            let facts = &cluster.nodes[other].facts;
            if constraint_misfit(
                &class.demand,
                &facts.labels,
                &facts.taints,
                facts.unschedulable,
            )
            .is_some()
            {
                continue;
            }
            if !saved.iter().any(|(i, _)| *i == b) {
                saved.push((b, bin.free.clone()));
                targets.push(other);
            }
            take(&mut bin.free, &class.demand.requests, k);
            left -= k;
        }
        if left > 0 {
            for (b, free) in saved {
                bins[b].free = free;
            }
            return Err(Kept::NoRoom(format!(
                "{left} pod(s) of {} would fit on no other node",
                class.label
            )));
        }
        moved += count;
    }
    for (pdb, need) in pdb_need {
        pdb_left[pdb] -= need;
    }
    receivers.extend(targets);
    Ok(moved)
}

pub(crate) fn plan(
    cluster: &Cluster<'_>,
    bins: &mut [Bin],
    up: &UpResult,
    input: &PlanInput<'_>,
    history: &mut History,
) -> DownResult {
    let now = cluster.now;
    let mut pdb_left: Vec<i32> = cluster.pdbs.iter().map(|(_, _, a)| *a).collect();
    let mut removed: HashSet<usize> = HashSet::new();
    // Nodes that take pods in this plan (pending pods placed by scale-up, pods moved off a
    // removed node) must stay.
    let mut receivers: HashSet<usize> = bins
        .iter()
        .filter_map(|b| match b.kind {
            BinKind::Existing(i) => {
                let n = &cluster.nodes[i];
                (b.free != n.facts.allocatable.saturating_sub(&n.facts.requested)).then_some(i)
            }
            _ => None,
        })
        .collect();
    let mut actions = Vec::new();
    let mut reasons = Vec::new();
    let mut under_total = 0;
    let mut longest_wait: Option<(std::time::Duration, std::time::Duration)> = None;
    let mut notes: Vec<String> = Vec::new();

    // Pools that may get a replacement node: not growing, not in a scale-up cooldown.
    let can_grow: Vec<bool> = cluster
        .pools
        .iter()
        .enumerate()
        .map(|(q, pool)| {
            let cooling = history
                .pools
                .get(&pool.name)
                .and_then(|h| h.last_scale_up_ms)
                .is_some_and(|t| from_ms(t) + pool.scale_up.cooldown > now);
            !up.scaling[q] && !cooling
        })
        .collect();
    let mut replacing: HashMap<usize, u32> = HashMap::new();
    let mut replaced: Vec<(usize, String, String)> = Vec::new();
    for (p, pool) in cluster.pools.iter().enumerate() {
        let policy = &pool.scale_down;
        let h = history.pools.entry(pool.name.clone()).or_default();
        // Which nodes are unneeded right now, and since when.
        let mut under: Vec<usize> = Vec::new();
        for (i, n) in cluster.nodes.iter().enumerate() {
            if n.pool != Some(p) || !n.ready || n.deleting || n.facts.unschedulable {
                continue;
            }
            let usage_ok = |threshold: f64, value: Option<f64>| {
                threshold <= 0.0 || value.is_some_and(|v| v * 100.0 < threshold)
            };
            let usage = n
                .info
                .usage
                .as_ref()
                .filter(|_| !input.snapshot.utilization_stale);
            if utilization(n) < policy.utilization_below
                && usage_ok(policy.cpu_below, usage.map(|u| u.cpu))
                && usage_ok(policy.memory_below, usage.map(|u| u.memory))
            {
                under.push(i);
            }
        }
        let names: HashSet<&str> = under
            .iter()
            .map(|i| cluster.nodes[*i].info.name.as_str())
            .collect();
        h.unneeded_since_ms
            .retain(|name, _| names.contains(name.as_str()));
        h.replacing.retain(|name, _| names.contains(name.as_str()));
        for name in &names {
            h.unneeded_since_ms
                .entry(name.to_string())
                .or_insert(ms(now));
        }
        under_total += under.len();
        // Which pods run on the pool's nodes: consolidateAfter waits for it to settle.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for n in cluster.nodes.iter().filter(|n| n.pool == Some(p)) {
            n.info.name.hash(&mut hasher);
            n.pods.hash(&mut hasher);
        }
        let fingerprint = hasher.finish();
        if h.pods_fingerprint != fingerprint || h.pods_changed_ms.is_none() {
            h.pods_fingerprint = fingerprint;
            h.pods_changed_ms = Some(ms(now));
        }
        let settled_for = h
            .pods_changed_ms
            .map(|t| now.duration_since(from_ms(t)).unwrap_or_default())
            .unwrap_or_default();
        if !policy.enabled || under.is_empty() {
            continue;
        }
        if up.scaling[p] {
            notes.push(format!("pool {}: growing in this decision", pool.name));
            continue;
        }
        if up.wanted[p] {
            notes.push(format!(
                "pool {}: pending pods could use its nodes",
                pool.name
            ));
            continue;
        }
        let last = h
            .last_scale_up_ms
            .into_iter()
            .chain(h.last_scale_down_ms)
            .max();
        if let Some(last) = last {
            let until = from_ms(last) + policy.cooldown;
            if until > now {
                notes.push(format!(
                    "pool {}: scale-down cooldown until {}",
                    pool.name,
                    rfc3339(until)
                ));
                continue;
            }
        }
        let mut eligible: Vec<usize> = Vec::new();
        for i in &under {
            let n = &cluster.nodes[*i];
            let since = h
                .unneeded_since_ms
                .get(&n.info.name)
                .map_or(now, |ms| from_ms(*ms));
            let waited = now.duration_since(since).unwrap_or_default();
            if pool.is_permanent(&n.info.name)
                || n.info.scale_down_disabled
                || receivers.contains(i)
            {
                continue;
            }
            if waited < policy.unneeded_for {
                if longest_wait.is_none_or(|(w, _)| waited > w) {
                    longest_wait = Some((waited, policy.unneeded_for));
                }
                continue;
            }
            eligible.push(*i);
        }
        if eligible.is_empty() {
            continue;
        }
        let live = cluster.live[p] + cluster.in_flight[p];
        let mut budget = live.saturating_sub(cluster.bounds[p].min) as usize;
        if budget == 0 {
            notes.push(format!(
                "pool {}: at minNodes {}",
                pool.name, cluster.bounds[p].min
            ));
            continue;
        }
        match policy.order {
            ScaleDownOrder::Lifo => eligible.sort_by(|a, b| {
                cluster.nodes[*b]
                    .created_ms
                    .cmp(&cluster.nodes[*a].created_ms)
                    .then(
                        cluster.nodes[*b]
                            .info
                            .name
                            .cmp(&cluster.nodes[*a].info.name),
                    )
            }),
            ScaleDownOrder::LeastUtilized => eligible.sort_by(|a, b| {
                utilization(&cluster.nodes[*a])
                    .total_cmp(&utilization(&cluster.nodes[*b]))
                    .then(
                        cluster.nodes[*a]
                            .info
                            .name
                            .cmp(&cluster.nodes[*b].info.name),
                    )
            }),
        }
        let mut slots = policy.max_concurrent as usize;
        let draining = cluster
            .nodes
            .iter()
            .filter(|n| n.pool == Some(p) && n.deleting)
            .count() as u32;
        if let Some((allowed, which)) = policy.disruption_allowed(cluster.live[p] + draining, now) {
            let left = allowed.saturating_sub(draining) as usize;
            if left < slots {
                slots = left;
                if slots == 0 {
                    notes.push(format!(
                        "pool {}: disruption budget {which} used ({draining} node(s) draining)",
                        pool.name,
                    ));
                    continue;
                }
            }
        }
        let empty = |i: &usize| {
            cluster.nodes[*i]
                .pods
                .iter()
                .all(|(c, _)| cluster.classes[*c].node_bound)
        };
        // Empty nodes, in bulk.
        let empties: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(empty)
            .take(slots.min(budget))
            .collect();
        let mut chosen: Vec<String> = Vec::new();
        for i in &empties {
            removed.insert(*i);
            chosen.push(cluster.nodes[*i].info.name.clone());
        }
        slots -= empties.len();
        budget -= empties.len();
        let mut reason_parts = Vec::new();
        if !empties.is_empty() {
            reason_parts.push(format!(
                "{} empty node(s) unneeded for {} (requests < {:.0}%)",
                empties.len(),
                human(policy.unneeded_for),
                policy.utilization_below * 100.0
            ));
        }
        // Then nodes with pods, each drained onto the nodes that stay, while slots last.
        let with_pods: Vec<usize> = eligible.iter().copied().filter(|i| !empty(i)).collect();
        if slots > 0 && budget > 0 && !with_pods.is_empty() {
            if settled_for < policy.consolidate_after {
                notes.push(format!(
                    "pool {}: pods changed {} ago, consolidateAfter {}",
                    pool.name,
                    human(settled_for),
                    human(policy.consolidate_after)
                ));
            } else {
                let mut blocked: Vec<String> = Vec::new();
                let mut no_room: Vec<usize> = Vec::new();
                for i in with_pods.iter().take(CANDIDATES) {
                    if slots == 0 || budget == 0 {
                        break;
                    }
                    if receivers.contains(i) {
                        blocked.push(format!(
                            "{}: takes pods moved off another node",
                            cluster.nodes[*i].info.name
                        ));
                        continue;
                    }
                    match try_drain(cluster, bins, *i, &removed, &mut receivers, &mut pdb_left) {
                        Ok(moved) => {
                            removed.insert(*i);
                            // Its room is gone for the next drains.
                            for bin in bins.iter_mut() {
                                if bin.kind == BinKind::Existing(*i) {
                                    bin.free = shoal_core::Resources::default();
                                }
                            }
                            slots -= 1;
                            budget -= 1;
                            let n = &cluster.nodes[*i];
                            chosen.push(n.info.name.clone());
                            reason_parts.push(format!(
                                "{} unneeded for {} (requests {:.0}% < {:.0}%); its {moved} pod(s) fit on other nodes",
                                n.info.name,
                                human(policy.unneeded_for),
                                utilization(n) * 100.0,
                                policy.utilization_below * 100.0
                            ));
                        }
                        Err(why) => {
                            if matches!(why, Kept::NoRoom(_)) {
                                no_room.push(*i);
                            }
                            blocked.push(format!("{}: {why}", cluster.nodes[*i].info.name));
                        }
                    }
                }
                // A node whose pods fit nowhere else may still fit one cheaper node of another
                // pool: add that node; once it is Ready the node drains onto it.
                if slots > 0 && budget > 0 {
                    for i in &no_room {
                        let name = &cluster.nodes[*i].info.name;
                        if h.replacing.get(name).is_some_and(|t| {
                            now.duration_since(from_ms(*t)).unwrap_or_default() < REPLACE_WAIT
                        }) {
                            notes.push(format!(
                                "pool {}: {name} waits for its replacement",
                                pool.name
                            ));
                            break;
                        }
                        if let Some((q, why)) = replacement(cluster, *i, p, &can_grow, &replacing) {
                            *replacing.entry(q).or_default() += 1;
                            h.replacing.insert(name.clone(), ms(now));
                            notes.push(format!(
                                "pool {}: {name} is to be replaced by a node of pool {}: {why}",
                                pool.name, cluster.pools[q].name
                            ));
                            replaced.push((q, name.clone(), why));
                            break;
                        }
                    }
                }
                if !blocked.is_empty() {
                    let more = blocked.len().saturating_sub(5);
                    blocked.truncate(5);
                    notes.push(format!(
                        "pool {}: kept {}{}",
                        pool.name,
                        blocked.join("; "),
                        if more > 0 {
                            format!(" (and {more} more)")
                        } else {
                            String::new()
                        }
                    ));
                }
            }
        }
        if chosen.is_empty() {
            continue;
        }
        // Bins of removed nodes take nothing more.
        for bin in bins.iter_mut() {
            if let BinKind::Existing(i) = bin.kind
                && removed.contains(&i)
            {
                bin.free = shoal_core::Resources::default();
            }
        }
        let reason = format!("-{} node(s): {}", chosen.len(), reason_parts.join("; "));
        reasons.push(format!(
            "pool {}: {reason} ({})",
            pool.name,
            chosen.join(", ")
        ));
        actions.push((pool.name.clone(), chosen, reason));
    }
    reasons.extend(notes.iter().cloned());
    let summary = if under_total == 0 {
        "no node is under its scale-down thresholds".to_string()
    } else if let Some((waited, needed)) = longest_wait
        && actions.is_empty()
        && notes.is_empty()
    {
        format!(
            "{under_total} node(s) under the scale-down thresholds, none unneeded long enough (longest {} of {})",
            human(waited),
            human(needed)
        )
    } else if notes.is_empty() {
        format!("{under_total} node(s) under the scale-down thresholds, none removable")
    } else {
        notes.join("; ")
    };
    DownResult {
        actions,
        reasons,
        summary,
        replacements: replaced
            .into_iter()
            .map(|(q, node, why)| (cluster.pools[q].name.clone(), node, why))
            .collect(),
    }
}
