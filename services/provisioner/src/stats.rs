//! The provisioner's own Prometheus metrics (`shoal_provisioner_*`, `shoal_node_ready_seconds`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Handles to every metric the provisioner exports.
#[derive(Clone)]
pub struct Stats {
    /// `shoal_provisioner_claims{pool,phase}`: claims in the store by phase.
    pub claims: IntGaugeVec,
    /// `shoal_node_ready_seconds{pool}`: claim created → node Ready.
    pub node_ready: HistogramVec,
    /// `shoal_provisioner_backend_calls_total{backend,op,result}`.
    pub backend_calls: IntCounterVec,
    /// `shoal_provisioner_backend_call_seconds{backend,op}`.
    pub backend_seconds: HistogramVec,
    /// `shoal_provisioner_backend_retries_total{backend,op}`.
    pub retries: IntCounterVec,
    /// `shoal_provisioner_breaker_state{backend}`: 0 closed, 1 open, 2 half-open.
    pub breaker: IntGaugeVec,
    /// `shoal_provisioner_rollbacks_total{pool,reason}`: nodes deleted because they never became Ready.
    pub rollbacks: IntCounterVec,
    /// `shoal_provisioner_claims_failed_total{pool}`.
    pub failed: IntCounterVec,
    /// `shoal_provisioner_operations_total{kind,state}`: finished operations.
    pub operations: IntCounterVec,
    /// `shoal_provisioner_evictions_total{result}`: evicted, blocked (429), gone.
    pub evictions: IntCounterVec,
    /// `shoal_provisioner_records_removed_total{kind}`: finished records removed by retention.
    pub records_removed: IntCounterVec,
}

impl Stats {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> Result<Stats, prometheus::Error> {
        let stats = Stats {
            claims: IntGaugeVec::new(
                Opts::new(
                    "shoal_provisioner_claims",
                    "NodeClaims in the store by pool and phase",
                ),
                &["pool", "phase"],
            )?,
            node_ready: HistogramVec::new(
                HistogramOpts::new(
                    "shoal_node_ready_seconds",
                    "From a NodeClaim's creation to its node being Ready",
                )
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
                &["pool"],
            )?,
            backend_calls: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_backend_calls_total",
                    "Backend calls by backend, operation and result (ok, transient, permanent, conflict, breaker_open, timeout)",
                ),
                &["backend", "op", "result"],
            )?,
            backend_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "shoal_provisioner_backend_call_seconds",
                    "Latency of one backend call attempt",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["backend", "op"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_backend_retries_total",
                    "Backend call attempts that were retries",
                ),
                &["backend", "op"],
            )?,
            breaker: IntGaugeVec::new(
                Opts::new(
                    "shoal_provisioner_breaker_state",
                    "Circuit breaker per backend: 0 closed, 1 open, 2 half-open",
                ),
                &["backend"],
            )?,
            rollbacks: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_rollbacks_total",
                    "Nodes deleted because they did not become Ready (TTL, boot failure)",
                ),
                &["pool", "reason"],
            )?,
            failed: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_claims_failed_total",
                    "Claims that ended Failed",
                ),
                &["pool"],
            )?,
            operations: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_operations_total",
                    "Finished operations by kind and final state",
                ),
                &["kind", "state"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_evictions_total",
                    "Eviction attempts by result",
                ),
                &["result"],
            )?,
            records_removed: IntCounterVec::new(
                Opts::new(
                    "shoal_provisioner_records_removed_total",
                    "Finished records removed by retention, by kind (claim, operation)",
                ),
                &["kind"],
            )?,
        };
        registry.register(Box::new(stats.claims.clone()))?;
        registry.register(Box::new(stats.node_ready.clone()))?;
        registry.register(Box::new(stats.backend_calls.clone()))?;
        registry.register(Box::new(stats.backend_seconds.clone()))?;
        registry.register(Box::new(stats.retries.clone()))?;
        registry.register(Box::new(stats.breaker.clone()))?;
        registry.register(Box::new(stats.rollbacks.clone()))?;
        registry.register(Box::new(stats.failed.clone()))?;
        registry.register(Box::new(stats.operations.clone()))?;
        registry.register(Box::new(stats.evictions.clone()))?;
        registry.register(Box::new(stats.records_removed.clone()))?;
        Ok(stats)
    }
}
