//! PATCH bodies: JSON merge patch (RFC 7386) and the part of strategic merge patch that kubectl
//! sends (lists of named items merged by `name`, `$setElementOrder`/`$retainKeys` directives
//! honoured or dropped, `$patch: delete` on list items).

use serde_json::{Map, Value};

use crate::error::ApiError;

/// How a PATCH body is to be applied, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
}

impl PatchType {
    /// From a Content-Type header.
    pub fn from_content_type(content_type: &str) -> Result<PatchType, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            other => Err(ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format ({other:?}); accepted: application/merge-patch+json, application/strategic-merge-patch+json"
            ))),
        }
    }
}

/// Applies `patch` to `target`.
pub fn apply(target: &mut Value, patch: &Value, kind: PatchType) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => merge_object(target, patch, kind),
        (target, patch) => *target = strip_directives(patch),
    }
}

fn merge_object(target: &mut Map<String, Value>, patch: &Map<String, Value>, kind: PatchType) {
    for (key, value) in patch {
        if kind == PatchType::Strategic && key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(p)) => merge_object(existing, p, kind),
            (Some(Value::Array(existing)), Value::Array(items))
                if kind == PatchType::Strategic && is_named_list(items) =>
            {
                let order = patch
                    .get(&format!("$setElementOrder/{key}"))
                    .and_then(Value::as_array);
                merge_named_list(existing, items, order);
            }
            _ => {
                target.insert(key.clone(), strip_directives(value));
            }
        }
    }
}

fn is_named_list(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

fn merge_named_list(existing: &mut Vec<Value>, items: &[Value], order: Option<&Vec<Value>>) {
    for item in items {
        let name = item.get("name");
        let deleting = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match existing.iter_mut().position(|e| e.get("name") == name) {
            Some(i) if deleting => {
                existing.remove(i);
            }
            Some(i) => apply(&mut existing[i], item, PatchType::Strategic),
            None if !deleting => existing.push(strip_directives(item)),
            None => {}
        }
    }
    if let Some(order) = order {
        let rank = |v: &Value| {
            order
                .iter()
                .position(|o| o.get("name") == v.get("name"))
                .unwrap_or(usize::MAX)
        };
        existing.sort_by_key(rank);
    }
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut v = json!({ "spec": { "replicas": 1, "paused": true }, "metadata": { "labels": { "a": "1" } } });
        apply(
            &mut v,
            &json!({ "spec": { "replicas": 3, "paused": null }, "metadata": { "labels": { "b": "2" } } }),
            PatchType::Merge,
        );
        assert_eq!(
            v,
            json!({ "spec": { "replicas": 3 }, "metadata": { "labels": { "a": "1", "b": "2" } } })
        );
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut v = json!({ "spec": { "containers": [ { "name": "app", "image": "a:1", "ports": [1] }, { "name": "side", "image": "s:1" } ] } });
        let patch = json!({ "spec": {
            "$setElementOrder/containers": [ { "name": "side" }, { "name": "app" } ],
            "containers": [ { "name": "app", "image": "a:2" } ]
        } });
        apply(&mut v, &patch, PatchType::Strategic);
        assert_eq!(
            v,
            json!({ "spec": { "containers": [ { "name": "side", "image": "s:1" }, { "name": "app", "image": "a:2", "ports": [1] } ] } })
        );
    }

    #[test]
    fn unknown_patch_types_are_415() {
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json")
                .unwrap_err()
                .code(),
            415
        );
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Ok(PatchType::Merge)
        );
    }
}
