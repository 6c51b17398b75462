//! `shoal-sim agent`: one simulated node as its own process, talking to the simulator's API over
//! HTTP like a kubelet: it registers its Node, reports Ready, renews its Lease, and runs the pods
//! bound to it. This is what runs inside a Docker container for the Docker backend. When the
//! process dies, the node goes NotReady after the grace period, as a real node would.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{LEASE_NAMESPACE, micro_time};

/// What the agent registers and how it behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// API server, `http://host:port`.
    pub api: String,
    /// Node name.
    pub name: String,
    /// CPU quantity, e.g. "4".
    pub cpu: String,
    /// Memory quantity, e.g. "8Gi".
    pub memory: String,
    /// Pod slots.
    pub pods: u32,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Taints as `key=value:Effect` or `key:Effect`.
    pub taints: Vec<String>,
    /// Lease renewal interval.
    pub heartbeat_interval: Duration,
    /// Bound pod → Running.
    pub pod_start_delay: Duration,
    /// `spec.providerID` to register with (empty: none).
    pub provider_id: String,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A taint flag did not parse.
    #[error(
        "--taint {0:?}: expected key=value:Effect or key:Effect with Effect NoSchedule, PreferNoSchedule or NoExecute"
    )]
    BadTaint(String),
    /// The API server refused the node.
    #[error("registering node {name}: {message}")]
    Register {
        /// Node name.
        name: String,
        /// What the server said.
        message: String,
    },
}

fn parse_taint(raw: &str) -> Result<Value, AgentError> {
    let bad = || AgentError::BadTaint(raw.to_string());
    let (key_value, effect) = raw.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(bad());
    }
    let (key, value) = key_value.split_once('=').unwrap_or((key_value, ""));
    if key.is_empty() {
        return Err(bad());
    }
    Ok(json!({ "key": key, "value": value, "effect": effect }))
}

/// Runs the agent until `shutdown`. Transient API errors are retried; only an invalid setup or a
/// refused registration ends it with an error.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let taints = config
        .taints
        .iter()
        .map(|t| parse_taint(t))
        .collect::<Result<Vec<_>, _>>()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| AgentError::Register {
            name: config.name.clone(),
            message: e.to_string(),
        })?;
    let capacity = json!({ "cpu": config.cpu, "memory": config.memory, "pods": config.pods.to_string(), "ephemeral-storage": "100Gi" });
    let mut labels = config.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), config.name.clone());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": config.name, "labels": labels, "annotations": { "sim.shoal.dev/external-kubelet": "true" } },
        "spec": { "taints": taints },
        "status": { "capacity": capacity, "allocatable": capacity },
    });
    let mut node = node;
    if !config.provider_id.is_empty() {
        node["spec"]["providerID"] = json!(config.provider_id);
    }
    // Register, retrying while the API server is unreachable.
    loop {
        match http
            .post(format!("{}/api/v1/nodes", config.api))
            .json(&node)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => break,
            Ok(r) => {
                let message = r.text().await.unwrap_or_default();
                return Err(AgentError::Register {
                    name: config.name.clone(),
                    message,
                });
            }
            Err(err) => tracing::warn!(error = %err, "API server unreachable; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    tracing::info!(node = %config.name, api = %config.api, "registered");
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    let mut pods_tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                if let Err(err) = beat(&http, &config).await {
                    tracing::warn!(error = %err, "heartbeat failed");
                }
            }
            _ = pods_tick.tick() => {
                if let Err(err) = start_pods(&http, &config).await {
                    tracing::debug!(error = %err, "pod sync failed");
                }
            }
        }
    }
}

/// Renews the lease and reports Ready.
async fn beat(http: &reqwest::Client, config: &AgentConfig) -> Result<(), reqwest::Error> {
    let now = micro_time(std::time::SystemTime::now());
    let lease_url = format!(
        "{}/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{}",
        config.api, config.name
    );
    let patched = http
        .patch(&lease_url)
        .header("content-type", "application/merge-patch+json")
        .body(json!({ "spec": { "renewTime": now } }).to_string())
        .send()
        .await?;
    if patched.status().as_u16() == 404 {
        let lease = json!({ "metadata": { "name": config.name, "namespace": LEASE_NAMESPACE },
            "spec": { "holderIdentity": config.name, "leaseDurationSeconds": 40, "renewTime": now } });
        http.post(format!(
            "{}/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
            config.api
        ))
        .json(&lease)
        .send()
        .await?;
    }
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let status = json!({ "status": { "conditions": [ { "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t } ] } });
    http.patch(format!(
        "{}/api/v1/nodes/{}/status",
        config.api, config.name
    ))
    .header("content-type", "application/merge-patch+json")
    .body(status.to_string())
    .send()
    .await?;
    // A node that was marked unreachable while we were gone loses the taint.
    let node: Value = http
        .get(format!("{}/api/v1/nodes/{}", config.api, config.name))
        .send()
        .await?
        .json()
        .await?;
    let taints = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if taints
        .iter()
        .any(|t| t["key"] == crate::lifecycle::UNREACHABLE_TAINT)
    {
        let kept: Vec<Value> = taints
            .into_iter()
            .filter(|t| t["key"] != crate::lifecycle::UNREACHABLE_TAINT)
            .collect();
        http.patch(format!("{}/api/v1/nodes/{}", config.api, config.name))
            .header("content-type", "application/merge-patch+json")
            .body(json!({ "spec": { "taints": kept } }).to_string())
            .send()
            .await?;
    }
    Ok(())
}

/// Finishes pods being deleted, then starts the pods bound to this node that are still Pending.
async fn start_pods(http: &reqwest::Client, config: &AgentConfig) -> Result<(), reqwest::Error> {
    let mine: Value = http
        .get(format!("{}/api/v1/pods", config.api))
        .query(&[("fieldSelector", format!("spec.nodeName={}", config.name))])
        .send()
        .await?
        .json()
        .await?;
    for pod in mine["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_some())
    {
        let (Some(ns), Some(name)) = (
            pod.pointer("/metadata/namespace").and_then(Value::as_str),
            pod.pointer("/metadata/name").and_then(Value::as_str),
        ) else {
            continue;
        };
        http.delete(format!("{}/api/v1/namespaces/{ns}/pods/{name}", config.api))
            .query(&[("gracePeriodSeconds", "0")])
            .send()
            .await?;
    }
    let list: Value = http
        .get(format!("{}/api/v1/pods", config.api))
        .query(&[(
            "fieldSelector",
            format!("spec.nodeName={},status.phase=Pending", config.name),
        )])
        .send()
        .await?
        .json()
        .await?;
    for pod in list["items"].as_array().into_iter().flatten() {
        let (Some(ns), Some(name)) = (
            pod.pointer("/metadata/namespace").and_then(Value::as_str),
            pod.pointer("/metadata/name").and_then(Value::as_str),
        ) else {
            continue;
        };
        tokio::time::sleep(config.pod_start_delay).await;
        let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let status = json!({ "status": { "phase": "Running", "startTime": t, "podIP": "10.244.0.2", "conditions": [
            { "type": "PodScheduled", "status": "True", "lastTransitionTime": t },
            { "type": "Initialized", "status": "True", "lastTransitionTime": t },
            { "type": "ContainersReady", "status": "True", "lastTransitionTime": t },
            { "type": "Ready", "status": "True", "lastTransitionTime": t } ] } });
        http.patch(format!(
            "{}/api/v1/namespaces/{ns}/pods/{name}/status",
            config.api
        ))
        .header("content-type", "application/merge-patch+json")
        .body(status.to_string())
        .send()
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_or_say_why_not() {
        assert_eq!(
            parse_taint("gpu=true:NoSchedule").ok(),
            Some(json!({ "key": "gpu", "value": "true", "effect": "NoSchedule" }))
        );
        assert_eq!(
            parse_taint("dedicated:NoExecute").ok(),
            Some(json!({ "key": "dedicated", "value": "", "effect": "NoExecute" }))
        );
        assert!(parse_taint("gpu=true").is_err());
        assert!(parse_taint("=x:NoSchedule").is_err());
        assert!(parse_taint("a:Sometimes").is_err());
    }
}
