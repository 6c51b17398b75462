//! Server-side field validation: which fields of a request body the object's schema does not
//! know. The body is decoded into the k8s-openapi type and every key serde had to ignore is
//! reported, with its path — as `fieldValidation=Strict` (400) or `Warn` (a `Warning` header) do
//! in the real API server.

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    coordination::v1::Lease,
    core::v1::{Event, Namespace, Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use serde_json::Value;

use crate::resources::ResourceKind;

/// How unknown fields are treated (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Accept, with a `Warning` header per field (the server's default).
    Warn,
    /// Refuse the request (400).
    Strict,
}

impl FieldValidation {
    /// From the query parameter (case-sensitive, as in Kubernetes).
    pub fn parse(value: Option<&str>) -> Result<FieldValidation, String> {
        match value {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(format!(
                "fieldValidation: {other:?} is not one of Ignore, Warn, Strict"
            )),
        }
    }
}

/// `spec.template.spec.containers.0.colour`: map keys and sequence indices only (serde_ignored's
/// own rendering also shows `Option` and newtype layers).
fn dotted(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    let (parent, segment) = match path {
        Path::Root => return String::new(),
        Path::Seq { parent, index } => (*parent, index.to_string()),
        Path::Map { parent, key } => (*parent, key.clone()),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => return dotted(parent),
    };
    let prefix = dotted(parent);
    if prefix.is_empty() {
        segment
    } else {
        format!("{prefix}.{segment}")
    }
}

fn ignored<T: serde::de::DeserializeOwned>(object: &Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let _ = serde_ignored::deserialize::<_, _, T>(object, |path| unknown.push(dotted(&path)));
    unknown
}

/// Paths of fields in `object` that `kind`'s schema does not have (e.g. `spec.replica`).
pub fn unknown_fields(kind: &ResourceKind, object: &Value) -> Vec<String> {
    match kind.kind {
        "Pod" => ignored::<Pod>(object),
        "Node" => ignored::<Node>(object),
        "Namespace" => ignored::<Namespace>(object),
        "Event" => ignored::<Event>(object),
        "Deployment" => ignored::<Deployment>(object),
        "ReplicaSet" => ignored::<ReplicaSet>(object),
        "PodTemplate" => ignored::<k8s_openapi::api::core::v1::PodTemplate>(object),
        "CustomResourceDefinition" => ignored::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(object),
        "PodDisruptionBudget" => ignored::<PodDisruptionBudget>(object),
        "Lease" => ignored::<Lease>(object),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_unknown_fields_with_paths() {
        let deployments = crate::resources::by_kind("Deployment").expect("kind");
        let object = json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "w", "colour": "red" },
            "spec": { "replica": 3, "selector": { "matchLabels": {} }, "template": { "spec": { "containers": [] } } } });
        let mut unknown = unknown_fields(deployments, &object);
        unknown.sort();
        assert_eq!(unknown, ["metadata.colour", "spec.replica"]);
        let fine = json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "w" }, "spec": { "replicas": 3,
            "selector": { "matchLabels": {} }, "template": { "spec": { "containers": [] } } } });
        assert!(unknown_fields(deployments, &fine).is_empty());
    }

    #[test]
    fn parameter_values() {
        assert_eq!(FieldValidation::parse(None), Ok(FieldValidation::Warn));
        assert_eq!(
            FieldValidation::parse(Some("Strict")),
            Ok(FieldValidation::Strict)
        );
        assert!(FieldValidation::parse(Some("strict")).is_err());
    }
}
