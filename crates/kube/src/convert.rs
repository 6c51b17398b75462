//! Kubernetes objects → the scheduler's view of them (`shoal_core::fit`), plus the facts about
//! pods and nodes that scaling decisions need (controller, eviction blockers, readiness).
//!
//! Shared by the simulator's scheduler and Shoal's services, so that every component reads a pod
//! the same way.

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

/// Readiness of a node from its Ready condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready=True.
    Ready,
    /// Ready=False.
    NotReady,
    /// Ready=Unknown, or no Ready condition yet.
    Unknown,
}

/// The node's readiness and when its Ready condition last changed.
pub fn node_readiness(node: &Node) -> (Readiness, Option<std::time::SystemTime>) {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match condition {
        None => (Readiness::Unknown, None),
        Some(c) => {
            let readiness = match c.status.as_str() {
                "True" => Readiness::Ready,
                "False" => Readiness::NotReady,
                _ => Readiness::Unknown,
            };
            let since = c.last_transition_time.as_ref().map(|t| time(&t.0));
            (readiness, since)
        }
    }
}

/// A Kubernetes timestamp as system time.
pub fn time(t: &k8s_openapi::jiff::Timestamp) -> std::time::SystemTime {
    let nanos = t.as_nanosecond();
    if nanos <= 0 {
        return std::time::UNIX_EPOCH;
    }
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos.min(u64::MAX as i128) as u64)
}

/// The pod's controlling owner (`kind`, `name`), if any.
pub fn controller_of(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.name.clone()))
}

/// Annotation the kubelet puts on the API mirror of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// True for the mirror of a static pod (tied to its node; never evicted).
pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
}

/// True when a DaemonSet controls the pod.
pub fn is_daemonset_pod(pod: &Pod) -> bool {
    controller_of(pod).is_some_and(|(kind, _)| kind == "DaemonSet")
}

/// True when the pod mounts node-local storage (emptyDir or hostPath), which eviction loses.
pub fn uses_local_storage(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|vs| {
            vs.iter()
                .any(|v| v.empty_dir.is_some() || v.host_path.is_some())
        })
}

/// Whether object metadata carries `shoal.dev/do-not-disrupt` or `karpenter.sh/do-not-disrupt`
/// set to "true".
pub fn do_not_disrupt(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations.is_some_and(|a| {
        [
            shoal_core::labels::DO_NOT_DISRUPT,
            shoal_core::labels::KARPENTER_DO_NOT_DISRUPT,
        ]
        .iter()
        .any(|k| a.get(*k).is_some_and(|v| v == "true"))
    })
}

/// The capacity request a pod consumes: its `autoscaling.x-k8s.io/consume-provisioning-request`
/// annotation (or the older `cluster-autoscaler.kubernetes.io/…` one), when not empty.
pub fn consumed_provisioning_request(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<String> {
    let a = annotations?;
    [
        shoal_core::labels::CONSUME_PROVISIONING_REQUEST,
        shoal_core::labels::CONSUME_PROVISIONING_REQUEST_OLD,
    ]
    .iter()
    .find_map(|k| a.get(*k).filter(|v| !v.is_empty()).cloned())
}

/// The `cluster-autoscaler.kubernetes.io/safe-to-evict` annotation: `Some(true)` or
/// `Some(false)` when set to "true"/"false", `None` otherwise.
pub fn safe_to_evict(pod: &Pod) -> Option<bool> {
    match pod
        .metadata
        .annotations
        .as_ref()?
        .get(shoal_core::labels::SAFE_TO_EVICT)?
        .as_str()
    {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Where a pod is, as far as scheduling is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodPlacement {
    /// Occupies this node (bound, not finished).
    Bound(String),
    /// The scheduler found no node for it: since when, and its message.
    Unschedulable {
        /// `lastTransitionTime` of the PodScheduled=False condition.
        since: Option<std::time::SystemTime>,
        /// The scheduler's message.
        message: String,
    },
    /// Neither: new and not yet looked at by the scheduler, finished, or being deleted unbound.
    Other,
}

/// Where the pod is. A pod that is merely new (no PodScheduled condition yet) is not
/// unschedulable; neither is an unbound pod being deleted.
pub fn pod_placement(pod: &Pod) -> PodPlacement {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return PodPlacement::Other;
    }
    if let Some(node) = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .filter(|n| !n.is_empty())
    {
        return PodPlacement::Bound(node.clone());
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodPlacement::Other;
    }
    let condition = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"));
    match condition {
        Some(c) if c.status == "False" && c.reason.as_deref() == Some("Unschedulable") => {
            PodPlacement::Unschedulable {
                since: c.last_transition_time.as_ref().map(|t| time(&t.0)),
                message: c.message.clone().unwrap_or_default(),
            }
        }
        _ => PodPlacement::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod JSON")
    }

    #[test]
    fn placement_distinguishes_new_from_unschedulable() {
        let new =
            pod(serde_json::json!({ "metadata": { "name": "a" }, "spec": { "containers": [] } }));
        assert_eq!(pod_placement(&new), PodPlacement::Other);
        let unschedulable = pod(
            serde_json::json!({ "metadata": { "name": "a" }, "spec": { "containers": [] },
            "status": { "phase": "Pending", "conditions": [ { "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient cpu.", "lastTransitionTime": "2026-01-02T03:04:05Z" } ] } }),
        );
        match pod_placement(&unschedulable) {
            PodPlacement::Unschedulable { since, message } => {
                assert!(message.contains("Insufficient cpu"));
                assert_eq!(
                    since
                        .and_then(|s| s.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    Some(1_767_323_045)
                );
            }
            other => panic!("expected unschedulable, got {other:?}"),
        }
        let bound = pod(
            serde_json::json!({ "metadata": { "name": "a" }, "spec": { "containers": [], "nodeName": "n1" },
            "status": { "phase": "Running" } }),
        );
        assert_eq!(pod_placement(&bound), PodPlacement::Bound("n1".into()));
        let done = pod(
            serde_json::json!({ "metadata": { "name": "a" }, "spec": { "containers": [], "nodeName": "n1" },
            "status": { "phase": "Succeeded" } }),
        );
        assert_eq!(pod_placement(&done), PodPlacement::Other);
    }

    #[test]
    fn blockers_are_read_from_the_pod() {
        let p = pod(serde_json::json!({ "metadata": { "name": "a",
                "annotations": { "cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "kubernetes.io/config.mirror": "x" },
                "ownerReferences": [ { "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true } ] },
            "spec": { "containers": [], "volumes": [ { "name": "scratch", "emptyDir": {} } ] } }));
        assert!(is_daemonset_pod(&p));
        assert!(is_mirror(&p));
        assert!(uses_local_storage(&p));
        assert_eq!(safe_to_evict(&p), Some(false));
        assert_eq!(controller_of(&p), Some(("DaemonSet".into(), "ds".into())));
    }
}
