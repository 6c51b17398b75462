//! The audit log: every mutating call to a Shoal service — and every action a service takes on
//! its own, such as the decider's scale-ups — as one record in the store (`audit/<ms>-<id>`):
//! who, what (the request as JSON, secrets redacted), the result, the trace id and when.
//! Retention bounds it by count and age; `AuditService/ListAudit` reads it back.

use std::{
    sync::OnceLock,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde::{Deserialize, Serialize};
use shoal_proto::v1::{
    AuditRecord, ListAuditRequest, ListAuditResponse, audit_service_server::AuditService,
};
use shoal_state::{SharedStore, keys};
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::{Caller, is_mutating};

/// `audit`: how long records are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditConfig {
    /// Newest records kept.
    pub max_count: usize,
    /// Oldest record kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Time between retention sweeps.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_count: 10_000,
            max_age: Duration::from_secs(30 * 86400),
            interval: Duration::from_secs(60),
        }
    }
}

impl AuditConfig {
    /// Adds problems under `path`.
    pub fn validate(&self, path: &str, errors: &mut shoal_core::ValidationErrors) {
        if self.max_count == 0 || self.max_count > 1_000_000 {
            errors.add(format!("{path}.maxCount"), "must be between 1 and 1000000");
        }
        if self.max_age < Duration::from_secs(60) || self.max_age > Duration::from_secs(400 * 86400)
        {
            errors.add(format!("{path}.maxAge"), "must be between 1m and 400d");
        }
        if self.interval < Duration::from_secs(1) || self.interval > Duration::from_secs(86400) {
            errors.add(format!("{path}.interval"), "must be between 1s and 1d");
        }
    }
}

/// Longest request summary kept in a record.
const SUMMARY_LIMIT: usize = 2048;

/// Writes audit records for one service replica.
#[derive(Clone)]
pub struct AuditLog {
    store: SharedStore,
    service: &'static str,
    instance: String,
    failures: prometheus::IntCounter,
}

impl AuditLog {
    /// Records to `store` as `service`/`instance`.
    pub fn new(
        store: SharedStore,
        service: &'static str,
        instance: &str,
        failures: prometheus::IntCounter,
    ) -> AuditLog {
        AuditLog {
            store,
            service,
            instance: instance.to_string(),
            failures,
        }
    }

    /// Records an action this service takes on its own (`what`, e.g. `decider: scale up`).
    pub async fn own_action(&self, what: &str, summary: &serde_json::Value, result: &str) {
        let record = AuditRecord {
            identity: format!("{}/{}", self.service, self.instance),
            authenticated_by: "service".into(),
            method: what.to_string(),
            request: redacted_summary(summary),
            result: result.to_string(),
            trace_id: current_trace_id(),
            ..AuditRecord::default()
        };
        self.write(record).await;
    }

    /// Writes `record` (id, time, service filled in), retrying briefly: an audit record is
    /// never why a call fails, but a lost one is counted (`shoal_audit_write_failures_total`).
    pub async fn write(&self, mut record: AuditRecord) {
        let now = SystemTime::now();
        let ms = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let id = format!("{ms:013}-{:016x}", rand::random::<u64>());
        record.id = id.clone();
        record.time = Some(prost_types::Timestamp::from(now));
        record.service = self.service.to_string();
        record.instance = self.instance.clone();
        let key = keys::audit(ms, &id[14..]);
        let value = record.encode_to_vec();
        for attempt in 0..3 {
            match self.store.put(&key, value.clone(), None).await {
                Ok(_) => return,
                Err(e) if attempt < 2 && e.is_transient() => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    self.failures.inc();
                    tracing::warn!(error = %e, method = %record.method, "cannot write an audit record");
                    return;
                }
            }
        }
    }

    /// Removes records beyond `config` every `config.interval` until `stop` (any replica may:
    /// deleting what another already deleted is harmless).
    pub async fn retain(&self, config: AuditConfig, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(config.interval) => {}
            }
            let Ok(all) = self.store.keys(AUDIT_PREFIX).await else {
                continue;
            };
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            let cutoff = now_ms.saturating_sub(config.max_age.as_millis() as u64);
            let by_count = all.len().saturating_sub(config.max_count);
            let by_age = all
                .iter()
                .take_while(|k| keys::history_time(k).is_some_and(|t| t < cutoff))
                .count();
            let excess = by_count.max(by_age);
            if excess > 0
                && let Err(e) =
                    shoal_state::records::delete_in_chunks(&self.store, None, &all[..excess]).await
            {
                tracing::warn!(error = %e, "cannot trim the audit log yet");
            }
        }
    }
}

const AUDIT_PREFIX: &str = "audit/";

/// The W3C trace id of the current span, if it is traced.
fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let id = span.span_context().trace_id();
    if id == opentelemetry::trace::TraceId::INVALID {
        String::new()
    } else {
        id.to_string()
    }
}

/// Field names whose values are secrets wherever they appear.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "token",
        "password",
        "secret",
        "credential",
        "privatekey",
        "private_key",
        "apikey",
        "api_key",
    ]
    .iter()
    .any(|s| lower.contains(s))
}

/// Replaces every value under a secret-looking key (and every `env` entry's value, which may
/// hold a join token) with `<redacted>`.
pub fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if is_secret_name(key) && !v.is_null() {
                    *v = serde_json::Value::String("<redacted>".into());
                } else if key == "env" && v.is_object() {
                    if let Some(env) = v.as_object_mut() {
                        for (name, value) in env.iter_mut() {
                            if is_secret_name(name) {
                                *value = serde_json::Value::String("<redacted>".into());
                            }
                        }
                    }
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn redacted_summary(value: &serde_json::Value) -> String {
    let mut value = value.clone();
    redact(&mut value);
    let mut text = value.to_string();
    if text.len() > SUMMARY_LIMIT {
        let mut end = SUMMARY_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn descriptors() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(shoal_proto::FILE_DESCRIPTOR_SET).ok())
        .as_ref()
}

/// A unary gRPC request body (one length-prefixed message) as redacted JSON.
fn summarize(path: &str, body: &[u8]) -> String {
    let Some(pool) = descriptors() else {
        return String::new();
    };
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return String::new();
    };
    let Some(input) = pool
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == method))
        .map(|m| m.input())
    else {
        return String::new();
    };
    // gRPC framing: 1 byte compressed flag, 4 bytes length, the message.
    if body.len() < 5 || body[0] != 0 {
        return format!("({} bytes, not summarized)", body.len());
    }
    let Ok(message) = DynamicMessage::decode(input, &body[5..]) else {
        return "(undecodable request)".into();
    };
    match serde_json::to_value(&message) {
        Ok(value) => redacted_summary(&value),
        Err(_) => String::new(),
    }
}

/// The layer recording mutating calls (see the module docs).
#[derive(Clone)]
pub struct AuditLayer {
    log: Option<AuditLog>,
    max_request_bytes: usize,
}

impl AuditLayer {
    /// Records to `log` (`None`: services without a store record nothing); requests above
    /// `max_request_bytes` are refused (RESOURCE_EXHAUSTED) before they reach a handler.
    pub fn new(log: Option<AuditLog>, max_request_bytes: usize) -> AuditLayer {
        AuditLayer {
            log,
            max_request_bytes,
        }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;
    fn layer(&self, inner: S) -> Audit<S> {
        Audit {
            inner,
            log: self.log.clone(),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// See [`AuditLayer`].
#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    log: Option<AuditLog>,
    max_request_bytes: usize,
}

impl<S> Service<http::Request<Body>> for Audit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let Some(log) = self.log.clone().filter(|_| is_mutating(&path)) else {
            return Box::pin(inner.call(req));
        };
        let limit = self.max_request_bytes;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let caller = parts.extensions.get::<Caller>().cloned();
            let bytes = match http_body_util::Limited::new(body, limit + 5)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        tonic::Status::resource_exhausted(format!(
                            "request larger than {limit} bytes (grpc.auth.limits.maxRequestBytes)"
                        ))
                    } else {
                        tonic::Status::cancelled(format!("request body: {e}"))
                    };
                    return Ok(status.into_http());
                }
            };
            let summary = summarize(&path, &bytes);
            let req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            let result = inner.call(req).await;
            let (code, message) = match &result {
                Ok(response) => outcome(response),
                Err(_) => ("INTERNAL".to_string(), "the service failed".to_string()),
            };
            let caller = caller.unwrap_or(Caller {
                identity: "unknown".into(),
                role: crate::auth::Role::Viewer,
                by: crate::auth::AuthenticatedBy::Anonymous,
            });
            let record = AuditRecord {
                identity: caller.identity,
                authenticated_by: caller.by.as_str().into(),
                method: path,
                request: summary,
                result: code,
                message,
                trace_id: current_trace_id(),
                ..AuditRecord::default()
            };
            // Written before the answer goes back: a caller that got its answer finds the
            // record (bounded: the store's own timeout).
            log.write(record).await;
            result
        })
    }
}

/// The gRPC status of a response: trailers-only answers (errors) carry it in the headers.
fn outcome(response: &http::Response<Body>) -> (String, String) {
    let headers = response.headers();
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return ("OK".into(), String::new());
    };
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let name = format!("{:?}", tonic::Code::from_i32(code));
    (to_upper_snake(&name), message)
}

fn to_upper_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// `AuditService`: reads the records back, newest first.
pub struct AuditReader {
    store: SharedStore,
}

impl AuditReader {
    /// Reads from `store`.
    pub fn new(store: SharedStore) -> AuditReader {
        AuditReader { store }
    }
}

fn ms_of(t: &Option<prost_types::Timestamp>) -> Option<u64> {
    t.as_ref()
        .map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
}

#[tonic::async_trait]
impl AuditService for AuditReader {
    async fn list_audit(
        &self,
        request: tonic::Request<ListAuditRequest>,
    ) -> Result<tonic::Response<ListAuditResponse>, tonic::Status> {
        let r = request.into_inner();
        let mut errors = shoal_core::ValidationErrors::default();
        if r.limit < 0 || r.limit > 1000 {
            errors.add("limit", "must be between 0 (default 100) and 1000");
        }
        if r.identity.len() > 253 {
            errors.add("identity", "must be at most 253 characters");
        }
        if r.method.len() > 256 {
            errors.add("method", "must be at most 256 characters");
        }
        if !r.page_token.is_empty() && !r.page_token.starts_with(AUDIT_PREFIX) {
            errors.add(
                "pageToken",
                "is not a token from a previous ListAudit response",
            );
        }
        if !errors.is_empty() {
            return Err(crate::upstream::invalid_argument(&errors, ""));
        }
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let since = ms_of(&r.since);
        let until = ms_of(&r.until);
        let range = self
            .store
            .range(AUDIT_PREFIX)
            .await
            .map_err(|e| crate::host::status_from_store(&e))?;
        let mut records = Vec::new();
        let mut last_key = "";
        let mut next = String::new();
        for kv in range.kvs.iter().rev() {
            if !r.page_token.is_empty() && kv.key.as_str() >= r.page_token.as_str() {
                continue;
            }
            let Some(t) = keys::history_time(&kv.key) else {
                continue;
            };
            if until.is_some_and(|u| t > u) {
                continue;
            }
            if since.is_some_and(|s| t < s) {
                break;
            }
            let Ok(record) = AuditRecord::decode(kv.value.as_slice()) else {
                continue;
            };
            if !r.identity.is_empty() && record.identity != r.identity {
                continue;
            }
            if !r.method.is_empty() && !record.method.ends_with(&r.method) {
                continue;
            }
            if records.len() == limit {
                // More match: the next page starts below the last key returned.
                next = last_key.to_string();
                break;
            }
            last_key = &kv.key;
            records.push(record);
        }
        Ok(tonic::Response::new(ListAuditResponse {
            records,
            next_page_token: next,
        }))
    }
}

/// The audit service for a host with a store.
pub fn service(
    store: SharedStore,
) -> shoal_proto::v1::audit_service_server::AuditServiceServer<AuditReader> {
    shoal_proto::v1::audit_service_server::AuditServiceServer::new(AuditReader::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_are() {
        let mut v = serde_json::json!({
            "pool": "general",
            "token": "abc",
            "provider": { "env": { "K3S_TOKEN": "join-me", "K3S_URL": "https://k3s:6443" } },
            "list": [ { "password": "p" } ]
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("abc") && !text.contains("join-me") && !text.contains("\"p\""),
            "{text}"
        );
        assert!(
            text.contains("https://k3s:6443") && text.contains("general"),
            "{text}"
        );
    }

    #[test]
    fn a_create_nodes_request_is_summarized_as_json() {
        let request = shoal_proto::v1::CreateNodesRequest {
            pool: "general".into(),
            count: 3,
            idempotency_key: "k-1".into(),
            ..Default::default()
        };
        let mut framed = vec![0u8];
        let encoded = request.encode_to_vec();
        framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        framed.extend_from_slice(&encoded);
        let summary = summarize("/shoal.v1.ProvisionerService/CreateNodes", &framed);
        assert!(summary.contains("\"pool\":\"general\""), "{summary}");
        assert!(summary.contains("\"count\":3"), "{summary}");
    }
}
