//! Server-side printing: the `meta.k8s.io/v1` Table that kubectl asks for (`Accept: …;as=Table`)
//! so that `kubectl get` shows the usual columns (nodes: STATUS, ROLES, VERSION; pods: READY,
//! STATUS, RESTARTS, and with `-o wide` IP and NODE; deployments: READY, UP-TO-DATE, AVAILABLE).

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::{resources::ResourceKind, store::Stored};

/// Whether the request's Accept header asks for a Table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// kubectl's human durations: `45s`, `3m20s`, `15m`, `5h10m`, `3d4h`, `400d`.
pub fn human_duration(seconds: u64) -> String {
    let (m, h) = (seconds / 60, seconds / 3600);
    match () {
        _ if seconds < 120 => format!("{seconds}s"),
        _ if m < 10 => {
            if seconds.is_multiple_of(60) {
                format!("{m}m")
            } else {
                format!("{m}m{}s", seconds % 60)
            }
        }
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => {
            if m % 60 == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{}m", m % 60)
            }
        }
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => {
            if h % 24 == 0 {
                format!("{}d", h / 24)
            } else {
                format!("{}d{}h", h / 24, h % 24)
            }
        }
        _ if h < 24 * 365 * 2 => format!("{}d", h / 24),
        _ => format!("{}y{}d", h / (24 * 365), (h / 24) % 365),
    }
}

fn age(object: &Value) -> String {
    let created = object
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok());
    match created {
        Some(t) => human_duration(
            SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs(),
        ),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `field` of every container in a workload's pod template, comma-separated.
fn template_containers(v: &Value, field: &str) -> String {
    v.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c[field].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A workload's `matchLabels` as `k=v,k=v`.
fn selector_text(v: &Value) -> String {
    v.pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, val)| format!("{k}={}", val.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

fn or_none(text: String) -> String {
    if text.is_empty() {
        "<none>".into()
    } else {
        text
    }
}

/// (name, type, priority): priority 1 columns show with `-o wide`.
fn columns(kind: &ResourceKind) -> Vec<(&'static str, &'static str, u8)> {
    match kind.kind {
        "Node" => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        "Pod" => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        "Deployment" => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "string", 0),
            ("Available", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "ReplicaSet" => vec![
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "PodDisruptionBudget" => vec![
            ("Name", "string", 0),
            ("Min Available", "string", 0),
            ("Max Unavailable", "string", 0),
            ("Allowed Disruptions", "integer", 0),
            ("Age", "string", 0),
        ],
        "Namespace" => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        _ => vec![("Name", "string", 0), ("Age", "string", 0)],
    }
}

fn cells(kind: &ResourceKind, v: &Value) -> Vec<Value> {
    let name = s(v, "/metadata/name").to_string();
    match kind.kind {
        "Node" => {
            let ready = v
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str());
            let mut status = match ready {
                Some("True") => "Ready",
                Some(_) => "NotReady",
                None => "Unknown",
            }
            .to_string();
            if v.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<&str> = v
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            let address = |t: &str| {
                v.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .and_then(|x| x["address"].as_str())
                    .unwrap_or("<none>")
                    .to_string()
            };
            vec![
                json!(name),
                json!(status),
                json!(or_none(roles.join(","))),
                json!(age(v)),
                json!(or_none(s(v, "/status/nodeInfo/kubeletVersion").into())),
                json!(address("InternalIP")),
                json!(address("ExternalIP")),
                json!(or_none(s(v, "/status/nodeInfo/osImage").into())),
                json!(or_none(s(v, "/status/nodeInfo/kernelVersion").into())),
                json!(or_none(
                    s(v, "/status/nodeInfo/containerRuntimeVersion").into()
                )),
            ]
        }
        "Pod" => {
            let total = v
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = v
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |cs| cs.iter().filter(|c| c["ready"] == true).count());
            let restarts: i64 = statuses.map_or(0, |cs| {
                cs.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            let status = if v.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else {
                s(v, "/status/phase").to_string()
            };
            vec![
                json!(name),
                json!(format!("{ready}/{total}")),
                json!(or_none(status)),
                json!(restarts.to_string()),
                json!(age(v)),
                json!(or_none(s(v, "/status/podIP").into())),
                json!(or_none(s(v, "/spec/nodeName").into())),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        "Deployment" => {
            let n = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            vec![
                json!(name),
                json!(format!(
                    "{}/{}",
                    n("/status/readyReplicas"),
                    v.pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                )),
                json!(n("/status/updatedReplicas").to_string()),
                json!(n("/status/availableReplicas").to_string()),
                json!(age(v)),
                json!(template_containers(v, "name")),
                json!(template_containers(v, "image")),
                json!(selector_text(v)),
            ]
        }
        "ReplicaSet" => {
            let n = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            vec![
                json!(name),
                json!(
                    v.pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                ),
                json!(n("/status/replicas")),
                json!(n("/status/readyReplicas")),
                json!(age(v)),
                json!(template_containers(v, "name")),
                json!(template_containers(v, "image")),
                json!(selector_text(v)),
            ]
        }
        "PodDisruptionBudget" => {
            let text = |p: &str| {
                v.pointer(p)
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .unwrap_or_else(|| "N/A".into())
            };
            vec![
                json!(name),
                json!(text("/spec/minAvailable")),
                json!(text("/spec/maxUnavailable")),
                json!(
                    v.pointer("/status/disruptionsAllowed")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                ),
                json!(age(v)),
            ]
        }
        "Namespace" => vec![
            json!(name),
            json!(or_none(s(v, "/status/phase").into())),
            json!(age(v)),
        ],
        _ => vec![json!(name), json!(age(v))],
    }
}

/// Columns of a custom kind: Name, then its `additionalPrinterColumns` (Age when it has none).
fn custom_columns(custom: &crate::crd::CustomInfo) -> Vec<(String, String, i64)> {
    let mut out = vec![("Name".to_string(), "string".to_string(), 0)];
    if custom.columns.is_empty() {
        out.push(("Age".into(), "date".into(), 0));
    }
    out.extend(
        custom
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.column_type.clone(), c.priority)),
    );
    out
}

fn custom_cells(custom: &crate::crd::CustomInfo, v: &Value) -> Vec<Value> {
    let mut cells = vec![json!(s(v, "/metadata/name"))];
    if custom.columns.is_empty() {
        cells.push(json!(age(v)));
    }
    for c in &custom.columns {
        let value = crate::crd::column_value(v, &c.json_path);
        cells.push(match (c.column_type.as_str(), &value) {
            (_, Value::Null) => Value::Null,
            ("date", Value::String(_)) => {
                json!(age(&json!({ "metadata": { "creationTimestamp": value } })))
            }
            ("string", Value::String(_)) => value,
            ("string", other) => json!(other.to_string()),
            _ => value,
        });
    }
    cells
}

fn row(kind: &ResourceKind, object: &Value, include_object: bool) -> Value {
    let embedded = if include_object {
        object.clone()
    } else {
        json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"] })
    };
    let cells = match kind.custom {
        Some(custom) => custom_cells(custom, object),
        None => cells(kind, object),
    };
    json!({ "cells": cells, "object": embedded })
}

/// A Table of `objects`.
pub fn render(
    kind: &ResourceKind,
    objects: &[&Stored],
    rv: u64,
    include_object: bool,
    with_columns: bool,
) -> Value {
    let definitions: Vec<Value> = if with_columns {
        let columns: Vec<(String, String, i64)> = match kind.custom {
            Some(custom) => custom_columns(custom),
            None => columns(kind)
                .into_iter()
                .map(|(n, t, p)| (n.to_string(), t.to_string(), i64::from(p)))
                .collect(),
        };
        columns
            .iter()
            .map(|(name, ty, priority)| json!({ "name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": "", "priority": priority }))
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| row(kind, &o.value(), include_object))
        .collect();
    json!({ "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": { "resourceVersion": rv.to_string() },
        "columnDefinitions": definitions, "rows": rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(15 * 60), "15m");
        assert_eq!(human_duration(5 * 3600 + 600), "5h10m");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600), "3d4h");
    }

    #[test]
    fn accept_header() {
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }
}
