//! `externalgrpc:<name>` backends: any Cluster Autoscaler external gRPC cloud provider
//! (`clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider`) as a node source. A pool
//! names the plugin as its backend and one of the plugin's node groups as its `provider.class`;
//! the pool owns that group.
//!
//! Cluster Autoscaler's protocol grows groups by a delta and has no claim ids, labels or node
//! names, so this backend keeps what Shoal needs in the store (`backends/externalgrpc:<name>/`):
//!
//! - **Create** takes one instance of the group for the claim: an instance of the group no claim
//!   holds (one a crash left between `NodeGroupIncreaseSize` and the record), else
//!   `NodeGroupIncreaseSize(1)` and the new instance once `NodeGroupNodes` lists it. One create at
//!   a time per provider, so each new instance goes to exactly one claim. The record (claim →
//!   instance) makes a retried create return the same instance.
//! - The instance's id is the providerID its Node reports; the provisioner finds that Node and
//!   gives it the claim's labels (it keeps its own name).
//! - **List** answers the recorded instances the plugin still lists, with the claim's labels.
//! - **Delete** is `NodeGroupDeleteNodes` of the instance's group (NOT_FOUND: already gone).

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use shoal_proto::{
    externalgrpc::{self as ca, cloud_provider_client::CloudProviderClient},
    v1 as pb,
};
use shoal_runtime::layers::TracedChannel;
use shoal_state::{Compare, SharedStore, Txn, TxnOp, keys};

use super::{CLAIM_LABEL, InstanceSpec, NodeProvider, POOL_LABEL, ProviderError};

/// `service.backends.externalGrpc.<name>`: where the plugin is and the mTLS to it (Cluster
/// Autoscaler's plugins are meant to be called over mTLS) — the same settings as a `plugin:`.
pub type ExternalGrpcBackend = super::plugin::PluginBackend;

/// The backend's name for plugin `name`.
pub fn backend_name(name: &str) -> String {
    format!("externalgrpc:{name}")
}

/// What the store keeps per claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    /// The instance id (its providerID).
    instance: String,
    /// Its node group.
    group: String,
    /// The claim's ownership and pool labels.
    labels: BTreeMap<String, String>,
}

/// A Cluster Autoscaler plugin behind a lazily connecting channel.
pub struct ExternalGrpcProvider {
    name: String,
    client: CloudProviderClient<TracedChannel>,
    store: SharedStore,
    /// One create at a time: a new instance is matched to exactly one claim.
    growing: tokio::sync::Mutex<()>,
}

fn status_error(plugin: &str, what: &str, status: &tonic::Status) -> ProviderError {
    super::plugin::status_error(plugin, what, status)
}

fn state(instance: &ca::Instance) -> &'static str {
    use ca::instance_status::InstanceState;
    let status = instance.status.clone().unwrap_or_default();
    if status
        .error_info
        .as_ref()
        .is_some_and(|e| !e.error_code.is_empty())
    {
        return "failed";
    }
    match InstanceState::try_from(status.instance_state) {
        Ok(InstanceState::InstanceRunning) => "running",
        Ok(InstanceState::InstanceCreating) => "creating",
        Ok(InstanceState::InstanceDeleting) => "deleting",
        _ => "unknown",
    }
}

impl ExternalGrpcProvider {
    /// A provider for plugin `name` (no connection is made yet).
    pub fn new(
        name: &str,
        settings: &ExternalGrpcBackend,
        store: SharedStore,
    ) -> Result<ExternalGrpcProvider, ProviderError> {
        let channel = settings.channel(&format!("externalgrpc {name}"))?;
        Ok(ExternalGrpcProvider {
            name: name.to_string(),
            client: CloudProviderClient::new(channel),
            store,
            growing: tokio::sync::Mutex::new(()),
        })
    }

    fn store_error(e: shoal_state::StoreError) -> ProviderError {
        if e.is_transient() {
            ProviderError::Transient(format!("state store: {e}"))
        } else {
            ProviderError::Permanent(format!("state store: {e}"))
        }
    }

    fn key(&self, claim: &str) -> String {
        keys::backend_record(&backend_name(&self.name), claim)
    }

    /// Every record, by claim.
    async fn records(&self) -> Result<BTreeMap<String, Record>, ProviderError> {
        let prefix = self.key("");
        let range = self.store.range(&prefix).await.map_err(Self::store_error)?;
        Ok(range
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let claim = kv.key.strip_prefix(&prefix)?.to_string();
                Some((claim, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect())
    }

    async fn group_nodes(&self, group: &str) -> Result<Vec<ca::Instance>, ProviderError> {
        Ok(self
            .client
            .clone()
            .node_group_nodes(ca::NodeGroupNodesRequest { id: group.into() })
            .await
            .map_err(|s| status_error(&self.name, "NodeGroupNodes", &s))?
            .into_inner()
            .instances)
    }

    fn to_instance(&self, claim: &str, record: &Record, found: &ca::Instance) -> pb::Instance {
        pb::Instance {
            id: record.instance.clone(),
            backend: backend_name(&self.name),
            pool: record.labels.get(POOL_LABEL).cloned().unwrap_or_default(),
            claim_id: claim.to_string(),
            state: state(found).into(),
            labels: record.labels.clone(),
            provider_id: record.instance.clone(),
            ..Default::default()
        }
    }

    /// An instance of `group` no claim holds and not on its way out.
    fn free<'a>(
        instances: &'a [ca::Instance],
        records: &BTreeMap<String, Record>,
    ) -> Option<&'a ca::Instance> {
        instances.iter().find(|i| {
            !i.id.is_empty()
                && !matches!(state(i), "deleting" | "failed")
                && !records.values().any(|r| r.instance == i.id)
        })
    }
}

#[async_trait::async_trait]
impl NodeProvider for ExternalGrpcProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let group = spec.class.clone();
        if group.is_empty() || group == "default" {
            return Err(ProviderError::Permanent(format!(
                "pool {}: provider.class must name the node group of externalgrpc plugin {}",
                spec.pool, self.name
            )));
        }
        let _one_at_a_time = self.growing.lock().await;
        let records = self.records().await?;
        if let Some(record) = records.get(&spec.claim_id) {
            let instances = self.group_nodes(&record.group).await?;
            if let Some(found) = instances.iter().find(|i| i.id == record.instance) {
                return Ok(self.to_instance(&spec.claim_id, record, found));
            }
            // Recorded but gone from the plugin: forget it and take another.
            self.store
                .delete(&self.key(&spec.claim_id))
                .await
                .map_err(Self::store_error)?;
        }
        let mut instances = self.group_nodes(&group).await?;
        if Self::free(&instances, &records).is_none() {
            self.client
                .clone()
                .node_group_increase_size(ca::NodeGroupIncreaseSizeRequest {
                    delta: 1,
                    id: group.clone(),
                })
                .await
                .map_err(|s| status_error(&self.name, "NodeGroupIncreaseSize", &s))?;
            // Until the plugin lists it; the call's deadline (resilience.callTimeout) bounds the
            // wait, and the retry takes the instance once it shows (it is then free).
            loop {
                instances = self.group_nodes(&group).await?;
                if Self::free(&instances, &records).is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let Some(found) = Self::free(&instances, &records).cloned() else {
            return Err(ProviderError::Transient(format!(
                "externalgrpc {}: node group {group} has no free instance",
                self.name
            )));
        };
        let mut labels = spec.labels.clone();
        labels.insert(CLAIM_LABEL.into(), spec.claim_id.clone());
        let record = Record {
            instance: found.id.clone(),
            group,
            labels,
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| ProviderError::Permanent(format!("record: {e}")))?;
        let key = self.key(&spec.claim_id);
        let outcome = self
            .store
            .txn(Txn {
                compares: vec![Compare::CreateRevision {
                    key: key.clone(),
                    revision: 0,
                }],
                success: vec![TxnOp::Put {
                    key,
                    value,
                    lease: None,
                }],
                failure: vec![],
            })
            .await
            .map_err(Self::store_error)?;
        if !outcome.succeeded {
            return Err(ProviderError::Conflict(format!(
                "claim {} already holds an instance of externalgrpc {}",
                spec.claim_id, self.name
            )));
        }
        tracing::info!(plugin = %self.name, claim = %spec.claim_id, instance = %found.id, "took an instance of the node group");
        Ok(self.to_instance(&spec.claim_id, &record, &found))
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let records = self.records().await?;
        let held = records.iter().find(|(_, r)| r.instance == instance_id);
        let groups: Vec<String> = match held {
            Some((_, r)) => vec![r.group.clone()],
            None => self
                .client
                .clone()
                .node_groups(ca::NodeGroupsRequest {})
                .await
                .map_err(|s| status_error(&self.name, "NodeGroups", &s))?
                .into_inner()
                .node_groups
                .into_iter()
                .map(|g| g.id)
                .collect(),
        };
        for group in groups {
            let listed = self.group_nodes(&group).await?;
            if !listed.iter().any(|i| i.id == instance_id) {
                continue;
            }
            let node = ca::ExternalGrpcNode {
                provider_id: instance_id.to_string(),
                ..Default::default()
            };
            match self
                .client
                .clone()
                .node_group_delete_nodes(ca::NodeGroupDeleteNodesRequest {
                    nodes: vec![node],
                    id: group.clone(),
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(status_error(&self.name, "NodeGroupDeleteNodes", &s)),
            }
        }
        if let Some((claim, _)) = held {
            self.store
                .delete(&self.key(claim))
                .await
                .map_err(Self::store_error)?;
        }
        Ok(())
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let records = self.records().await?;
        let mut by_group: BTreeMap<&str, Vec<ca::Instance>> = BTreeMap::new();
        let mut out = Vec::new();
        for (claim, record) in &records {
            if !owner.iter().all(|(k, v)| record.labels.get(k) == Some(v)) {
                continue;
            }
            if !by_group.contains_key(record.group.as_str()) {
                let listed = self.group_nodes(&record.group).await?;
                by_group.insert(&record.group, listed);
            }
            if let Some(found) = by_group[record.group.as_str()]
                .iter()
                .find(|i| i.id == record.instance)
            {
                out.push(self.to_instance(claim, record, found));
            }
        }
        Ok(out)
    }

    fn describe(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: backend_name(&self.name),
            classes: Vec::new(),
            capabilities: vec!["provider-ids".into()],
        }
    }
}
