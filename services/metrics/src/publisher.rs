//! Building snapshots and pushing them to subscribers: a new snapshot after a batching window
//! when something relevant changes (closed after `batchIdle` without further relevant changes,
//! or `batchMax` after the first, or `batchIdle` after the first pod that became pending in it —
//! a burst of pending pods that keeps the cluster busy gets a snapshot every `batchIdle`, not
//! every `batchMax`), and at least every `scanInterval`. Subscribers read the
//! latest snapshot from a watch channel, so a slow one skips snapshots instead of queueing them.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prost::Message;
use shoal_proto::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{state::ClusterState, stats::Stats, utilization::UtilizationSource};

/// When snapshots go out.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Quiet time that closes a window.
    pub idle: Duration,
    /// Longest a window stays open.
    pub max: Duration,
    /// Longest time between two snapshots.
    pub scan: Duration,
}

/// The open batching window, if any.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// (first, last) relevant change.
    open: Option<(Instant, Instant)>,
    /// The first change in the window that made a pod pending.
    first_pending: Option<Instant>,
}

impl Window {
    /// A relevant change at `now`.
    pub fn change(&mut self, now: Instant) {
        self.open = Some(match self.open {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
    }

    /// A relevant change at `now` that made a pod pending.
    pub fn pending(&mut self, now: Instant) {
        self.change(now);
        self.first_pending.get_or_insert(now);
    }

    /// When the next snapshot is due, given the last one went out at `last_publish`.
    pub fn due(&self, batching: &Batching, last_publish: Instant) -> Instant {
        match self.open {
            Some((first, last)) => {
                let due = (last + batching.idle).min(first + batching.max);
                match self.first_pending {
                    Some(pending) => due.min(pending + batching.idle),
                    None => due,
                }
            }
            None => last_publish + batching.scan,
        }
    }

    /// The window closed with a snapshot.
    pub fn close(&mut self) {
        self.open = None;
        self.first_pending = None;
    }
}

/// Builds and publishes snapshots.
pub struct Publisher {
    state: Arc<Mutex<ClusterState>>,
    usage: UtilizationSource,
    stats: Stats,
    sequence: AtomicU64,
    latest: watch::Sender<Option<Arc<pb::ClusterSnapshot>>>,
}

impl Publisher {
    /// A publisher over `state` and `usage`.
    pub fn new(
        state: Arc<Mutex<ClusterState>>,
        usage: UtilizationSource,
        stats: Stats,
    ) -> Publisher {
        Publisher {
            state,
            usage,
            stats,
            sequence: AtomicU64::new(0),
            latest: watch::Sender::new(None),
        }
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<Mutex<ClusterState>> {
        &self.state
    }

    /// Utilization.
    pub fn usage(&self) -> &UtilizationSource {
        &self.usage
    }

    /// Snapshots as they are published (`None` until the first).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<pb::ClusterSnapshot>>> {
        self.latest.subscribe()
    }

    /// A snapshot of this moment, or `Err` with what has not been listed yet. Every snapshot
    /// starts a trace (`metrics.snapshot`) that decisions made from it continue.
    pub fn build(&self) -> Result<pb::ClusterSnapshot, String> {
        let span = tracing::info_span!(
            "metrics.snapshot",
            sequence = tracing::field::Empty,
            nodes = tracing::field::Empty,
            pending_classes = tracing::field::Empty
        );
        let _entered = span.enter();
        let usage = self.usage.current();
        let started = Instant::now();
        let (snapshot, sizes) = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let synced = state.synced();
            if !synced.all() {
                let yes_no = |b: bool| if b { "listed" } else { "listing" };
                return Err(format!(
                    "the cluster caches are still syncing (nodes {}, pods {}, PodDisruptionBudgets {})",
                    yes_no(synced.nodes),
                    yes_no(synced.pods),
                    yes_no(synced.pdbs)
                ));
            }
            let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
            let snapshot = state.snapshot(
                sequence,
                SystemTime::now(),
                &usage,
                shoal_runtime::telemetry::traceparent_of(&span),
            );
            (snapshot, state.sizes())
        };
        self.stats
            .build_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.record_sizes(sizes);
        span.record("sequence", snapshot.sequence);
        span.record("nodes", snapshot.nodes.len());
        span.record("pending_classes", snapshot.pending.len());
        Ok(snapshot)
    }

    /// Builds a snapshot and pushes it to subscribers; `false` while still syncing.
    pub fn publish(&self) -> bool {
        match self.build() {
            Ok(snapshot) => {
                self.stats.snapshot_bytes.set(snapshot.encoded_len() as i64);
                self.stats.published.inc();
                self.latest.send_replace(Some(Arc::new(snapshot)));
                true
            }
            Err(_) => false,
        }
    }

    /// Publishes on relevant changes (batched) and every scan interval until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        changes: Arc<Notify>,
        batching: Batching,
        shutdown: CancellationToken,
    ) {
        let mut window = Window::default();
        let mut last_publish = Instant::now();
        let mut published_once = false;
        loop {
            let due = window.due(&batching, last_publish);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.notified() => {
                    let (relevant, pending) = {
                        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        (state.take_relevant(), state.take_pending_grew())
                    };
                    if relevant {
                        tracing::debug!("relevant change");
                        if published_once {
                            if pending {
                                window.pending(Instant::now());
                            } else {
                                window.change(Instant::now());
                            }
                        } else if self.publish() {
                            // The first complete picture goes out at once.
                            published_once = true;
                            last_publish = Instant::now();
                        }
                    }
                }
                _ = tokio::time::sleep_until(due.into()) => {
                    tracing::debug!("publishing");
                    if self.publish() {
                        published_once = true;
                    }
                    window.close();
                    last_publish = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_close_on_idle_or_max_and_scan_bounds_the_gap() {
        let b = Batching {
            idle: Duration::from_secs(1),
            max: Duration::from_secs(10),
            scan: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.due(&b, t0), t0 + b.scan, "no window: the scan interval");
        w.change(t0);
        assert_eq!(w.due(&b, t0), t0 + b.idle);
        // Changes every 0.5 s keep the window open, but never beyond max.
        for i in 1..40 {
            w.change(t0 + Duration::from_millis(500 * i));
        }
        assert_eq!(w.due(&b, t0), t0 + b.max);
        w.close();
        assert_eq!(w.due(&b, t0 + b.max), t0 + b.max + b.scan);
    }

    #[test]
    fn pods_turning_pending_wait_at_most_idle_however_busy_the_cluster() {
        let b = Batching {
            idle: Duration::from_secs(1),
            max: Duration::from_secs(10),
            scan: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = Window::default();
        // Other changes open the window; a pod turns pending 2 s in; changes keep coming.
        w.change(t0);
        for i in 1..4 {
            w.change(t0 + Duration::from_millis(500 * i));
        }
        w.pending(t0 + Duration::from_secs(2));
        for i in 5..40 {
            w.change(t0 + Duration::from_millis(500 * i));
        }
        assert_eq!(
            w.due(&b, t0),
            t0 + Duration::from_secs(3),
            "1 s after the first pending pod, not at batchMax"
        );
        w.close();
        // The next window without pending pods waits for quiet (or batchMax) again.
        w.change(t0 + Duration::from_secs(3));
        for i in 7..40 {
            w.change(t0 + Duration::from_millis(500 * i));
        }
        assert_eq!(w.due(&b, t0), t0 + Duration::from_secs(13));
    }
}
