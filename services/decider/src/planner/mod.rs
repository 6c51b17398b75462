//! The planner: a pure function of (snapshot, pools, in-flight claims, history, now) to a
//! decision, with no I/O. It places pending pods on existing capacity and in-flight nodes as
//! the scheduler would (sharing its fit rules), bin-packs the rest onto new nodes of the pools
//! that can host them (chosen by the expander chain), applies the seed systems' threshold and
//! min-node rules, and removes unneeded nodes whose pods can all be placed elsewhere. Every
//! decision says why — including why nothing happens.

pub mod bookings;
pub mod expander;
pub mod packing;
mod scale_down;
mod scale_up;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use shoal_core::{
    ClaimPhase, Resources,
    claim::NodeClaim,
    fit::{NodeFacts, PodDemand},
    pool::{Bounds, Pool},
    snapshot,
};
use shoal_proto::v1 as pb;

pub use bookings::{Bookings, Reservation};
pub use expander::Expander;

/// How long after its claim turned Ready a node the snapshot does not show usable still counts
/// as coming (the snapshot and the scheduler catch up within seconds).
pub const SETTLE_MS: u64 = 60_000;

/// What a pool's decisions so far mean for the next one. Pure data: the planner reads one and
/// returns the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolHistory {
    /// Last executed scale-up (Unix ms).
    #[serde(default)]
    pub last_scale_up_ms: Option<u64>,
    /// Last executed scale-down (Unix ms).
    #[serde(default)]
    pub last_scale_down_ms: Option<u64>,
    /// Since when each node has been unneeded (Unix ms).
    #[serde(default)]
    pub unneeded_since_ms: BTreeMap<String, u64>,
    /// Since when average CPU has been above `scaleUp.cpuAbove` (Unix ms).
    #[serde(default)]
    pub cpu_above_since_ms: Option<u64>,
    /// Since when average memory has been above `scaleUp.memoryAbove` (Unix ms).
    #[serde(default)]
    pub memory_above_since_ms: Option<u64>,
    /// A fingerprint of which pods run on the pool's nodes (for `consolidateAfter`).
    #[serde(default)]
    pub pods_fingerprint: u64,
    /// When the fingerprint last changed (Unix ms).
    #[serde(default)]
    pub pods_changed_ms: Option<u64>,
    /// Nodes of the pool a cheaper node was added to replace, and when (Unix ms).
    #[serde(default)]
    pub replacing: BTreeMap<String, u64>,
}

/// Per-pool history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    /// By pool name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolHistory>,
}

impl History {
    /// Records that `decision`'s actions were carried out at `now` (starting cooldowns).
    pub fn record_executed(&mut self, decision: &pb::Decision, now: SystemTime) {
        let now = ms(now);
        for action in &decision.actions {
            match &action.action {
                Some(pb::scale_action::Action::ScaleUp(up)) => {
                    self.pools
                        .entry(up.pool.clone())
                        .or_default()
                        .last_scale_up_ms = Some(now);
                }
                Some(pb::scale_action::Action::ScaleDown(down)) => {
                    let pool = self.pools.entry(down.pool.clone()).or_default();
                    pool.last_scale_down_ms = Some(now);
                    for node in &down.nodes {
                        pool.unneeded_since_ms.remove(node);
                    }
                }
                None => {}
            }
        }
    }
}

/// Everything a plan depends on.
pub struct PlanInput<'a> {
    /// The cluster.
    pub snapshot: &'a pb::ClusterSnapshot,
    /// Valid pools.
    pub pools: &'a [Pool],
    /// NodeClaims in the store (any phase).
    pub claims: &'a [NodeClaim],
    /// What earlier decisions did.
    pub history: &'a History,
    /// The planning time.
    pub now: SystemTime,
    /// The expander chain.
    pub expanders: &'a [Expander],
    /// Seed of the random expander and the packer.
    pub seed: u64,
    /// Time this decision may spend improving packings beyond first-fit decreasing.
    pub packing_budget: Duration,
    /// How long a pool waits after launches that failed before it grows again.
    pub backoff: Backoff,
    /// Capacity booked by capacity requests, and whether this plan answers one.
    pub bookings: Bookings<'a>,
}

/// A pool whose launches failed (the backend refused, or nodes never got Ready) does not grow
/// again for `initial`, doubled for each further failed scale-up in a row, at most `max` — as
/// Cluster Autoscaler backs off node groups. A node of the pool turning Ready ends the streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// After the first failed scale-up.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// The longest wait.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(30 * 60),
        }
    }
}

impl Backoff {
    /// Why pool `pool` may not grow at `now`, if its recent launches failed: the failed
    /// scale-ups (operations) since a node of the pool last turned Ready, the wait they earn,
    /// and the last failure's reason.
    pub fn holds(&self, pool: &str, claims: &[NodeClaim], now: SystemTime) -> Option<String> {
        let now_ms = ms(now);
        let at = |c: &NodeClaim, phase: ClaimPhase| {
            c.history
                .iter()
                .filter(|t| t.phase == phase)
                .map(|t| t.at_ms)
                .max()
        };
        let mut last_ready = 0;
        let mut failed: Vec<(u64, &NodeClaim)> = Vec::new();
        for c in claims.iter().filter(|c| c.pool == pool) {
            let ready = at(c, ClaimPhase::Ready);
            if let Some(r) = ready {
                last_ready = last_ready.max(r);
            }
            if c.phase == ClaimPhase::Failed && ready.is_none() {
                failed.push((at(c, ClaimPhase::Failed).unwrap_or(c.updated_at_ms), c));
            }
        }
        failed.retain(|(t, _)| *t > last_ready);
        let (latest, last) = failed.iter().max_by_key(|(t, _)| *t)?;
        let streak = failed
            .iter()
            .map(|(_, c)| c.operation_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u32;
        let wait = self
            .initial
            .saturating_mul(1u32 << streak.saturating_sub(1).min(20))
            .min(self.max);
        let until = from_ms(*latest) + wait;
        (until > from_ms(now_ms)).then(|| {
            format!(
                "backing off after {streak} failed scale-up(s) until {}: {}",
                rfc3339(until),
                last.failure_reason
            )
        })
    }
}

/// A plan: the decision and the history after it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Actions, reasons and per-class outcomes (id, time and duration are the caller's).
    pub decision: pb::Decision,
    /// History with this plan's observations (unneeded nodes, thresholds). Cooldowns start only
    /// when the caller records the decision as executed.
    pub history: History,
    /// A pool's scale-up stopped at its `batchSize`: plan again once these nodes are claimed.
    pub batch_capped: bool,
    /// When the oldest pending pod this plan helps became unschedulable.
    pub oldest_helped_since: Option<SystemTime>,
    /// Bookings that no longer fit the cluster: capacity request id → pods without room.
    pub bookings_short: BTreeMap<String, i64>,
}

/// What a node of pool `q` costs, comparably with one of pool `p`: its price when both pools
/// have one; when neither has, its size as a multiple of `p`'s node (CPU share + memory share,
/// so `p` itself costs 2): the smaller node wastes less. `None` when only one has a price.
pub(crate) fn node_cost(pools: &[Pool], p: usize, q: usize) -> Option<f64> {
    let (a, b) = (&pools[p], &pools[q]);
    let share = |x: i64, y: i64| if y > 0 { x as f64 / y as f64 } else { 0.0 };
    match (a.price > 0.0, b.price > 0.0) {
        (true, true) => Some(b.price),
        (false, false) => Some(
            share(b.capacity.cpu_millis, a.capacity.cpu_millis)
                + share(b.capacity.memory_bytes, a.capacity.memory_bytes),
        ),
        _ => None,
    }
}

pub(crate) fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// A pod class as the planner sees it.
pub(crate) struct Class<'a> {
    pub proto: &'a pb::PodClass,
    pub demand: PodDemand,
    /// Blockers that forbid moving the pod (anything but DaemonSet, mirror and PDB).
    pub hard_blockers: Vec<pb::EvictionBlocker>,
    /// Dies with its node (DaemonSet or mirror pod): never moved, never in the way.
    pub node_bound: bool,
    /// Index into `Cluster::pdbs`.
    pub pdb: Option<usize>,
    /// `namespace/owner` for reasons.
    pub label: String,
}

/// A snapshot node as the planner sees it.
pub(crate) struct Node<'a> {
    pub info: &'a pb::NodeInfo,
    pub facts: NodeFacts,
    /// Index into the pools, when a known pool manages it.
    pub pool: Option<usize>,
    pub ready: bool,
    /// A claim of it is Draining or Terminating.
    pub deleting: bool,
    pub created_ms: u64,
    /// (class index, count).
    pub pods: Vec<(usize, i64)>,
}

/// Where pods can go during the plan: free capacity of an existing node or of a template node
/// (in flight, or added by this plan).
#[derive(Clone)]
pub(crate) struct Bin {
    pub free: Resources,
    pub kind: BinKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinKind {
    /// Snapshot node (index).
    Existing(usize),
    /// A node in flight (claimed, not yet in the snapshot) of a pool.
    InFlight(usize),
    /// A node this plan adds to a pool (min enforcement).
    New(usize),
}

/// The indexed input.
pub(crate) struct Cluster<'a> {
    pub pools: &'a [Pool],
    pub bounds: Vec<Bounds>,
    pub classes: Vec<Class<'a>>,
    pub class_index: HashMap<u64, usize>,
    pub nodes: Vec<Node<'a>>,
    /// Nodes per pool that exist and are not being deleted.
    pub live: Vec<u32>,
    /// Claimed nodes per pool that are not in the snapshot yet.
    pub in_flight: Vec<u32>,
    /// (namespace, name, disruptions allowed).
    pub pdbs: Vec<(String, String, i32)>,
    pub template: Vec<NodeFacts>,
    pub now: SystemTime,
}

impl<'a> Cluster<'a> {
    fn build(input: &PlanInput<'a>) -> Cluster<'a> {
        let pool_index: HashMap<&str, usize> = input
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let pdbs: Vec<(String, String, i32)> = input
            .snapshot
            .pdbs
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone(), p.disruptions_allowed))
            .collect();
        let pdb_index: HashMap<(&str, &str), usize> = pdbs
            .iter()
            .enumerate()
            .map(|(i, (ns, name, _))| ((ns.as_str(), name.as_str()), i))
            .collect();
        let mut class_index = HashMap::with_capacity(input.snapshot.classes.len());
        let classes: Vec<Class<'a>> = input
            .snapshot
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                class_index.insert(c.id, i);
                use pb::EvictionBlocker as B;
                let blockers: Vec<B> = c
                    .blockers
                    .iter()
                    .filter_map(|b| B::try_from(*b).ok())
                    .collect();
                let node_bound = blockers
                    .iter()
                    .any(|b| matches!(b, B::Daemonset | B::Mirror));
                let hard_blockers = blockers
                    .into_iter()
                    .filter(|b| !matches!(b, B::Daemonset | B::Mirror | B::Pdb | B::Unspecified))
                    .collect();
                let owner = c
                    .owner
                    .as_ref()
                    .map_or_else(|| "(no owner)".to_string(), |o| o.name.clone());
                Class {
                    proto: c,
                    demand: snapshot::pod_demand(c),
                    hard_blockers,
                    node_bound,
                    pdb: (!c.pdb.is_empty())
                        .then(|| {
                            pdb_index
                                .get(&(c.namespace.as_str(), c.pdb.as_str()))
                                .copied()
                        })
                        .flatten(),
                    label: format!("{}/{owner}", c.namespace),
                }
            })
            .collect();
        // Claims: which nodes are going away, which are still coming. A node is still coming
        // from its claim's creation until the snapshot shows it usable (Ready, startup taints
        // gone): until then its claim counts as in flight (template capacity), so neither a
        // stale snapshot nor a scheduler that has not bound the pods yet makes the planner ask
        // twice. A node that stays unusable long after its claim turned Ready is a broken
        // node, not a coming one (the reconciler deals with it).
        let now_ms = ms(input.now);
        let snapshot_nodes: HashMap<&str, &pb::NodeInfo> = input
            .snapshot
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n))
            .collect();
        let usable = |claim: &NodeClaim, node: &pb::NodeInfo| {
            let startup: Vec<&str> = pool_index
                .get(claim.pool.as_str())
                .map(|p| {
                    input.pools[*p]
                        .startup_taints
                        .iter()
                        .map(|t| t.key.as_str())
                        .collect()
                })
                .unwrap_or_default();
            node.readiness == pb::NodeReadiness::Ready as i32
                && !node
                    .taints
                    .iter()
                    .any(|t| startup.contains(&t.key.as_str()))
        };
        let mut deleting_nodes: std::collections::HashSet<&str> = Default::default();
        let mut in_flight = vec![0u32; input.pools.len()];
        let mut coming_nodes: std::collections::HashSet<&str> = Default::default();
        for claim in input.claims {
            let coming = match claim.phase {
                ClaimPhase::Draining | ClaimPhase::Terminating => {
                    deleting_nodes.insert(claim.node_name.as_str());
                    false
                }
                ClaimPhase::Pending | ClaimPhase::Launched | ClaimPhase::Registered => true,
                ClaimPhase::Ready => match snapshot_nodes.get(claim.node_name.as_str()) {
                    None => true,
                    Some(node) => {
                        !usable(claim, node)
                            && now_ms.saturating_sub(claim.phase_since_ms()) < SETTLE_MS
                    }
                },
                _ => false,
            };
            if coming {
                coming_nodes.insert(claim.node_name.as_str());
                if let Some(p) = pool_index.get(claim.pool.as_str()) {
                    in_flight[*p] += 1;
                }
            }
        }
        let mut live = vec![0u32; input.pools.len()];
        let nodes: Vec<Node<'a>> = input
            .snapshot
            .nodes
            .iter()
            .map(|info| {
                let pool = pool_index.get(info.pool.as_str()).copied();
                let deleting = deleting_nodes.contains(info.name.as_str());
                let coming = coming_nodes.contains(info.name.as_str());
                if let (Some(p), false, false) = (pool, deleting, coming) {
                    live[p] += 1;
                }
                Node {
                    info,
                    facts: snapshot::node_facts(info),
                    pool,
                    // A node still coming up hosts nothing yet: its claim is in flight instead.
                    ready: info.readiness == pb::NodeReadiness::Ready as i32 && !coming,
                    deleting,
                    created_ms: info
                        .created_at
                        .as_ref()
                        .map_or(0, |t| ms(snapshot::system_time(t))),
                    pods: info
                        .pods
                        .iter()
                        .filter_map(|c| Some((*class_index.get(&c.class_id)?, c.count as i64)))
                        .collect(),
                }
            })
            .collect();
        Cluster {
            pools: input.pools,
            bounds: input.pools.iter().map(|p| p.bounds(input.now)).collect(),
            template: input.pools.iter().map(Pool::template_node).collect(),
            classes,
            class_index,
            nodes,
            live,
            in_flight,
            pdbs,
            now: input.now,
        }
    }

    /// Bins for placement: schedulable existing nodes, then in-flight template nodes.
    fn bins(&self) -> Vec<Bin> {
        let mut bins: Vec<Bin> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.ready && !n.deleting && !n.facts.unschedulable)
            .map(|(i, n)| Bin {
                free: n.facts.allocatable.saturating_sub(&n.facts.requested),
                kind: BinKind::Existing(i),
            })
            .collect();
        for (p, count) in self.in_flight.iter().enumerate() {
            for _ in 0..*count {
                bins.push(Bin {
                    free: self.pools[p].capacity.clone(),
                    kind: BinKind::InFlight(p),
                });
            }
        }
        bins
    }

    /// The labels, taints and cordon state of a bin.
    pub fn bin_facts(&self, kind: BinKind) -> &NodeFacts {
        match kind {
            BinKind::Existing(i) => &self.nodes[i].facts,
            BinKind::InFlight(p) | BinKind::New(p) => &self.template[p],
        }
    }
}

/// Plans one decision.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let cluster = Cluster::build(input);
    let mut history = input.history.clone();
    // Forget pools that no longer exist.
    history
        .pools
        .retain(|name, _| input.pools.iter().any(|p| &p.name == name));
    let mut bins = cluster.bins();
    // Booked capacity first: pending pods cannot take it, and the nodes holding it stay.
    let bookings_short = bookings::reserve(&cluster, &mut bins, input.bookings.reserved);
    let up = scale_up::plan(&cluster, &mut bins, input, &mut history);
    let down = scale_down::plan(&cluster, &mut bins, &up, input, &mut history);

    let mut actions = Vec::new();
    let mut reasons = up.reasons.clone();
    for (pool, count, reason) in &up.actions {
        actions.push(pb::ScaleAction {
            action: Some(pb::scale_action::Action::ScaleUp(pb::ScaleUp {
                pool: pool.clone(),
                count: *count as i32,
                reason: reason.clone(),
                packing: up.packing.get(pool).cloned(),
            })),
        });
    }
    // Replacement nodes join their pool's scale-up (one action per pool and decision).
    for (pool, node, why) in &down.replacements {
        let text = format!("replaces node {node}: {why}");
        let existing = actions.iter_mut().find_map(|a| match &mut a.action {
            Some(pb::scale_action::Action::ScaleUp(u)) if &u.pool == pool => Some(u),
            _ => None,
        });
        match existing {
            Some(u) => {
                u.count += 1;
                u.reason.push_str(&format!("; +1 node: {text}"));
            }
            None => actions.push(pb::ScaleAction {
                action: Some(pb::scale_action::Action::ScaleUp(pb::ScaleUp {
                    pool: pool.clone(),
                    count: 1,
                    reason: format!("+1 node(s): {text}"),
                    packing: None,
                })),
            }),
        }
        reasons.push(format!("pool {pool}: +1 node: {text}"));
    }
    for (pool, nodes, reason) in &down.actions {
        actions.push(pb::ScaleAction {
            action: Some(pb::scale_action::Action::ScaleDown(pb::ScaleDown {
                pool: pool.clone(),
                nodes: nodes.clone(),
                reason: reason.clone(),
            })),
        });
    }
    reasons.extend(down.reasons);
    if !input.bookings.reserved.is_empty() {
        let booked: i64 = input
            .bookings
            .reserved
            .iter()
            .flat_map(|r| r.pods.iter().map(|(_, n)| *n))
            .sum();
        reasons.push(format!(
            "{booked} pod(s) of {} capacity request(s) have booked room",
            input.bookings.reserved.len()
        ));
    }
    let consuming: i64 = input
        .snapshot
        .pending
        .iter()
        .filter(|p| input.bookings.consumes(p.class_id))
        .map(|p| i64::from(p.count))
        .sum();
    if consuming > 0 {
        reasons.push(format!(
            "{consuming} pending pod(s) consume booked capacity: not planned again"
        ));
    }
    for (id, short) in &bookings_short {
        reasons.push(format!(
            "capacity request {id}: {short} booked pod(s) no longer fit the cluster"
        ));
    }
    if actions.is_empty() {
        let mut why = vec!["no action".to_string()];
        if up.pending_pods == 0 {
            why.push("no pending pods".into());
        } else if up.helped_pods == 0 {
            why.push(format!(
                "{} pending pod(s) need no new node or cannot be helped (see outcomes)",
                up.pending_pods
            ));
        }
        why.push(down.summary.clone());
        reasons.insert(0, why.join("; "));
    }
    Plan {
        decision: pb::Decision {
            id: String::new(),
            created_at: Some(snapshot::timestamp(input.now)),
            snapshot_sequence: input.snapshot.sequence,
            actions,
            reasons,
            outcomes: up.outcomes,
            dry_run: false,
            plan_duration: None,
            trace_id: String::new(),
        },
        history,
        batch_capped: up.batch_capped,
        oldest_helped_since: up.oldest_helped_since,
        bookings_short,
    }
}

#[cfg(test)]
mod tests;
