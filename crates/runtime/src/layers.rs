//! Tower layers on every gRPC server and client: W3C trace context propagation (one call chain
//! across services is one trace) and per-method request metrics. Handlers never see any of it.

use std::{
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use opentelemetry::global;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use prometheus::{HistogramVec, IntCounterVec};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// gRPC status of a trailers-only response (errors), else OK (carried in trailers).
fn status_code<B>(response: &http::Response<B>) -> &str {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(|code| match code {
            "0" => "OK",
            "1" => "CANCELLED",
            "2" => "UNKNOWN",
            "3" => "INVALID_ARGUMENT",
            "4" => "DEADLINE_EXCEEDED",
            "5" => "NOT_FOUND",
            "6" => "ALREADY_EXISTS",
            "7" => "PERMISSION_DENIED",
            "8" => "RESOURCE_EXHAUSTED",
            "9" => "FAILED_PRECONDITION",
            "10" => "ABORTED",
            "11" => "OUT_OF_RANGE",
            "12" => "UNIMPLEMENTED",
            "13" => "INTERNAL",
            "14" => "UNAVAILABLE",
            "15" => "DATA_LOSS",
            "16" => "UNAUTHENTICATED",
            _ => "UNKNOWN",
        })
        .unwrap_or("OK")
}

/// Health checks and reflection are infrastructure: traced only when a caller sends a context.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// Server layer: continues the caller's trace (W3C `traceparent`) in a `grpc.server` span.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for ServerTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        if is_infrastructure(&path) && !req.headers().contains_key("traceparent") {
            return Box::pin(inner.call(req));
        }
        let parent =
            global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
        let (service, method) = split_path(&path);
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        let fut = inner.call(req);
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = fut.await;
                if let Ok(response) = &result {
                    recorder.record("rpc.grpc.status_code", status_code(response));
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Client layer: a `grpc.client` span whose context is injected as W3C `traceparent`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTraceLayer;

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;
    fn layer(&self, inner: S) -> ClientTrace<S> {
        ClientTrace { inner }
    }
}

/// See [`ClientTraceLayer`].
#[derive(Debug, Clone)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for ClientTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let (service, method) = split_path(&path);
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        let context = span.context();
        global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(req.headers_mut()))
        });
        Box::pin(inner.call(req).instrument(span))
    }
}

/// Server layer: `shoal_grpc_server_handled_total` and `shoal_grpc_server_handling_seconds`.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    handled: IntCounterVec,
    seconds: HistogramVec,
}

impl GrpcMetricsLayer {
    /// Records into the given vectors (labels: service, method[, code]).
    pub fn new(handled: IntCounterVec, seconds: HistogramVec) -> Self {
        GrpcMetricsLayer { handled, seconds }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let layer = self.layer.clone();
        let started = Instant::now();
        let fut = inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let (service, method) = split_path(&path);
            let code = match &result {
                Ok(response) => status_code(response),
                Err(_) => "UNAVAILABLE",
            };
            layer
                .handled
                .with_label_values(&[service, method, code])
                .inc();
            layer
                .seconds
                .with_label_values(&[service, method])
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// A lazily connecting channel whose calls carry the caller's trace context.
pub type TracedChannel = ClientTrace<tonic::transport::Channel>;

/// Builds a [`TracedChannel`] to `address` (see [`channel`]).
pub fn traced_channel(
    address: &str,
    tls: Option<&crate::tls::Tls>,
) -> Result<TracedChannel, ChannelError> {
    Ok(ClientTraceLayer.layer(channel(address, tls)?))
}

/// Why a channel to another service cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address does not parse.
    #[error("{address:?}: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// `https://` without TLS material to call with.
    #[error("{0:?} is https:// but this service has no grpc.tls to call it with")]
    NoTls(String),
}

/// A lazily connecting channel to `address`: `https://host:port` over TLS with this service's
/// certificate (`tls`, re-read as it rotates), `http://host:port` in plaintext. Connection
/// happens on first use and is retried by the channel, so a peer that starts later is fine.
pub fn channel(
    address: &str,
    tls: Option<&crate::tls::Tls>,
) -> Result<tonic::transport::Channel, ChannelError> {
    channel_verifying(address, tls, None)
}

/// As [`channel`]; over TLS the peer's certificate must name `server_name` when given (a
/// replica of this service at its pod IP) instead of the address's host.
pub fn channel_verifying(
    address: &str,
    tls: Option<&crate::tls::Tls>,
    server_name: Option<&str>,
) -> Result<tonic::transport::Channel, ChannelError> {
    let invalid = |e: tonic::transport::Error| ChannelError::Address {
        address: address.to_string(),
        reason: e.to_string(),
    };
    match address.strip_prefix("https://") {
        Some(rest) => {
            let tls = tls.ok_or_else(|| ChannelError::NoTls(address.to_string()))?;
            // The connector does TLS itself (so the certificate can rotate); tonic sees http.
            let connector = match server_name {
                Some(name) => tls.connector_for(name),
                None => tls.connector(),
            };
            Ok(endpoint(&format!("http://{rest}"))
                .map_err(invalid)?
                .connect_with_connector_lazy(connector))
        }
        None => Ok(endpoint(address).map_err(invalid)?.connect_lazy()),
    }
}

/// HTTP/2 keepalive ping interval on every channel between services.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection whose ping is not answered within this is closed (so a half-open stream, such
/// as a silently dropped `WatchSnapshots`, fails within interval + timeout).
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The endpoint settings of every channel between services: connect and request deadlines
/// (streams: until the response headers) and HTTP/2 keepalive, also while idle.
pub fn endpoint(address: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(std::time::Duration::from_secs(30))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/shoal.v1.DeciderService/GetStatus"),
            ("shoal.v1.DeciderService", "GetStatus")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn status_codes_come_from_trailers_only_responses() {
        let ok = http::Response::builder().body(()).expect("response");
        assert_eq!(status_code(&ok), "OK");
        let unimplemented = http::Response::builder()
            .header("grpc-status", "12")
            .body(())
            .expect("response");
        assert_eq!(status_code(&unimplemented), "UNIMPLEMENTED");
    }
}
