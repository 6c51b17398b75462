//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): turning a CRD into a served kind, and
//! what the API server does with custom objects — structural-schema validation with field paths
//! (422), pruning of unknown fields, defaults, and `additionalPrinterColumns` for kubectl.

use serde_json::{Map, Value, json};

use crate::resources::ResourceKind;

/// A printer column of a CRD version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterColumn {
    /// Header (kubectl upper-cases it).
    pub name: String,
    /// integer, number, string, boolean or date.
    pub column_type: String,
    /// Simple JSONPath (`.status.nodes`).
    pub json_path: String,
    /// 0 = always, 1 = `-o wide`.
    pub priority: i64,
}

/// What a custom kind carries beyond a built-in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomInfo {
    /// `nodepools.shoal.dev`.
    pub crd_name: String,
    /// The served version's `openAPIV3Schema`.
    pub schema: Value,
    /// Its `additionalPrinterColumns`.
    pub columns: Vec<PrinterColumn>,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// Reads a CRD and returns the kind it serves (its storage version), or the invalid fields.
///
/// Each served CRD leaks one small `ResourceKind` (kinds are `&'static` throughout the
/// simulator); that is bounded by the CRDs a test creates.
pub fn kind_from_crd(crd: &Value) -> Result<&'static ResourceKind, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let text = |pointer: &str| {
        crd.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let group = text("/spec/group");
    let plural = text("/spec/names/plural");
    let kind = text("/spec/names/kind");
    let scope = text("/spec/scope");
    let name = text("/metadata/name");
    for (field, value) in [
        ("spec.group", &group),
        ("spec.names.plural", &plural),
        ("spec.names.kind", &kind),
    ] {
        if value.is_empty() {
            errors.push((field.to_string(), "Required value".to_string()));
        }
    }
    if !group.is_empty() && !group.contains('.') {
        errors.push((
            "spec.group".into(),
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        ));
    }
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        errors.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    if scope != "Namespaced" && scope != "Cluster" {
        errors.push((
            "spec.scope".into(),
            format!("Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""),
        ));
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push((
            "spec.versions".into(),
            "Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage: Vec<&Value> = versions
        .iter()
        .filter(|v| v["storage"] == true && v["served"] != false)
        .collect();
    if !versions.is_empty() && storage.len() != 1 {
        errors.push((
            "spec.versions".into(),
            "Invalid value: must have exactly one served version marked as storage version".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let version = storage[0];
    let schema = version
        .pointer("/schema/openAPIV3Schema")
        .cloned()
        .unwrap_or_else(
            || json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true }),
        );
    let columns = version["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| PrinterColumn {
            name: c["name"].as_str().unwrap_or_default().to_string(),
            column_type: c["type"].as_str().unwrap_or("string").to_string(),
            json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
            priority: c["priority"].as_i64().unwrap_or(0),
        })
        .collect();
    let short_names: Vec<&'static str> = crd
        .pointer("/spec/names/shortNames")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(leak)
        .collect();
    let subresources: &'static [&'static str] = if version.pointer("/subresources/status").is_some()
    {
        &["status"]
    } else {
        &[]
    };
    let singular = match crd.pointer("/spec/names/singular").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => kind.to_lowercase(),
    };
    let custom: &'static CustomInfo = Box::leak(Box::new(CustomInfo {
        crd_name: name,
        schema,
        columns,
    }));
    Ok(Box::leak(Box::new(ResourceKind {
        group: leak(&group),
        version: leak(version["name"].as_str().unwrap_or("v1")),
        plural: leak(&plural),
        singular: leak(&singular),
        kind: leak(&kind),
        namespaced: scope == "Namespaced",
        short_names: Box::leak(short_names.into_boxed_slice()),
        subresources,
        fields: &[],
        custom: Some(custom),
    })))
}

/// What validating a custom object found.
#[derive(Debug, Default)]
pub struct Checked {
    /// (field path, message): the object is refused with 422.
    pub invalid: Vec<(String, String)>,
    /// Fields the schema does not know (pruned; Strict refuses them).
    pub unknown: Vec<String>,
}

/// Validates `object` against its kind's schema, applies defaults and prunes unknown fields.
pub fn check(custom: &CustomInfo, object: &mut Value) -> Checked {
    let mut checked = Checked::default();
    let Some(map) = object.as_object_mut() else {
        return checked;
    };
    let properties = custom.schema["properties"].as_object();
    for (key, value) in map.iter_mut() {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match properties.and_then(|p| p.get(key)) {
            Some(schema) => walk(schema, value, key, &mut checked),
            None if preserves(&custom.schema) => {}
            None => checked.unknown.push(key.clone()),
        }
    }
    for key in required(&custom.schema) {
        if !matches!(key, "apiVersion" | "kind" | "metadata") && !map.contains_key(key) {
            checked
                .invalid
                .push((key.to_string(), "Required value".into()));
        }
    }
    let unknown_top: Vec<String> = checked
        .unknown
        .iter()
        .filter(|u| !u.contains('.'))
        .cloned()
        .collect();
    for key in unknown_top {
        map.remove(&key);
    }
    checked
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == true
}

fn required(schema: &Value) -> Vec<&str> {
    schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn invalid(checked: &mut Checked, path: &str, value: &Value, why: String) {
    checked.invalid.push((
        path.to_string(),
        format!("Invalid value: {}: {path} in body {why}", shown(value)),
    ));
}

/// Validates one value; `path` is its dotted field path.
fn walk(schema: &Value, value: &mut Value, path: &str, checked: &mut Checked) {
    if value.is_null() {
        if schema["nullable"] != true && !schema["type"].is_null() {
            invalid(
                checked,
                path,
                value,
                format!("must be of type {}", schema["type"].as_str().unwrap_or("?")),
            );
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !matches!(type_name(value), "integer" | "string") {
            invalid(
                checked,
                path,
                value,
                "must be of type integer or string".into(),
            );
        }
        return;
    }
    let actual = type_name(value);
    if let Some(expected) = schema["type"].as_str() {
        let ok = expected == actual || (expected == "number" && actual == "integer");
        if !ok {
            invalid(checked, path, value, format!("must be of type {expected}"));
            return;
        }
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        let supported: Vec<String> = options.iter().map(Value::to_string).collect();
        checked.invalid.push((
            path.to_string(),
            format!(
                "Unsupported value: {}: supported values: {}",
                shown(value),
                supported.join(", ")
            ),
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema["minimum"].as_f64() {
            let exclusive = schema["exclusiveMinimum"] == true;
            if n < min || (exclusive && n == min) {
                let op = if exclusive {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                invalid(
                    checked,
                    path,
                    value,
                    format!("should be {op} {}", schema["minimum"]),
                );
            }
        }
        if let Some(max) = schema["maximum"].as_f64() {
            let exclusive = schema["exclusiveMaximum"] == true;
            if n > max || (exclusive && n == max) {
                let op = if exclusive {
                    "less than"
                } else {
                    "less than or equal to"
                };
                invalid(
                    checked,
                    path,
                    value,
                    format!("should be {op} {}", schema["maximum"]),
                );
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            invalid(
                checked,
                path,
                value,
                format!("should be at least {min} chars long"),
            );
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            invalid(
                checked,
                path,
                value,
                format!("may not be more than {max} bytes"),
            );
        }
    }
    match value {
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema["minItems"].as_u64()
                && n < min
            {
                invalid(
                    checked,
                    path,
                    &Value::Null,
                    format!("should have at least {min} items"),
                );
            }
            if let Some(max) = schema["maxItems"].as_u64()
                && n > max
            {
                checked.invalid.push((
                    path.to_string(),
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), checked);
                }
            }
        }
        Value::Object(map) => walk_object(schema, map, path, checked),
        _ => {}
    }
}

fn walk_object(schema: &Value, map: &mut Map<String, Value>, path: &str, checked: &mut Checked) {
    let properties = schema["properties"].as_object();
    // Defaults first, so that required fields with a default are satisfied.
    for (key, sub) in properties.into_iter().flatten() {
        if !map.contains_key(key)
            && let Some(default) = sub.get("default")
        {
            map.insert(key.clone(), default.clone());
        }
    }
    let additional = schema.get("additionalProperties");
    let mut pruned = Vec::new();
    for (key, value) in map.iter_mut() {
        let child = format!("{path}.{key}");
        if let Some(sub) = properties.and_then(|p| p.get(key)) {
            walk(sub, value, &child, checked);
        } else if let Some(sub) = additional.filter(|a| a.is_object()) {
            walk(sub, value, &child, checked);
        } else if additional == Some(&Value::Bool(true)) || preserves(schema) {
            // Kept as is.
        } else {
            checked.unknown.push(child);
            pruned.push(key.clone());
        }
    }
    for key in pruned {
        map.remove(&key);
    }
    for key in required(schema) {
        if !map.contains_key(key) {
            checked
                .invalid
                .push((format!("{path}.{key}"), "Required value".into()));
        }
    }
}

/// The value at a printer column's simple JSONPath (`.status.nodes`, `.spec.limits.maxNodes`).
pub fn column_value(object: &Value, json_path: &str) -> Value {
    let pointer: String = json_path
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split('.')
        .filter(|s| !s.is_empty())
        .map(|s| format!("/{s}"))
        .collect();
    object.pointer(&pointer).cloned().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": { "name": "widgets.example.com" },
            "spec": { "group": "example.com", "scope": "Namespaced",
                "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"] },
                "versions": [{ "name": "v1", "served": true, "storage": true,
                    "subresources": { "status": {} },
                    "additionalPrinterColumns": [{ "name": "Size", "type": "integer", "jsonPath": ".spec.size" }],
                    "schema": { "openAPIV3Schema": { "type": "object", "properties": {
                        "spec": { "type": "object", "required": ["size"], "properties": {
                            "size": { "type": "integer", "minimum": 1, "maximum": 10 },
                            "colour": { "type": "string", "enum": ["red", "blue"], "default": "red" },
                            "tags": { "type": "array", "items": { "type": "string" } }
                        } },
                        "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    } } } }] }
        })
    }

    #[test]
    fn a_crd_becomes_a_served_kind() {
        let kind = kind_from_crd(&crd()).unwrap();
        assert_eq!(
            (kind.group, kind.version, kind.plural, kind.kind),
            ("example.com", "v1", "widgets", "Widget")
        );
        assert!(kind.namespaced && kind.has_status());
        assert_eq!(kind.short_names, ["wd"]);
        let mut bad = crd();
        bad["spec"]["scope"] = json!("Galaxy");
        bad["metadata"]["name"] = json!("widgets.other.com");
        let errors = kind_from_crd(&bad).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "spec.scope"]);
    }

    #[test]
    fn objects_are_validated_with_field_paths_defaulted_and_pruned() {
        let kind = kind_from_crd(&crd()).unwrap();
        let custom = kind.custom.unwrap();
        let mut good = json!({ "metadata": { "name": "w" }, "spec": { "size": 3, "extra": 1 } });
        let checked = check(custom, &mut good);
        assert!(checked.invalid.is_empty(), "{:?}", checked.invalid);
        assert_eq!(checked.unknown, ["spec.extra"]);
        assert_eq!(good["spec"], json!({ "size": 3, "colour": "red" }));

        let mut bad = json!({ "spec": { "size": 11, "colour": "green", "tags": [1] } });
        let checked = check(custom, &mut bad);
        let mut invalid = checked.invalid.clone();
        invalid.sort();
        let fields: Vec<&str> = invalid.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["spec.colour", "spec.size", "spec.tags[0]"]);
        assert!(invalid[0].1.contains("supported values"), "{invalid:?}");
        assert!(
            invalid[1].1.contains("less than or equal to 10"),
            "{invalid:?}"
        );

        let mut missing = json!({ "spec": { "size": "three" } });
        let checked = check(custom, &mut missing);
        assert_eq!(checked.invalid[0].0, "spec.size");
        assert!(checked.invalid[0].1.contains("must be of type integer"));
        let mut none = json!({ "spec": {} });
        assert_eq!(
            check(custom, &mut none).invalid,
            [("spec.size".to_string(), "Required value".to_string())]
        );
    }

    #[test]
    fn printer_columns_read_simple_paths() {
        let object = json!({ "spec": { "limits": { "maxNodes": 5 } } });
        assert_eq!(column_value(&object, ".spec.limits.maxNodes"), json!(5));
        assert_eq!(column_value(&object, ".status.nodes"), Value::Null);
    }
}
