//! The Prometheus registry every service exports on its admin port, with the metrics the runtime
//! itself owns. Services register their own `shoal_*` metrics into the same registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Metrics owned by the runtime.
#[derive(Clone)]
pub struct RuntimeMetrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// `shoal_ready`: 1 when the service serves.
    pub ready: IntGauge,
    /// `shoal_leader{service}`: 1 while this replica leads.
    pub leader: IntGaugeVec,
    /// `shoal_leader_transitions_total{service,to}`.
    pub leader_transitions: IntCounterVec,
    /// `shoal_fenced_writes_rejected_total{service}`: writes refused because leadership was lost.
    pub fenced_rejections: IntCounterVec,
    /// `shoal_grpc_server_handled_total{service,method,code}`.
    pub grpc_handled: IntCounterVec,
    /// `shoal_grpc_server_handling_seconds{service,method}`.
    pub grpc_seconds: HistogramVec,
    /// `shoal_loop_restarts_total{service,loop}`: supervised loops restarted after they failed.
    pub loop_restarts: IntCounterVec,
    /// `shoal_grpc_refused_total{service,code}`: calls refused before a handler (no or unknown
    /// credentials, too small a role, limits).
    pub refused: IntCounterVec,
    /// `shoal_audit_write_failures_total{service}`: audit records that could not be written.
    pub audit_failures: prometheus::IntCounter,
}

/// A metric could not be registered (a duplicate name is a programming error).
#[derive(Debug, thiserror::Error)]
#[error("metric registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl RuntimeMetrics {
    /// A registry with process metrics and the runtime's own, labelled with `service`.
    pub fn new(service: &str) -> Result<RuntimeMetrics, MetricsError> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let build_info = IntGaugeVec::new(
            Opts::new("shoal_build_info", "Shoal build information (always 1)"),
            &["service", "version"],
        )?;
        build_info
            .with_label_values(&[service, env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;

        let ready = IntGauge::with_opts(
            Opts::new("shoal_ready", "1 when the service is serving")
                .const_label("service", service),
        )?;
        registry.register(Box::new(ready.clone()))?;
        let leader = IntGaugeVec::new(
            Opts::new("shoal_leader", "1 while this replica leads its service"),
            &["service"],
        )?;
        leader.with_label_values(&[service]).set(0);
        registry.register(Box::new(leader.clone()))?;
        let leader_transitions = IntCounterVec::new(
            Opts::new(
                "shoal_leader_transitions_total",
                "Leadership changes of this replica, by new role",
            ),
            &["service", "to"],
        )?;
        registry.register(Box::new(leader_transitions.clone()))?;
        let fenced_rejections = IntCounterVec::new(
            Opts::new(
                "shoal_fenced_writes_rejected_total",
                "Writes refused because this replica no longer led",
            ),
            &["service"],
        )?;
        fenced_rejections.with_label_values(&[service]);
        registry.register(Box::new(fenced_rejections.clone()))?;
        let grpc_handled = IntCounterVec::new(
            Opts::new(
                "shoal_grpc_server_handled_total",
                "gRPC calls completed, by method and status code",
            ),
            &["service", "method", "code"],
        )?;
        registry.register(Box::new(grpc_handled.clone()))?;
        let grpc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "shoal_grpc_server_handling_seconds",
                "gRPC call latency until response headers",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["service", "method"],
        )?;
        registry.register(Box::new(grpc_seconds.clone()))?;
        let loop_restarts = IntCounterVec::new(
            Opts::new(
                "shoal_loop_restarts_total",
                "Supervised background loops restarted after they panicked, failed or returned",
            ),
            &["service", "loop"],
        )?;
        registry.register(Box::new(loop_restarts.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "shoal_grpc_refused_total",
                "gRPC calls refused before reaching a handler (credentials, role, limits), by code",
            )
            .const_label("service", service),
            &["code"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        let audit_failures = prometheus::IntCounter::with_opts(
            Opts::new(
                "shoal_audit_write_failures_total",
                "Audit records that could not be written to the store",
            )
            .const_label("service", service),
        )?;
        registry.register(Box::new(audit_failures.clone()))?;
        Ok(RuntimeMetrics {
            loop_restarts,
            refused,
            audit_failures,
            registry,
            ready,
            leader,
            leader_transitions,
            fenced_rejections,
            grpc_handled,
            grpc_seconds,
        })
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %err, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_shoal_metrics_and_process_metrics() {
        let metrics = RuntimeMetrics::new("decider").expect("metrics");
        metrics
            .grpc_handled
            .with_label_values(&["shoal.v1.DeciderService", "GetStatus", "OK"])
            .inc();
        let text = metrics.encode();
        assert!(
            text.contains("shoal_build_info{service=\"decider\""),
            "{text}"
        );
        assert!(
            text.contains("shoal_leader{service=\"decider\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("shoal_grpc_server_handled_total{code=\"OK\",method=\"GetStatus\""),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
