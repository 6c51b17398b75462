//! The leader loop a campaigning service runs: campaign, publish leadership to the service's
//! loops, keep the fenced leader record (`leaders/<service>`) fresh, step down the moment
//! leadership is lost, campaign again; resign on shutdown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_state::{Election, Leadership, StoreError, keys};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::RuntimeMetrics;

/// The leader's status record, refreshed with a fenced write every record interval.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderStatusRecord {
    /// The leading replica.
    pub holder: String,
    /// Its term (election key create revision).
    pub term: i64,
    /// When it became leader (Unix ms).
    pub since_unix_ms: u64,
    /// When this record was written (Unix ms).
    pub updated_unix_ms: u64,
}

/// Current leadership of this replica: `Some` while it leads.
pub type LeaderWatch = watch::Receiver<Option<Leadership>>;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the leader loop until `shutdown`; returns once leadership (if held) is resigned.
pub async fn run_leader_loop(
    election: Election,
    record_interval: Duration,
    metrics: RuntimeMetrics,
    publish: watch::Sender<Option<Leadership>>,
    shutdown: CancellationToken,
) {
    let service = election.service().to_string();
    let leader_gauge = metrics.leader.with_label_values(&[&service]);
    while let Some(leadership) = election.campaign(&shutdown).await {
        leader_gauge.set(1);
        metrics
            .leader_transitions
            .with_label_values(&[&service, "leader"])
            .inc();
        publish.send_replace(Some(leadership.clone()));
        let mut ticker = tokio::time::interval(record_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let resigned = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    leadership.resign().await;
                    break true;
                }
                _ = leadership.lost().cancelled() => break false,
                _ = ticker.tick() => {
                    let record = LeaderStatusRecord {
                        holder: leadership.record().holder.clone(),
                        term: leadership.term(),
                        since_unix_ms: leadership.record().since_unix_ms,
                        updated_unix_ms: unix_ms(),
                    };
                    let value = serde_json::to_vec(&record).unwrap_or_default();
                    match leadership.fenced_put(&keys::leader_record(&service), value).await {
                        Ok(_) => {}
                        Err(StoreError::Fenced { .. }) => {
                            metrics.fenced_rejections.with_label_values(&[&service]).inc();
                            break false;
                        }
                        Err(err) => tracing::warn!(%service, error = %err, "leader record write failed; will retry"),
                    }
                }
            }
        };
        publish.send_replace(None);
        leader_gauge.set(0);
        metrics
            .leader_transitions
            .with_label_values(&[&service, "follower"])
            .inc();
        if resigned {
            break;
        }
        tracing::warn!(
            %service,
            term = leadership.term(),
            reason = leadership.lost_reason().unwrap_or_default(),
            "stepped down as leader; campaigning again"
        );
    }
}

/// Leadership as status RPCs report it: this replica's role and, when it does not lead, who does
/// according to the store.
pub async fn describe_leadership(
    watch: Option<&LeaderWatch>,
    election: Option<&Election>,
) -> shoal_proto::v1::LeaderInfo {
    let ours = watch
        .and_then(|w| w.borrow().clone())
        .filter(|l| l.is_held());
    if let Some(leadership) = ours {
        return shoal_proto::v1::LeaderInfo {
            is_leader: true,
            leader_id: leadership.record().holder.clone(),
            term: leadership.term(),
            since: Some(timestamp(leadership.record().since_unix_ms)),
        };
    }
    match election.map(|e| e.current_leader()) {
        Some(lookup) => match lookup.await {
            Ok(Some(record)) => shoal_proto::v1::LeaderInfo {
                is_leader: false,
                leader_id: record.holder,
                term: record.term,
                since: Some(timestamp(record.since_unix_ms)),
            },
            Ok(None) | Err(_) => shoal_proto::v1::LeaderInfo::default(),
        },
        None => shoal_proto::v1::LeaderInfo::default(),
    }
}

/// Unix milliseconds as a protobuf timestamp.
pub fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (unix_ms / 1000) as i64,
        nanos: ((unix_ms % 1000) * 1_000_000) as i32,
    }
}
