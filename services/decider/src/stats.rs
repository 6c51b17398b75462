//! The decider's own Prometheus metrics (`shoal_decider_*`).

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Handles to every metric the decider exports.
#[derive(Clone)]
pub struct Stats {
    /// `shoal_decider_decisions_total{action,pool,reason}`.
    pub decisions: IntCounterVec,
    /// `shoal_decider_plan_seconds`.
    pub plan_seconds: Histogram,
    /// `shoal_decider_pending_to_decision_seconds`: oldest helped pod unschedulable → decision.
    pub pending_to_decision: Histogram,
    /// `shoal_decider_cooldown_active{pool,direction}`.
    pub cooldown: IntGaugeVec,
    /// `shoal_decider_paused`.
    pub paused: IntGauge,
    /// `shoal_decider_provisioner_calls_total{op,result}`.
    pub provisioner_calls: IntCounterVec,
    /// `shoal_decider_snapshot_stream_errors_total`.
    pub stream_errors: IntCounterVec,
}

impl Stats {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> Result<Stats, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "shoal_decider_decisions_total",
                "Decisions by action (scale_up, scale_down, none), pool and reason",
            ),
            &["action", "pool", "reason"],
        )?;
        let plan_seconds = Histogram::with_opts(
            HistogramOpts::new("shoal_decider_plan_seconds", "Time to plan one decision").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
        )?;
        let pending_to_decision = Histogram::with_opts(
            HistogramOpts::new(
                "shoal_decider_pending_to_decision_seconds",
                "From a helped pod becoming unschedulable to the decision that adds nodes for it",
            )
            .buckets(vec![
                0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
        )?;
        let cooldown = IntGaugeVec::new(
            Opts::new(
                "shoal_decider_cooldown_active",
                "1 while a pool's scale-up or scale-down cooldown runs",
            ),
            &["pool", "direction"],
        )?;
        let paused = IntGauge::new("shoal_decider_paused", "1 while the decider does not act")?;
        let provisioner_calls = IntCounterVec::new(
            Opts::new(
                "shoal_decider_provisioner_calls_total",
                "CreateNodes and DeleteNodes calls by result",
            ),
            &["op", "result"],
        )?;
        let stream_errors = IntCounterVec::new(
            Opts::new(
                "shoal_decider_snapshot_stream_errors_total",
                "WatchSnapshots streams that failed or ended and were reopened",
            ),
            &["reason"],
        )?;
        for metric in [
            Box::new(decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(plan_seconds.clone()),
            Box::new(pending_to_decision.clone()),
            Box::new(cooldown.clone()),
            Box::new(paused.clone()),
            Box::new(provisioner_calls.clone()),
            Box::new(stream_errors.clone()),
        ] {
            registry.register(metric)?;
        }
        Ok(Stats {
            decisions,
            plan_seconds,
            pending_to_decision,
            cooldown,
            paused,
            provisioner_calls,
            stream_errors,
        })
    }
}
