//! PodDisruptionBudgets: how many disruptions each allows right now, the eviction check behind
//! `pods/eviction` (429 when a budget forbids it, as the real API answers), and a controller
//! that keeps each budget's status current.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    error::ApiError,
    resources::by_kind,
    selector::LabelSelector,
    store::{ListPage, Store, Stored},
};

/// A budget's current numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Pods the budget covers.
    pub expected: i64,
    /// Covered pods that are Running and Ready.
    pub healthy: i64,
    /// Healthy pods the budget requires.
    pub desired: i64,
    /// Evictions allowed now.
    pub allowed: i64,
}

fn selector_of(pdb: &Value) -> Option<LabelSelector> {
    let labels = pdb
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object);
    let text: Vec<String> = labels
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some(format!("{k}={}", v.as_str()?)))
        .collect();
    let mut requirements = text;
    for e in pdb
        .pointer("/spec/selector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        requirements.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    LabelSelector::parse(&requirements.join(",")).ok()
}

fn pod_healthy(pod: &Value) -> bool {
    pod.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
        && pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
}

/// `minAvailable`/`maxUnavailable` as a count of `expected` (percentages round up, as Kubernetes
/// does for these fields).
fn count(value: &Value, expected: i64) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let pct: f64 = s.strip_suffix('%')?.parse().ok()?;
            Some((pct * expected as f64 / 100.0).ceil() as i64)
        }
        _ => None,
    }
}

/// The budget's numbers given the pods in its namespace.
pub fn budget(pdb: &Value, pods: &[Arc<Stored>]) -> Budget {
    let selector = selector_of(pdb).unwrap_or_default();
    let covered: Vec<Value> = pods
        .iter()
        .filter(|p| selector.matches(&p.labels))
        .map(|p| p.value())
        .collect();
    let expected = covered.len() as i64;
    let healthy = covered.iter().filter(|p| pod_healthy(p)).count() as i64;
    let desired = if let Some(min) = pdb.pointer("/spec/minAvailable") {
        count(min, expected).unwrap_or(expected)
    } else if let Some(max) = pdb.pointer("/spec/maxUnavailable") {
        expected - count(max, expected).unwrap_or(0)
    } else {
        expected
    };
    Budget {
        expected,
        healthy,
        desired,
        allowed: (healthy - desired).max(0),
    }
}

/// Evicts a pod unless a budget that covers it allows no disruption.
pub fn evict(store: &Store, namespace: &str, name: &str) -> Result<(), ApiError> {
    let (Some(pods), Some(pdbs)) = (by_kind("Pod"), by_kind("PodDisruptionBudget")) else {
        return Err(ApiError::Internal("kinds missing".into()));
    };
    let pod = store.get(pods, namespace, name)?;
    let page = ListPage {
        namespace: Some(namespace.to_string()),
        ..Default::default()
    };
    let in_namespace = store.list(pods, &page, &|_| true).items;
    // Pods that are not running do not count against a budget (the real API evicts them freely).
    let pod_value = pod.value();
    if pod_healthy(&pod_value) {
        for pdb in store.list(pdbs, &page, &|_| true).items {
            let pdb = pdb.value();
            if !selector_of(&pdb).is_some_and(|s| s.matches(&pod.labels)) {
                continue;
            }
            let b = budget(&pdb, &in_namespace);
            if b.allowed < 1 {
                let pdb_name = pdb
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                return Err(ApiError::TooManyRequests(format!(
                    "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {pdb_name} needs {} healthy pods and has {} currently",
                    b.desired, b.healthy
                )));
            }
        }
    }
    store.delete(pods, namespace, name).map(|_| ())
}

/// Keeps `status` of every PodDisruptionBudget current, until `shutdown`.
pub async fn run(store: Arc<Store>, shutdown: CancellationToken) {
    let (Some(pods), Some(pdbs)) = (by_kind("Pod"), by_kind("PodDisruptionBudget")) else {
        return;
    };
    loop {
        let (_, mut live) = store.subscribe(&[]);
        refresh(&store, pods, pdbs, None);
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return,
                change = live.recv() => match change {
                    Ok(change) => change,
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                },
            };
            let mut namespaces = BTreeMap::new();
            for change in std::iter::once(change).chain(std::iter::from_fn(|| live.try_recv().ok()))
            {
                if change.plural == "pods" || change.plural == "poddisruptionbudgets" {
                    namespaces.insert(change.object.namespace.clone(), ());
                }
            }
            for namespace in namespaces.keys() {
                refresh(&store, pods, pdbs, Some(namespace));
            }
        }
    }
}

fn refresh(
    store: &Store,
    pods: &'static crate::resources::ResourceKind,
    pdbs: &'static crate::resources::ResourceKind,
    namespace: Option<&String>,
) {
    let page = ListPage {
        namespace: namespace.cloned(),
        ..Default::default()
    };
    for pdb in store.list(pdbs, &page, &|_| true).items {
        let in_namespace = store
            .list(
                pods,
                &ListPage {
                    namespace: Some(pdb.namespace.clone()),
                    ..Default::default()
                },
                &|_| true,
            )
            .items;
        let value = pdb.value();
        let b = budget(&value, &in_namespace);
        let generation = value
            .pointer("/metadata/generation")
            .cloned()
            .unwrap_or(json!(1));
        let status = json!({
            "observedGeneration": generation, "disruptionsAllowed": b.allowed, "currentHealthy": b.healthy,
            "desiredHealthy": b.desired, "expectedPods": b.expected,
        });
        let _ = store.modify(pdbs, &pdb.namespace, &pdb.name, true, |p| {
            let same = [
                "disruptionsAllowed",
                "currentHealthy",
                "desiredHealthy",
                "expectedPods",
                "observedGeneration",
            ]
            .iter()
            .all(|k| p["status"].get(*k) == status.get(*k));
            if same {
                return false;
            }
            let conditions = p["status"].get("conditions").cloned();
            p["status"] = status.clone();
            if let Some(c) = conditions {
                p["status"]["conditions"] = c;
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_up() {
        assert_eq!(count(&json!("50%"), 3), Some(2));
        assert_eq!(count(&json!(2), 10), Some(2));
        assert_eq!(count(&json!("x"), 3), None);
    }
}
