//! The simulated kube-scheduler: binds pending pods to nodes using the real scheduler's filters
//! (`shoal_core::fit`) and least-allocated scoring, and marks pods that fit nowhere
//! `PodScheduled=False, reason=Unschedulable` with the scheduler's message.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};
use shoal_core::{
    Resources,
    fit::{Misfit, NodeFacts, PodDemand, misfits, nodes_to_find, unschedulable_message_counted},
};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use shoal_kube::convert::{node_facts, pod_demand};

use crate::{
    resources::{ResourceKind, by_kind},
    store::{Change, EventType, Store, Stored},
};

fn kinds() -> Option<(&'static ResourceKind, &'static ResourceKind)> {
    Some((by_kind("Node")?, by_kind("Pod")?))
}

#[derive(Default)]
struct Cache {
    /// Nodes (their facts carry `requested`, kept current as pods bind and go).
    nodes: Vec<(String, NodeFacts)>,
    index: HashMap<String, usize>,
    /// (namespace, name) → (node, requests) of pods that occupy a node.
    bound: HashMap<(String, String), (String, Resources)>,
    /// Requests of bound pods per node, also for nodes not seen yet.
    requested: HashMap<String, Resources>,
    /// (namespace, name) → (demand, message last written).
    pending: BTreeMap<(String, String), (PodDemand, Option<String>)>,
    /// When each pending pod's condition was last rewritten and how often: like
    /// kube-scheduler's per-pod backoff (1 s doubling to 10 s), a pod that stays unschedulable
    /// is not rewritten on every pass while nodes come and go.
    written: HashMap<(String, String), (tokio::time::Instant, u32)>,
    /// Where the next node search starts (rotates, as in kube-scheduler).
    next_start: usize,
    /// When a rewrite held back by the backoff is due: a pass then writes the current message
    /// even if nothing else changes (kube-scheduler retries a pod once its backoff ends).
    retry_at: Option<tokio::time::Instant>,
}

impl Cache {
    fn occupy(&mut self, node: &str, requests: &Resources, add: bool) {
        let tally = self.requested.entry(node.to_string()).or_default();
        *tally = if add {
            tally.saturating_add(requests)
        } else {
            tally.saturating_sub(requests)
        };
        let tally = tally.clone();
        if let Some(i) = self.index.get(node) {
            self.nodes[*i].1.requested = tally;
        }
    }

    fn remove_node(&mut self, name: &str) {
        if let Some(i) = self.index.remove(name) {
            self.nodes.swap_remove(i);
            if let Some((moved, _)) = self.nodes.get(i) {
                self.index.insert(moved.clone(), i);
            }
        }
    }

    /// Applies a change; true when it can change where pods go (a node's facts, a pod that
    /// needs a place, or capacity freed or taken) — not heartbeats or status updates.
    fn apply(&mut self, plural: &str, kind: EventType, object: &Stored) -> bool {
        let key = (object.namespace.clone(), object.name.clone());
        match plural {
            "nodes" if kind == EventType::Deleted => {
                self.remove_node(&object.name);
                true
            }
            "nodes" => {
                let Ok(node) = serde_json::from_slice::<Node>(&object.json) else {
                    return false;
                };
                let mut facts = node_facts(&node);
                facts.requested = self
                    .requested
                    .get(&object.name)
                    .cloned()
                    .unwrap_or_default();
                match self.index.get(&object.name) {
                    Some(i) if self.nodes[*i].1 == facts => false,
                    Some(i) => {
                        self.nodes[*i].1 = facts;
                        true
                    }
                    None => {
                        self.index.insert(object.name.clone(), self.nodes.len());
                        self.nodes.push((object.name.clone(), facts));
                        true
                    }
                }
            }
            "pods" => {
                let was_bound = self.bound.remove(&key);
                let was_pending = self.pending.remove(&key);
                if kind == EventType::Deleted {
                    self.written.remove(&key);
                }
                if let Some((node, requests)) = &was_bound {
                    self.occupy(node, requests, false);
                }
                let now = if kind == EventType::Deleted {
                    None
                } else {
                    serde_json::from_slice::<Pod>(&object.json)
                        .ok()
                        .and_then(|pod| placement(&pod))
                };
                let relevant = match &now {
                    None => was_bound.is_some() || was_pending.is_some(),
                    Some(Placement::Bound(node, requests)) => {
                        was_bound.as_ref() != Some(&(node.clone(), requests.clone()))
                    }
                    Some(Placement::Pending(demand, _)) => {
                        was_pending.as_ref().is_none_or(|(d, _)| d != demand)
                    }
                };
                match now {
                    Some(Placement::Bound(node, requests)) => {
                        self.occupy(&node, &requests, true);
                        self.bound.insert(key, (node, requests));
                    }
                    Some(Placement::Pending(demand, message)) => {
                        self.pending.insert(key, (demand, message));
                    }
                    None => {}
                }
                relevant
            }
            _ => false,
        }
    }

    /// One scheduling pass over every pending pod. Pods alike (same demand) share one scan of
    /// the nodes for the ones they could fit (kube-scheduler's equivalence classes); each pod
    /// then looks at up to [`nodes_to_find`] of those still fitting (starting where the previous
    /// pod stopped, as kube-scheduler does) and takes the least allocated. A class that fits
    /// nowhere gets the scheduler's message once.
    fn schedule(&mut self, store: &Store, pods: &'static ResourceKind) {
        self.retry_at = None;
        if self.pending.is_empty() {
            return;
        }
        let to_find = nodes_to_find(self.nodes.len()).max(1);
        let mut classes: HashMap<PodDemand, Vec<Waiting>> = HashMap::new();
        for (key, (demand, message)) in &self.pending {
            classes
                .entry(demand.clone())
                .or_default()
                .push((key.clone(), message.clone()));
        }
        for (demand, members) in classes {
            // The nodes this class fits, in search order from where the last search stopped.
            let start = self.next_start % self.nodes.len().max(1);
            let mut reasons = Reasons::default();
            let mut feasible: Vec<usize> = Vec::new();
            for k in 0..self.nodes.len() {
                let i = (start + k) % self.nodes.len();
                let misfit = misfits(&demand, &self.nodes[i].1);
                if misfit.is_empty() {
                    feasible.push(i);
                } else {
                    reasons.add(misfit);
                }
            }
            let mut cursor = 0;
            let mut unplaced = Vec::new();
            for ((namespace, name), last_message) in members {
                match self.pick(&demand, &mut feasible, &mut cursor, to_find, &mut reasons) {
                    Some(i) => {
                        if !self.bind(store, pods, &namespace, &name, i, &demand) {
                            unplaced.push(((namespace, name), last_message));
                        }
                    }
                    None => unplaced.push(((namespace, name), last_message)),
                }
            }
            self.next_start = (start + cursor.max(1)) % self.nodes.len().max(1);
            if unplaced.is_empty() {
                continue;
            }
            let message = unschedulable_message_counted(
                reasons.nodes,
                reasons.counts.iter().map(|(m, n)| (m, *n)),
            );
            let now = tokio::time::Instant::now();
            for ((namespace, name), last_message) in unplaced {
                if last_message.as_deref() == Some(message.as_str()) {
                    continue;
                }
                let key = (namespace.clone(), name.clone());
                if last_message.is_some()
                    && let Some((at, writes)) = self.written.get(&key)
                    && now < *at + rewrite_backoff(*writes)
                {
                    let due = *at + rewrite_backoff(*writes);
                    self.retry_at = Some(self.retry_at.map_or(due, |r| r.min(due)));
                    continue;
                }
                let writes = self.written.get(&key).map_or(0, |w| w.1) + 1;
                self.written.insert(key, (now, writes));
                let written = store.modify(pods, &namespace, &name, true, |pod| {
                    set_scheduled(pod, "False", Some("Unschedulable"), Some(&message))
                });
                if let Ok(Some(pod)) = &written {
                    crate::events::record(
                        store,
                        &pod.value(),
                        "Warning",
                        "FailedScheduling",
                        &message,
                        "default-scheduler",
                    );
                }
                if written.is_ok()
                    && let Some(entry) = self.pending.get_mut(&(namespace, name))
                {
                    entry.1 = Some(message.clone());
                }
            }
        }
    }

    /// The least allocated of up to `to_find` nodes of `feasible` that still fit `demand`,
    /// starting at `cursor`; nodes that stopped fitting (filled by earlier pods of the class)
    /// are dropped, their reasons kept for the message.
    fn pick(
        &self,
        demand: &PodDemand,
        feasible: &mut Vec<usize>,
        cursor: &mut usize,
        to_find: usize,
        reasons: &mut Reasons,
    ) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        let mut found = 0;
        let mut k = 0;
        while k < feasible.len() && found < to_find {
            let at = (*cursor + k) % feasible.len();
            let i = feasible[at];
            let misfit = misfits(demand, &self.nodes[i].1);
            if misfit.is_empty() {
                found += 1;
                let score = free_fraction(&self.nodes[i].1);
                if best.is_none_or(|(_, s)| score > s) {
                    best = Some((i, score));
                }
                k += 1;
            } else {
                reasons.add(misfit);
                feasible.remove(at);
                if at < *cursor {
                    *cursor -= 1;
                }
            }
        }
        if !feasible.is_empty() {
            *cursor = (*cursor + k) % feasible.len();
        }
        best.map(|(i, _)| i)
    }

    /// Binds a pod to node `i`; false when the pod changed meanwhile.
    fn bind(
        &mut self,
        store: &Store,
        pods: &'static ResourceKind,
        namespace: &str,
        name: &str,
        i: usize,
        demand: &PodDemand,
    ) -> bool {
        let node_name = self.nodes[i].0.clone();
        let bound = store.modify(pods, namespace, name, false, |pod| {
            if pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            {
                return false;
            }
            pod["spec"]["nodeName"] = json!(node_name);
            true
        });
        if !matches!(bound, Ok(Some(_))) {
            return false;
        }
        let _ = store.modify(pods, namespace, name, true, |pod| {
            set_scheduled(pod, "True", None, None)
        });
        let key = (namespace.to_string(), name.to_string());
        self.pending.remove(&key);
        self.written.remove(&key);
        self.occupy(&node_name, &demand.requests, true);
        self.bound.insert(key, (node_name, demand.requests.clone()));
        true
    }
}

/// A pending pod of a class: its (namespace, name) and the message last written.
type Waiting = ((String, String), Option<String>);

/// Wait before rewriting the condition of a pod still unschedulable after `writes` writes.
fn rewrite_backoff(writes: u32) -> std::time::Duration {
    std::time::Duration::from_secs((1u64 << writes.min(4).saturating_sub(1)).min(10))
}

/// Why nodes do not fit a class, counted as the nodes are scanned.
#[derive(Default)]
struct Reasons {
    nodes: usize,
    counts: HashMap<Misfit, usize>,
}

impl Reasons {
    fn add(&mut self, misfit: Vec<Misfit>) {
        self.nodes += 1;
        for m in misfit {
            *self.counts.entry(m).or_default() += 1;
        }
    }
}

/// Where a pod stands for the scheduler.
enum Placement {
    /// On a node, taking its requests.
    Bound(String, Resources),
    /// Waiting for a node; the message last written.
    Pending(PodDemand, Option<String>),
}

fn placement(pod: &Pod) -> Option<Placement> {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return None;
    }
    let demand = pod_demand(pod);
    match pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
    {
        Some(node) => Some(Placement::Bound(node, demand.requests)),
        None => {
            let message = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                })
                .and_then(|c| c.message.clone());
            Some(Placement::Pending(demand, message))
        }
    }
}

/// Least-allocated score: mean free fraction of CPU and memory.
fn free_fraction(facts: &NodeFacts) -> f64 {
    let frac = |alloc: i64, used: i64| {
        if alloc <= 0 {
            0.0
        } else {
            (alloc - used) as f64 / alloc as f64
        }
    };
    (frac(facts.allocatable.cpu_millis, facts.requested.cpu_millis)
        + frac(facts.allocatable.memory_bytes, facts.requested.memory_bytes))
        / 2.0
}

/// Sets the PodScheduled condition; returns whether anything changed.
fn set_scheduled(
    pod: &mut Value,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) -> bool {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut condition = json!({ "type": "PodScheduled", "status": status, "lastProbeTime": null, "lastTransitionTime": now });
    if let Some(reason) = reason {
        condition["reason"] = json!(reason);
    }
    if let Some(message) = message {
        condition["message"] = json!(message);
    }
    let conditions = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut others: Vec<Value> = conditions
        .iter()
        .filter(|c| c["type"] != "PodScheduled")
        .cloned()
        .collect();
    if let Some(old) = conditions.iter().find(|c| c["type"] == "PodScheduled") {
        if old["status"] == status && old.get("message") == condition.get("message") {
            return false;
        }
        if old["status"] == status {
            condition["lastTransitionTime"] = old["lastTransitionTime"].clone();
        }
    }
    others.insert(0, condition);
    pod["status"]["conditions"] = Value::Array(others);
    true
}

/// Shortest time between two scheduling passes.
const MIN_PASS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Runs the scheduler until `shutdown`.
pub async fn run(store: Arc<Store>, shutdown: CancellationToken) {
    let Some((nodes, pods)) = kinds() else { return };
    loop {
        let (objects, mut live) = store.subscribe(&[nodes, pods]);
        let mut cache = Cache::default();
        for change in &objects {
            apply_change(&mut cache, change);
        }
        cache.schedule(&store, pods);
        loop {
            let retry_at = cache.retry_at;
            let change: Option<Change> = tokio::select! {
                _ = shutdown.cancelled() => return,
                change = live.recv() => match change {
                    Ok(change) => Some(change),
                    Err(RecvError::Lagged(_)) => break, // resync from a fresh snapshot
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                    if retry_at.is_some() => None,
            };
            // A held-back rewrite coming due counts as a change.
            let mut relevant = change.is_none_or(|change| apply_change(&mut cache, &change));
            // Take everything already queued before scheduling once.
            while let Ok(change) = live.try_recv() {
                relevant |= apply_change(&mut cache, &change);
            }
            if relevant {
                let started = tokio::time::Instant::now();
                // A pass is CPU work: keep it off the async workers the API server needs.
                let multi = tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread;
                if multi {
                    tokio::task::block_in_place(|| cache.schedule(&store, pods));
                } else {
                    cache.schedule(&store, pods);
                }
                // At most one pass per MIN_PASS_INTERVAL: under a storm of changes (thousands
                // of nodes arriving) passes batch them instead of running per change.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(started + MIN_PASS_INTERVAL) => {}
                }
            }
        }
    }
}

fn apply_change(cache: &mut Cache, change: &Change) -> bool {
    cache.apply(change.plural, change.kind, &change.object)
}
