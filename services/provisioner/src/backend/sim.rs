//! The `sim` backend: an HTTP client of the simulator's cloud API (`/cloud/v1/instances`).

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use shoal_proto::v1 as pb;

use super::{InstanceSpec, NodeProvider, ProviderError, taint_json, with_ownership};

/// Talks to one simulator.
pub struct SimProvider {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SimInstance {
    id: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    state: String,
    #[serde(default)]
    created_at_ms: u64,
}

#[derive(Deserialize)]
struct SimList {
    instances: Vec<SimInstance>,
}

#[derive(Deserialize)]
struct SimStatus {
    #[serde(default)]
    message: String,
}

impl SimInstance {
    fn into_proto(self) -> pb::Instance {
        with_ownership(
            pb::Instance {
                id: self.id,
                state: self.state,
                labels: self.labels,
                created_at: Some(prost_types::Timestamp {
                    seconds: (self.created_at_ms / 1000) as i64,
                    nanos: ((self.created_at_ms % 1000) * 1_000_000) as i32,
                }),
                node_name: self.name,
                ..Default::default()
            },
            "sim",
        )
    }
}

impl SimProvider {
    /// A client of the simulator at `base` (e.g. `http://127.0.0.1:6443`).
    pub fn new(base: &str) -> Result<SimProvider, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ProviderError::Permanent(format!("sim backend client: {e}")))?;
        Ok(SimProvider {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn check(
        &self,
        what: &str,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ProviderError> {
        let response =
            response.map_err(|e| ProviderError::Transient(format!("sim cloud {what}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = response
            .json::<SimStatus>()
            .await
            .map(|s| s.message)
            .unwrap_or_default();
        let text = format!("sim cloud {what}: HTTP {}: {message}", status.as_u16());
        Err(match status.as_u16() {
            409 => ProviderError::Conflict(text),
            429 | 500..=599 => ProviderError::Transient(text),
            _ => ProviderError::Permanent(text),
        })
    }
}

fn quantity_body(spec: &InstanceSpec) -> serde_json::Value {
    serde_json::json!({
        "cpu": format!("{}m", spec.capacity.cpu_millis),
        "memory": spec.capacity.memory_bytes.to_string(),
        "pods": spec.capacity.pods.max(1).to_string(),
    })
}

#[async_trait::async_trait]
impl NodeProvider for SimProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let body = serde_json::json!({
            "name": spec.node_name,
            "labels": spec.labels,
            "taints": spec.taints.iter().map(taint_json).collect::<Vec<_>>(),
            "capacity": quantity_body(spec),
        });
        let response = self
            .http
            .post(format!("{}/cloud/v1/instances", self.base))
            .json(&body)
            .send()
            .await;
        let response = self.check("create", response).await?;
        let instance: SimInstance = response
            .json()
            .await
            .map_err(|e| ProviderError::Transient(format!("sim cloud create: bad answer: {e}")))?;
        Ok(instance.into_proto())
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let response = self
            .http
            .delete(format!("{}/cloud/v1/instances/{instance_id}", self.base))
            .send()
            .await;
        match self.check("delete", response).await {
            Ok(_) => Ok(()),
            // Already gone: deleting is idempotent.
            Err(ProviderError::Permanent(m)) if m.contains("HTTP 404") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let selector = owner
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let response = self
            .http
            .get(format!("{}/cloud/v1/instances", self.base))
            .query(&[("labelSelector", selector)])
            .send()
            .await;
        let response = self.check("list", response).await?;
        let list: SimList = response
            .json()
            .await
            .map_err(|e| ProviderError::Transient(format!("sim cloud list: bad answer: {e}")))?;
        Ok(list
            .instances
            .into_iter()
            .map(SimInstance::into_proto)
            .collect())
    }

    fn describe(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: "sim".into(),
            classes: vec![],
            capabilities: vec!["failure-injection".into()],
        }
    }
}
