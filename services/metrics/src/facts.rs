//! What the metrics service keeps of each Kubernetes object: a few hundred bytes of facts instead
//! of the whole object (no managed fields, no container specs, no status history).

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use k8s_openapi::api::{
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use shoal_core::{Resources, labels};
use shoal_kube::convert::{self, PodPlacement, Readiness};
use shoal_proto::v1 as pb;

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

/// Labels, shared between pods that carry the same set.
pub type Labels = Arc<BTreeMap<String, String>>;

/// One requirement of a required node affinity term, as compared for equivalence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequirementKey {
    /// Label key.
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist, Gt, Lt.
    pub operator: String,
    /// Values.
    pub values: Vec<String>,
}

/// A toleration, as compared for equivalence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TolerationKey {
    /// Key (empty with Exists tolerates everything).
    pub key: String,
    /// Equal or Exists.
    pub operator: String,
    /// Value.
    pub value: String,
    /// NoSchedule, PreferNoSchedule, NoExecute or empty (all).
    pub effect: String,
    /// tolerationSeconds, if set.
    pub seconds: Option<i64>,
}

/// Everything that makes two pods interchangeable for scheduling, except their PDB (which
/// depends on PodDisruptionBudgets, watched separately).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodSpecKey {
    /// Namespace.
    pub namespace: String,
    /// Controlling owner (kind, name).
    pub owner: Option<(String, String)>,
    /// Effective requests (pods = 1).
    pub requests: Resources,
    /// nodeSelector.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity terms (ORed).
    pub affinity: Vec<Vec<RequirementKey>>,
    /// Tolerations.
    pub tolerations: Vec<TolerationKey>,
    /// spec.priority.
    pub priority: i32,
    /// The safe-to-evict annotation.
    pub safe_to_evict: Option<bool>,
    /// Annotated do-not-disrupt (Shoal's or Karpenter's).
    pub do_not_disrupt: bool,
    /// Mounts emptyDir or hostPath.
    pub local_storage: bool,
    /// A static pod's mirror.
    pub mirror: bool,
    /// The capacity request the pod consumes (its consume-provisioning-request annotation).
    pub provisioning_request: Option<String>,
}

impl PodSpecKey {
    /// The pod's eviction blockers that do not depend on PDB status.
    pub fn blockers(&self, pdb: Option<&str>) -> Vec<pb::EvictionBlocker> {
        use pb::EvictionBlocker as B;
        let mut out = Vec::new();
        if self
            .owner
            .as_ref()
            .is_some_and(|(kind, _)| kind == "DaemonSet")
        {
            out.push(B::Daemonset);
        }
        if self.mirror {
            out.push(B::Mirror);
        }
        if self.do_not_disrupt {
            // Stronger than safe-to-evict: the pod's owner asked that it not be disrupted.
            out.push(B::DoNotDisrupt);
        }
        match self.safe_to_evict {
            // Cluster Autoscaler's rule: an explicit "true" overrides the other blockers.
            Some(true) => return out,
            Some(false) => out.push(B::NotSafeToEvict),
            None => {}
        }
        if self.local_storage {
            out.push(B::LocalStorage);
        }
        if self.owner.is_none() && !self.mirror {
            out.push(B::NoController);
        }
        if self.namespace == "kube-system" && pdb.is_none() {
            out.push(B::KubeSystem);
        }
        out
    }
}

/// A pod as the metrics service keeps it.
#[derive(Debug, Clone)]
pub struct PodFacts {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Scheduling equivalence (without the PDB).
    pub spec: PodSpecKey,
    /// Labels (for matching PDB selectors).
    pub labels: BTreeMap<String, String>,
    /// Bound, unschedulable, or neither.
    pub placement: PodPlacement,
}

impl PodFacts {
    /// Reads the facts off a pod.
    pub fn from_pod(pod: &Pod) -> PodFacts {
        let demand = convert::pod_demand(pod);
        let spec = PodSpecKey {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            owner: convert::controller_of(pod),
            requests: demand.requests,
            node_selector: demand.node_selector,
            affinity: demand
                .required_affinity
                .iter()
                .map(|term| {
                    term.iter()
                        .map(|r| {
                            let p = shoal_core::snapshot::requirement_to_proto(r);
                            RequirementKey {
                                key: p.key,
                                operator: p.operator,
                                values: p.values,
                            }
                        })
                        .collect()
                })
                .collect(),
            tolerations: pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.as_ref())
                .map(|ts| {
                    let mut keys: Vec<TolerationKey> = ts
                        .iter()
                        .map(|t| TolerationKey {
                            key: t.key.clone().unwrap_or_default(),
                            operator: t.operator.clone().unwrap_or_else(|| "Equal".into()),
                            value: t.value.clone().unwrap_or_default(),
                            effect: t.effect.clone().unwrap_or_default(),
                            seconds: t.toleration_seconds,
                        })
                        .collect();
                    keys.sort();
                    keys
                })
                .unwrap_or_default(),
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            safe_to_evict: convert::safe_to_evict(pod),
            do_not_disrupt: convert::do_not_disrupt(pod.metadata.annotations.as_ref()),
            local_storage: convert::uses_local_storage(pod),
            mirror: convert::is_mirror(pod),
            provisioning_request: convert::consumed_provisioning_request(
                pod.metadata.annotations.as_ref(),
            ),
        };
        PodFacts {
            key: (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            ),
            spec,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            placement: convert::pod_placement(pod),
        }
    }
}

/// A node as the metrics service keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<pb::Taint>,
    /// Allocatable (capacity when allocatable is absent).
    pub allocatable: Resources,
    /// From the Ready condition.
    pub readiness: pb::NodeReadiness,
    /// When the node last turned Ready, while it is Ready.
    pub ready_since: Option<SystemTime>,
    /// Cordoned.
    pub unschedulable: bool,
    /// creationTimestamp.
    pub created_at: Option<SystemTime>,
    /// Annotated `shoal.dev/scale-down-disabled: "true"`.
    pub scale_down_disabled: bool,
}

impl NodeFacts {
    /// Reads the facts off a node.
    pub fn from_node(node: &Node) -> NodeFacts {
        let facts = convert::node_facts(node);
        let (readiness, since) = convert::node_readiness(node);
        let readiness = match readiness {
            Readiness::Ready => pb::NodeReadiness::Ready,
            Readiness::NotReady => pb::NodeReadiness::NotReady,
            Readiness::Unknown => pb::NodeReadiness::Unknown,
        };
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: facts.labels,
            // The real taints; readiness travels separately (the synthesized not-ready taint of
            // the scheduler's view is not on the object).
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .map(|ts| {
                    ts.iter()
                        .filter_map(|t| {
                            Some(pb::Taint {
                                key: t.key.clone(),
                                value: t.value.clone().unwrap_or_default(),
                                effect: shoal_core::snapshot::effect_to_proto(
                                    shoal_core::snapshot::effect_from_name(&t.effect)?,
                                ) as i32,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            allocatable: facts.allocatable,
            readiness,
            ready_since: (readiness == pb::NodeReadiness::Ready)
                .then_some(since)
                .flatten(),
            unschedulable: facts.unschedulable,
            created_at: node
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| convert::time(&t.0)),
            scale_down_disabled: node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(labels::SCALE_DOWN_DISABLED))
                .is_some_and(|v| v == "true")
                || convert::do_not_disrupt(node.metadata.annotations.as_ref()),
        }
    }
}

/// A label selector requirement of a PDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorRequirement {
    key: String,
    operator: String,
    values: Vec<String>,
}

/// A PodDisruptionBudget as the metrics service keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdbFacts {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `None`: the selector selects nothing (nil). `Some(empty)` selects every pod.
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Vec<SelectorRequirement>,
    /// status.disruptionsAllowed.
    pub disruptions_allowed: i32,
}

impl PdbFacts {
    /// Reads the facts off a PDB.
    pub fn from_pdb(pdb: &PodDisruptionBudget) -> PdbFacts {
        let selector = pdb.spec.as_ref().and_then(|s| s.selector.as_ref());
        PdbFacts {
            key: (
                pdb.metadata.namespace.clone().unwrap_or_default(),
                pdb.metadata.name.clone().unwrap_or_default(),
            ),
            match_labels: selector.map(|s| s.match_labels.clone().unwrap_or_default()),
            match_expressions: selector
                .and_then(|s| s.match_expressions.as_ref())
                .map(|es| {
                    es.iter()
                        .map(|e| SelectorRequirement {
                            key: e.key.clone(),
                            operator: e.operator.clone(),
                            values: e.values.clone().unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            disruptions_allowed: pdb
                .status
                .as_ref()
                .and_then(|s| s.disruptions_allowed)
                .unwrap_or(0),
        }
    }

    /// Whether the selector is the same as `other`'s (so pods need not be re-matched).
    pub fn same_selector(&self, other: &PdbFacts) -> bool {
        self.match_labels == other.match_labels && self.match_expressions == other.match_expressions
    }

    /// Whether this PDB covers a pod of `namespace` with `labels`.
    pub fn covers(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.key.0 != namespace {
            return false;
        }
        let Some(match_labels) = &self.match_labels else {
            return false;
        };
        match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pdb_selectors_match_like_kubernetes() {
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": "default" },
            "spec": { "minAvailable": 1, "selector": { "matchLabels": { "app": "web" },
                "matchExpressions": [ { "key": "tier", "operator": "NotIn", "values": ["batch"] } ] } },
            "status": { "disruptionsAllowed": 2, "currentHealthy": 3, "desiredHealthy": 1, "expectedPods": 3 } }))
        .expect("pdb");
        let facts = PdbFacts::from_pdb(&pdb);
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(facts.covers("default", &labels(&[("app", "web")])));
        assert!(!facts.covers("other", &labels(&[("app", "web")])));
        assert!(!facts.covers("default", &labels(&[("app", "web"), ("tier", "batch")])));
        assert!(!facts.covers("default", &labels(&[("app", "db")])));
        assert_eq!(facts.disruptions_allowed, 2);
        let nil: PodDisruptionBudget = serde_json::from_value(
            json!({ "metadata": { "name": "x", "namespace": "default" }, "spec": {} }),
        )
        .expect("pdb");
        assert!(
            !PdbFacts::from_pdb(&nil).covers("default", &labels(&[])),
            "a nil selector selects nothing"
        );
    }

    #[test]
    fn pods_consuming_a_provisioning_request_form_their_own_class() {
        let pod = |annotations: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "namespace": "ml", "annotations": annotations },
                "spec": { "containers": [{ "name": "c", "resources": { "requests": { "cpu": "2" } } }] }
            }))
            .expect("pod")
        };
        let new = PodFacts::from_pod(&pod(
            serde_json::json!({ "autoscaling.x-k8s.io/consume-provisioning-request": "job-a" }),
        ));
        let old = PodFacts::from_pod(&pod(serde_json::json!({
            "cluster-autoscaler.kubernetes.io/consume-provisioning-request": "job-b"
        })));
        let plain = PodFacts::from_pod(&pod(serde_json::json!({})));
        assert_eq!(new.spec.provisioning_request.as_deref(), Some("job-a"));
        assert_eq!(old.spec.provisioning_request.as_deref(), Some("job-b"));
        assert_eq!(plain.spec.provisioning_request, None);
        assert_ne!(new.spec, plain.spec, "consumers are a class of their own");
    }

    #[test]
    fn blockers_follow_cluster_autoscaler_rules() {
        use pb::EvictionBlocker as B;
        let mut spec = PodSpecKey {
            namespace: "kube-system".into(),
            owner: None,
            requests: Resources::default(),
            node_selector: BTreeMap::new(),
            affinity: vec![],
            tolerations: vec![],
            priority: 0,
            safe_to_evict: None,
            do_not_disrupt: false,
            local_storage: true,
            mirror: false,
            provisioning_request: None,
        };
        assert_eq!(
            spec.blockers(None),
            [B::LocalStorage, B::NoController, B::KubeSystem]
        );
        assert_eq!(
            spec.blockers(Some("pdb")),
            [B::LocalStorage, B::NoController]
        );
        spec.safe_to_evict = Some(true);
        assert!(
            spec.blockers(None).is_empty(),
            "safe-to-evict=true overrides"
        );
        spec.owner = Some(("DaemonSet".into(), "fluentd".into()));
        assert_eq!(spec.blockers(None), [B::Daemonset]);
    }
}
