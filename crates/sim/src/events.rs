//! Events the simulated control plane writes (core/v1), as the real components do:
//! FailedScheduling from the scheduler, Killing from kubelets stopping a pod.

use serde_json::{Value, json};

use crate::{resources::by_kind, store::Store};

/// Records an Event about `object` (a stored object's JSON) in its namespace (`default` for
/// cluster-scoped objects). Best effort: a namespace being deleted refuses it.
pub fn record(
    store: &Store,
    object: &Value,
    event_type: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let Some(events) = by_kind("Event") else {
        return;
    };
    let metadata = &object["metadata"];
    let name = metadata["name"].as_str().unwrap_or_default();
    let namespace = metadata["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": { "generateName": format!("{name}."), "namespace": namespace },
        "involvedObject": {
            "apiVersion": object["apiVersion"], "kind": object["kind"], "name": name,
            "namespace": metadata["namespace"], "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
        },
        "reason": reason, "message": message, "type": event_type, "count": 1,
        "firstTimestamp": now, "lastTimestamp": now,
        "source": { "component": component },
        "reportingComponent": component, "reportingInstance": "shoal-sim",
    });
    let _ = store.create(events, namespace, event);
}
