//! Node heartbeats and the node lifecycle controller.
//!
//! Kubelets (simulated in process, or `shoal-sim agent` processes) renew a Lease per node in
//! `kube-node-lease`. When a node's lease is older than the grace period (default 40 s), its
//! Ready condition turns Unknown and it gets the `node.kubernetes.io/unreachable:NoExecute` taint;
//! after a further eviction timeout its pods are deleted so their controllers re-create them
//! elsewhere — as the real node lifecycle controller does. A node whose heartbeats resume is
//! Ready again.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    resources::by_kind,
    store::{ListPage, Store},
};

/// Timing of heartbeats and of the lifecycle controller.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleTiming {
    /// How often kubelets renew their lease.
    pub heartbeat_interval: Duration,
    /// A node whose lease is older than this is NotReady (Unknown).
    pub grace_period: Duration,
    /// Pods of a node NotReady this long are evicted.
    pub eviction_timeout: Duration,
}

impl Default for LifecycleTiming {
    fn default() -> Self {
        LifecycleTiming {
            heartbeat_interval: Duration::from_secs(10),
            grace_period: Duration::from_secs(40),
            eviction_timeout: Duration::from_secs(300),
        }
    }
}

/// The lease namespace.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Taint of a node that stopped heartbeating.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// `2006-01-02T15:04:05.000000Z`, the MicroTime format of `spec.renewTime`.
pub fn micro_time(at: SystemTime) -> String {
    humantime::format_rfc3339_micros(at).to_string()
}

/// Renews (or creates) the lease of `node` in `store`.
pub fn renew_lease(store: &Store, node: &str, duration: Duration) {
    let Some(leases) = by_kind("Lease") else {
        return;
    };
    let now = micro_time(SystemTime::now());
    let renewed = store.modify(leases, LEASE_NAMESPACE, node, false, |lease| {
        lease["spec"]["renewTime"] = json!(now);
        true
    });
    if renewed.is_err() {
        let lease = json!({ "metadata": { "name": node, "namespace": LEASE_NAMESPACE },
            "spec": { "holderIdentity": node, "leaseDurationSeconds": duration.as_secs(), "renewTime": now } });
        let _ = store.create(leases, LEASE_NAMESPACE, lease);
    }
}

/// Nodes whose in-process kubelet is stopped ("killed"): they stop heartbeating.
#[derive(Debug, Default, Clone)]
pub struct KilledNodes(Arc<Mutex<HashSet<String>>>);

impl KilledNodes {
    /// Stops the in-process kubelet of `node`.
    pub fn kill(&self, node: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string());
    }

    /// Starts it again.
    pub fn revive(&self, node: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// Whether `node`'s kubelet is stopped.
    pub fn is_killed(&self, node: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node)
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()
}

/// Heartbeats of the in-process kubelets, until `shutdown`.
pub async fn run_heartbeats(
    store: Arc<Store>,
    timing: LifecycleTiming,
    killed: KilledNodes,
    shutdown: CancellationToken,
) {
    let Some(nodes) = by_kind("Node") else { return };
    let mut ticker = tokio::time::interval(timing.heartbeat_interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for node in store.list(nodes, &ListPage::default(), &|_| true).items {
            if killed.is_killed(&node.name) || crate::kubelet::has_external_kubelet(&node.value()) {
                continue;
            }
            renew_lease(&store, &node.name, timing.grace_period);
            mark_ready_if_recovered(&store, &node.name);
        }
    }
}

/// A kubelet that heartbeats again reports Ready and loses the unreachable taint.
pub fn mark_ready_if_recovered(store: &Store, node: &str) {
    let Some(nodes) = by_kind("Node") else { return };
    let _ = store.modify(nodes, "", node, true, |n| {
        let conditions = n.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        let unknown = conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "Unknown");
        if !unknown {
            return false;
        }
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let mut others: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "Ready").collect();
        others.push(json!({ "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now }));
        n["status"]["conditions"] = Value::Array(others);
        true
    });
    let _ = store.modify(nodes, "", node, false, |n| {
        let taints = n
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !taints.iter().any(|t| t["key"] == UNREACHABLE_TAINT) {
            return false;
        }
        n["spec"]["taints"] = Value::Array(
            taints
                .into_iter()
                .filter(|t| t["key"] != UNREACHABLE_TAINT)
                .collect(),
        );
        true
    });
}

/// The node lifecycle controller, until `shutdown`.
pub async fn run_controller(
    store: Arc<Store>,
    timing: LifecycleTiming,
    shutdown: CancellationToken,
) {
    let (Some(nodes), Some(leases), Some(pods)) =
        (by_kind("Node"), by_kind("Lease"), by_kind("Pod"))
    else {
        return;
    };
    let mut unreachable_since: HashMap<String, SystemTime> = HashMap::new();
    // kube-controller-manager's node monitor period is 5 s against a 40 s grace period.
    let period =
        (timing.grace_period / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = SystemTime::now();
        let renewals: HashMap<String, SystemTime> = store
            .list(
                leases,
                &ListPage {
                    namespace: Some(LEASE_NAMESPACE.into()),
                    ..Default::default()
                },
                &|_| true,
            )
            .items
            .iter()
            .filter_map(|l| {
                Some((
                    l.name.clone(),
                    parse_time(l.value().pointer("/spec/renewTime")?.as_str()?)?,
                ))
            })
            .collect();
        for node in store.list(nodes, &ListPage::default(), &|_| true).items {
            let value = node.value();
            let ready = value
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str().map(str::to_string));
            // A node that never became Ready (still booting) is not judged yet.
            let Some(ready) = ready else { continue };
            let last = renewals.get(&node.name).copied().or_else(|| {
                value
                    .pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .and_then(parse_time)
            });
            let stale = last
                .is_none_or(|t| now.duration_since(t).unwrap_or_default() > timing.grace_period);
            if !stale {
                unreachable_since.remove(&node.name);
                continue;
            }
            if ready != "Unknown" {
                mark_unreachable(&store, &node.name);
            }
            let since = *unreachable_since.entry(node.name.clone()).or_insert(now);
            if now.duration_since(since).unwrap_or_default() >= timing.eviction_timeout {
                let name = node.name.clone();
                for pod in store
                    .list(pods, &ListPage::default(), &|p| {
                        p.field("spec.nodeName").as_deref() == Some(name.as_str())
                    })
                    .items
                {
                    let _ = store.delete(pods, &pod.namespace, &pod.name);
                }
            }
        }
    }
}

fn mark_unreachable(store: &Store, node: &str) {
    let Some(nodes) = by_kind("Node") else { return };
    tracing::info!(%node, "node stopped heartbeating: Ready=Unknown, tainted unreachable");
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let _ = store.modify(nodes, "", node, true, |n| {
        let conditions = n.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut others: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "Ready").collect();
        others.push(json!({ "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
            "message": "Kubelet stopped posting node status.", "lastHeartbeatTime": now, "lastTransitionTime": now }));
        n["status"]["conditions"] = Value::Array(others);
        true
    });
    let _ = store.modify(nodes, "", node, false, |n| {
        let mut taints = n
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if taints.iter().any(|t| t["key"] == UNREACHABLE_TAINT) {
            return false;
        }
        taints.push(json!({ "key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": now }));
        n["spec"]["taints"] = Value::Array(taints);
        true
    });
}
