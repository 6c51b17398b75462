//! Whether a pod fits on a node, by the Kubernetes scheduler's filters: unschedulable (cordoned)
//! nodes, resources (cpu, memory, pods, ephemeral storage, extended), nodeSelector, required node
//! affinity, and taints/tolerations (NoSchedule and NoExecute).
//!
//! One implementation serves the simulator's scheduler and the decider's planner, so the planner
//! never places a pod where the scheduler would refuse it.

use std::collections::BTreeMap;

use crate::Resources;

/// Taint effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// Pods that do not tolerate it are not scheduled.
    NoSchedule,
    /// Soft: the scheduler tries to avoid the node (never a filter).
    PreferNoSchedule,
    /// Not scheduled, and evicted if running.
    NoExecute,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    pub value: String,
    /// Effect.
    pub effect: Effect,
}

/// A pod toleration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Toleration {
    /// Empty with `exists` tolerates every taint.
    pub key: String,
    /// `Exists` (true) or `Equal` (false).
    pub exists: bool,
    /// Value for `Equal`.
    pub value: String,
    /// `None` tolerates every effect.
    pub effect: Option<Effect>,
}

impl Toleration {
    /// Whether this toleration tolerates `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        if self.key.is_empty() {
            return self.exists;
        }
        self.key == taint.key && (self.exists || self.value == taint.value)
    }
}

/// Operator of a node selector requirement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SelectorOp {
    /// Label value in the set.
    In(Vec<String>),
    /// Label absent or value not in the set.
    NotIn(Vec<String>),
    /// Label present.
    Exists,
    /// Label absent.
    DoesNotExist,
    /// Label value, as an integer, greater than.
    Gt(i64),
    /// Label value, as an integer, less than.
    Lt(i64),
}

/// One requirement of a node selector term.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator and values.
    pub op: SelectorOp,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            SelectorOp::In(values) => value.is_some_and(|v| values.contains(v)),
            SelectorOp::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            SelectorOp::Exists => value.is_some(),
            SelectorOp::DoesNotExist => value.is_none(),
            SelectorOp::Gt(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            SelectorOp::Lt(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }
}

/// What a pod demands of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PodDemand {
    /// Resource requests (pods = 1 for a pod).
    pub requests: Resources,
    /// `spec.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: terms ORed, requirements within a term ANDed. Empty: no constraint.
    pub required_affinity: Vec<Vec<Requirement>>,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
}

/// What the scheduler knows of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Allocatable resources.
    pub allocatable: Resources,
    /// Sum of requests of pods bound to it.
    pub requested: Resources,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Cordoned.
    pub unschedulable: bool,
}

/// Why a pod does not fit on a node, in the scheduler's words.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Misfit {
    /// `node(s) were unschedulable`
    Unschedulable,
    /// `node(s) didn't match Pod's node affinity/selector`
    Affinity,
    /// `node(s) had untolerated taint {key: value}`
    Taint(String, String),
    /// `Insufficient <resource>`
    Insufficient(String),
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misfit::Unschedulable => write!(f, "node(s) were unschedulable"),
            Misfit::Affinity => write!(f, "node(s) didn't match Pod's node affinity/selector"),
            Misfit::Taint(key, value) => {
                write!(f, "node(s) had untolerated taint {{{key}: {value}}}")
            }
            Misfit::Insufficient(resource) => write!(f, "Insufficient {resource}"),
        }
    }
}

/// Whether `pod` may go on a node with these labels and taints, resources aside: the
/// unschedulable, node affinity/selector and taint filters, in the scheduler's order.
pub fn constraint_misfit(
    pod: &PodDemand,
    labels: &BTreeMap<String, String>,
    taints: &[Taint],
    unschedulable: bool,
) -> Option<Misfit> {
    if unschedulable {
        return Some(Misfit::Unschedulable);
    }
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity_ok = pod.required_affinity.is_empty()
        || pod
            .required_affinity
            .iter()
            .any(|term| term.iter().all(|r| r.matches(labels)));
    if !selector_ok || !affinity_ok {
        return Some(Misfit::Affinity);
    }
    taints
        .iter()
        .filter(|t| matches!(t.effect, Effect::NoSchedule | Effect::NoExecute))
        .find(|t| !pod.tolerations.iter().any(|tol| tol.tolerates(t)))
        .map(|taint| Misfit::Taint(taint.key.clone(), taint.value.clone()))
}

/// Every reason `pod` cannot go on `node`; empty when it fits. Filters run in the scheduler's
/// order and stop at the first failing one, as the scheduler reports one reason per node.
pub fn misfits(pod: &PodDemand, node: &NodeFacts) -> Vec<Misfit> {
    if let Some(misfit) = constraint_misfit(pod, &node.labels, &node.taints, node.unschedulable) {
        return vec![misfit];
    }
    let free = |alloc: i64, used: i64| alloc.saturating_sub(used);
    let r = &pod.requests;
    let (a, u) = (&node.allocatable, &node.requested);
    let mut out = Vec::new();
    if r.cpu_millis > free(a.cpu_millis, u.cpu_millis) {
        out.push(Misfit::Insufficient("cpu".into()));
    }
    if r.memory_bytes > free(a.memory_bytes, u.memory_bytes) {
        out.push(Misfit::Insufficient("memory".into()));
    }
    if r.ephemeral_storage_bytes > free(a.ephemeral_storage_bytes, u.ephemeral_storage_bytes) {
        out.push(Misfit::Insufficient("ephemeral-storage".into()));
    }
    for (name, want) in &r.extended {
        let have = free(
            a.extended.get(name).copied().unwrap_or(0),
            u.extended.get(name).copied().unwrap_or(0),
        );
        if *want > have {
            out.push(Misfit::Insufficient(name.clone()));
        }
    }
    if r.pods.max(1) > free(a.pods, u.pods) {
        out.push(Misfit::Insufficient("pods".into()));
    }
    out
}

/// How many feasible nodes the scheduler looks for before scoring, as kube-scheduler's adaptive
/// `percentageOfNodesToScore`: all of up to 100 nodes, then `50 - nodes/125` percent (at least
/// 5 %, at least 100 nodes).
pub fn nodes_to_find(nodes: usize) -> usize {
    if nodes <= 100 {
        return nodes;
    }
    let percent = (50i64 - (nodes as i64) / 125).max(5) as usize;
    (nodes * percent / 100).max(100)
}

/// The scheduler's message for a pod that fits nowhere, e.g.
/// `0/3 nodes are available: 1 node(s) were unschedulable, 2 Insufficient cpu.`
pub fn unschedulable_message<'a>(per_node: impl IntoIterator<Item = &'a [Misfit]>) -> String {
    let mut counts: BTreeMap<&Misfit, usize> = BTreeMap::new();
    let mut nodes = 0;
    for reasons in per_node {
        nodes += 1;
        for reason in reasons {
            *counts.entry(reason).or_default() += 1;
        }
    }
    unschedulable_message_counted(nodes, counts)
}

/// [`unschedulable_message`] from `nodes` nodes and how many had each reason (for callers that
/// count as they scan instead of keeping every node's reasons).
pub fn unschedulable_message_counted<'a>(
    nodes: usize,
    counts: impl IntoIterator<Item = (&'a Misfit, usize)>,
) -> String {
    if nodes == 0 {
        return "no nodes available to schedule pods".to_string();
    }
    // The scheduler sorts the formatted "<count> <reason>" strings.
    let mut parts: Vec<String> = counts
        .into_iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    parts.sort();
    format!("0/{nodes} nodes are available: {}.", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cpu: i64, mem: i64) -> NodeFacts {
        NodeFacts {
            allocatable: Resources {
                cpu_millis: cpu,
                memory_bytes: mem,
                pods: 110,
                ephemeral_storage_bytes: 1 << 40,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(cpu: i64, mem: i64) -> PodDemand {
        PodDemand {
            requests: Resources {
                cpu_millis: cpu,
                memory_bytes: mem,
                pods: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn resources_are_checked_against_free_capacity() {
        let mut n = node(4000, 8 << 30);
        assert!(misfits(&pod(4000, 8 << 30), &n).is_empty());
        n.requested.cpu_millis = 3500;
        assert_eq!(
            misfits(&pod(1000, 1), &n),
            [Misfit::Insufficient("cpu".into())]
        );
        n.requested.pods = 110;
        assert_eq!(
            misfits(&pod(0, 0), &n),
            [Misfit::Insufficient("pods".into())]
        );
    }

    #[test]
    fn selectors_affinity_taints_and_cordons() {
        let mut n = node(4000, 8 << 30);
        n.labels.insert("pool".into(), "gpu".into());
        n.taints.push(Taint {
            key: "nvidia.com/gpu".into(),
            value: "true".into(),
            effect: Effect::NoSchedule,
        });
        let mut p = pod(100, 1);
        assert_eq!(
            misfits(&p, &n),
            [Misfit::Taint("nvidia.com/gpu".into(), "true".into())]
        );
        p.tolerations.push(Toleration {
            key: "nvidia.com/gpu".into(),
            exists: true,
            value: String::new(),
            effect: None,
        });
        assert!(misfits(&p, &n).is_empty());
        p.node_selector.insert("pool".into(), "general".into());
        assert_eq!(misfits(&p, &n), [Misfit::Affinity]);
        p.node_selector.clear();
        p.required_affinity = vec![vec![Requirement {
            key: "pool".into(),
            op: SelectorOp::NotIn(vec!["gpu".into()]),
        }]];
        assert_eq!(misfits(&p, &n), [Misfit::Affinity]);
        p.required_affinity.push(vec![Requirement {
            key: "pool".into(),
            op: SelectorOp::Exists,
        }]);
        assert!(misfits(&p, &n).is_empty(), "terms are ORed");
        n.unschedulable = true;
        assert_eq!(misfits(&p, &n), [Misfit::Unschedulable]);
    }

    #[test]
    fn prefer_no_schedule_is_not_a_filter() {
        let mut n = node(1000, 1 << 30);
        n.taints.push(Taint {
            key: "soft".into(),
            value: String::new(),
            effect: Effect::PreferNoSchedule,
        });
        assert!(misfits(&pod(100, 1), &n).is_empty());
    }

    #[test]
    fn message_in_the_schedulers_form() {
        let a = [Misfit::Insufficient("cpu".into())];
        let b = [
            Misfit::Insufficient("cpu".into()),
            Misfit::Insufficient("memory".into()),
        ];
        let c = [Misfit::Taint(
            "node-role.kubernetes.io/control-plane".into(),
            String::new(),
        )];
        let msg = unschedulable_message([&a[..], &b[..], &c[..]]);
        assert_eq!(
            msg,
            "0/3 nodes are available: 1 Insufficient memory, 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, 2 Insufficient cpu."
        );
    }
}
