//! `plugin:<name>` backends: an out-of-tree process serving `shoal.v1.NodeProvider` over gRPC
//! (proto/shoal/v1/provider.proto). The provisioner calls it exactly as a built-in backend —
//! behind the same deadlines, retries, circuit breaker and per-pool concurrency — and maps its
//! gRPC status codes to what it does next (docs/plugins.md):
//!
//! | code | meaning to Shoal |
//! |---|---|
//! | `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`, `UNKNOWN` | transient: retried, counted by the breaker, the claim waits |
//! | `ALREADY_EXISTS` | the instance exists: Shoal looks it up by its claim label |
//! | anything else (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `PERMISSION_DENIED`, `NOT_FOUND`, `UNIMPLEMENTED`, …) | permanent: the claim fails with the plugin's message |
//!
//! A per-instance failure inside a `Create` or `Delete` answer is transient when the plugin
//! marks it `retryable`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoal_core::ValidationErrors;
use shoal_proto::v1::{self as pb, node_provider_client::NodeProviderClient};
use shoal_runtime::{
    layers::TracedChannel,
    tls::{Tls, TlsConfig},
};

use super::{InstanceSpec, NodeProvider, ProviderError};

/// `service.backends.plugins.<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginBackend {
    /// `http://host:port`, or `https://host:port` with `tls`.
    pub address: String,
    /// The client certificate Shoal presents and the CA the plugin's certificate is checked
    /// against (mTLS).
    #[serde(default)]
    pub tls: TlsConfig,
}

impl PluginBackend {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        shoal_runtime::validate_address(&format!("{path}.address"), &self.address, errors);
        if self.address.starts_with("https://") && !self.tls.is_set() {
            errors.add(
                format!("{path}.tls"),
                "an https:// plugin needs certFile, keyFile and caFile",
            );
        }
        if self.tls.is_set() {
            self.tls.validate(&format!("{path}.tls"), errors);
        }
    }
}

impl PluginBackend {
    /// A lazily connecting channel to the plugin (mTLS when `tls` is set); errors name `what`.
    pub fn channel(&self, what: &str) -> Result<TracedChannel, ProviderError> {
        let tls = if self.tls.is_set() {
            Some(
                Tls::load(&self.tls)
                    .map_err(|e| ProviderError::Permanent(format!("{what} tls: {e}")))?,
            )
        } else {
            None
        };
        shoal_runtime::layers::traced_channel(&self.address, tls.as_ref())
            .map_err(|e| ProviderError::Permanent(format!("{what}: {e}")))
    }
}

/// Whether `name` may follow `plugin:` (a DNS label).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The backend's name for plugin `name`.
pub fn backend_name(name: &str) -> String {
    format!("plugin:{name}")
}

/// A plugin process behind a lazily connecting channel.
pub struct PluginProvider {
    name: String,
    client: NodeProviderClient<TracedChannel>,
    /// What `Describe` said last (refreshed by [`PluginProvider::refresh_description`]).
    info: Mutex<pb::ProviderInfo>,
}

/// What a status code means for the call that got it.
pub fn status_error(plugin: &str, what: &str, status: &tonic::Status) -> ProviderError {
    use tonic::Code;
    let text = format!(
        "plugin {plugin} {what}: {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => ProviderError::Transient(text),
        Code::AlreadyExists => ProviderError::Conflict(text),
        _ => ProviderError::Permanent(text),
    }
}

fn failure_error(plugin: &str, what: &str, f: &pb::InstanceFailure) -> ProviderError {
    let text = format!("plugin {plugin} {what}: {}", f.reason);
    if f.retryable {
        ProviderError::Transient(text)
    } else {
        ProviderError::Permanent(text)
    }
}

impl PluginProvider {
    /// A provider for plugin `name` at `settings.address` (no connection is made yet).
    pub fn new(name: &str, settings: &PluginBackend) -> Result<PluginProvider, ProviderError> {
        let channel = settings.channel(&format!("plugin {name}"))?;
        Ok(PluginProvider {
            name: name.to_string(),
            client: NodeProviderClient::new(channel),
            info: Mutex::new(pb::ProviderInfo {
                name: backend_name(name),
                ..Default::default()
            }),
        })
    }

    /// Asks the plugin what it is (name, version, classes, capabilities).
    pub async fn refresh_description(&self) -> Result<pb::ProviderInfo, ProviderError> {
        let info = self
            .client
            .clone()
            .describe(pb::DescribeProviderRequest {})
            .await
            .map_err(|s| status_error(&self.name, "Describe", &s))?
            .into_inner();
        *self.info.lock().unwrap_or_else(|p| p.into_inner()) = info.clone();
        Ok(info)
    }

    /// Keeps the description current: now, then every `every` (the plugin may start later).
    pub fn describe_in_background(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(provider) = me.upgrade() {
                match provider.refresh_description().await {
                    Ok(info) => {
                        tracing::debug!(plugin = %provider.name, name = %info.name, capabilities = ?info.capabilities, "plugin described itself")
                    }
                    Err(e) => {
                        tracing::warn!(plugin = %provider.name, error = %e, "plugin Describe failed")
                    }
                }
                drop(provider);
                tokio::time::sleep(every).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl NodeProvider for PluginProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let request = pb::CreateInstancesRequest {
            pool: spec.pool.clone(),
            class: spec.class.clone(),
            instances: vec![pb::InstanceSpec {
                claim_id: spec.claim_id.clone(),
                node_name: spec.node_name.clone(),
                labels: spec.labels.clone(),
                startup_taints: spec.taints.clone(),
                capacity: Some((&spec.capacity).into()),
            }],
        };
        let answer = self
            .client
            .clone()
            .create(request)
            .await
            .map_err(|s| status_error(&self.name, "Create", &s))?
            .into_inner();
        if let Some(f) = answer
            .failures
            .iter()
            .find(|f| f.claim_id == spec.claim_id || f.claim_id.is_empty())
        {
            return Err(failure_error(&self.name, "Create", f));
        }
        let mut instance = answer
            .instances
            .into_iter()
            .find(|i| i.claim_id == spec.claim_id || i.claim_id.is_empty())
            .ok_or_else(|| {
                ProviderError::Permanent(format!(
                    "plugin {} Create answered without an instance for claim {}",
                    self.name, spec.claim_id
                ))
            })?;
        if instance.id.is_empty() {
            return Err(ProviderError::Permanent(format!(
                "plugin {} Create answered an instance without an id",
                self.name
            )));
        }
        instance.backend = backend_name(&self.name);
        instance.claim_id = spec.claim_id.clone();
        instance.pool = spec.pool.clone();
        if instance.node_name.is_empty() {
            instance.node_name = spec.node_name.clone();
        }
        if instance.labels.is_empty() {
            instance.labels = spec.labels.clone();
        }
        Ok(instance)
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let answer = self
            .client
            .clone()
            .delete(pb::DeleteInstancesRequest {
                instance_ids: vec![instance_id.to_string()],
            })
            .await
            .map_err(|s| status_error(&self.name, "Delete", &s))?
            .into_inner();
        match answer.failures.first() {
            Some(f) => Err(failure_error(&self.name, "Delete", f)),
            None => Ok(()),
        }
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let answer = self
            .client
            .clone()
            .list(pb::ListOwnedInstancesRequest {
                owner_labels: owner.clone(),
            })
            .await
            .map_err(|s| status_error(&self.name, "List", &s))?
            .into_inner();
        Ok(answer
            .instances
            .into_iter()
            // Only what really carries every owner label (a plugin that ignores the filter
            // must not make Shoal adopt or delete someone else's instance).
            .filter(|i| owner.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .map(|i| super::with_ownership(i, &backend_name(&self.name)))
            .collect())
    }

    fn describe(&self) -> pb::ProviderInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_decide_retry_adopt_or_fail() {
        let e = |code| status_error("p", "Create", &tonic::Status::new(code, "why"));
        assert!(e(tonic::Code::Unavailable).is_transient());
        assert!(e(tonic::Code::DeadlineExceeded).is_transient());
        assert!(matches!(
            e(tonic::Code::AlreadyExists),
            ProviderError::Conflict(_)
        ));
        let permanent = e(tonic::Code::InvalidArgument);
        assert!(!permanent.is_transient());
        assert_eq!(
            permanent.to_string(),
            "plugin p Create: InvalidArgument: why"
        );
        assert!(valid_name("procs-2") && !valid_name("Procs") && !valid_name("-x"));
    }
}
