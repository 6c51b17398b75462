//! [`ClusterState`]: the cluster as the watches report it, kept compact and kept *aggregated* as
//! events arrive — per node the requested resources and (pod class, count) pairs, pods grouped
//! into equivalence classes — so that building a snapshot is a walk over nodes, not over pods.
//!
//! Owns no I/O: the watch sinks feed it, the snapshot builder reads it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use shoal_core::{Resources, labels, snapshot::timestamp};
use shoal_kube::convert::PodPlacement;
use shoal_proto::v1 as pb;

use crate::facts::{Labels, NodeFacts, ObjectKey, PdbFacts, PodFacts, PodSpecKey};

/// Identity of a pod class within this process.
pub type ClassId = u64;

/// Pods that are interchangeable for scheduling and for eviction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClassKey {
    /// Everything but the PDB.
    pub spec: PodSpecKey,
    /// Name of the PDB covering these pods.
    pub pdb: Option<String>,
}

struct ClassEntry {
    key: Arc<ClassKey>,
    refs: u32,
}

#[derive(Debug, Clone)]
enum Placement {
    Bound(Arc<str>),
    Unschedulable {
        since: Option<SystemTime>,
        message: Arc<str>,
    },
    Other,
}

struct PodRecord {
    class: ClassId,
    labels: Labels,
    placement: Placement,
}

impl PodRecord {
    fn is_pending(&self) -> bool {
        matches!(self.placement, Placement::Unschedulable { .. })
    }
}

/// What the pods bound to one node add up to.
#[derive(Default)]
struct Occupancy {
    requested: Resources,
    /// (class, count); a node holds few classes, so a vector beats a map.
    classes: Vec<(ClassId, u32)>,
}

/// Which kinds have completed their first list.
#[derive(Debug, Default, Clone, Copy)]
pub struct Synced {
    /// Nodes listed.
    pub nodes: bool,
    /// Pods listed.
    pub pods: bool,
    /// PodDisruptionBudgets listed.
    pub pdbs: bool,
}

impl Synced {
    /// All three kinds listed at least once.
    pub fn all(&self) -> bool {
        self.nodes && self.pods && self.pdbs
    }
}

/// Object counts, for the cache-size metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Nodes.
    pub nodes: usize,
    /// Pods.
    pub pods: usize,
    /// PodDisruptionBudgets.
    pub pdbs: usize,
    /// Pod classes.
    pub classes: usize,
    /// Unschedulable pods.
    pub pending: usize,
}

/// Measured usage of one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeUsage {
    /// Fraction of CPU in use.
    pub cpu: f64,
    /// Fraction of memory in use.
    pub memory: f64,
}

/// Utilization as last read from Prometheus.
#[derive(Debug, Clone, Default)]
pub struct Utilization {
    /// Per node.
    pub nodes: HashMap<String, NodeUsage>,
    /// When the values were read (None: never).
    pub sampled_at: Option<SystemTime>,
    /// True when the last attempt failed (values are from `sampled_at`).
    pub stale: bool,
    /// Why, when stale.
    pub error: String,
}

/// The cluster, compact and aggregated.
pub struct ClusterState {
    pool_label: String,
    nodes: BTreeMap<String, NodeFacts>,
    pods: BTreeMap<ObjectKey, PodRecord>,
    pending: BTreeSet<ObjectKey>,
    pdbs: BTreeMap<ObjectKey, PdbFacts>,
    classes: HashMap<ClassId, ClassEntry>,
    class_index: HashMap<Arc<ClassKey>, ClassId>,
    next_class: ClassId,
    occupancy: HashMap<Arc<str>, Occupancy>,
    label_sets: HashSet<Labels>,
    synced: Synced,
    relevant: bool,
    /// A pod became pending (or changed pending class) since the last `take_pending_grew`.
    pending_grew: bool,
}

impl ClusterState {
    /// An empty state; nodes name their pool with `pool_label`.
    pub fn new(pool_label: &str) -> ClusterState {
        ClusterState {
            pool_label: pool_label.to_string(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            pending: BTreeSet::new(),
            pdbs: BTreeMap::new(),
            classes: HashMap::new(),
            class_index: HashMap::new(),
            next_class: 1,
            occupancy: HashMap::new(),
            label_sets: HashSet::new(),
            synced: Synced::default(),
            relevant: false,
            pending_grew: false,
        }
    }

    /// Which kinds have been listed.
    pub fn synced(&self) -> Synced {
        self.synced
    }

    /// Whether something that warrants a prompt snapshot changed since the last call (a pod
    /// became or stopped being unschedulable; a node appeared, disappeared or changed
    /// readiness), and resets it.
    pub fn take_relevant(&mut self) -> bool {
        std::mem::take(&mut self.relevant)
    }

    /// Whether a pod became pending (or moved to another pending class) since the last call, and
    /// resets it: pending pods wait at most `batchIdle` for a snapshot, however busy the cluster.
    pub fn take_pending_grew(&mut self) -> bool {
        std::mem::take(&mut self.pending_grew)
    }

    /// Whether a relevant change is waiting to be taken.
    pub fn has_relevant(&self) -> bool {
        self.relevant
    }

    /// Object counts.
    pub fn sizes(&self) -> Sizes {
        Sizes {
            nodes: self.nodes.len(),
            pods: self.pods.len(),
            pdbs: self.pdbs.len(),
            classes: self.classes.len(),
            pending: self.pending.len(),
        }
    }

    // ---- nodes -------------------------------------------------------------------------------

    /// A node was added or changed.
    pub fn apply_node(&mut self, node: NodeFacts) {
        let relevant = self
            .nodes
            .get(&node.name)
            .is_none_or(|old| old.readiness != node.readiness);
        self.relevant |= relevant;
        self.nodes.insert(node.name.clone(), node);
    }

    /// A node was deleted.
    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.relevant = true;
        }
        self.drop_idle_occupancy(name);
    }

    /// A (re-)list of nodes completed: these are all the nodes there are.
    pub fn replace_nodes(&mut self, nodes: Vec<NodeFacts>) {
        let fresh: BTreeMap<String, NodeFacts> =
            nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        let changed = fresh.len() != self.nodes.len()
            || fresh.iter().any(|(name, n)| {
                self.nodes
                    .get(name)
                    .is_none_or(|old| old.readiness != n.readiness)
            });
        self.relevant |= changed || !self.synced.nodes;
        self.nodes = fresh;
        self.synced.nodes = true;
        let idle: Vec<Arc<str>> = self
            .occupancy
            .iter()
            .filter(|(name, occ)| occ.classes.is_empty() && !self.nodes.contains_key(&***name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle {
            self.occupancy.remove(&name);
        }
    }

    fn drop_idle_occupancy(&mut self, name: &str) {
        if self
            .occupancy
            .get(name)
            .is_some_and(|occ| occ.classes.is_empty())
            && !self.nodes.contains_key(name)
        {
            self.occupancy.remove(name);
        }
    }

    // ---- pods --------------------------------------------------------------------------------

    /// A pod was added or changed.
    pub fn apply_pod(&mut self, pod: PodFacts) {
        let key = pod.key.clone();
        let old = self.pods.remove(&key);
        let old_pending_class = old.as_ref().filter(|r| r.is_pending()).map(|r| r.class);
        if let Some(old) = old {
            self.unplace(&key, &old);
            self.release(old.class);
        }
        let record = self.record(pod);
        let new_pending_class = record.is_pending().then_some(record.class);
        self.place(&key, &record);
        self.pods.insert(key, record);
        if old_pending_class != new_pending_class {
            self.relevant = true;
            self.pending_grew |= new_pending_class.is_some();
        }
    }

    /// A pod was deleted.
    pub fn delete_pod(&mut self, key: &ObjectKey) {
        if let Some(old) = self.pods.remove(key) {
            self.relevant |= old.is_pending();
            self.unplace(key, &old);
            self.release(old.class);
            if let Placement::Bound(node) = &old.placement {
                self.drop_idle_occupancy(node);
            }
        }
    }

    /// A (re-)list of pods completed: these are all the pods there are.
    pub fn replace_pods(&mut self, pods: Vec<PodFacts>) {
        self.pods.clear();
        self.pending.clear();
        self.occupancy.clear();
        self.classes.clear();
        self.class_index.clear();
        self.label_sets.clear();
        for pod in pods {
            let key = pod.key.clone();
            let record = self.record(pod);
            self.place(&key, &record);
            self.pods.insert(key, record);
        }
        self.synced.pods = true;
        self.relevant = true;
    }

    fn record(&mut self, pod: PodFacts) -> PodRecord {
        let pdb = self.pdb_for(&pod.key.0, &pod.labels);
        let class = self.acquire(ClassKey {
            spec: pod.spec,
            pdb,
        });
        let labels = self.intern_labels(pod.labels);
        let placement = match pod.placement {
            PodPlacement::Bound(node) => Placement::Bound(self.node_name(&node)),
            PodPlacement::Unschedulable { since, message } => Placement::Unschedulable {
                since,
                message: message.into(),
            },
            PodPlacement::Other => Placement::Other,
        };
        PodRecord {
            class,
            labels,
            placement,
        }
    }

    fn node_name(&self, name: &str) -> Arc<str> {
        match self.occupancy.get_key_value(name) {
            Some((arc, _)) => arc.clone(),
            None => Arc::from(name),
        }
    }

    fn intern_labels(&mut self, labels: BTreeMap<String, String>) -> Labels {
        if let Some(existing) = self.label_sets.get(&labels) {
            return existing.clone();
        }
        let shared: Labels = Arc::new(labels);
        // Bound the interner: sets only this table still holds are dropped now and then.
        if self.label_sets.len() > 4 * self.pods.len().max(1024) {
            self.label_sets.retain(|l| Arc::strong_count(l) > 1);
        }
        self.label_sets.insert(shared.clone());
        shared
    }

    fn place(&mut self, key: &ObjectKey, record: &PodRecord) {
        match &record.placement {
            Placement::Bound(node) => {
                let requests = self
                    .classes
                    .get(&record.class)
                    .map(|c| c.key.spec.requests.clone())
                    .unwrap_or_default();
                let occ = self.occupancy.entry(node.clone()).or_default();
                occ.requested = occ.requested.saturating_add(&requests);
                match occ.classes.iter_mut().find(|(c, _)| *c == record.class) {
                    Some((_, n)) => *n += 1,
                    None => occ.classes.push((record.class, 1)),
                }
            }
            Placement::Unschedulable { .. } => {
                self.pending.insert(key.clone());
            }
            Placement::Other => {}
        }
    }

    fn unplace(&mut self, key: &ObjectKey, record: &PodRecord) {
        match &record.placement {
            Placement::Bound(node) => {
                let requests = self
                    .classes
                    .get(&record.class)
                    .map(|c| c.key.spec.requests.clone())
                    .unwrap_or_default();
                if let Some(occ) = self.occupancy.get_mut(node) {
                    occ.requested = occ.requested.saturating_sub(&requests);
                    if let Some(i) = occ.classes.iter().position(|(c, _)| *c == record.class) {
                        occ.classes[i].1 -= 1;
                        if occ.classes[i].1 == 0 {
                            occ.classes.swap_remove(i);
                        }
                    }
                }
            }
            Placement::Unschedulable { .. } => {
                self.pending.remove(key);
            }
            Placement::Other => {}
        }
    }

    fn acquire(&mut self, key: ClassKey) -> ClassId {
        if let Some(id) = self.class_index.get(&key) {
            if let Some(entry) = self.classes.get_mut(id) {
                entry.refs += 1;
            }
            return *id;
        }
        let id = self.next_class;
        self.next_class += 1;
        let key = Arc::new(key);
        self.class_index.insert(key.clone(), id);
        self.classes.insert(id, ClassEntry { key, refs: 1 });
        id
    }

    fn release(&mut self, id: ClassId) {
        let gone = match self.classes.get_mut(&id) {
            Some(entry) => {
                entry.refs = entry.refs.saturating_sub(1);
                entry.refs == 0
            }
            None => false,
        };
        if gone && let Some(entry) = self.classes.remove(&id) {
            self.class_index.remove(&entry.key);
        }
    }

    // ---- PodDisruptionBudgets ----------------------------------------------------------------

    fn pdb_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Option<String> {
        self.pdbs
            .range((namespace.to_string(), String::new())..)
            .take_while(|(key, _)| key.0 == namespace)
            .find(|(_, pdb)| pdb.covers(namespace, labels))
            .map(|(key, _)| key.1.clone())
    }

    /// A PDB was added or changed.
    pub fn apply_pdb(&mut self, pdb: PdbFacts) {
        let namespace = pdb.key.0.clone();
        let reselect = self
            .pdbs
            .get(&pdb.key)
            .is_none_or(|old| !old.same_selector(&pdb));
        self.pdbs.insert(pdb.key.clone(), pdb);
        if reselect {
            self.rematch_namespace(&namespace);
        }
    }

    /// A PDB was deleted.
    pub fn delete_pdb(&mut self, key: &ObjectKey) {
        if self.pdbs.remove(key).is_some() {
            self.rematch_namespace(&key.0);
        }
    }

    /// A (re-)list of PDBs completed.
    pub fn replace_pdbs(&mut self, pdbs: Vec<PdbFacts>) {
        let fresh: BTreeMap<ObjectKey, PdbFacts> =
            pdbs.into_iter().map(|p| (p.key.clone(), p)).collect();
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        for (key, pdb) in &fresh {
            if self.pdbs.get(key).is_none_or(|old| !old.same_selector(pdb)) {
                namespaces.insert(key.0.clone());
            }
        }
        for key in self.pdbs.keys() {
            if !fresh.contains_key(key) {
                namespaces.insert(key.0.clone());
            }
        }
        self.pdbs = fresh;
        self.synced.pdbs = true;
        for namespace in namespaces {
            self.rematch_namespace(&namespace);
        }
    }

    /// Re-derives which PDB covers each pod of `namespace`, moving pods between classes.
    fn rematch_namespace(&mut self, namespace: &str) {
        let keys: Vec<ObjectKey> = self
            .pods
            .range((namespace.to_string(), String::new())..)
            .take_while(|(key, _)| key.0 == namespace)
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let Some(record) = self.pods.get(&key) else {
                continue;
            };
            let pdb = self.pdb_for(namespace, &record.labels);
            let Some(current) = self.classes.get(&record.class).map(|c| c.key.clone()) else {
                continue;
            };
            if current.pdb == pdb {
                continue;
            }
            let Some(record) = self.pods.remove(&key) else {
                continue;
            };
            self.unplace(&key, &record);
            self.release(record.class);
            let class = self.acquire(ClassKey {
                spec: current.spec.clone(),
                pdb,
            });
            let record = PodRecord { class, ..record };
            self.relevant |= record.is_pending();
            self.place(&key, &record);
            self.pods.insert(key, record);
        }
    }

    // ---- snapshots ---------------------------------------------------------------------------

    /// Node names with their allocatable and requested resources, for `GetNodeMetrics`.
    pub fn node_resources(&self) -> Vec<(String, Resources, Resources)> {
        self.nodes
            .keys()
            .map(|name| {
                let node = &self.nodes[name];
                let requested = self
                    .occupancy
                    .get(name.as_str())
                    .map(|o| o.requested.clone())
                    .unwrap_or_default();
                (name.clone(), node.allocatable.clone(), requested)
            })
            .collect()
    }

    /// The snapshot of this moment. `usage` is attached per node; `now` dates it.
    pub fn snapshot(
        &self,
        sequence: u64,
        now: SystemTime,
        usage: &Utilization,
        traceparent: String,
    ) -> pb::ClusterSnapshot {
        let sampled_at = usage.sampled_at.map(timestamp);
        let nodes: Vec<pb::NodeInfo> = self
            .nodes
            .values()
            .map(|node| {
                let occ = self.occupancy.get(node.name.as_str());
                pb::NodeInfo {
                    name: node.name.clone(),
                    pool: node
                        .labels
                        .get(&self.pool_label)
                        .cloned()
                        .unwrap_or_default(),
                    claim_id: node.labels.get(labels::CLAIM).cloned().unwrap_or_default(),
                    allocatable: Some((&node.allocatable).into()),
                    requested: Some(occ.map(|o| (&o.requested).into()).unwrap_or_default()),
                    usage: usage.nodes.get(&node.name).map(|u| pb::NodeUsage {
                        cpu: u.cpu,
                        memory: u.memory,
                        sampled_at,
                    }),
                    labels: node.labels.clone(),
                    taints: node.taints.clone(),
                    readiness: node.readiness as i32,
                    unschedulable: node.unschedulable,
                    created_at: node.created_at.map(timestamp),
                    scale_down_disabled: node.scale_down_disabled,
                    pods: occ
                        .map(|o| {
                            o.classes
                                .iter()
                                .map(|(class, count)| pb::ClassCount {
                                    class_id: *class,
                                    count: *count as i32,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    ready_since: node.ready_since.map(timestamp),
                }
            })
            .collect();

        // Pending pods by class: count, the oldest's time and message.
        let mut pending: BTreeMap<ClassId, (i32, Option<SystemTime>, Arc<str>)> = BTreeMap::new();
        for key in &self.pending {
            let Some(record) = self.pods.get(key) else {
                continue;
            };
            let Placement::Unschedulable { since, message } = &record.placement else {
                continue;
            };
            let entry = pending
                .entry(record.class)
                .or_insert((0, *since, message.clone()));
            entry.0 += 1;
            if since.is_some() && (entry.1.is_none() || *since < entry.1) {
                entry.1 = *since;
                entry.2 = message.clone();
            }
        }

        let allowance: HashMap<(&str, &str), i32> = self
            .pdbs
            .values()
            .map(|p| ((p.key.0.as_str(), p.key.1.as_str()), p.disruptions_allowed))
            .collect();
        // Every live class (a few may belong only to pods that are neither bound nor pending).
        let mut ids: Vec<ClassId> = self.classes.keys().copied().collect();
        ids.sort_unstable();
        let classes = ids
            .iter()
            .filter_map(|id| Some((*id, self.classes.get(id)?)))
            .map(|(id, entry)| {
                let key = &entry.key;
                let mut blockers = key.spec.blockers(key.pdb.as_deref());
                if let Some(pdb) = &key.pdb
                    && allowance
                        .get(&(key.spec.namespace.as_str(), pdb.as_str()))
                        .is_none_or(|allowed| *allowed <= 0)
                {
                    blockers.push(pb::EvictionBlocker::Pdb);
                }
                pb::PodClass {
                    provisioning_request: key.spec.provisioning_request.clone().unwrap_or_default(),
                    id,
                    namespace: key.spec.namespace.clone(),
                    owner: key.spec.owner.as_ref().map(|(kind, name)| pb::OwnerRef {
                        kind: kind.clone(),
                        name: name.clone(),
                    }),
                    requests: Some((&key.spec.requests).into()),
                    node_selector: key.spec.node_selector.clone(),
                    required_affinity: key
                        .spec
                        .affinity
                        .iter()
                        .map(|term| pb::NodeSelectorTerm {
                            match_expressions: term
                                .iter()
                                .map(|r| pb::NodeSelectorRequirement {
                                    key: r.key.clone(),
                                    operator: r.operator.clone(),
                                    values: r.values.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                    tolerations: key
                        .spec
                        .tolerations
                        .iter()
                        .map(|t| pb::Toleration {
                            key: t.key.clone(),
                            operator: t.operator.clone(),
                            value: t.value.clone(),
                            effect: shoal_core::snapshot::effect_from_name(&t.effect)
                                .map_or(pb::TaintEffect::Unspecified, |e| {
                                    shoal_core::snapshot::effect_to_proto(e)
                                }) as i32,
                            toleration_seconds: t.seconds.unwrap_or(0),
                            has_toleration_seconds: t.seconds.is_some(),
                        })
                        .collect(),
                    pdb: key.pdb.clone().unwrap_or_default(),
                    blockers: blockers.into_iter().map(|b| b as i32).collect(),
                    priority: key.spec.priority,
                }
            })
            .collect();

        let pending = pending
            .into_iter()
            .map(|(id, (count, since, message))| pb::PendingPods {
                class_id: id,
                count,
                unschedulable_since: since.map(timestamp),
                scheduler_message: message.to_string(),
            })
            .collect();
        let pdbs = self
            .pdbs
            .values()
            .map(|p| pb::PdbAllowance {
                namespace: p.key.0.clone(),
                name: p.key.1.clone(),
                disruptions_allowed: p.disruptions_allowed,
            })
            .collect();
        let utilization_age = usage.sampled_at.map(|at| {
            let age = now.duration_since(at).unwrap_or_default();
            prost_types::Duration {
                seconds: age.as_secs() as i64,
                nanos: age.subsec_nanos() as i32,
            }
        });
        pb::ClusterSnapshot {
            sequence,
            taken_at: Some(timestamp(now)),
            nodes,
            classes,
            pending,
            pdbs,
            utilization_stale: usage.stale,
            utilization_age,
            traceparent,
            utilization_error: usage.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::{
        core::v1::{Node, Pod},
        policy::v1::PodDisruptionBudget,
    };
    use serde_json::json;

    fn node(name: &str, ready: &str) -> NodeFacts {
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "shoal.dev/pool": "general" } },
            "status": { "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
                "conditions": [ { "type": "Ready", "status": ready } ] } }))
        .expect("node");
        NodeFacts::from_node(&node)
    }

    fn pod(name: &str, app: &str, cpu: &str, node: Option<&str>) -> PodFacts {
        let mut value = json!({
            "metadata": { "name": name, "namespace": "default", "labels": { "app": app },
                "ownerReferences": [ { "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": app, "uid": "u", "controller": true } ] },
            "spec": { "containers": [ { "name": "c", "image": "x", "resources": { "requests": { "cpu": cpu, "memory": "1Gi" } } } ] },
            "status": { "phase": "Pending" } });
        match node {
            Some(node) => {
                value["spec"]["nodeName"] = json!(node);
                value["status"]["phase"] = json!("Running");
            }
            None => {
                value["status"]["conditions"] = json!([ { "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 Insufficient cpu.", "lastTransitionTime": "2026-01-01T00:00:00Z" } ]);
            }
        }
        let pod: Pod = serde_json::from_value(value).expect("pod");
        PodFacts::from_pod(&pod)
    }

    fn pdb(name: &str, app: &str, allowed: i32) -> PdbFacts {
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "selector": { "matchLabels": { "app": app } } },
            "status": { "disruptionsAllowed": allowed, "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0 } }))
        .expect("pdb");
        PdbFacts::from_pdb(&pdb)
    }

    fn synced_state() -> ClusterState {
        let mut state = ClusterState::new(labels::POOL);
        state.replace_nodes(vec![node("n1", "True"), node("n2", "True")]);
        state.replace_pods(vec![]);
        state.replace_pdbs(vec![]);
        state.take_relevant();
        state
    }

    fn snap(state: &ClusterState) -> pb::ClusterSnapshot {
        state.snapshot(1, SystemTime::now(), &Utilization::default(), String::new())
    }

    #[test]
    fn pods_group_into_classes_and_nodes_add_up() {
        let mut state = synced_state();
        for i in 0..3 {
            state.apply_pod(pod(&format!("web-{i}"), "web", "500m", Some("n1")));
        }
        state.apply_pod(pod("db-0", "db", "1", Some("n1")));
        state.apply_pod(pod("web-3", "web", "500m", Some("n2")));
        assert!(
            !state.take_relevant(),
            "running pods do not call for a snapshot"
        );
        let s = snap(&state);
        assert_eq!(s.classes.len(), 2, "web and db");
        let n1 = &s.nodes[0];
        assert_eq!(n1.name, "n1");
        assert_eq!(n1.pool, "general");
        assert_eq!(n1.requested.as_ref().map(|r| r.cpu_millis), Some(2500));
        assert_eq!(n1.requested.as_ref().map(|r| r.pods), Some(4));
        let counts: Vec<i32> = n1.pods.iter().map(|c| c.count).collect();
        assert_eq!(counts.iter().sum::<i32>(), 4);
        assert!(counts.contains(&3) && counts.contains(&1));

        // A pod that moves and one that goes away leave no trace behind.
        state.delete_pod(&("default".into(), "web-0".into()));
        state.apply_pod(pod("db-0", "db", "1", Some("n2")));
        let s = snap(&state);
        assert_eq!(
            s.nodes[0].requested.as_ref().map(|r| r.cpu_millis),
            Some(1000)
        );
        assert_eq!(
            s.nodes[1].requested.as_ref().map(|r| r.cpu_millis),
            Some(1500)
        );
        assert_eq!(state.sizes().pods, 4);
    }

    #[test]
    fn unschedulable_pods_are_pending_and_relevant() {
        let mut state = synced_state();
        state.apply_pod(pod("big-0", "big", "8", None));
        state.apply_pod(pod("big-1", "big", "8", None));
        assert!(state.take_relevant());
        assert!(state.take_pending_grew(), "pods turned pending");
        let s = snap(&state);
        assert_eq!(s.pending.len(), 1);
        assert_eq!(s.pending[0].count, 2);
        assert!(s.pending[0].scheduler_message.contains("Insufficient cpu"));
        assert!(s.pending[0].unschedulable_since.is_some());
        // Bound at last: no longer pending, and that matters too.
        state.apply_pod(pod("big-0", "big", "8", Some("n1")));
        assert!(state.take_relevant());
        assert!(
            !state.take_pending_grew(),
            "a pod bound is not a new pending pod"
        );
        assert_eq!(snap(&state).pending[0].count, 1);
        state.delete_pod(&("default".into(), "big-1".into()));
        assert!(state.take_relevant());
        assert!(snap(&state).pending.is_empty());
    }

    #[test]
    fn readiness_changes_and_node_churn_are_relevant_and_relists_leave_no_ghosts() {
        let mut state = synced_state();
        state.apply_node(node("n1", "True"));
        assert!(!state.take_relevant(), "a heartbeat is not news");
        state.apply_node(node("n1", "False"));
        assert!(state.take_relevant());
        state.apply_pod(pod("web-0", "web", "1", Some("n2")));
        state.replace_nodes(vec![node("n3", "True")]);
        assert!(state.take_relevant());
        let s = snap(&state);
        assert_eq!(
            s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["n3"]
        );
        state.replace_pods(vec![pod("web-9", "web", "1", Some("n3"))]);
        let s = snap(&state);
        assert_eq!(s.nodes[0].pods.iter().map(|c| c.count).sum::<i32>(), 1);
        assert_eq!(state.sizes().pods, 1, "the re-list replaced the pods");
        assert_eq!(state.sizes().classes, 1);
    }

    #[test]
    fn pdbs_split_classes_and_block_when_exhausted() {
        let mut state = synced_state();
        state.apply_pod(pod("web-0", "web", "1", Some("n1")));
        state.apply_pod(pod("web-1", "web", "1", Some("n1")));
        let before = snap(&state);
        assert_eq!(before.classes[0].pdb, "");
        state.apply_pdb(pdb("web-pdb", "web", 0));
        let s = snap(&state);
        assert_eq!(s.classes.len(), 1);
        assert_eq!(s.classes[0].pdb, "web-pdb");
        assert!(
            s.classes[0]
                .blockers
                .contains(&(pb::EvictionBlocker::Pdb as i32))
        );
        assert_eq!(s.pdbs[0].disruptions_allowed, 0);
        state.apply_pdb(pdb("web-pdb", "web", 1));
        let s = snap(&state);
        assert!(
            s.classes[0].blockers.is_empty(),
            "{:?}",
            s.classes[0].blockers
        );
        state.delete_pdb(&("default".into(), "web-pdb".into()));
        assert_eq!(snap(&state).classes[0].pdb, "");
        assert_eq!(state.sizes().classes, 1, "the old class was released");
    }
}
