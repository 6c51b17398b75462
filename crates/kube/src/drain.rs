//! Node operations of a safe scale-down: cordon and taint, evict through the Eviction API (so
//! PodDisruptionBudgets are honoured: a blocked eviction is a 429 the caller retries), skip
//! DaemonSet and mirror pods, and delete the Node. Also removal of startup taints.

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::{
    Api, Client,
    api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    KubeError,
    convert::{is_daemonset_pod, is_mirror},
};

/// What one eviction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// The pod is being removed.
    Evicted,
    /// A PodDisruptionBudget does not allow it now (HTTP 429); retry later.
    Blocked(String),
    /// The pod is gone already.
    Gone,
}

/// Node operations against one API server.
#[derive(Clone)]
pub struct NodeOps {
    client: Client,
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl NodeOps {
    /// Over `client`.
    pub fn new(client: Client) -> NodeOps {
        NodeOps { client }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// The Node, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<Node>, KubeError> {
        Ok(self.nodes().get_opt(name).await?)
    }

    async fn set_taints(
        &self,
        name: &str,
        unschedulable: Option<bool>,
        edit: impl FnOnce(&mut Vec<Taint>) -> bool,
    ) -> Result<bool, KubeError> {
        let Some(node) = self.get(name).await? else {
            return Ok(false);
        };
        let mut taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let changed = edit(&mut taints);
        let cordoned = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if !changed && unschedulable.is_none_or(|u| u == cordoned) {
            return Ok(true);
        }
        let mut spec = json!({ "taints": taints });
        if let Some(u) = unschedulable {
            spec["unschedulable"] = json!(u);
        }
        let patch = json!({ "spec": spec });
        match self
            .nodes()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Cordons the node and adds `key:NoSchedule`. False when the node does not exist.
    pub async fn cordon(&self, name: &str, key: &str) -> Result<bool, KubeError> {
        self.set_taints(name, Some(true), |taints| {
            if taints.iter().any(|t| t.key == key) {
                return false;
            }
            taints.push(Taint {
                key: key.to_string(),
                effect: "NoSchedule".into(),
                ..Default::default()
            });
            true
        })
        .await
    }

    /// Undoes [`NodeOps::cordon`].
    pub async fn uncordon(&self, name: &str, key: &str) -> Result<bool, KubeError> {
        self.set_taints(name, Some(false), |taints| {
            let before = taints.len();
            taints.retain(|t| t.key != key);
            taints.len() != before
        })
        .await
    }

    /// Removes the taints with these keys (startup taints once the node is Ready).
    pub async fn remove_taints(&self, name: &str, keys: &[String]) -> Result<bool, KubeError> {
        self.set_taints(name, None, |taints| {
            let before = taints.len();
            taints.retain(|t| !keys.contains(&t.key));
            taints.len() != before
        })
        .await
    }

    /// Pods a drain must remove: everything on the node except DaemonSet and mirror pods and
    /// pods that already finished.
    pub async fn pods_to_drain(&self, name: &str) -> Result<Vec<Pod>, KubeError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| !is_mirror(p) && !is_daemonset_pod(p))
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .collect())
    }

    /// Asks the Eviction API to remove `pod`.
    pub async fn evict(&self, pod: &Pod) -> Result<Eviction, KubeError> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match pods.evict(&name, &EvictParams::default()).await {
            Ok(_) => Ok(Eviction::Evicted),
            Err(kube::Error::Api(s)) if s.code == 429 => Ok(Eviction::Blocked(s.message)),
            Err(e) if not_found(&e) => Ok(Eviction::Gone),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `pod` outright (only when a pool allows forcing after its drain timeout).
    pub async fn delete_pod(&self, pod: &Pod) -> Result<(), KubeError> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match pods.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds the Node whose `spec.providerID` is `provider_id` among those without the label
    /// `unclaimed_by` and merges `labels` into its labels (nodes from backends that cannot label
    /// them, found by what their cloud calls them). Returns the Node's name; `None` while no such
    /// Node reports that id.
    pub async fn label_by_provider_id(
        &self,
        provider_id: &str,
        unclaimed_by: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<String>, KubeError> {
        // The API cannot select on spec.providerID: list the nodes not labelled yet and look.
        let unclaimed = format!("!{unclaimed_by}");
        let list = self
            .nodes()
            .list(&ListParams::default().labels(&unclaimed))
            .await?;
        let Some(name) = list
            .items
            .iter()
            .find(|n| n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some(provider_id))
            .and_then(|n| n.metadata.name.clone())
        else {
            return Ok(None);
        };
        let patch = json!({ "metadata": { "labels": labels } });
        match self
            .nodes()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(Some(name)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the Node object; absent is fine.
    pub async fn delete(&self, name: &str) -> Result<(), KubeError> {
        match self.nodes().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
