//! The reconciler's own Prometheus metrics (`shoal_reconciliation_*`).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Handles to every metric the reconciler exports.
#[derive(Clone)]
pub struct Stats {
    /// `shoal_reconciliation_cycles_total`.
    pub cycles: IntCounter,
    /// `shoal_reconciliation_duration_seconds`.
    pub duration: Histogram,
    /// `shoal_reconciliation_drifts_total{type}`.
    pub drifts: IntCounterVec,
    /// `shoal_reconciliation_repairs_total{type,result}`.
    pub repairs: IntCounterVec,
    /// `shoal_reconciliation_timeouts_total`: passes given up at `passTimeout`.
    pub timeouts: IntCounter,
    /// `shoal_store_compactions_total`: compactions of the store's history.
    pub compactions: IntCounter,
    /// `shoal_store_defragmentations_total`.
    pub defragmentations: IntCounter,
    /// `shoal_store_db_bytes{kind}`: the database's size (`file`, `in_use`) after the last
    /// compaction.
    pub db_bytes: IntGaugeVec,
}

impl Stats {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> Result<Stats, prometheus::Error> {
        let stats = Stats {
            cycles: IntCounter::new(
                "shoal_reconciliation_cycles_total",
                "Reconciliation passes run",
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new("shoal_reconciliation_duration_seconds", "Time of one pass")
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
            )?,
            drifts: IntCounterVec::new(
                Opts::new("shoal_reconciliation_drifts_total", "Drifts found, by type"),
                &["type"],
            )?,
            repairs: IntCounterVec::new(
                Opts::new(
                    "shoal_reconciliation_repairs_total",
                    "Repairs by drift type and result (repaired, failed, reported, deferred)",
                ),
                &["type", "result"],
            )?,
            defragmentations: IntCounter::new(
                "shoal_store_defragmentations_total",
                "Defragmentations of the store's database after a compaction",
            )?,
            db_bytes: IntGaugeVec::new(
                Opts::new(
                    "shoal_store_db_bytes",
                    "The store's database size after the last compaction (file, in_use)",
                ),
                &["kind"],
            )?,
            compactions: IntCounter::new(
                "shoal_store_compactions_total",
                "Compactions of the store's history by the reconciler's leader",
            )?,
            timeouts: IntCounter::new(
                "shoal_reconciliation_timeouts_total",
                "Passes given up after passTimeout (a backend or the Kubernetes API hung)",
            )?,
        };
        registry.register(Box::new(stats.cycles.clone()))?;
        registry.register(Box::new(stats.duration.clone()))?;
        registry.register(Box::new(stats.drifts.clone()))?;
        registry.register(Box::new(stats.repairs.clone()))?;
        registry.register(Box::new(stats.timeouts.clone()))?;
        registry.register(Box::new(stats.compactions.clone()))?;
        registry.register(Box::new(stats.defragmentations.clone()))?;
        registry.register(Box::new(stats.db_bytes.clone()))?;
        Ok(stats)
    }
}
