//! Leadership, the one way every service uses it: the leader loop a campaigning service runs
//! (campaign, publish leadership, keep the fenced leader record `leaders/<service>` fresh, step
//! down the moment leadership is lost or the replica becomes unfit to lead, campaign again;
//! resign on shutdown), and [`while_leading`], which runs a service's leader-only work for each
//! term and cancels it the moment the term ends.

use std::{
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

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
    /// Its advertised gRPC address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
}

/// Current leadership of this replica: `Some` while it leads.
pub type LeaderWatch = watch::Receiver<Option<Leadership>>;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How one term of the leader loop ended.
enum TermEnd {
    /// Shutdown: leadership was resigned; stop campaigning.
    Shutdown,
    /// Lost (lease, fence) or given up because the replica became unfit; campaign again.
    Lost,
}

/// Runs the leader loop until `shutdown`; returns once leadership (if held) is resigned.
///
/// The replica campaigns only while `fit` is true (every supervised loop runs); when it turns
/// false during a term the replica resigns at once, so a standby whose loops work takes over.
pub async fn run_leader_loop(
    election: Election,
    record_interval: Duration,
    metrics: RuntimeMetrics,
    publish: watch::Sender<Option<Leadership>>,
    mut fit: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let service = election.service().to_string();
    let leader_gauge = metrics.leader.with_label_values(&[&service]);
    loop {
        if !*fit.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = until(&mut fit, true) => {}
            }
        }
        let stop_campaign = shutdown.child_token();
        let leadership = tokio::select! {
            l = election.campaign(&stop_campaign) => l,
            _ = until(&mut fit, false) => {
                stop_campaign.cancel();
                continue;
            }
        };
        let Some(leadership) = leadership else {
            return; // shutdown while campaigning
        };
        leader_gauge.set(1);
        metrics
            .leader_transitions
            .with_label_values(&[&service, "leader"])
            .inc();
        publish.send_replace(Some(leadership.clone()));
        let end = hold_term(
            &service,
            &leadership,
            record_interval,
            &metrics,
            &mut fit,
            &shutdown,
        )
        .await;
        publish.send_replace(None);
        leader_gauge.set(0);
        metrics
            .leader_transitions
            .with_label_values(&[&service, "follower"])
            .inc();
        if let TermEnd::Shutdown = end {
            return;
        }
        tracing::warn!(
            %service,
            term = leadership.term(),
            reason = leadership.lost_reason().unwrap_or_default(),
            "stepped down as leader; campaigning again"
        );
    }
}

/// Waits until `fit` is `want` (forever once its sender is gone: only at shutdown, which the
/// callers also wait for).
async fn until(fit: &mut watch::Receiver<bool>, want: bool) {
    if fit.wait_for(|f| *f == want).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Holds one term: refreshes the leader record until the term is lost, the replica becomes
/// unfit (resign), or shutdown (resign).
async fn hold_term(
    service: &str,
    leadership: &Leadership,
    record_interval: Duration,
    metrics: &RuntimeMetrics,
    fit: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> TermEnd {
    let mut ticker = tokio::time::interval(record_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                leadership.resign().await;
                return TermEnd::Shutdown;
            }
            _ = leadership.lost().cancelled() => return TermEnd::Lost,
            _ = until(fit, false) => {
                tracing::warn!(%service, "a supervised loop is down: resigning leadership");
                leadership.resign().await;
                return TermEnd::Lost;
            }
            _ = ticker.tick() => {
                let record = LeaderStatusRecord {
                    holder: leadership.record().holder.clone(),
                    term: leadership.term(),
                    since_unix_ms: leadership.record().since_unix_ms,
                    updated_unix_ms: unix_ms(),
                    address: leadership.record().address.clone(),
                };
                let value = serde_json::to_vec(&record).unwrap_or_default();
                match leadership.fenced_put(&keys::leader_record(service), value).await {
                    Ok(_) => {}
                    Err(StoreError::Fenced { .. }) => {
                        metrics.fenced_rejections.with_label_values(&[service]).inc();
                        return TermEnd::Lost;
                    }
                    Err(err) => tracing::warn!(%service, error = %err, "leader record write failed; will retry"),
                }
            }
        }
    }
}

/// This replica's leadership, if it holds it right now.
pub fn current_leadership(watch: Option<&LeaderWatch>) -> Option<Leadership> {
    watch
        .and_then(|w| w.borrow().clone())
        .filter(Leadership::is_held)
}

/// Runs `term` for every term this replica leads, until `shutdown`: waits for leadership, runs
/// `term(leadership, token)`, and the moment leadership ends drops the future and cancels
/// `token` (give it to anything the term spawns), so no leader-only work outlives its term.
///
/// Returns `Err` when `term` fails or returns while still leading: the caller (a supervised
/// loop) is then restarted, and the replica resigns meanwhile.
pub async fn while_leading<F, Fut>(
    mut leader: LeaderWatch,
    shutdown: CancellationToken,
    mut term: F,
) -> Result<(), String>
where
    F: FnMut(Leadership, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    loop {
        let leadership = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            l = leader.wait_for(|l| l.as_ref().is_some_and(Leadership::is_held)) => match l {
                Ok(l) => l.clone(),
                Err(_) => return Ok(()), // the host is gone: shutting down
            },
        };
        let Some(leadership) = leadership else {
            continue;
        };
        let token = shutdown.child_token();
        let ended = tokio::select! {
            _ = leadership.lost().cancelled() => Ok(()),
            _ = shutdown.cancelled() => Ok(()),
            r = term(leadership.clone(), token.clone()) => match r {
                Ok(()) if leadership.is_held() && !shutdown.is_cancelled() => {
                    Err(format!("its work for term {} ended while still leading", leadership.term()))
                }
                other => other,
            },
        };
        token.cancel();
        ended?;
    }
}

/// Leadership as status RPCs report it: this replica's role and, when it does not lead, who does
/// according to the store.
pub async fn describe_leadership(
    watch: Option<&LeaderWatch>,
    election: Option<&Election>,
) -> shoal_proto::v1::LeaderInfo {
    if let Some(leadership) = current_leadership(watch) {
        return shoal_proto::v1::LeaderInfo {
            is_leader: true,
            leader_id: leadership.record().holder.clone(),
            term: leadership.term(),
            since: Some(timestamp(leadership.record().since_unix_ms)),
            address: leadership.record().address.clone(),
        };
    }
    match election.map(|e| e.current_leader()) {
        Some(lookup) => match lookup.await {
            Ok(Some(record)) => shoal_proto::v1::LeaderInfo {
                is_leader: false,
                leader_id: record.holder,
                term: record.term,
                since: Some(timestamp(record.since_unix_ms)),
                address: record.address,
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
