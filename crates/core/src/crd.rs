//! The custom resources Shoal serves to Kubernetes users: `NodePool` (the pool YAML, with a
//! status the decider writes) and `NodeClaim` (a read-only mirror of the provisioner's claim
//! records). Their CustomResourceDefinitions are generated from these types
//! ([`definitions_yaml`]) into `deploy/k8s/crds/`, and a test keeps the checked-in files current.

use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::claim::{self, now_ms};
pub use crate::pool::NodePool;
use crate::pool::{MetadataDoc, PoolDocument};

/// One condition, in the Kubernetes convention.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, LimitReached, ScalingUp, Degraded.
    #[serde(rename = "type")]
    pub condition_type: String,
    /// True, False or Unknown.
    pub status: String,
    /// CamelCase reason.
    #[serde(default)]
    pub reason: String,
    /// What a human reads.
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    #[serde(default)]
    pub last_transition_time: String,
}

/// `status` of a NodePool, written by the decider's leader.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolStatus {
    /// Claims not yet deleted (Pending through Draining).
    #[serde(default)]
    pub nodes: i64,
    /// Claims whose node is Ready.
    #[serde(default)]
    pub ready_nodes: i64,
    /// Claims by phase (`Pending`, `Launched`, `Registered`, `Ready`, `Draining`, …).
    #[serde(default)]
    pub phases: std::collections::BTreeMap<String, i64>,
    /// Ready, LimitReached, ScalingUp, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The last decision that acted on this pool.
    #[serde(default)]
    pub last_decision_id: String,
    /// Its reason.
    #[serde(default)]
    pub last_decision_reason: String,
    /// `metadata.generation` the decider last took the spec from.
    #[serde(default)]
    pub observed_generation: i64,
}

impl NodePool {
    /// The pool document the rest of Shoal validates and stores.
    pub fn to_document(&self) -> PoolDocument {
        PoolDocument {
            api_version: crate::pool::API_VERSION.into(),
            kind: "NodePool".into(),
            metadata: MetadataDoc {
                name: self.metadata.name.clone().unwrap_or_default(),
            },
            spec: self.spec.clone(),
        }
    }
}

/// `spec` of a NodeClaim: what was asked for (written once).
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, kube::CustomResource,
)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "NodeClaim",
    shortname = "nc",
    status = "NodeClaimStatus",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Instance","type":"string","jsonPath":".status.instanceId"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".spec.backend","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaimSpec {
    /// The pool.
    pub pool: String,
    /// The backend.
    pub backend: String,
    /// The provisioner operation that created it.
    #[serde(default)]
    pub operation_id: String,
}

/// One phase change, as `kubectl describe nodeclaim` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseChange {
    /// The new phase.
    pub phase: String,
    /// RFC 3339.
    pub at: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// `status` of a NodeClaim: the provisioner's record as it is now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaimStatus {
    /// Pending, Launched, Registered, Ready, Draining, Deleting, Deleted, Failed.
    pub phase: String,
    /// The Kubernetes node.
    #[serde(default)]
    pub node_name: String,
    /// The backend's instance id.
    #[serde(default)]
    pub instance_id: String,
    /// Why it failed, if it did.
    #[serde(default)]
    pub failure_reason: String,
    /// Phase changes, oldest first.
    #[serde(default)]
    pub history: Vec<PhaseChange>,
}

/// RFC 3339 (seconds) of Unix milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

impl NodeClaim {
    /// The mirror of a claim record (named by the claim id).
    pub fn mirror(record: &claim::NodeClaim) -> NodeClaim {
        let mut claim = NodeClaim::new(
            &record.id,
            NodeClaimSpec {
                pool: record.pool.clone(),
                backend: record.backend.clone(),
                operation_id: record.operation_id.clone(),
            },
        );
        claim.metadata.labels = Some(
            [
                (crate::labels::POOL.to_string(), record.pool.clone()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "shoal".to_string(),
                ),
            ]
            .into(),
        );
        claim.status = Some(NodeClaimStatus::of(record));
        claim
    }
}

impl NodeClaimStatus {
    /// The status part of a claim record's mirror.
    pub fn of(record: &claim::NodeClaim) -> NodeClaimStatus {
        NodeClaimStatus {
            phase: format!("{:?}", record.phase),
            node_name: record.node_name.clone(),
            instance_id: record.instance_id.clone(),
            failure_reason: record.failure_reason.clone(),
            history: record
                .history
                .iter()
                .map(|t| PhaseChange {
                    phase: format!("{:?}", t.phase),
                    at: rfc3339_ms(t.at_ms),
                    reason: t.reason.clone(),
                })
                .collect(),
        }
    }
}

/// A condition with `lastTransitionTime` kept from `previous` when its status did not change.
pub fn condition(
    previous: &[Condition],
    condition_type: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.condition_type == condition_type && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339_ms(now_ms()));
    Condition {
        condition_type: condition_type.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
    }
}

/// Removes `additionalProperties: false` (what `deny_unknown_fields` makes schemars emit) from
/// nodes that also list `properties`: a structural schema may not have both (the API server
/// prunes unknown fields anyway).
fn make_structural(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if map.contains_key("properties")
                && map.get("additionalProperties") == Some(&Value::Bool(false))
            {
                map.remove("additionalProperties");
            }
            for v in map.values_mut() {
                make_structural(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(make_structural),
        _ => {}
    }
}

/// The CRDs as one multi-document YAML (what `deploy/k8s/crds/shoal.dev.yaml` holds).
pub fn definitions_yaml() -> String {
    let mut out = String::from(
        "# Generated from the Rust types (shoal-core/src/crd.rs): `shoal crds > deploy/k8s/crds/shoal.dev.yaml`.\n",
    );
    for crd in [NodePool::crd(), NodeClaim::crd()] {
        let mut value = serde_json::to_value(&crd).unwrap_or(Value::Null);
        make_structural(&mut value);
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&value).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crds_are_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/k8s/crds/shoal.dev.yaml"
        );
        let generated = definitions_yaml();
        if std::env::var_os("SHOAL_UPDATE_CRDS").is_some() {
            std::fs::write(path, &generated).expect("write the CRDs");
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "deploy/k8s/crds/shoal.dev.yaml is not what the Rust types generate; run \
             `SHOAL_UPDATE_CRDS=1 cargo test -p shoal-core crd` (or `shoal crds > deploy/k8s/crds/shoal.dev.yaml`) and commit it"
        );
    }

    #[test]
    fn the_nodepool_schema_is_structural_and_has_the_columns() {
        let mut crd = serde_json::to_value(NodePool::crd()).unwrap();
        make_structural(&mut crd);
        let version = &crd["spec"]["versions"][0];
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Nodes", "Min", "Max", "Ready", "Backend", "Age"]);
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["limits"]["properties"]["maxNodes"]["type"],
            "integer"
        );
        assert!(
            spec["required"]
                .as_array()
                .unwrap()
                .contains(&"provider".into())
        );
        let text = crd.to_string();
        assert!(!text.contains("\"$ref\""), "schemas must be inlined");
    }

    #[test]
    fn a_nodepool_resource_reads_as_a_pool_document() {
        let yaml = r#"
apiVersion: shoal.dev/v1alpha1
kind: NodePool
metadata: { name: general }
spec:
  provider: { backend: sim }
  template: { capacity: { cpu: "4", memory: 8Gi } }
  limits: { maxNodes: 5 }
"#;
        let pool: NodePool = serde_yaml_ng::from_str(yaml).unwrap();
        let proto = pool.to_document().to_proto().unwrap();
        assert_eq!(proto.name, "general");
    }
}
