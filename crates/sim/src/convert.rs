//! Kubernetes objects → the scheduler's view of them (`shoal_core::fit`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use shoal_core::{
    Resources,
    fit::{Effect, NodeFacts, PodDemand, Requirement, SelectorOp, Taint, Toleration},
    parse_cpu_millis, parse_memory_bytes,
};

fn effect(s: &str) -> Option<Effect> {
    match s {
        "NoSchedule" => Some(Effect::NoSchedule),
        "PreferNoSchedule" => Some(Effect::PreferNoSchedule),
        "NoExecute" => Some(Effect::NoExecute),
        _ => None,
    }
}

/// Adds a quantity map (requests or allocatable) into `Resources`. Unparseable quantities count
/// as zero; the API server would have refused them.
fn add_quantities(
    into: &mut Resources,
    map: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) {
    for (name, q) in map {
        match name.as_str() {
            "cpu" => into.cpu_millis += parse_cpu_millis(&q.0).unwrap_or(0),
            "memory" => into.memory_bytes += parse_memory_bytes(&q.0).unwrap_or(0),
            "ephemeral-storage" => {
                into.ephemeral_storage_bytes += parse_memory_bytes(&q.0).unwrap_or(0)
            }
            "pods" => into.pods += q.0.parse::<i64>().unwrap_or(0),
            other => {
                *into.extended.entry(other.to_string()).or_default() +=
                    parse_memory_bytes(&q.0).unwrap_or(0)
            }
        }
    }
}

/// The pod's requests: the sum over containers, at least the largest init container (as the
/// scheduler computes effective requests), one pod slot.
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::default();
    let Some(spec) = &pod.spec else {
        return Resources {
            pods: 1,
            ..Default::default()
        };
    };
    for c in &spec.containers {
        if let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            add_quantities(&mut total, req);
        }
    }
    for c in spec.init_containers.iter().flatten() {
        let mut init = Resources::default();
        if let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            add_quantities(&mut init, req);
        }
        total.cpu_millis = total.cpu_millis.max(init.cpu_millis);
        total.memory_bytes = total.memory_bytes.max(init.memory_bytes);
    }
    total.pods = 1;
    total
}

/// What the pod demands of a node.
pub fn pod_demand(pod: &Pod) -> PodDemand {
    let spec = pod.spec.as_ref();
    let node_selector = spec
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let required_affinity = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|sel| {
            sel.node_selector_terms
                .iter()
                .map(|term| {
                    term.match_expressions
                        .iter()
                        .flatten()
                        .map(|e| {
                            let values = e.values.clone().unwrap_or_default();
                            let first_int = values
                                .first()
                                .and_then(|v| v.parse::<i64>().ok())
                                .unwrap_or(0);
                            let op = match e.operator.as_str() {
                                "In" => SelectorOp::In(values),
                                "NotIn" => SelectorOp::NotIn(values),
                                "Exists" => SelectorOp::Exists,
                                "DoesNotExist" => SelectorOp::DoesNotExist,
                                "Gt" => SelectorOp::Gt(first_int),
                                "Lt" => SelectorOp::Lt(first_int),
                                // Unknown operators match nothing, as the API would reject them.
                                _ => SelectorOp::In(Vec::new()),
                            };
                            Requirement {
                                key: e.key.clone(),
                                op,
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let tolerations = spec
        .and_then(|s| s.tolerations.as_ref())
        .map(|ts| {
            ts.iter()
                .map(|t| Toleration {
                    key: t.key.clone().unwrap_or_default(),
                    exists: t.operator.as_deref() == Some("Exists"),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.as_deref().and_then(effect),
                })
                .collect()
        })
        .unwrap_or_default();
    PodDemand {
        requests: pod_requests(pod),
        node_selector,
        required_affinity,
        tolerations,
    }
}

/// True when the node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The scheduler's view of a node (requests of bound pods are added by the caller). A node that
/// is not Ready carries `node.kubernetes.io/not-ready:NoSchedule`, as the node lifecycle
/// controller would put on it.
pub fn node_facts(node: &Node) -> NodeFacts {
    let mut allocatable = Resources::default();
    if let Some(a) = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
    {
        add_quantities(&mut allocatable, a);
    }
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    Some(Taint {
                        key: t.key.clone(),
                        value: t.value.clone().unwrap_or_default(),
                        effect: effect(&t.effect)?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if !node_ready(node) {
        taints.push(Taint {
            key: "node.kubernetes.io/not-ready".into(),
            value: String::new(),
            effect: Effect::NoSchedule,
        });
    }
    NodeFacts {
        allocatable,
        requested: Resources::default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        taints,
        unschedulable: node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
    }
}
