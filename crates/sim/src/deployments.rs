//! The deployment controller: keeps the number of pods of each Deployment at `spec.replicas`
//! (creating from the template, deleting unscheduled and newest first), reports status, and
//! deletes a Deployment's pods with it. Pods are owned by their Deployment directly (the
//! simulator serves no ReplicaSets); rolling updates of a changed template are not simulated.

use std::{collections::BTreeSet, sync::Arc};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    resources::by_kind,
    store::{Change, EventType, ListPage, Store, Stored},
};

fn owner_uid(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true && o["kind"] == "Deployment")?
        .get("uid")?
        .as_str()
}

/// Runs the controller until `shutdown`.
pub async fn run(store: Arc<Store>, shutdown: CancellationToken) {
    let (Some(deployments), Some(pods)) = (by_kind("Deployment"), by_kind("Pod")) else {
        return;
    };
    loop {
        let (objects, mut live) = store.subscribe(&[deployments]);
        for change in &objects {
            reconcile(&store, &change.object.namespace, &change.object.name);
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
            let mut dirty: BTreeSet<(String, String)> = BTreeSet::new();
            let mut note = |change: &Change| match change.plural {
                "deployments" if change.kind == EventType::Deleted => {
                    let uid = change.object.value()["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let owned = store.list(
                        pods,
                        &ListPage {
                            namespace: Some(change.object.namespace.clone()),
                            ..Default::default()
                        },
                        &|p| owner_uid(&p.value()) == Some(uid.as_str()),
                    );
                    for pod in owned.items {
                        let _ = store.delete(pods, &pod.namespace, &pod.name);
                    }
                }
                "deployments" => {
                    dirty.insert((change.object.namespace.clone(), change.object.name.clone()));
                }
                "pods" => {
                    if let Some(owner) = deployment_of(&change.object) {
                        dirty.insert(owner);
                    }
                }
                _ => {}
            };
            note(&first);
            while let Ok(change) = live.try_recv() {
                note(&change);
            }
            for (namespace, name) in dirty {
                reconcile(&store, &namespace, &name);
            }
        }
    }
}

fn deployment_of(pod: &Stored) -> Option<(String, String)> {
    let value = pod.value();
    let owner = value
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|o| o["kind"] == "Deployment")?;
    Some((pod.namespace.clone(), owner["name"].as_str()?.to_string()))
}

fn reconcile(store: &Store, namespace: &str, name: &str) {
    let (Some(deployments), Some(pods)) = (by_kind("Deployment"), by_kind("Pod")) else {
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
    let desired = deployment
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let owned = store.list(
        pods,
        &ListPage {
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        &|p| owner_uid(&p.value()) == Some(uid.as_str()),
    );
    let mut owned: Vec<Value> = owned.items.iter().map(|p| p.value()).collect();
    if owned.len() < desired {
        let template = deployment
            .pointer("/spec/template")
            .cloned()
            .unwrap_or(json!({}));
        for _ in owned.len()..desired {
            let mut metadata = template
                .get("metadata")
                .filter(|m| m.is_object())
                .cloned()
                .unwrap_or(json!({}));
            metadata["generateName"] = json!(format!("{name}-"));
            metadata["namespace"] = json!(namespace);
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true
            }]);
            let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template.get("spec").cloned().unwrap_or(json!({})) });
            match store.create(pods, namespace, pod) {
                Ok(created) => owned.push(created.value()),
                Err(err) => {
                    tracing::warn!(%namespace, %name, error = %err, "deployment controller could not create a pod")
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
    let generation = deployment
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let status = json!({
        "observedGeneration": generation,
        "replicas": owned.len(),
        "updatedReplicas": owned.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": owned.len().saturating_sub(ready),
        "conditions": [{ "type": "Available", "status": if ready >= desired { "True" } else { "False" },
                         "reason": if ready >= desired { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" } }],
    });
    let _ = store.modify(deployments, namespace, name, true, |d| {
        if d.get("status") == Some(&status) {
            return false;
        }
        d["status"] = status.clone();
        true
    });
}
