//! Logs and traces: `tracing` with human or JSON output, an OpenTelemetry layer so every span has
//! a W3C trace id, and OTLP/gRPC export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, propagation::TraceContextPropagator, runtime, trace::SdkTracerProvider,
};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetryConfig};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint).
    #[error("cannot build the OTLP exporter for OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Exporter(String),
    /// The log filter did not parse.
    #[error("telemetry.logLevel: {0}")]
    Filter(String),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Installed telemetry; call [`Telemetry::shutdown`] before exit to flush spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Installs the global subscriber and propagator. Must run inside a Tokio runtime.
    pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        let exporting = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.is_empty());
        if exporting {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            // The Tokio-driven batch processor: the tonic exporter needs the runtime's reactor.
            let processor =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    runtime::Tokio,
                )
                .build();
            builder = builder.with_span_processor(processor);
        }
        let provider = builder.build();
        global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer("shoal");

        let filter = EnvFilter::builder()
            .parse(&config.log_level)
            .map_err(|e| TelemetryError::Filter(e.to_string()))?;
        let fmt = match config.log_format {
            LogFormat::Human => tracing_subscriber::fmt::layer().with_target(true).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .boxed(),
        };
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            // Traces carry our INFO spans, not the transport crates' debug/trace internals.
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(LevelFilter::INFO),
            )
            .try_init()
            .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
        Ok(Telemetry {
            provider,
            exporting,
        })
    }

    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Flushes and stops span export.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.force_flush() {
            tracing::debug!(error = %err, "flushing spans failed");
        }
        let _ = self.provider.shutdown();
    }
}

/// The W3C `traceparent` of `span`, for carrying a trace inside a message (a snapshot, a stored
/// operation) rather than in call metadata. Empty when the span has no valid trace.
pub fn traceparent_of(span: &tracing::Span) -> String {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let mut carrier = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the trace in `traceparent` (ignored when empty or malformed).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if traceparent.is_empty() {
        return;
    }
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent = global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(parent);
}

/// The trace id of `span` as 32 hex digits (empty when it has none).
pub fn trace_id_of(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}
