//! Simulated kubelets and the node lifecycle: nodes turn Ready after a delay, pods bound to a
//! Ready node go Running after a delay, and pods of a deleted node are removed (pod GC).
//! Nodes annotated `sim.shoal.dev/external-kubelet: "true"` are left to a real agent process.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    resources::by_kind,
    store::{Change, EventType, ListPage, Store},
};

/// Timing of the simulated kubelets.
#[derive(Debug, Clone, Copy)]
pub struct KubeletTiming {
    /// Node registered → Ready.
    pub node_ready_delay: Duration,
    /// Pod bound → Running.
    pub pod_start_delay: Duration,
}

impl Default for KubeletTiming {
    fn default() -> Self {
        KubeletTiming {
            node_ready_delay: Duration::from_secs(1),
            pod_start_delay: Duration::from_millis(500),
        }
    }
}

const EXTERNAL: &str = "sim.shoal.dev/external-kubelet";

/// The node named `name` if it exists and the in-process kubelets run it.
fn local_node(store: &Store, name: &str) -> Option<Value> {
    let node = store.get(by_kind("Node")?, "", name).ok()?.value();
    (!has_external_kubelet(&node)).then_some(node)
}

/// Runs `action` after `delay`, unless the simulator shuts down first.
fn after(delay: Duration, stop: &CancellationToken, action: impl FnOnce() + Send + 'static) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => action(),
        }
    });
}

/// Whether a node is run by an agent process rather than the in-process kubelets.
pub(crate) fn has_external_kubelet(node: &Value) -> bool {
    node.pointer("/metadata/annotations")
        .and_then(|a| a.get(EXTERNAL))
        .and_then(Value::as_str)
        == Some("true")
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn ready_condition(node: &Value) -> bool {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Runs the kubelets until `shutdown`.
pub async fn run(store: Arc<Store>, timing: KubeletTiming, shutdown: CancellationToken) {
    let (Some(nodes), Some(pods)) = (by_kind("Node"), by_kind("Pod")) else {
        return;
    };
    loop {
        let (objects, mut live) = store.subscribe(&[nodes, pods]);
        for change in &objects {
            react(&store, timing, change, &shutdown);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = live.recv() => match change {
                    Ok(change) => react(&store, timing, &change, &shutdown),
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}

fn react(store: &Arc<Store>, timing: KubeletTiming, change: &Change, shutdown: &CancellationToken) {
    let (Some(nodes), Some(pods)) = (by_kind("Node"), by_kind("Pod")) else {
        return;
    };
    // Most changes concern nothing a kubelet does: decide from the indexed fields before
    // parsing the object.
    let interesting = match (change.plural, change.kind) {
        ("nodes", EventType::Deleted | EventType::Added) => true,
        ("pods", EventType::Added | EventType::Modified) => {
            change
                .object
                .field("spec.nodeName")
                .is_some_and(|n| !n.is_empty())
                && (change.object.field("status.phase").as_deref() == Some("Pending")
                    || change.kind == EventType::Modified)
        }
        _ => false,
    };
    if !interesting {
        return;
    }
    let object = change.object.value();
    match (change.plural, change.kind) {
        ("nodes", EventType::Deleted) => {
            // Pod GC: pods bound to a node that no longer exists are deleted.
            let name = change.object.name.clone();
            let bound = store.list(pods, &ListPage::default(), &|p| {
                p.field("spec.nodeName").as_deref() == Some(name.as_str())
            });
            for pod in bound.items {
                let _ = store.delete(pods, &pod.namespace, &pod.name);
            }
        }
        ("nodes", _) => {
            if has_external_kubelet(&object)
                || ready_condition(&object)
                || change.kind != EventType::Added
            {
                return;
            }
            let (store, name) = (store.clone(), change.object.name.clone());
            after(timing.node_ready_delay, shutdown, move || {
                let _ = store.modify(nodes, "", &name, true, |node| {
                    if ready_condition(node) {
                        return false;
                    }
                    let t = now();
                    node["status"]["conditions"] = json!([{
                        "type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t
                    }]);
                    node["status"]["nodeInfo"] = json!({ "kubeletVersion": "v1.34.0-shoal-sim", "architecture": "amd64", "operatingSystem": "linux",
                        "containerRuntimeVersion": "sim://1", "kernelVersion": "sim", "kubeProxyVersion": "", "osImage": "shoal-sim",
                        "bootID": "", "machineID": "", "systemUUID": "" });
                    true
                });
            });
        }
        ("pods", EventType::Modified)
            if object.pointer("/metadata/deletionTimestamp").is_some() =>
        {
            // Graceful deletion: the kubelet stops the containers, then removes the pod.
            let node_name = object
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if local_node(store, &node_name).is_none() {
                return;
            }
            if change
                .prev
                .as_ref()
                .is_some_and(|p| !p.value()["metadata"]["deletionTimestamp"].is_null())
            {
                // Already being stopped.
                return;
            }
            let container = object
                .pointer("/spec/containers/0/name")
                .and_then(Value::as_str)
                .unwrap_or("main");
            crate::events::record(
                store,
                &object,
                "Normal",
                "Killing",
                &format!("Stopping container {container}"),
                "kubelet",
            );
            let (store, ns, name) = (
                store.clone(),
                change.object.namespace.clone(),
                change.object.name.clone(),
            );
            after(timing.pod_start_delay, shutdown, move || {
                let _ = store.delete(pods, &ns, &name);
            });
        }
        ("pods", EventType::Added | EventType::Modified) => {
            let node_name = object
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let phase = object
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("Pending");
            if node_name.is_empty() || phase != "Pending" {
                return;
            }
            if !local_node(store, &node_name).is_some_and(|node| ready_condition(&node)) {
                return;
            }
            let (store, ns, name) = (
                store.clone(),
                change.object.namespace.clone(),
                change.object.name.clone(),
            );
            after(timing.pod_start_delay, shutdown, move || {
                let _ = store.modify(pods, &ns, &name, true, |pod| {
                    if pod.pointer("/status/phase").and_then(Value::as_str) != Some("Pending") {
                        return false;
                    }
                    let t = now();
                    let ip = format!("10.{}.{}.{}", rand::random::<u8>(), rand::random::<u8>(), rand::random::<u8>().max(1));
                    let scheduled = pod["status"]["conditions"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled").cloned())
                        .unwrap_or(json!({ "type": "PodScheduled", "status": "True", "lastTransitionTime": t }));
                    let containers: Vec<Value> = pod["spec"]["containers"]
                        .as_array()
                        .map(|cs| {
                            cs.iter()
                                .map(|c| json!({ "name": c["name"], "image": c["image"], "imageID": "", "ready": true, "started": true,
                                    "restartCount": 0, "state": { "running": { "startedAt": t } } }))
                                .collect()
                        })
                        .unwrap_or_default();
                    pod["status"]["phase"] = json!("Running");
                    pod["status"]["podIP"] = json!(ip);
                    pod["status"]["startTime"] = json!(t);
                    pod["status"]["containerStatuses"] = Value::Array(containers);
                    pod["status"]["conditions"] = json!([
                        scheduled,
                        { "type": "Initialized", "status": "True", "lastTransitionTime": t },
                        { "type": "ContainersReady", "status": "True", "lastTransitionTime": t },
                        { "type": "Ready", "status": "True", "lastTransitionTime": t },
                    ]);
                    true
                });
            });
        }
        _ => {}
    }
}
