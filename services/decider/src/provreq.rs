//! ProvisioningRequest resources (`autoscaling.x-k8s.io/v1`, the contract Kueue's provisioning
//! admission check and Cluster Autoscaler share), when `service.capacity.provisioningRequests`
//! is on: each request of a class Shoal serves becomes a stored capacity request (pod sets read
//! from their PodTemplates), its lifecycle is written back as status conditions and
//! `provisioningClassDetails`, and deleting the resource ends its booking.
//!
//! Only the leader runs this. Requests of other classes are left alone (another autoscaler may
//! serve them), as Cluster Autoscaler does.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodTemplate};
use kube::{
    Api, Client, CustomResource,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde::{Deserialize, Serialize};
use shoal_core::{ValidationErrors, snapshot};
use shoal_proto::v1 as pb;

use crate::{
    capacity::{self, Book, class_name},
    control::Decider,
};

/// `spec` of a ProvisioningRequest (upstream `autoscaling.x-k8s.io/v1`; the CRD installed is
/// upstream's, deploy/k8s/crds/autoscaling.x-k8s.io_provisioningrequests.yaml).
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "autoscaling.x-k8s.io",
    version = "v1",
    kind = "ProvisioningRequest",
    namespaced,
    status = "ProvisioningRequestStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningRequestSpec {
    /// Groups of pods to make room for.
    pub pod_sets: Vec<PodSet>,
    /// How: best-effort-atomic-scale-up or check-capacity (`….autoscaling.x-k8s.io`).
    pub provisioning_class_name: String,
    /// Class parameters (ValidUntilSeconds, noRetry).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// One group of identical pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSet {
    /// The PodTemplate (same namespace) describing the pods.
    pub pod_template_ref: Reference,
    /// How many.
    pub count: i32,
}

/// A reference to an object in the same namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Reference {
    /// Its name.
    #[serde(default)]
    pub name: String,
}

/// A status condition (metav1.Condition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Accepted, Provisioned, Failed, BookingExpired, CapacityRevoked.
    #[serde(rename = "type")]
    pub condition_type: String,
    /// True or False.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// What a human reads.
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `status` of a ProvisioningRequest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningRequestStatus {
    /// Where the request stands.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Shoal's details: the capacity request id, nodes per pool, booking, consumption, the
    /// latest step of the explanation.
    #[serde(default)]
    pub provisioning_class_details: BTreeMap<String, String>,
}

/// The id a ProvisioningRequest's capacity request gets (its uid: unique and stable).
fn request_id(pr: &ProvisioningRequest) -> Option<String> {
    pr.metadata.uid.as_ref().map(|uid| format!("pr-{uid}"))
}

fn class_of(name: &str) -> Option<pb::CapacityClass> {
    match name {
        class_name::ATOMIC => Some(pb::CapacityClass::AtomicScaleUp),
        class_name::CHECK => Some(pb::CapacityClass::CheckCapacity),
        _ => None,
    }
}

/// The pod class a PodTemplate describes.
pub fn pod_class(template: &PodTemplate, namespace: &str) -> pb::PodClass {
    let t = template.template.clone().unwrap_or_default();
    let pod = Pod {
        metadata: t.metadata.unwrap_or_default(),
        spec: t.spec,
        status: None,
    };
    let demand = shoal_kube::convert::pod_demand(&pod);
    pb::PodClass {
        namespace: namespace.to_string(),
        requests: Some((&demand.requests).into()),
        node_selector: demand.node_selector.into_iter().collect(),
        required_affinity: demand
            .required_affinity
            .iter()
            .map(|term| pb::NodeSelectorTerm {
                match_expressions: term.iter().map(snapshot::requirement_to_proto).collect(),
            })
            .collect(),
        tolerations: demand
            .tolerations
            .iter()
            .map(snapshot::toleration_to_proto)
            .collect(),
        ..Default::default()
    }
}

/// The leader's link to ProvisioningRequest resources.
pub struct ProvisioningRequests {
    client: Client,
    watch_client: Client,
}

impl ProvisioningRequests {
    /// Follows ProvisioningRequests through `client` (and `watch_client`, without a read
    /// deadline, for the watch).
    pub fn new(client: Client, watch_client: Client) -> ProvisioningRequests {
        ProvisioningRequests {
            client,
            watch_client,
        }
    }

    /// The leader's work until dropped: requests in, status out.
    pub async fn run(self: Arc<Self>, decider: Arc<Decider>) {
        tokio::join!(self.follow(&decider), self.keep_status(&decider));
    }

    async fn follow(&self, decider: &Decider) {
        let api: Api<ProvisioningRequest> = Api::all(self.watch_client.clone());
        let mut events = watcher(api, watcher::Config::default()).boxed();
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listed.clear(),
                Ok(watcher::Event::InitApply(pr)) => {
                    if let Some(id) = request_id(&pr) {
                        listed.insert(id);
                    }
                    self.admit(decider, &pr).await;
                }
                Ok(watcher::Event::Apply(pr)) => self.admit(decider, &pr).await,
                Ok(watcher::Event::InitDone) => self.remove_orphans(decider, &listed).await,
                Ok(watcher::Event::Delete(pr)) => {
                    if let Some(id) = request_id(&pr) {
                        self.remove(decider, &id).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ProvisioningRequest watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Records a new ProvisioningRequest as a capacity request (once: the spec is immutable).
    async fn admit(&self, decider: &Decider, pr: &ProvisioningRequest) {
        let Some(class) = class_of(&pr.spec.provisioning_class_name) else {
            tracing::debug!(class = %pr.spec.provisioning_class_name, "ProvisioningRequest of a class Shoal does not serve");
            return;
        };
        let Some(id) = request_id(pr) else { return };
        let book = &decider.capacity;
        match book.get(&id).await {
            Ok(_) => return,
            Err(capacity::Error::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(request = %id, error = %e, "cannot read the capacity request");
                return;
            }
        }
        let namespace = pr.metadata.namespace.clone().unwrap_or_default();
        let name = pr.metadata.name.clone().unwrap_or_default();
        let templates: Api<PodTemplate> = Api::namespaced(self.client.clone(), &namespace);
        let mut errors = ValidationErrors::default();
        let mut pods = Vec::new();
        for (i, set) in pr.spec.pod_sets.iter().enumerate() {
            match templates.get_opt(&set.pod_template_ref.name).await {
                Ok(Some(t)) => pods.push(pb::CapacityRequestItem {
                    pod: Some(pod_class(&t, &namespace)),
                    count: set.count,
                }),
                Ok(None) => errors.add(
                    format!("spec.podSets[{i}].podTemplateRef.name"),
                    format!(
                        "PodTemplate {namespace}/{} not found",
                        set.pod_template_ref.name
                    ),
                ),
                Err(e) => {
                    // Transient: the next event (or the re-list) tries again.
                    tracing::warn!(request = %id, error = %e, "cannot read a PodTemplate; retrying later");
                    return;
                }
            }
        }
        if errors.is_empty() {
            capacity::validate_pods(&pods, "spec.podSets", &mut errors);
        }
        if let Some(v) = pr.spec.parameters.get("ValidUntilSeconds")
            && v.trim().parse::<u64>().is_err()
        {
            errors.add(
                "spec.parameters.ValidUntilSeconds",
                format!("{v:?} is not a number of seconds"),
            );
        }
        let mut record = pb::CapacityRequest {
            id: id.clone(),
            requester: format!("ProvisioningRequest {namespace}/{name}"),
            class: class as i32,
            pods,
            source: format!("ProvisioningRequest {namespace}/{name}"),
            namespace,
            name,
            parameters: pr.spec.parameters.clone().into_iter().collect(),
            ..Default::default()
        };
        if !errors.is_empty() {
            capacity::reject(&mut record, "Invalid", errors.to_string());
        }
        if let Err(e) = book.submit(decider, record).await {
            tracing::warn!(request = %id, error = %e, "cannot record the ProvisioningRequest; retrying at the next event");
        }
    }

    async fn remove(&self, decider: &Decider, id: &str) {
        if let Err(e) = decider.capacity.remove(decider, id).await {
            tracing::warn!(request = %id, error = %e, "cannot end the capacity request of a deleted ProvisioningRequest");
        }
    }

    /// Ends the capacity requests whose ProvisioningRequest is gone (deleted while no leader
    /// watched).
    async fn remove_orphans(&self, decider: &Decider, listed: &HashSet<String>) {
        let Ok(all) = decider.capacity.all().await else {
            return;
        };
        for r in all
            .iter()
            .filter(|r| !r.name.is_empty() && !listed.contains(&r.id))
        {
            self.remove(decider, &r.id).await;
        }
    }

    /// Writes each request's conditions back whenever a stored request changes.
    async fn keep_status(&self, decider: &Decider) {
        let mut changes = decider.capacity.changes();
        let mut written: HashMap<String, ProvisioningRequestStatus> = HashMap::new();
        loop {
            if let Err(e) = self.write_status(&decider.capacity, &mut written).await {
                tracing::warn!(error = %e, "cannot write ProvisioningRequest status; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tokio::select! {
                c = changes.changed() => if c.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(30)) => written.clear(),
            }
        }
    }

    async fn write_status(
        &self,
        book: &Book,
        written: &mut HashMap<String, ProvisioningRequestStatus>,
    ) -> Result<(), String> {
        let all = book.all().await.map_err(|e| e.to_string())?;
        for r in all.iter().filter(|r| !r.name.is_empty()) {
            let status = status_of(r);
            if written.get(&r.id) == Some(&status) {
                continue;
            }
            let api: Api<ProvisioningRequest> = Api::namespaced(self.client.clone(), &r.namespace);
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    written.insert(r.id.clone(), status);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    written.insert(r.id.clone(), status);
                }
                Err(e) => return Err(format!("{}/{}: {e}", r.namespace, r.name)),
            }
        }
        written.retain(|id, _| all.iter().any(|r| &r.id == id));
        Ok(())
    }
}

/// A capacity request's state as ProvisioningRequest status.
pub fn status_of(r: &pb::CapacityRequest) -> ProvisioningRequestStatus {
    let conditions = r
        .conditions
        .iter()
        .map(|c| Condition {
            condition_type: c.r#type.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: c
                .last_transition_time
                .as_ref()
                .map(|t| humantime::format_rfc3339_seconds(snapshot::system_time(t)).to_string())
                .unwrap_or_default(),
            observed_generation: None,
        })
        .collect();
    let mut details = BTreeMap::new();
    details.insert("shoal.dev/request-id".to_string(), r.id.clone());
    if !r.nodes_per_pool.is_empty() {
        let nodes: Vec<String> = r
            .nodes_per_pool
            .iter()
            .map(|(p, n)| format!("{p}={n}"))
            .collect();
        details.insert("shoal.dev/new-nodes".into(), nodes.join(","));
    }
    if let Some(until) = &r.booked_until {
        details.insert(
            "shoal.dev/booked-until".into(),
            humantime::format_rfc3339_seconds(snapshot::system_time(until)).to_string(),
        );
    }
    details.insert("shoal.dev/consumed".into(), r.consumed.to_string());
    if let Some(last) = r.explanation.last() {
        details.insert("shoal.dev/explanation".into(), last.clone());
    }
    if let Some(d) = r.decision_ids.last() {
        details.insert("shoal.dev/decision".into(), d.clone());
    }
    ProvisioningRequestStatus {
        conditions,
        provisioning_class_details: details,
    }
}
