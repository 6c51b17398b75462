//! Node utilization from Prometheus over its HTTP API: two instant PromQL queries (CPU and
//! memory, as fractions per node), read on a schedule and on demand, each with a timeout. When
//! Prometheus is down or slow, the last values are kept and marked stale with their age.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_core::ValidationErrors;
use tokio_util::sync::CancellationToken;

use crate::{
    state::{NodeUsage, Utilization},
    stats::Stats,
};

/// Where utilization comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusSettings {
    /// Prometheus base URL, e.g. `http://prometheus:9090`. Empty: no utilization (snapshots
    /// carry requests only, and threshold rules on usage never fire).
    pub url: String,
    /// PromQL giving each node's CPU in use as a fraction (0..1), one series per node.
    pub cpu_query: String,
    /// PromQL giving each node's memory in use as a fraction (0..1), one series per node.
    pub memory_query: String,
    /// Label of the query results that holds the Kubernetes node name.
    pub node_label: String,
    /// How often utilization is read.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of each query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `Authorization: Bearer` token (inline, `{ fromFile: … }` or `{ fromEnv: … }`).
    #[serde(default)]
    pub bearer_token: shoal_runtime::secret::Secret,
    /// HTTP basic auth (Prometheus' `web.config` `basic_auth_users`).
    #[serde(default)]
    pub basic_auth: BasicAuth,
    /// TLS to Prometheus: the CA of its certificate and, optionally, a client certificate.
    #[serde(default)]
    pub tls: PrometheusTls,
}

/// `service.prometheus.basicAuth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BasicAuth {
    /// User name; empty: no basic auth.
    pub username: String,
    /// Its password.
    pub password: shoal_runtime::secret::Secret,
}

/// `service.prometheus.tls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrometheusTls {
    /// PEM CA bundle that signs Prometheus' certificate (empty: the system's roots).
    pub ca_file: std::path::PathBuf,
    /// PEM client certificate (with `keyFile`), for `client_auth_type: RequireAndVerifyClientCert`.
    pub cert_file: std::path::PathBuf,
    /// PEM key of the client certificate.
    pub key_file: std::path::PathBuf,
}

impl Default for PrometheusSettings {
    fn default() -> Self {
        PrometheusSettings {
            url: String::new(),
            // node-exporter names; the simulator exports the same. On clusters where node-exporter's
            // `instance` is `<ip>:9100`, relabel it to the node name or change node_label.
            cpu_query: "1 - avg by (instance) (rate(node_cpu_seconds_total{mode=\"idle\"}[1m]))"
                .into(),
            memory_query:
                "1 - avg by (instance) (node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes)"
                    .into(),
            node_label: "instance".into(),
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
            bearer_token: shoal_runtime::secret::Secret::default(),
            basic_auth: BasicAuth::default(),
            tls: PrometheusTls::default(),
        }
    }
}

impl PrometheusSettings {
    /// Adds problems under `path`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        if !self.url.is_empty() {
            let ok = self
                .url
                .strip_prefix("http://")
                .or_else(|| self.url.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty());
            if !ok {
                errors.add(
                    format!("{path}.url"),
                    format!("{:?} is not an http(s) URL", self.url),
                );
            }
            for (field, query) in [
                ("cpuQuery", &self.cpu_query),
                ("memoryQuery", &self.memory_query),
            ] {
                if query.trim().is_empty() {
                    errors.add(
                        format!("{path}.{field}"),
                        "must not be empty when url is set",
                    );
                }
            }
        }
        if self.node_label.trim().is_empty() {
            errors.add(format!("{path}.nodeLabel"), "must not be empty");
        }
        if !self.bearer_token.is_empty() && !self.basic_auth.username.is_empty() {
            errors.add(
                format!("{path}.basicAuth"),
                "give bearerToken or basicAuth, not both",
            );
        }
        if !self.basic_auth.username.is_empty() && self.basic_auth.password.is_empty() {
            errors.add(
                format!("{path}.basicAuth.password"),
                "is required with basicAuth.username",
            );
        }
        if self.tls.cert_file.as_os_str().is_empty() != self.tls.key_file.as_os_str().is_empty() {
            errors.add(format!("{path}.tls"), "certFile and keyFile go together");
        }
        if self.interval < Duration::from_secs(1) {
            errors.add(format!("{path}.interval"), "must be at least 1s");
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            errors.add(
                format!("{path}.timeout"),
                "must be above zero and at most interval",
            );
        }
    }
}

/// A Prometheus query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromError {
    /// No Prometheus is configured.
    #[error("no Prometheus is configured (service.prometheus.url is empty)")]
    Disabled,
    /// Prometheus could not be reached or did not answer within the timeout.
    #[error("prometheus at {url}: {reason}")]
    Unreachable {
        /// Base URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Prometheus refused the query (`bad_data`, ...).
    #[error("prometheus refused the query ({error_type}): {message}")]
    Rejected {
        /// Prometheus' errorType.
        error_type: String,
        /// Prometheus' error.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("prometheus answered something unexpected: {0}")]
    Malformed(String),
}

/// The `data` of a successful instant query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryData {
    /// vector, matrix, scalar or string.
    pub result_type: String,
    /// The `result` field.
    pub result: Value,
}

/// A client of the Prometheus HTTP API.
#[derive(Clone)]
pub struct Prometheus {
    http: reqwest::Client,
    url: String,
    timeout: Duration,
    auth: Auth,
}

/// How each request authenticates.
#[derive(Clone)]
enum Auth {
    None,
    Bearer(shoal_runtime::secret::Secret),
    Basic(String, shoal_runtime::secret::Secret),
}

#[derive(Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct ApiData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Value,
}

impl Prometheus {
    /// A client for `url` whose queries time out after `timeout` (no auth, system roots).
    pub fn new(url: &str, timeout: Duration) -> Prometheus {
        Prometheus {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_string(),
            timeout,
            auth: Auth::None,
        }
    }

    /// A client as `settings` say: auth and TLS (files read now; an unreadable one is an error
    /// naming the field).
    pub fn from_settings(settings: &PrometheusSettings) -> Result<Prometheus, String> {
        let read = |field: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| format!("service.prometheus.tls.{field}: {}: {e}", path.display()))
        };
        let mut builder = reqwest::Client::builder();
        let tls = &settings.tls;
        if !tls.ca_file.as_os_str().is_empty() {
            let ca = reqwest::Certificate::from_pem(&read("caFile", &tls.ca_file)?)
                .map_err(|e| format!("service.prometheus.tls.caFile: {e}"))?;
            builder = builder.add_root_certificate(ca);
        }
        if !tls.cert_file.as_os_str().is_empty() {
            let mut pem = read("certFile", &tls.cert_file)?;
            pem.extend(read("keyFile", &tls.key_file)?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("service.prometheus.tls.certFile: {e}"))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| format!("service.prometheus: {e}"))?;
        let auth = if !settings.bearer_token.is_empty() {
            Auth::Bearer(settings.bearer_token.clone())
        } else if !settings.basic_auth.username.is_empty() {
            Auth::Basic(
                settings.basic_auth.username.clone(),
                settings.basic_auth.password.clone(),
            )
        } else {
            Auth::None
        };
        Ok(Prometheus {
            http,
            url: settings.url.trim_end_matches('/').to_string(),
            timeout: settings.timeout,
            auth,
        })
    }

    /// An instant query at `time` (now when `None`).
    pub async fn query(
        &self,
        promql: &str,
        time: Option<SystemTime>,
    ) -> Result<QueryData, PromError> {
        if self.url.is_empty() {
            return Err(PromError::Disabled);
        }
        let unreachable = |reason: String| PromError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let mut form = vec![("query", promql.to_string())];
        if let Some(time) = time {
            let secs = time
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            form.push(("time", format!("{secs:.3}")));
        }
        let request = self
            .http
            .post(format!("{}/api/v1/query", self.url))
            .form(&form)
            .timeout(self.timeout);
        let request = match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token.expose()),
            Auth::Basic(user, password) => request.basic_auth(user, Some(password.expose())),
        };
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                unreachable(format!("no answer within {:?}", self.timeout))
            } else {
                unreachable(root_cause(&e))
            }
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(unreachable(format!(
                "HTTP {status}: Prometheus refused the credentials (service.prometheus.bearerToken, basicAuth or tls)"
            )));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| unreachable(root_cause(&e)))?;
        let parsed: ApiResponse = serde_json::from_slice(&body).map_err(|_| {
            PromError::Malformed(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })?;
        if parsed.status != "success" {
            return Err(PromError::Rejected {
                error_type: parsed.error_type,
                message: parsed.error,
            });
        }
        let data = parsed
            .data
            .ok_or_else(|| PromError::Malformed("success without data".into()))?;
        Ok(QueryData {
            result_type: data.result_type,
            result: data.result,
        })
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Reads `label → value` from an instant vector result.
fn vector_by(data: &QueryData, label: &str) -> Result<HashMap<String, f64>, PromError> {
    if data.result_type != "vector" {
        return Err(PromError::Malformed(format!(
            "expected a vector, got a {}",
            data.result_type
        )));
    }
    let mut out = HashMap::new();
    for sample in data.result.as_array().into_iter().flatten() {
        let Some(name) = sample["metric"][label].as_str() else {
            continue;
        };
        let Some(value) = sample["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if value.is_finite() {
            out.insert(name.to_string(), value.max(0.0));
        }
    }
    Ok(out)
}

/// The utilization reader: the latest values, shared with the snapshot builder.
#[derive(Clone)]
pub struct UtilizationSource {
    prometheus: Prometheus,
    settings: PrometheusSettings,
    current: Arc<Mutex<Utilization>>,
    stats: Stats,
    readiness: shoal_runtime::admin::Readiness,
}

impl UtilizationSource {
    /// A reader with the given settings.
    pub fn new(
        settings: PrometheusSettings,
        stats: Stats,
        readiness: shoal_runtime::admin::Readiness,
    ) -> Result<UtilizationSource, String> {
        Ok(UtilizationSource {
            prometheus: Prometheus::from_settings(&settings)?,
            settings,
            current: Arc::default(),
            stats,
            readiness,
        })
    }

    /// The Prometheus client (for pass-through queries).
    pub fn prometheus(&self) -> &Prometheus {
        &self.prometheus
    }

    /// The latest utilization.
    pub fn current(&self) -> Utilization {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a Prometheus is configured.
    pub fn enabled(&self) -> bool {
        !self.settings.url.is_empty()
    }

    /// Reads utilization now. On failure the previous values stay, marked stale.
    pub async fn refresh(&self) {
        if !self.enabled() {
            return;
        }
        let (cpu, memory) = tokio::join!(
            self.prometheus.query(&self.settings.cpu_query, None),
            self.prometheus.query(&self.settings.memory_query, None),
        );
        let read = cpu
            .and_then(|c| vector_by(&c, &self.settings.node_label))
            .and_then(|cpu| {
                memory
                    .and_then(|m| vector_by(&m, &self.settings.node_label))
                    .map(|memory| (cpu, memory))
            });
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match read {
            Ok((cpu, memory)) => {
                let mut nodes: HashMap<String, NodeUsage> = HashMap::new();
                for (name, value) in cpu {
                    nodes
                        .entry(name)
                        .or_insert(NodeUsage {
                            cpu: 0.0,
                            memory: 0.0,
                        })
                        .cpu = value;
                }
                for (name, value) in memory {
                    nodes
                        .entry(name)
                        .or_insert(NodeUsage {
                            cpu: 0.0,
                            memory: 0.0,
                        })
                        .memory = value;
                }
                *current = Utilization {
                    nodes,
                    sampled_at: Some(SystemTime::now()),
                    stale: false,
                    error: String::new(),
                };
                self.stats.utilization_stale.set(0);
                self.readiness.set_degraded("prometheus", None);
            }
            Err(err) => {
                if !current.stale {
                    tracing::warn!(error = %err, "utilization is stale: Prometheus could not be read");
                }
                current.stale = true;
                current.error = err.to_string();
                self.stats.prometheus_errors.inc();
                self.stats.utilization_stale.set(1);
                self.readiness
                    .set_degraded("prometheus", Some(format!("utilization is stale: {err}")));
            }
        }
        if let Some(at) = current.sampled_at {
            self.stats.utilization_age.set(
                SystemTime::now()
                    .duration_since(at)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
    }

    /// Reads utilization every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => self.refresh().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vectors_are_read_by_the_node_label() {
        let data = QueryData {
            result_type: "vector".into(),
            result: json!([
                { "metric": { "instance": "n1" }, "value": [1.0, "0.25"] },
                { "metric": { "instance": "n2" }, "value": [1.0, "NaN"] },
                { "metric": { "job": "x" }, "value": [1.0, "0.5"] },
            ]),
        };
        let by = vector_by(&data, "instance").expect("vector");
        assert_eq!(by.len(), 1, "NaN and unlabelled series are skipped: {by:?}");
        assert_eq!(by["n1"], 0.25);
        let scalar = QueryData {
            result_type: "scalar".into(),
            result: json!([1.0, "1"]),
        };
        assert!(matches!(
            vector_by(&scalar, "instance"),
            Err(PromError::Malformed(_))
        ));
    }

    #[test]
    fn settings_are_validated_with_paths() {
        let mut errors = ValidationErrors::default();
        PrometheusSettings {
            url: "prometheus:9090".into(),
            cpu_query: " ".into(),
            timeout: Duration::from_secs(30),
            ..Default::default()
        }
        .validate("service.prometheus", &mut errors);
        let paths: Vec<&str> = errors.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "service.prometheus.url",
                "service.prometheus.cpuQuery",
                "service.prometheus.timeout"
            ]
        );
    }
}
