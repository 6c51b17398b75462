//! The deployment and replica-set controllers, as kube-controller-manager runs them:
//!
//! - A Deployment owns one ReplicaSet per pod template (named `<deployment>-<pod-template-hash>`,
//!   the hash also a label of the set, its selector and its pods). A changed template gets a new
//!   set and a rolling update: the new set grows by at most `maxSurge` over `replicas` and the old
//!   ones shrink while at most `maxUnavailable` pods are not Running (defaults 25 % / 25 %, as
//!   Kubernetes); `Recreate` empties the old sets first. Old sets are kept, at 0 replicas, up to
//!   `revisionHistoryLimit` (10).
//! - A ReplicaSet keeps `spec.replicas` pods from its template (deleting unscheduled, then not
//!   running, then newest first) and reports status.
//! - Deleting an owner deletes what it owns (foreground-style garbage collection).

use std::{
    collections::BTreeSet,
    hash::{Hash, Hasher},
    sync::Arc,
};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    resources::{ResourceKind, by_kind},
    store::{Change, EventType, ListPage, Store, Stored},
};

/// Label with the hash of the pod template a ReplicaSet runs.
pub const HASH_LABEL: &str = "pod-template-hash";
/// Annotation with a Deployment's revision on its ReplicaSets.
const REVISION: &str = "deployment.kubernetes.io/revision";
/// Old ReplicaSets kept when a Deployment does not say.
const HISTORY_LIMIT: usize = 10;

/// The uid of `object`'s controlling owner of `kind`.
fn controller_uid<'a>(object: &'a Value, kind: &str) -> Option<&'a str> {
    object
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true && o["kind"] == kind)?
        .get("uid")?
        .as_str()
}

/// The (namespace, name) of `object`'s controlling owner of `kind`.
fn controller_of(object: &Stored, kind: &str) -> Option<(String, String)> {
    let value = object.value();
    let owner = value
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true && o["kind"] == kind)?;
    Some((
        object.namespace.clone(),
        owner["name"].as_str()?.to_string(),
    ))
}

/// Objects of `kind` in `namespace` controlled by the owner with `uid`.
fn owned(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: &str,
    owner: &str,
    uid: &str,
) -> Vec<Value> {
    store
        .list(
            kind,
            &ListPage {
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            &|o| controller_uid(&o.value(), owner) == Some(uid),
        )
        .items
        .iter()
        .map(|o| o.value())
        .collect()
}

fn owner_reference(owner: &Value) -> Value {
    json!([{
        "apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true
    }])
}

/// Runs both controllers until `shutdown`.
pub async fn run(store: Arc<Store>, shutdown: CancellationToken) {
    let (Some(deployments), Some(sets), Some(pods)) =
        (by_kind("Deployment"), by_kind("ReplicaSet"), by_kind("Pod"))
    else {
        return;
    };
    loop {
        let (objects, mut live) = store.subscribe(&[deployments, sets]);
        for change in &objects {
            match change.plural {
                "deployments" => {
                    reconcile_deployment(&store, &change.object.namespace, &change.object.name)
                }
                _ => reconcile_set(&store, &change.object.namespace, &change.object.name),
            }
        }
        loop {
            let first: Change = tokio::select! {
                _ = shutdown.cancelled() => return,
                change = live.recv() => match change {
                    Ok(change) => change,
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                },
            };
            let mut dirty_deployments: BTreeSet<(String, String)> = BTreeSet::new();
            let mut dirty_sets: BTreeSet<(String, String)> = BTreeSet::new();
            let mut note = |change: &Change| match (change.plural, change.kind) {
                ("deployments", EventType::Deleted) => {
                    collect_garbage(&store, sets, &change.object, "Deployment")
                }
                ("replicasets", EventType::Deleted) => {
                    collect_garbage(&store, pods, &change.object, "ReplicaSet");
                    dirty_deployments.extend(controller_of(&change.object, "Deployment"));
                }
                ("deployments", _) => {
                    dirty_deployments
                        .insert((change.object.namespace.clone(), change.object.name.clone()));
                }
                ("replicasets", _) => {
                    dirty_sets
                        .insert((change.object.namespace.clone(), change.object.name.clone()));
                    dirty_deployments.extend(controller_of(&change.object, "Deployment"));
                }
                ("pods", _) => dirty_sets.extend(controller_of(&change.object, "ReplicaSet")),
                _ => {}
            };
            note(&first);
            while let Ok(change) = live.try_recv() {
                note(&change);
            }
            for (namespace, name) in dirty_sets {
                reconcile_set(&store, &namespace, &name);
            }
            for (namespace, name) in dirty_deployments {
                reconcile_deployment(&store, &namespace, &name);
            }
        }
    }
}

/// Deletes the objects of `kind` a deleted `owner` controlled.
fn collect_garbage(store: &Store, kind: &'static ResourceKind, owner: &Stored, owner_kind: &str) {
    let uid = owner.value()["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for object in owned(store, kind, &owner.namespace, owner_kind, &uid) {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let _ = store.delete(kind, &owner.namespace, name);
    }
}

/// `pod-template-hash` of a template: stable for an unchanged template, different when it changes.
/// The simulator's usage annotations (`sim.shoal.dev/…`, what scenarios' `setUsage` changes) model
/// load, not the pod spec: they do not count, so a load change rolls nothing out.
pub fn template_hash(template: &Value) -> String {
    let mut template = template.clone();
    if let Some(metadata) = template.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(annotations) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.retain(|k, _| !k.starts_with("sim.shoal.dev/"));
            if annotations.is_empty() {
                metadata.remove("annotations");
            }
        }
        if metadata.is_empty() {
            template.as_object_mut().map(|t| t.remove("metadata"));
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    // Kubernetes' hashes read like `5d8f7c9b4`: lowercase alphanumerics without vowels.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = hasher.finish();
    (0..10)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// A `maxSurge`/`maxUnavailable` value (an integer or a percentage of `replicas`).
fn int_or_percent(
    value: Option<&Value>,
    replicas: i64,
    default_percent: i64,
    round_up: bool,
) -> i64 {
    let percent = |p: i64| {
        let scaled = replicas * p;
        if round_up {
            (scaled + 99) / 100
        } else {
            scaled / 100
        }
    };
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0).max(0),
        Some(Value::String(s)) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<i64>().ok())
            .map_or(percent(default_percent), percent),
        _ => percent(default_percent),
    }
}

fn replicas_of(object: &Value) -> i64 {
    object
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0)
}

fn status_i64(object: &Value, field: &str) -> i64 {
    object
        .pointer(&format!("/status/{field}"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn set_replicas(store: &Store, namespace: &str, name: &str, replicas: i64) {
    let Some(sets) = by_kind("ReplicaSet") else {
        return;
    };
    let _ = store.modify(sets, namespace, name, false, |rs| {
        if replicas_of(rs) == replicas && rs.pointer("/spec/replicas").is_some() {
            return false;
        }
        rs["spec"]["replicas"] = json!(replicas);
        true
    });
}

fn reconcile_deployment(store: &Store, namespace: &str, name: &str) {
    let (Some(deployments), Some(sets)) = (by_kind("Deployment"), by_kind("ReplicaSet")) else {
        return;
    };
    let Ok(deployment) = store.get(deployments, namespace, name) else {
        return;
    };
    let deployment = deployment.value();
    let uid = deployment["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let desired = replicas_of(&deployment);
    let template = deployment
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    let hash = template_hash(&template);
    let mut sets_owned = owned(store, sets, namespace, "Deployment", &uid);
    let revision = |rs: &Value| {
        rs.pointer(&format!(
            "/metadata/annotations/{}",
            REVISION.replace('/', "~1")
        ))
        .and_then(Value::as_str)
        .and_then(|r| r.parse::<i64>().ok())
        .unwrap_or(0)
    };
    let is_new = |rs: &Value| {
        rs.pointer(&format!("/metadata/labels/{HASH_LABEL}"))
            .and_then(Value::as_str)
            == Some(hash.as_str())
    };
    let max_revision = sets_owned.iter().map(revision).max().unwrap_or(0);
    if !sets_owned.iter().any(is_new) {
        let mut pod_template = template.clone();
        pod_template["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = deployment
            .pointer("/spec/selector")
            .cloned()
            .unwrap_or(json!({}));
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let mut labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels[HASH_LABEL] = json!(hash);
        // The first set starts at full size; a new template's set grows through the rollout.
        let initial = if sets_owned.is_empty() { desired } else { 0 };
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": { "name": format!("{name}-{hash}"), "namespace": namespace, "labels": labels,
                "annotations": { REVISION: (max_revision + 1).to_string() },
                "ownerReferences": owner_reference(&deployment) },
            "spec": { "replicas": initial, "selector": selector, "template": pod_template },
        });
        match store.create(sets, namespace, rs) {
            Ok(created) => sets_owned.push(created.value()),
            Err(err) => {
                tracing::warn!(%namespace, %name, error = %err, "deployment controller could not create a ReplicaSet");
                return;
            }
        }
    }
    let (new, old): (Vec<Value>, Vec<Value>) = sets_owned.into_iter().partition(|rs| is_new(rs));
    let Some(new) = new.into_iter().next() else {
        return;
    };
    let new_name = new["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let strategy = deployment
        .pointer("/spec/strategy/type")
        .and_then(Value::as_str)
        .unwrap_or("RollingUpdate");
    let old_replicas: i64 = old.iter().map(replicas_of).sum();
    let new_replicas = replicas_of(&new);
    let ready = |rs: &Value| status_i64(rs, "readyReplicas");
    if strategy == "Recreate" {
        for rs in &old {
            set_replicas(
                store,
                namespace,
                rs["metadata"]["name"].as_str().unwrap_or_default(),
                0,
            );
        }
        let old_pods: i64 = old.iter().map(|rs| status_i64(rs, "replicas")).sum();
        if old_pods == 0 {
            set_replicas(store, namespace, &new_name, desired);
        }
    } else if old_replicas == 0 {
        set_replicas(store, namespace, &new_name, desired);
    } else {
        let rolling = deployment.pointer("/spec/strategy/rollingUpdate");
        let mut surge = int_or_percent(rolling.and_then(|r| r.get("maxSurge")), desired, 25, true);
        let unavailable = int_or_percent(
            rolling.and_then(|r| r.get("maxUnavailable")),
            desired,
            25,
            false,
        );
        if surge == 0 && unavailable == 0 {
            surge = 1;
        }
        // Grow the new set within the surge.
        let room = desired + surge - (new_replicas + old_replicas);
        let new_target = (new_replicas + room.max(0)).min(desired);
        if new_target != new_replicas {
            set_replicas(store, namespace, &new_name, new_target);
        }
        // Shrink the old sets while enough pods stay available.
        let available: i64 = ready(&new) + old.iter().map(ready).sum::<i64>();
        let min_available = desired - unavailable;
        let old_unready: i64 = old.iter().map(|rs| replicas_of(rs) - ready(rs)).sum();
        let mut to_remove = (available - min_available).max(0) + old_unready;
        let mut old_sorted = old.clone();
        old_sorted.sort_by_key(revision);
        for rs in &old_sorted {
            if to_remove == 0 {
                break;
            }
            let current = replicas_of(rs);
            let cut = current.min(to_remove);
            if cut > 0 {
                set_replicas(
                    store,
                    namespace,
                    rs["metadata"]["name"].as_str().unwrap_or_default(),
                    current - cut,
                );
                to_remove -= cut;
            }
        }
    }
    // History: keep the newest empty old sets up to the limit.
    let limit = deployment
        .pointer("/spec/revisionHistoryLimit")
        .and_then(Value::as_u64)
        .map_or(HISTORY_LIMIT, |l| l as usize);
    let mut empty: Vec<&Value> = old
        .iter()
        .filter(|rs| replicas_of(rs) == 0 && status_i64(rs, "replicas") == 0)
        .collect();
    empty.sort_by_key(|rs| std::cmp::Reverse(revision(rs)));
    for rs in empty.into_iter().skip(limit) {
        let _ = store.delete(
            sets,
            namespace,
            rs["metadata"]["name"].as_str().unwrap_or_default(),
        );
    }
    // Status from the sets' own status.
    let all: Vec<&Value> = std::iter::once(&new).chain(old.iter()).collect();
    let total: i64 = all.iter().map(|rs| status_i64(rs, "replicas")).sum();
    let ready_total: i64 = all.iter().map(|rs| ready(rs)).sum();
    let updated = status_i64(&new, "replicas");
    let generation = deployment
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let available = ready_total
        >= desired
            - int_or_percent(
                deployment.pointer("/spec/strategy/rollingUpdate/maxUnavailable"),
                desired,
                25,
                false,
            );
    let complete = updated == desired && total == desired && ready(&new) == desired;
    let status = json!({
        "observedGeneration": generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready_total,
        "availableReplicas": ready_total,
        "unavailableReplicas": (desired - ready_total).max(0),
        "conditions": [
            { "type": "Available", "status": if available { "True" } else { "False" },
              "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" } },
            { "type": "Progressing", "status": "True",
              "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
              "message": format!("ReplicaSet \"{new_name}\" {}", if complete { "has successfully progressed." } else { "is progressing." }) }
        ],
    });
    let _ = store.modify(deployments, namespace, name, true, |d| {
        if d.get("status") == Some(&status) {
            return false;
        }
        d["status"] = status.clone();
        true
    });
}

fn reconcile_set(store: &Store, namespace: &str, name: &str) {
    let (Some(sets), Some(pods)) = (by_kind("ReplicaSet"), by_kind("Pod")) else {
        return;
    };
    let Ok(rs) = store.get(sets, namespace, name) else {
        return;
    };
    let rs = rs.value();
    let uid = rs["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let desired = replicas_of(&rs) as usize;
    let mut owned = owned(store, pods, namespace, "ReplicaSet", &uid);
    // Pods being deleted no longer count.
    owned.retain(|p| p.pointer("/metadata/deletionTimestamp").is_none());
    if owned.len() < desired {
        let template = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
        for _ in owned.len()..desired {
            let mut metadata = template
                .get("metadata")
                .filter(|m| m.is_object())
                .cloned()
                .unwrap_or(json!({}));
            metadata["generateName"] = json!(format!("{name}-"));
            metadata["namespace"] = json!(namespace);
            metadata["ownerReferences"] = owner_reference(&rs);
            let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template.get("spec").cloned().unwrap_or(json!({})) });
            match store.create(pods, namespace, pod) {
                Ok(created) => owned.push(created.value()),
                Err(err) => {
                    tracing::warn!(%namespace, %name, error = %err, "replica set controller could not create a pod")
                }
            }
        }
    } else if owned.len() > desired {
        // Unscheduled first, then not running, then newest.
        owned.sort_by_key(|p| {
            let unscheduled = p
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            let running = p.pointer("/status/phase").and_then(Value::as_str) == Some("Running");
            let created = p
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            (!unscheduled, running, std::cmp::Reverse(created))
        });
        let surplus = owned.len() - desired;
        for pod in owned.drain(..surplus) {
            let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let _ = store.delete(pods, namespace, pod_name);
        }
    }
    let ready = owned
        .iter()
        .filter(|p| p.pointer("/status/phase").and_then(Value::as_str) == Some("Running"))
        .count();
    let generation = rs
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let status = json!({
        "observedGeneration": generation,
        "replicas": owned.len(),
        "fullyLabeledReplicas": owned.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
    });
    let _ = store.modify(sets, namespace, name, true, |r| {
        if r.get("status") == Some(&status) {
            return false;
        }
        r["status"] = status.clone();
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hashes_are_stable_and_follow_the_template() {
        let a = json!({ "spec": { "containers": [{ "name": "c", "image": "app:1" }] } });
        let b = json!({ "spec": { "containers": [{ "name": "c", "image": "app:2" }] } });
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
        let mut loaded = a.clone();
        loaded["metadata"]["annotations"]["sim.shoal.dev/cpu-usage"] = json!("300m");
        assert_eq!(template_hash(&a), template_hash(&loaded));
    }

    #[test]
    fn surge_and_unavailable_read_like_kubernetes() {
        assert_eq!(int_or_percent(None, 10, 25, true), 3);
        assert_eq!(int_or_percent(None, 10, 25, false), 2);
        assert_eq!(int_or_percent(Some(&json!("50%")), 3, 25, true), 2);
        assert_eq!(int_or_percent(Some(&json!(2)), 10, 25, true), 2);
    }
}
