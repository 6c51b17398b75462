//! The metrics service's own Prometheus metrics (`shoal_metrics_*`).

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::state::Sizes;

/// Handles to every metric the service exports.
#[derive(Clone)]
pub struct Stats {
    /// `shoal_metrics_snapshot_build_seconds`.
    pub build_seconds: Histogram,
    /// `shoal_metrics_snapshot_bytes`: encoded size of the last snapshot.
    pub snapshot_bytes: IntGauge,
    /// `shoal_metrics_snapshots_published_total`.
    pub published: IntCounter,
    /// `shoal_metrics_cache_objects{kind}`.
    pub cache_objects: IntGaugeVec,
    /// `shoal_metrics_watch_restarts_total{kind}`: watch errors after which the watch restarted.
    pub watch_restarts: IntCounterVec,
    /// `shoal_metrics_watch_relists_total{kind}`: complete re-lists (first list included).
    pub relists: IntCounterVec,
    /// `shoal_metrics_prometheus_query_errors_total`.
    pub prometheus_errors: IntCounter,
    /// `shoal_metrics_utilization_stale`: 1 while Prometheus cannot be read.
    pub utilization_stale: IntGauge,
    /// `shoal_metrics_utilization_age_seconds`.
    pub utilization_age: Gauge,
}

impl Stats {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> Result<Stats, prometheus::Error> {
        let build_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "shoal_metrics_snapshot_build_seconds",
                "Time to build a cluster snapshot from the caches",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        let snapshot_bytes = IntGauge::new(
            "shoal_metrics_snapshot_bytes",
            "Encoded size of the last published snapshot",
        )?;
        let published = IntCounter::new(
            "shoal_metrics_snapshots_published_total",
            "Snapshots pushed to WatchSnapshots subscribers",
        )?;
        let cache_objects = IntGaugeVec::new(
            Opts::new(
                "shoal_metrics_cache_objects",
                "Objects held in the watch caches, by kind",
            ),
            &["kind"],
        )?;
        let watch_restarts = IntCounterVec::new(
            Opts::new(
                "shoal_metrics_watch_restarts_total",
                "Watch errors after which the watch was restarted, by kind",
            ),
            &["kind"],
        )?;
        let relists = IntCounterVec::new(
            Opts::new(
                "shoal_metrics_watch_relists_total",
                "Complete lists of a kind (the first one and every re-list)",
            ),
            &["kind"],
        )?;
        let prometheus_errors = IntCounter::new(
            "shoal_metrics_prometheus_query_errors_total",
            "Utilization reads from Prometheus that failed",
        )?;
        let utilization_stale = IntGauge::new(
            "shoal_metrics_utilization_stale",
            "1 while utilization could not be read from Prometheus",
        )?;
        let utilization_age = Gauge::new(
            "shoal_metrics_utilization_age_seconds",
            "Age of the utilization values in snapshots",
        )?;
        for kind in ["nodes", "pods", "pdbs"] {
            watch_restarts.with_label_values(&[kind]);
            relists.with_label_values(&[kind]);
        }
        for metric in [
            Box::new(build_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(snapshot_bytes.clone()),
            Box::new(published.clone()),
            Box::new(cache_objects.clone()),
            Box::new(watch_restarts.clone()),
            Box::new(relists.clone()),
            Box::new(prometheus_errors.clone()),
            Box::new(utilization_stale.clone()),
            Box::new(utilization_age.clone()),
        ] {
            registry.register(metric)?;
        }
        Ok(Stats {
            build_seconds,
            snapshot_bytes,
            published,
            cache_objects,
            watch_restarts,
            relists,
            prometheus_errors,
            utilization_stale,
            utilization_age,
        })
    }

    /// Records the cache sizes.
    pub fn record_sizes(&self, sizes: Sizes) {
        for (kind, n) in [
            ("nodes", sizes.nodes),
            ("pods", sizes.pods),
            ("pdbs", sizes.pdbs),
            ("classes", sizes.classes),
            ("pending_pods", sizes.pending),
        ] {
            self.cache_objects.with_label_values(&[kind]).set(n as i64);
        }
    }
}
