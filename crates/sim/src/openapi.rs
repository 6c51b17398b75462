//! A minimal OpenAPI v3 description (`/openapi/v3`): for every served kind, its create, update
//! and patch operations with the `fieldValidation` parameter and the
//! `x-kubernetes-group-version-kind` extension. That is what kubectl reads to decide that the
//! server validates fields itself, so `kubectl apply -f` works without `--validate=false`.
//! Schemas are not published; kubectl then computes apply patches from its built-in types.

use serde_json::{Map, Value, json};

use crate::resources::ResourceKind;

/// `api/v1`, `apis/apps/v1`, … for every served group version.
fn group_versions(kinds: &[&'static ResourceKind]) -> Vec<(String, &'static str, &'static str)> {
    let mut out: Vec<(String, &'static str, &'static str)> = Vec::new();
    for k in kinds {
        let path = if k.group.is_empty() {
            format!("api/{}", k.version)
        } else {
            format!("apis/{}/{}", k.group, k.version)
        };
        if !out.iter().any(|(p, _, _)| *p == path) {
            out.push((path, k.group, k.version));
        }
    }
    out
}

/// The discovery index.
pub fn index(kinds: &[&'static ResourceKind]) -> Value {
    let paths: Map<String, Value> = group_versions(kinds)
        .into_iter()
        .map(|(path, group, version)| {
            // The hash changes with the kinds served (kubectl caches documents by it).
            let served: Vec<&str> = kinds
                .iter()
                .filter(|k| k.group == group && k.version == version)
                .map(|k| k.plural)
                .collect();
            let hash = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                served.hash(&mut h);
                h.finish()
            };
            (
                path.clone(),
                json!({ "serverRelativeURL": format!("/openapi/v3/{path}?hash={hash:016x}") }),
            )
        })
        .collect();
    json!({ "paths": paths })
}

fn operation(kind: &ResourceKind, action: &str) -> Value {
    json!({
        "operationId": format!("{action}{}", kind.kind),
        "parameters": [
            { "name": "fieldValidation", "in": "query", "schema": { "type": "string", "uniqueItems": true } },
            { "name": "dryRun", "in": "query", "schema": { "type": "string", "uniqueItems": true } },
            { "name": "fieldManager", "in": "query", "schema": { "type": "string", "uniqueItems": true } }
        ],
        "responses": { "200": { "description": "OK" } },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": { "group": kind.group, "version": kind.version, "kind": kind.kind },
    })
}

/// The document of one group version (`api/v1`, `apis/apps/v1`), or `None` if not served.
pub fn group_version(kinds: &[&'static ResourceKind], path: &str) -> Option<Value> {
    let (_, group, version) = group_versions(kinds)
        .into_iter()
        .find(|(p, _, _)| p == path.trim_matches('/'))?;
    let mut paths = Map::new();
    for kind in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let base = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let collection = if kind.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", kind.plural)
        } else {
            format!("{base}/{}", kind.plural)
        };
        paths.insert(
            collection.clone(),
            json!({ "post": operation(kind, "post") }),
        );
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({ "put": operation(kind, "put"), "patch": operation(kind, "patch") }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes (shoal-sim)", "version": "v1.34.0" },
        "paths": paths,
        "components": { "schemas": {} },
    }))
}
