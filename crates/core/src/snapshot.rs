//! The wire form of the cluster picture (`shoal.v1` snapshot messages) turned into the scheduler's
//! view ([`crate::fit`]) and back, so that the planner judges pods and nodes exactly as the
//! simulator's scheduler (and kube-scheduler) does.

use shoal_proto::v1 as pb;

use crate::{
    Resources,
    fit::{Effect, NodeFacts, PodDemand, Requirement, SelectorOp, Taint, Toleration},
};

/// Taint the node lifecycle controller puts on a node that is not Ready.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// A proto taint effect; `None` for unspecified.
pub fn effect_from_proto(effect: i32) -> Option<Effect> {
    match pb::TaintEffect::try_from(effect).ok()? {
        pb::TaintEffect::NoSchedule => Some(Effect::NoSchedule),
        pb::TaintEffect::PreferNoSchedule => Some(Effect::PreferNoSchedule),
        pb::TaintEffect::NoExecute => Some(Effect::NoExecute),
        pb::TaintEffect::Unspecified => None,
    }
}

/// The proto form of an effect.
pub fn effect_to_proto(effect: Effect) -> pb::TaintEffect {
    match effect {
        Effect::NoSchedule => pb::TaintEffect::NoSchedule,
        Effect::PreferNoSchedule => pb::TaintEffect::PreferNoSchedule,
        Effect::NoExecute => pb::TaintEffect::NoExecute,
    }
}

/// Parses the Kubernetes spelling of an effect (`NoSchedule`, ...).
pub fn effect_from_name(name: &str) -> Option<Effect> {
    match name {
        "NoSchedule" => Some(Effect::NoSchedule),
        "PreferNoSchedule" => Some(Effect::PreferNoSchedule),
        "NoExecute" => Some(Effect::NoExecute),
        _ => None,
    }
}

/// The Kubernetes spelling of an effect.
pub fn effect_name(effect: Effect) -> &'static str {
    match effect {
        Effect::NoSchedule => "NoSchedule",
        Effect::PreferNoSchedule => "PreferNoSchedule",
        Effect::NoExecute => "NoExecute",
    }
}

/// A proto taint; `None` when its effect is unspecified.
pub fn taint_from_proto(t: &pb::Taint) -> Option<Taint> {
    Some(Taint {
        key: t.key.clone(),
        value: t.value.clone(),
        effect: effect_from_proto(t.effect)?,
    })
}

/// The proto form of a taint.
pub fn taint_to_proto(t: &Taint) -> pb::Taint {
    pb::Taint {
        key: t.key.clone(),
        value: t.value.clone(),
        effect: effect_to_proto(t.effect) as i32,
    }
}

/// A proto toleration.
pub fn toleration_from_proto(t: &pb::Toleration) -> Toleration {
    Toleration {
        key: t.key.clone(),
        exists: t.operator == "Exists",
        value: t.value.clone(),
        effect: effect_from_proto(t.effect),
    }
}

/// The proto form of a toleration.
pub fn toleration_to_proto(t: &Toleration) -> pb::Toleration {
    pb::Toleration {
        key: t.key.clone(),
        operator: if t.exists { "Exists" } else { "Equal" }.to_string(),
        value: t.value.clone(),
        effect: t
            .effect
            .map_or(pb::TaintEffect::Unspecified, effect_to_proto) as i32,
        toleration_seconds: 0,
        has_toleration_seconds: false,
    }
}

/// A proto selector requirement. Unknown operators match nothing, as the API would reject them.
pub fn requirement_from_proto(r: &pb::NodeSelectorRequirement) -> Requirement {
    let first_int = r
        .values
        .first()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    let op = match r.operator.as_str() {
        "In" => SelectorOp::In(r.values.clone()),
        "NotIn" => SelectorOp::NotIn(r.values.clone()),
        "Exists" => SelectorOp::Exists,
        "DoesNotExist" => SelectorOp::DoesNotExist,
        "Gt" => SelectorOp::Gt(first_int),
        "Lt" => SelectorOp::Lt(first_int),
        _ => SelectorOp::In(Vec::new()),
    };
    Requirement {
        key: r.key.clone(),
        op,
    }
}

/// The proto form of a selector requirement.
pub fn requirement_to_proto(r: &Requirement) -> pb::NodeSelectorRequirement {
    let (operator, values) = match &r.op {
        SelectorOp::In(v) => ("In", v.clone()),
        SelectorOp::NotIn(v) => ("NotIn", v.clone()),
        SelectorOp::Exists => ("Exists", Vec::new()),
        SelectorOp::DoesNotExist => ("DoesNotExist", Vec::new()),
        SelectorOp::Gt(n) => ("Gt", vec![n.to_string()]),
        SelectorOp::Lt(n) => ("Lt", vec![n.to_string()]),
    };
    pb::NodeSelectorRequirement {
        key: r.key.clone(),
        operator: operator.to_string(),
        values,
    }
}

/// What pods of a class demand of a node.
pub fn pod_demand(class: &pb::PodClass) -> PodDemand {
    let mut requests = class
        .requests
        .as_ref()
        .map(Resources::from)
        .unwrap_or_default();
    requests.pods = requests.pods.max(1);
    PodDemand {
        requests,
        node_selector: class
            .node_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        required_affinity: class
            .required_affinity
            .iter()
            .map(|term| {
                term.match_expressions
                    .iter()
                    .map(requirement_from_proto)
                    .collect()
            })
            .collect(),
        tolerations: class
            .tolerations
            .iter()
            .map(toleration_from_proto)
            .collect(),
    }
}

/// The scheduler's view of a snapshot node. A node that is not Ready carries
/// `node.kubernetes.io/not-ready:NoSchedule`, as the node lifecycle controller would put on it.
pub fn node_facts(node: &pb::NodeInfo) -> NodeFacts {
    let mut taints: Vec<Taint> = node.taints.iter().filter_map(taint_from_proto).collect();
    if node.readiness != pb::NodeReadiness::Ready as i32
        && !taints.iter().any(|t| t.key == NOT_READY_TAINT)
    {
        taints.push(Taint {
            key: NOT_READY_TAINT.into(),
            value: String::new(),
            effect: Effect::NoSchedule,
        });
    }
    NodeFacts {
        allocatable: node
            .allocatable
            .as_ref()
            .map(Resources::from)
            .unwrap_or_default(),
        requested: node
            .requested
            .as_ref()
            .map(Resources::from)
            .unwrap_or_default(),
        labels: node
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        taints,
        unschedulable: node.unschedulable,
    }
}

/// Unix time → protobuf timestamp.
pub fn timestamp(at: std::time::SystemTime) -> prost_types::Timestamp {
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Protobuf timestamp → Unix time (times before 1970 clamp to the epoch).
pub fn system_time(ts: &prost_types::Timestamp) -> std::time::SystemTime {
    let secs = ts.seconds.max(0) as u64;
    let nanos = ts.nanos.clamp(0, 999_999_999) as u32;
    std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::{Misfit, misfits};

    #[test]
    fn not_ready_nodes_refuse_pods_like_the_scheduler() {
        let mut node = pb::NodeInfo {
            name: "n".into(),
            allocatable: Some(pb::Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                pods: 110,
                ephemeral_storage_bytes: 1 << 40,
                ..Default::default()
            }),
            readiness: pb::NodeReadiness::NotReady as i32,
            ..Default::default()
        };
        let class = pb::PodClass {
            requests: Some(pb::Resources {
                cpu_millis: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        let demand = pod_demand(&class);
        assert_eq!(demand.requests.pods, 1, "a pod takes a pod slot");
        assert_eq!(
            misfits(&demand, &node_facts(&node)),
            [Misfit::Taint(NOT_READY_TAINT.into(), String::new())]
        );
        node.readiness = pb::NodeReadiness::Ready as i32;
        assert!(misfits(&demand, &node_facts(&node)).is_empty());
    }

    #[test]
    fn constraints_round_trip_through_proto() {
        let r = Requirement {
            key: "zone".into(),
            op: SelectorOp::Gt(3),
        };
        assert_eq!(requirement_from_proto(&requirement_to_proto(&r)), r);
        let t = Toleration {
            key: "gpu".into(),
            exists: true,
            value: String::new(),
            effect: Some(Effect::NoExecute),
        };
        assert_eq!(toleration_from_proto(&toleration_to_proto(&t)), t);
        let taint = Taint {
            key: "a".into(),
            value: "b".into(),
            effect: Effect::PreferNoSchedule,
        };
        assert_eq!(taint_from_proto(&taint_to_proto(&taint)), Some(taint));
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(system_time(&timestamp(at)), at);
    }
}
