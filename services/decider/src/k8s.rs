//! The decider's Kubernetes face (when `service.kube` is set): NodePool custom resources as the
//! source of pools (`poolSource: crd`), their status written back, and Events like Cluster
//! Autoscaler's — TriggeredScaleUp / NotTriggerScaleUp on pending pods, ScaleDown on nodes and
//! on the pods evicted from them — each naming the decision id.
//!
//! Only the leader runs this. Decisions reach it through a bounded channel: a slow API server
//! delays Events, never a decision.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use shoal_core::{
    ClaimPhase,
    crd::{NodePool, NodePoolStatus, condition},
    pool::Pool,
};
use shoal_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::control::Decider;

/// How often NodePool status is brought up to date.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);
/// A pod gets NotTriggerScaleUp at most this often.
const NOT_TRIGGERED_EVERY: Duration = Duration::from_secs(300);
/// Decisions queued for Events before new ones are dropped.
const QUEUE: usize = 64;

/// What the event writer needs of one decision.
pub struct Published {
    /// The decision.
    pub decision: pb::Decision,
    /// The snapshot's pod classes (to find the pods of each outcome).
    pub classes: Vec<pb::PodClass>,
}

/// The leader's link to the Kubernetes API.
pub struct KubeFace {
    client: Client,
    /// Without a read deadline, for the NodePool watch.
    watch_client: Client,
    /// Pools come from NodePool resources (whose status this face writes).
    pub crd_pools: bool,
    /// Events are written.
    pub events: bool,
    tx: mpsc::Sender<Published>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Published>>,
    /// Last decision that acted on each pool: (id, reason).
    last_action: Mutex<HashMap<String, (String, String)>>,
    /// Validation errors of NodePool resources the store refused, by name.
    invalid: Mutex<HashMap<String, String>>,
    /// The NodePool watch has listed every resource once.
    synced: std::sync::atomic::AtomicBool,
}

impl KubeFace {
    /// A face on `client`.
    pub fn new(client: Client, watch_client: Client, crd_pools: bool, events: bool) -> KubeFace {
        let (tx, rx) = mpsc::channel(QUEUE);
        KubeFace {
            client,
            watch_client,
            crd_pools,
            events,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            last_action: Mutex::new(HashMap::new()),
            invalid: Mutex::new(HashMap::new()),
            synced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Hands a decision to the event writer (dropped, with a log line, if it is behind).
    pub fn publish(&self, decision: &pb::Decision, snapshot: &pb::ClusterSnapshot) {
        {
            let mut last = self.last_action.lock().unwrap_or_else(|p| p.into_inner());
            for action in &decision.actions {
                let (pool, reason) = match &action.action {
                    Some(pb::scale_action::Action::ScaleUp(up)) => (&up.pool, &up.reason),
                    Some(pb::scale_action::Action::ScaleDown(down)) => (&down.pool, &down.reason),
                    None => continue,
                };
                last.insert(pool.clone(), (decision.id.clone(), reason.clone()));
            }
        }
        let interesting = self.events
            && (!decision.actions.is_empty() || decision.outcomes.iter().any(|o| o.unplaced > 0));
        if !interesting {
            return;
        }
        let published = Published {
            decision: decision.clone(),
            classes: snapshot.classes.clone(),
        };
        if self.tx.try_send(published).is_err() {
            tracing::warn!(decision = %decision.id, "event writer is behind: no Events for this decision");
        }
    }

    /// The leader's work until dropped: pool sync (CRD source), status, Events.
    pub async fn run(self: Arc<Self>, decider: Arc<Decider>) {
        let pools = async {
            if self.crd_pools {
                tokio::join!(self.sync_pools(&decider), self.keep_status(&decider));
            }
        };
        let events = async {
            if self.events {
                self.write_events().await
            }
        };
        tokio::join!(pools, events);
        futures::future::pending::<()>().await
    }

    /// Applies every NodePool resource to the store and deletes stored pools that have none.
    async fn sync_pools(&self, decider: &Decider) {
        let api: Api<NodePool> = Api::all(self.watch_client.clone());
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitApply(pool) | watcher::Event::Apply(pool)) => {
                    self.apply(decider, &pool).await
                }
                // Stored pools without a resource go in the status pass (`remove_orphans`).
                Ok(watcher::Event::InitDone) => self
                    .synced
                    .store(true, std::sync::atomic::Ordering::Release),
                Ok(watcher::Event::Delete(pool)) => {
                    if let Some(name) = &pool.metadata.name {
                        self.remove(decider, name).await;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "NodePool watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn apply(&self, decider: &Decider, pool: &NodePool) {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let result = pool
            .to_document()
            .to_proto()
            .map_err(|e| e.to_string())
            .and_then(|proto| {
                Pool::from_proto(&proto)
                    .map(|_| proto)
                    .map_err(|e| e.to_string())
            });
        let outcome = match result {
            Ok(proto) => decider
                .store
                .apply_pool(proto, 0)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(why) => Err(why),
        };
        let mut invalid = self.invalid.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                tracing::info!(pool = %name, "pool applied from its NodePool resource");
                invalid.remove(&name);
            }
            Err(why) => {
                tracing::warn!(pool = %name, error = %why, "NodePool resource refused");
                invalid.insert(name, why);
            }
        }
    }

    async fn remove(&self, decider: &Decider, name: &str) {
        match decider.store.delete_pool(name, 0).await {
            Ok(()) => tracing::info!(pool = %name, "pool deleted with its NodePool resource"),
            Err(err) => tracing::warn!(pool = %name, error = %err, "pool could not be deleted"),
        }
        self.invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Writes each NodePool's status when it changes.
    async fn keep_status(&self, decider: &Decider) {
        let api: Api<NodePool> = Api::all(self.client.clone());
        loop {
            if let Err(err) = self.write_status(&api, decider).await {
                tracing::debug!(error = %err, "NodePool status not written");
            }
            tokio::time::sleep(STATUS_INTERVAL).await;
        }
    }

    async fn write_status(&self, api: &Api<NodePool>, decider: &Decider) -> Result<(), String> {
        // Stored pools first, then the resources: a pool stored meanwhile is not in the first
        // list, so it cannot be mistaken for one whose resource is gone.
        let stored = decider
            .store
            .list_pools()
            .await
            .map_err(|e| e.to_string())?;
        let resources = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        self.remove_orphans(decider, &stored, &resources.items)
            .await;
        let claims = decider.claims_now().await.map_err(|e| e.to_string())?;
        for resource in resources {
            let Some(name) = resource.metadata.name.clone() else {
                continue;
            };
            let previous = resource.status.clone().unwrap_or_default();
            let mut status = NodePoolStatus {
                observed_generation: resource.metadata.generation.unwrap_or(0),
                ..Default::default()
            };
            let mut launching = 0;
            let mut last_failure: Option<(u64, String)> = None;
            for claim in claims.iter().filter(|c| c.pool == name) {
                if claim.phase == ClaimPhase::Failed {
                    if last_failure
                        .as_ref()
                        .is_none_or(|(at, _)| claim.updated_at_ms > *at)
                    {
                        last_failure = Some((claim.updated_at_ms, claim.failure_reason.clone()));
                    }
                    continue;
                }
                if claim.phase.is_terminal() {
                    continue;
                }
                status.nodes += 1;
                *status
                    .phases
                    .entry(format!("{:?}", claim.phase))
                    .or_default() += 1;
                match claim.phase {
                    ClaimPhase::Ready => status.ready_nodes += 1,
                    ClaimPhase::Pending | ClaimPhase::Launched | ClaimPhase::Registered => {
                        launching += 1
                    }
                    _ => {}
                }
            }
            let max = i64::from(resource.spec.limits.max_nodes);
            let invalid = self
                .invalid
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
            let old = &previous.conditions;
            status.conditions = vec![
                match &invalid {
                    Some(why) => condition(old, "Ready", false, "InvalidSpec", why.clone()),
                    None => condition(
                        old,
                        "Ready",
                        true,
                        "Applied",
                        "the decider plans with this spec",
                    ),
                },
                condition(
                    old,
                    "LimitReached",
                    status.nodes >= max,
                    if status.nodes >= max {
                        "MaxNodes"
                    } else {
                        "BelowMax"
                    },
                    format!("{} of maxNodes {max}", status.nodes),
                ),
                condition(
                    old,
                    "ScalingUp",
                    launching > 0,
                    if launching > 0 {
                        "NodesLaunching"
                    } else {
                        "Steady"
                    },
                    format!("{launching} nodes launching or registering"),
                ),
                match &last_failure {
                    Some((_, why)) => condition(old, "Degraded", true, "LaunchFailed", why.clone()),
                    None => condition(old, "Degraded", false, "NoFailures", ""),
                },
            ];
            if let Some((id, reason)) = self
                .last_action
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
            {
                status.last_decision_id = id.clone();
                status.last_decision_reason = reason.clone();
            } else {
                status.last_decision_id = previous.last_decision_id.clone();
                status.last_decision_reason = previous.last_decision_reason.clone();
            }
            if status == previous {
                continue;
            }
            let patch = serde_json::json!({ "status": status });
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

    /// Deletes stored pools that have no NodePool (their removal was refused while they had live
    /// claims, or they predate `poolSource: crd`), once the first list of resources was seen.
    async fn remove_orphans(
        &self,
        decider: &Decider,
        stored: &[pb::NodePool],
        resources: &[NodePool],
    ) {
        if !self.synced.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        for pool in stored {
            if resources
                .iter()
                .any(|r| r.metadata.name.as_deref() == Some(pool.name.as_str()))
            {
                continue;
            }
            match decider.store.delete_pool(&pool.name, 0).await {
                Ok(()) => tracing::info!(pool = %pool.name, "pool without a NodePool deleted"),
                Err(err) => {
                    tracing::debug!(pool = %pool.name, error = %err, "pool without a NodePool kept for now")
                }
            }
        }
    }

    /// Writes the Events of each published decision.
    async fn write_events(&self) {
        let mut rx = self.rx.lock().await;
        let mut not_triggered: HashMap<String, Instant> = HashMap::new();
        while let Some(published) = rx.recv().await {
            not_triggered.retain(|_, at| at.elapsed() < NOT_TRIGGERED_EVERY);
            if let Err(err) = self.events_of(&published, &mut not_triggered).await {
                tracing::warn!(decision = %published.decision.id, error = %err, "Events not written");
            }
        }
    }

    async fn events_of(
        &self,
        published: &Published,
        not_triggered: &mut HashMap<String, Instant>,
    ) -> Result<(), kube::Error> {
        let decision = &published.decision;
        let ups: BTreeMap<&str, i32> = decision
            .actions
            .iter()
            .filter_map(|a| match &a.action {
                Some(pb::scale_action::Action::ScaleUp(up)) => Some((up.pool.as_str(), up.count)),
                _ => None,
            })
            .collect();
        let helped = decision
            .outcomes
            .iter()
            .any(|o| !o.placed_new.is_empty() || o.unplaced > 0);
        if helped {
            let pods: Api<Pod> = Api::all(self.client.clone());
            let pending = pods
                .list(&ListParams::default().fields("spec.nodeName=,status.phase=Pending"))
                .await?;
            for pod in pending.items {
                let Some(outcome) = outcome_of(&pod, &decision.outcomes, &published.classes) else {
                    continue;
                };
                let key = format!(
                    "{}/{}",
                    pod.metadata.namespace.clone().unwrap_or_default(),
                    pod.metadata.name.clone().unwrap_or_default()
                );
                if !outcome.placed_new.is_empty() {
                    let groups: Vec<String> = outcome
                        .placed_new
                        .keys()
                        .map(|pool| {
                            format!("{pool} +{}", ups.get(pool.as_str()).copied().unwrap_or(0))
                        })
                        .collect();
                    let message = format!(
                        "pod triggered scale-up: [{}] (decision {})",
                        groups.join(", "),
                        decision.id
                    );
                    self.event(pod_ref(&pod), "Normal", "TriggeredScaleUp", &message)
                        .await?;
                    not_triggered.remove(&key);
                } else if outcome.unplaced > 0 && outcome.placed_existing == 0 {
                    if not_triggered.contains_key(&key) {
                        continue;
                    }
                    let verdicts: Vec<String> = outcome
                        .verdicts
                        .iter()
                        .filter(|v| !v.fits)
                        .map(|v| format!("{}: {}", v.pool, v.reason))
                        .collect();
                    let message = format!(
                        "pod didn't trigger scale-up: {} (decision {})",
                        if verdicts.is_empty() {
                            "no pool can take it".to_string()
                        } else {
                            verdicts.join("; ")
                        },
                        decision.id
                    );
                    self.event(pod_ref(&pod), "Normal", "NotTriggerScaleUp", &message)
                        .await?;
                    not_triggered.insert(key, Instant::now());
                }
            }
        }
        for action in &decision.actions {
            let Some(pb::scale_action::Action::ScaleDown(down)) = &action.action else {
                continue;
            };
            let pods: Api<Pod> = Api::all(self.client.clone());
            for node in &down.nodes {
                let node_ref = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.clone()),
                    ..Default::default()
                };
                let message = format!(
                    "node removed by Shoal from pool {}: {} (decision {})",
                    down.pool, down.reason, decision.id
                );
                self.event(node_ref, "Normal", "ScaleDown", &message)
                    .await?;
                let on_node = pods
                    .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                    .await?;
                for pod in on_node.items {
                    let message = format!(
                        "deleting pod for node scale down: {node} (decision {})",
                        decision.id
                    );
                    self.event(pod_ref(&pod), "Normal", "ScaleDown", &message)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn event(
        &self,
        object: ObjectReference,
        event_type: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", object.name.clone().unwrap_or_default())),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: object,
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(event_type.into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some("shoal-decider".into()),
                host: None,
            }),
            reporting_component: Some("shoal.dev/decider".into()),
            reporting_instance: Some(hostname()),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "shoal-decider".into())
}

fn pod_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// The outcome of the class `pod` belongs to: same namespace, controller and requests.
fn outcome_of<'a>(
    pod: &Pod,
    outcomes: &'a [pb::ClassOutcome],
    classes: &[pb::PodClass],
) -> Option<&'a pb::ClassOutcome> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let owner = shoal_kube::convert::controller_of(pod);
    let requests = shoal_kube::convert::pod_requests(pod);
    let class = classes.iter().find(|c| {
        let class_owner = c
            .owner
            .as_ref()
            .filter(|o| !o.kind.is_empty())
            .map(|o| (o.kind.clone(), o.name.clone()));
        let r = c.requests.clone().unwrap_or_default();
        c.namespace == namespace
            && class_owner == owner
            && r.cpu_millis == requests.cpu_millis
            && r.memory_bytes == requests.memory_bytes
    })?;
    outcomes.iter().find(|o| o.class_id == class.id)
}
