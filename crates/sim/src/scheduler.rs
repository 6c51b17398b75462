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
    fit::{Misfit, NodeFacts, PodDemand, misfits, nodes_to_find, unschedulable_message},
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
    nodes: BTreeMap<String, NodeFacts>,
    /// (namespace, name) → (node, requests) of pods that occupy a node.
    bound: HashMap<(String, String), (String, Resources)>,
    /// (namespace, name) → (demand, message last written).
    pending: BTreeMap<(String, String), (PodDemand, Option<String>)>,
    /// Where the next node search starts (rotates, as in kube-scheduler).
    next_start: usize,
}

impl Cache {
    fn apply(&mut self, plural: &str, kind: EventType, object: &Stored) {
        let key = (object.namespace.clone(), object.name.clone());
        match plural {
            "nodes" if kind == EventType::Deleted => {
                self.nodes.remove(&object.name);
            }
            "nodes" => {
                if let Ok(node) = serde_json::from_slice::<Node>(&object.json) {
                    self.nodes.insert(object.name.clone(), node_facts(&node));
                }
            }
            "pods" => {
                self.bound.remove(&key);
                self.pending.remove(&key);
                if kind == EventType::Deleted {
                    return;
                }
                let Ok(pod) = serde_json::from_slice::<Pod>(&object.json) else {
                    return;
                };
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("Pending");
                if matches!(phase, "Succeeded" | "Failed") {
                    return;
                }
                let demand = pod_demand(&pod);
                match pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| !n.is_empty())
                {
                    Some(node) => {
                        self.bound.insert(key, (node, demand.requests));
                    }
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
                        self.pending.insert(key, (demand, message));
                    }
                }
            }
            _ => {}
        }
    }

    /// One scheduling pass over every pending pod. Like kube-scheduler, it stops looking after
    /// [`nodes_to_find`] feasible nodes (starting where the previous pod stopped) and scores only
    /// those; pods identical to one that fit nowhere in this pass are not evaluated again.
    fn schedule(&mut self, store: &Store, pods: &'static ResourceKind) {
        if self.pending.is_empty() {
            return;
        }
        let mut nodes: Vec<(String, NodeFacts)> = self
            .nodes
            .iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        let index: HashMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        for (node, requests) in self.bound.values() {
            if let Some(i) = index.get(node) {
                nodes[*i].1.requested = nodes[*i].1.requested.saturating_add(requests);
            }
        }
        let to_find = nodes_to_find(nodes.len());
        let mut nowhere: HashMap<PodDemand, String> = HashMap::new();
        let pending: Vec<_> = self
            .pending
            .iter()
            .map(|(k, (d, m))| (k.clone(), d.clone(), m.clone()))
            .collect();
        for ((namespace, name), demand, last_message) in pending {
            let message = match nowhere.get(&demand) {
                Some(message) => Some(message.clone()),
                None => {
                    let mut best: Option<(usize, f64)> = None;
                    let mut found = 0;
                    let mut reasons: Vec<Vec<Misfit>> = Vec::new();
                    let mut scanned = 0;
                    while scanned < nodes.len() && found < to_find.max(1) {
                        let i = (self.next_start + scanned) % nodes.len();
                        scanned += 1;
                        let misfit = misfits(&demand, &nodes[i].1);
                        if misfit.is_empty() {
                            found += 1;
                            let score = free_fraction(&nodes[i].1);
                            if best.is_none_or(|(_, s)| score > s) {
                                best = Some((i, score));
                            }
                        } else {
                            reasons.push(misfit);
                        }
                    }
                    if !nodes.is_empty() {
                        self.next_start = (self.next_start + scanned) % nodes.len();
                    }
                    match best {
                        Some((i, _)) => {
                            let node_name = nodes[i].0.clone();
                            let bound = store.modify(pods, &namespace, &name, false, |pod| {
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
                            if matches!(bound, Ok(Some(_))) {
                                let _ = store.modify(pods, &namespace, &name, true, |pod| {
                                    set_scheduled(pod, "True", None, None)
                                });
                                nodes[i].1.requested =
                                    nodes[i].1.requested.saturating_add(&demand.requests);
                                self.pending.remove(&(namespace.clone(), name.clone()));
                                self.bound.insert(
                                    (namespace.clone(), name.clone()),
                                    (node_name, demand.requests),
                                );
                            }
                            None
                        }
                        None => {
                            let message = unschedulable_message(reasons.iter().map(Vec::as_slice));
                            nowhere.insert(demand, message.clone());
                            Some(message)
                        }
                    }
                }
            };
            if let Some(message) = message
                && last_message.as_deref() != Some(message.as_str())
            {
                let written = store.modify(pods, &namespace, &name, true, |pod| {
                    set_scheduled(pod, "False", Some("Unschedulable"), Some(&message))
                });
                if written.is_ok()
                    && let Some(entry) = self.pending.get_mut(&(namespace, name))
                {
                    entry.1 = Some(message);
                }
            }
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
            let change: Change = tokio::select! {
                _ = shutdown.cancelled() => return,
                change = live.recv() => match change {
                    Ok(change) => change,
                    Err(RecvError::Lagged(_)) => break, // resync from a fresh snapshot
                    Err(RecvError::Closed) => return,
                },
            };
            let mut relevant = apply_change(&mut cache, &change);
            // Take everything already queued before scheduling once.
            while let Ok(change) = live.try_recv() {
                relevant |= apply_change(&mut cache, &change);
            }
            if relevant {
                cache.schedule(&store, pods);
            }
        }
    }
}

fn apply_change(cache: &mut Cache, change: &Change) -> bool {
    if change.plural == "nodes" || change.plural == "pods" {
        cache.apply(change.plural, change.kind, &change.object);
        true
    } else {
        false
    }
}
