//! The control loop (leader only): follow `WatchSnapshots`, plan each snapshot, record the
//! decision and the planner history with fenced writes (bounded history), then carry the
//! actions out through the provisioner with the decision id as idempotency key. A decision
//! continues the trace of the snapshot it was made from.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use backon::{ExponentialBuilder, Retryable};
use prost::Message;
use shoal_core::{claim::NodeClaim, pool::Pool};
use shoal_proto::v1::{
    self as pb, CreateNodesRequest, DeleteNodesRequest, GetSnapshotRequest, WatchSnapshotsRequest,
    metrics_service_client::MetricsServiceClient,
    provisioner_service_client::ProvisionerServiceClient,
};
use shoal_runtime::{LeaderWatch, TracedChannel, telemetry, while_leading};
use shoal_state::{Election, Leadership, PrefixCache, StoreError, Txn, TxnOp, keys};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    DeciderSettings,
    planner::{self, History, Plan, PlanInput},
    stats::Stats,
    store::{self, DeciderStore},
};

/// Why a decision could not be made or recorded.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// This replica does not lead.
    #[error("this replica does not lead the decider{0}")]
    NotLeader(String),
    /// The store failed (or leadership was lost mid-write: fenced).
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<StoreError> for DecideError {
    fn from(e: StoreError) -> Self {
        DecideError::Store(store::Error::Store(e))
    }
}

/// What the leader keeps between decisions of one term.
struct LeaderState {
    term: i64,
    history: History,
    /// Stored decision keys, oldest first (for bounding the history).
    keys: VecDeque<String>,
}

/// A decision and what was done about it.
pub struct Outcome {
    /// The decision as recorded.
    pub decision: pb::Decision,
    /// Provisioner operations started.
    pub operations: Vec<String>,
    /// Plan again soon: a pool stopped at its batch size.
    pub batch_capped: bool,
    /// Every action was carried out (false when one was refused or none was carried out).
    pub executed: bool,
    /// NodeClaims created.
    pub claims: Vec<String>,
}

/// How a decision came about.
pub enum Mode {
    /// From a snapshot, in the control loop.
    Loop,
    /// For an external capacity request: only scale-ups are carried out.
    Capacity {
        /// Who asked.
        requester: String,
    },
}

/// The decider's shared core: caches, clients, leadership, the leader's state.
pub struct Decider {
    pub(crate) settings: DeciderSettings,
    pub(crate) store: DeciderStore,
    pub(crate) pools: PrefixCache,
    pub(crate) claims: PrefixCache,
    pub(crate) metrics: MetricsServiceClient<TracedChannel>,
    pub(crate) provisioner: ProvisionerServiceClient<TracedChannel>,
    pub(crate) leader: Option<LeaderWatch>,
    pub(crate) election: Option<Election>,
    pub(crate) stats: Stats,
    state: tokio::sync::Mutex<Option<LeaderState>>,
    /// The leader's planner history as of its last decision, with its term: readers
    /// (`Evaluate`, status, cooldown gauges) take it from here instead of waiting for a decision
    /// in progress, which may be waiting for the provisioner.
    published: std::sync::Mutex<Option<(i64, History)>>,
    /// Where the decider records the actions it takes on its own.
    audit: Option<shoal_runtime::audit::AuditLog>,
    pub(crate) last_decision_at: std::sync::Mutex<Option<SystemTime>>,
    /// NodePool resources and Events, when the decider talks to Kubernetes.
    kube: Option<Arc<crate::k8s::KubeFace>>,
    /// Capacity requests and their bookings.
    pub(crate) capacity: Arc<crate::capacity::Book>,
    /// ProvisioningRequest resources, when followed.
    provreqs: Option<Arc<crate::provreq::ProvisioningRequests>>,
}

fn decision_id() -> String {
    format!(
        "d{:x}{:06x}",
        planner::ms(SystemTime::now()),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Short reason code of an action for the decisions metric.
fn reason_code(reason: &str) -> &'static str {
    if reason.contains("minNodes") {
        "min_nodes"
    } else if reason.contains("pending pod") {
        "pending_pods"
    } else if reason.contains("cpuAbove") || reason.contains("memoryAbove") {
        "usage_above"
    } else if reason.contains("empty node") {
        "empty"
    } else {
        "underutilized"
    }
}

impl Decider {
    /// Assembles the core.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: DeciderSettings,
        store: DeciderStore,
        pools: PrefixCache,
        claims: PrefixCache,
        metrics: TracedChannel,
        provisioner: TracedChannel,
        leader: Option<LeaderWatch>,
        election: Option<Election>,
        stats: Stats,
        capacity: Arc<crate::capacity::Book>,
    ) -> Decider {
        Decider {
            settings,
            store,
            pools,
            claims,
            metrics: MetricsServiceClient::new(metrics).max_decoding_message_size(256 << 20),
            provisioner: ProvisionerServiceClient::new(provisioner),
            leader,
            election,
            stats,
            state: tokio::sync::Mutex::new(None),
            published: std::sync::Mutex::new(None),
            audit: None,
            last_decision_at: std::sync::Mutex::new(None),
            kube: None,
            capacity,
            provreqs: None,
        }
    }

    /// This replica's leadership, while it holds it.
    pub fn leadership(&self) -> Option<Leadership> {
        shoal_runtime::current_leadership(self.leader.as_ref())
    }

    /// Valid pools, from the cache (or the store while the cache syncs).
    pub async fn pools_now(&self) -> Result<Vec<Pool>, store::Error> {
        if self.pools.synced() {
            return Ok(store::valid_pools(&self.pools.values()));
        }
        let kvs = self.store.raw().range(keys::POOLS).await?.kvs;
        Ok(store::valid_pools(&kvs))
    }

    /// NodeClaims, from the cache (or the store while the cache syncs).
    pub async fn claims_now(&self) -> Result<Vec<NodeClaim>, store::Error> {
        let kvs = if self.claims.synced() {
            self.claims.values()
        } else {
            self.store.raw().range(keys::CLAIMS).await?.kvs
        };
        Ok(shoal_state::records::decode_claims(&kvs))
    }

    /// The current snapshot from the metrics service.
    pub async fn fetch_snapshot(&self) -> Result<pb::ClusterSnapshot, tonic::Status> {
        let mut client = self.metrics.clone();
        Ok(client
            .get_snapshot(GetSnapshotRequest {
                fresh_utilization: false,
            })
            .await?
            .into_inner())
    }

    /// Talks to Kubernetes through `kube` (NodePool resources, Events).
    pub fn with_kube(mut self, kube: Option<Arc<crate::k8s::KubeFace>>) -> Decider {
        self.kube = kube;
        self
    }

    /// Follows ProvisioningRequest resources through `provreqs`.
    pub fn with_provisioning_requests(
        mut self,
        provreqs: Option<Arc<crate::provreq::ProvisioningRequests>>,
    ) -> Decider {
        self.provreqs = provreqs;
        self
    }

    /// Records the decider's own actions in `audit`.
    pub fn with_audit(mut self, audit: Option<shoal_runtime::audit::AuditLog>) -> Decider {
        self.audit = audit;
        self
    }

    /// The planner history: the leader's in memory, else the stored one.
    pub async fn history_now(&self) -> Result<History, store::Error> {
        let published = self
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((term, history)) = published
            && self.leadership().is_some_and(|l| l.term() == term)
        {
            return Ok(history);
        }
        self.store.history().await
    }

    fn publish_history(&self, term: i64, history: &History) {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some((term, history.clone()));
    }

    /// Plans without acting or recording (what-if).
    pub fn evaluate(
        &self,
        snapshot: &pb::ClusterSnapshot,
        pools: &[Pool],
        claims: &[NodeClaim],
        history: &History,
        now: SystemTime,
        bookings: crate::planner::Bookings<'_>,
    ) -> Plan {
        let started = Instant::now();
        let mut plan = run_planner(&PlanInput {
            snapshot,
            pools,
            claims,
            history,
            now,
            expanders: &self.settings.expanders,
            seed: snapshot.sequence,
            packing_budget: self.settings.packing_budget,
            backoff: self.settings.failure_backoff,
            bookings,
        });
        plan.decision.id = format!("eval-{}", decision_id());
        plan.decision.dry_run = true;
        plan.decision.plan_duration = Some(duration(started.elapsed()));
        plan
    }

    async fn load_state(&self, leadership: &Leadership) -> Result<LeaderState, store::Error> {
        let history = self.store.history().await?;
        let keys = self.store.raw().keys(keys::DECISIONS).await?.into();
        Ok(LeaderState {
            term: leadership.term(),
            history,
            keys,
        })
    }

    /// Plans `snapshot`, records the decision (fenced), and carries it out unless paused or in
    /// dry-run mode.
    pub async fn decide(
        &self,
        snapshot: &pb::ClusterSnapshot,
        mode: Mode,
    ) -> Result<Outcome, DecideError> {
        let claims = self.claims_now().await?;
        let booked = self.capacity.for_loop(snapshot, &claims).await;
        self.decide_with(snapshot, mode, &booked, false).await
    }

    /// [`Decider::decide`] with the bookings to respect; `request`: the snapshot's pending pods
    /// are capacity requests' (see [`crate::planner::Bookings::request`]).
    pub(crate) async fn decide_with(
        &self,
        snapshot: &pb::ClusterSnapshot,
        mode: Mode,
        booked: &crate::capacity::BookedNow,
        request: bool,
    ) -> Result<Outcome, DecideError> {
        let leadership = self
            .leadership()
            .ok_or_else(|| DecideError::NotLeader(String::new()))?;
        let pools = self.pools_now().await?;
        let claims = self.claims_now().await?;
        let paused = self.store.paused().await?;
        let mut guard = self.state.lock().await;
        if guard.as_ref().is_none_or(|s| s.term != leadership.term()) {
            *guard = Some(self.load_state(&leadership).await?);
        }
        let Some(state) = guard.as_mut() else {
            return Err(DecideError::NotLeader(String::new()));
        };
        let now = SystemTime::now();
        let started = Instant::now();
        let mut plan = run_planner(&PlanInput {
            snapshot,
            pools: &pools,
            claims: &claims,
            history: &state.history,
            now,
            expanders: &self.settings.expanders,
            seed: snapshot.sequence,
            packing_budget: self.settings.packing_budget,
            backoff: self.settings.failure_backoff,
            bookings: booked.bookings(request),
        });
        if matches!(mode, Mode::Loop) {
            self.capacity.note_short(now, &plan.bookings_short);
        }
        let elapsed = started.elapsed();
        self.stats.plan_seconds.observe(elapsed.as_secs_f64());
        let mut decision = std::mem::take(&mut plan.decision);
        decision.id = decision_id();
        decision.plan_duration = Some(duration(elapsed));
        decision.trace_id = telemetry::trace_id_of(&tracing::Span::current());
        if let Mode::Capacity { requester } = &mode {
            let before = decision.actions.len();
            decision
                .actions
                .retain(|a| matches!(a.action, Some(pb::scale_action::Action::ScaleUp(_))));
            decision
                .reasons
                .insert(0, format!("capacity requested by {requester}"));
            if decision.actions.len() < before {
                decision
                    .reasons
                    .push("scale-downs are left to the control loop".into());
            }
        }
        let acts = !decision.actions.is_empty();
        decision.dry_run = self.settings.dry_run || paused.paused;
        if acts && paused.paused {
            decision.reasons.insert(
                0,
                format!(
                    "paused ({}): actions recorded, not carried out",
                    paused.reason
                ),
            );
        } else if acts && self.settings.dry_run {
            decision
                .reasons
                .insert(0, "dry run: actions recorded, not carried out".into());
        }

        // Record the decision and the history in one fenced transaction, then trim old ones.
        let key = keys::decision(planner::ms(now), &decision.id);
        let ops = vec![
            TxnOp::Put {
                key: key.clone(),
                value: decision.encode_to_vec(),
                lease: None,
            },
            TxnOp::Put {
                key: keys::DECIDER_HISTORY.to_string(),
                value: serde_json::to_vec(&plan.history).unwrap_or_default(),
                lease: None,
            },
        ];
        leadership
            .fenced_txn(Txn {
                compares: vec![],
                success: ops,
                failure: vec![],
            })
            .await?;
        state.keys.push_back(key);
        self.trim_history(&leadership, state, now).await;
        state.history = plan.history.clone();
        self.publish_history(state.term, &state.history);

        // Carry it out.
        let mut operations = Vec::new();
        let mut claim_ids = Vec::new();
        let mut carried_out = false;
        if acts && !decision.dry_run {
            let executed = self
                .execute(&decision, &mut operations, &mut claim_ids)
                .await;
            if let Some(audit) = &self.audit {
                let summary = serde_json::json!({
                    "decision": decision.id,
                    "actions": decision.actions.iter().map(describe_action).collect::<Vec<_>>(),
                    "operations": operations.clone(),
                });
                let result = if executed { "OK" } else { "FAILED" };
                audit
                    .own_action("decider: carry out decision", &summary, result)
                    .await;
            }
            // The next plan must count these claims as in flight: wait (bounded) until the
            // claims cache shows them, so a snapshot arriving meanwhile cannot ask again.
            self.await_claims(&claim_ids, Duration::from_secs(5)).await;
            carried_out = executed;
            if executed {
                state.history.record_executed(&decision, now);
                self.publish_history(state.term, &state.history);
                let value = serde_json::to_vec(&state.history).unwrap_or_default();
                leadership.fenced_put(keys::DECIDER_HISTORY, value).await?;
            }
        }
        drop(guard);
        if let Some(kube) = &self.kube {
            kube.publish(&decision, snapshot);
        }

        // Metrics and status.
        for action in &decision.actions {
            match &action.action {
                Some(pb::scale_action::Action::ScaleUp(up)) => {
                    self.stats
                        .decisions
                        .with_label_values(&["scale_up", &up.pool, reason_code(&up.reason)])
                        .inc();
                }
                Some(pb::scale_action::Action::ScaleDown(down)) => {
                    self.stats
                        .decisions
                        .with_label_values(&["scale_down", &down.pool, reason_code(&down.reason)])
                        .inc();
                }
                None => {}
            }
        }
        if decision.actions.is_empty() {
            self.stats
                .decisions
                .with_label_values(&["none", "", "none"])
                .inc();
        }
        if acts && let Some(since) = plan.oldest_helped_since {
            self.stats
                .pending_to_decision
                .observe(now.duration_since(since).unwrap_or_default().as_secs_f64());
        }
        self.record_cooldowns(&pools, now).await;
        *self
            .last_decision_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now);
        self.stats.paused.set(i64::from(paused.paused));
        tracing::info!(
            decision = %decision.id,
            actions = decision.actions.len(),
            reasons = %decision.reasons.join(" | "),
            dry_run = decision.dry_run,
            "decision"
        );
        Ok(Outcome {
            executed: carried_out || !acts,
            decision,
            operations,
            batch_capped: plan.batch_capped,
            claims: claim_ids,
        })
    }

    /// Records a decision that carries nothing out — a capacity request refused — with
    /// `reasons` and the plan's per-class `outcomes` (the pools' verdicts), in the bounded
    /// history like every other. Returns its id.
    pub(crate) async fn record_refusal(
        &self,
        reasons: Vec<String>,
        outcomes: Vec<pb::ClassOutcome>,
        sequence: u64,
    ) -> Result<String, DecideError> {
        let leadership = self
            .leadership()
            .ok_or_else(|| DecideError::NotLeader(String::new()))?;
        let mut guard = self.state.lock().await;
        if guard.as_ref().is_none_or(|s| s.term != leadership.term()) {
            *guard = Some(self.load_state(&leadership).await?);
        }
        let Some(state) = guard.as_mut() else {
            return Err(DecideError::NotLeader(String::new()));
        };
        let now = SystemTime::now();
        let decision = pb::Decision {
            id: decision_id(),
            created_at: Some(shoal_core::snapshot::timestamp(now)),
            snapshot_sequence: sequence,
            actions: vec![],
            reasons,
            outcomes,
            dry_run: false,
            plan_duration: None,
            trace_id: telemetry::trace_id_of(&tracing::Span::current()),
        };
        let key = keys::decision(planner::ms(now), &decision.id);
        leadership
            .fenced_put(&key, decision.encode_to_vec())
            .await?;
        state.keys.push_back(key);
        self.trim_history(&leadership, state, now).await;
        Ok(decision.id)
    }

    /// Drops decisions beyond `historyLimit` or older than `historyMaxAge` (fenced, in chunks).
    /// Best effort: what fails now is trimmed after the next decision.
    async fn trim_history(
        &self,
        leadership: &Leadership,
        state: &mut LeaderState,
        now: SystemTime,
    ) {
        let limit = self.settings.history_limit.max(1) as usize;
        let cutoff =
            planner::ms(now).saturating_sub(self.settings.history_max_age.as_millis() as u64);
        let by_count = state.keys.len().saturating_sub(limit);
        let by_age = state
            .keys
            .iter()
            .take_while(|k| keys::history_time(k).is_some_and(|t| t < cutoff))
            .count();
        let excess = by_count.max(by_age);
        if excess == 0 {
            return;
        }
        let trimmed: Vec<String> = state.keys.iter().take(excess).cloned().collect();
        match shoal_state::records::delete_in_chunks(self.store.raw(), Some(leadership), &trimmed)
            .await
        {
            Ok(_) => {
                state.keys.drain(..excess);
            }
            Err(e) => tracing::warn!(error = %e, excess, "cannot trim the decision history yet"),
        }
    }

    /// Waits (bounded) until the claims just created are in the claims cache.
    async fn await_claims(&self, ids: &[String], timeout: Duration) {
        if ids.is_empty() {
            return;
        }
        let mut changes = self.claims.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let missing = ids
                .iter()
                .filter(|id| self.claims.get(&keys::claim(id)).is_none())
                .count();
            if missing == 0 {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(missing, "created claims not visible in the store yet; planning on");
                    return;
                }
                c = changes.changed() => if c.is_err() { return },
            }
        }
    }

    async fn execute(
        &self,
        decision: &pb::Decision,
        operations: &mut Vec<String>,
        claim_ids: &mut Vec<String>,
    ) -> bool {
        let mut all_ok = true;
        let mut client = self.provisioner.clone();
        for action in &decision.actions {
            let (op, result) = match &action.action {
                Some(pb::scale_action::Action::ScaleUp(up)) => (
                    "create",
                    client
                        .create_nodes(CreateNodesRequest {
                            pool: up.pool.clone(),
                            count: up.count,
                            idempotency_key: format!("{}/{}", decision.id, up.pool),
                            reason: up.reason.clone(),
                        })
                        .await,
                ),
                Some(pb::scale_action::Action::ScaleDown(down)) => (
                    "delete",
                    client
                        .delete_nodes(DeleteNodesRequest {
                            nodes: down.nodes.clone(),
                            idempotency_key: format!("{}/{}", decision.id, down.pool),
                            reason: down.reason.clone(),
                        })
                        .await,
                ),
                None => continue,
            };
            match result {
                Ok(response) => {
                    self.stats
                        .provisioner_calls
                        .with_label_values(&[op, "ok"])
                        .inc();
                    let op = response.into_inner();
                    if op.kind == pb::OperationKind::Create as i32 {
                        claim_ids.extend(op.claim_ids);
                    }
                    operations.push(op.id);
                }
                Err(status) => {
                    all_ok = false;
                    self.stats
                        .provisioner_calls
                        .with_label_values(&[op, status.code().description()])
                        .inc();
                    tracing::warn!(decision = %decision.id, op, code = ?status.code(), message = status.message(), "the provisioner refused an action");
                }
            }
        }
        all_ok
    }

    async fn record_cooldowns(&self, pools: &[Pool], now: SystemTime) {
        let Some(state) = self
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, h)| h.clone())
        else {
            return;
        };
        for pool in pools {
            let h = state.pools.get(&pool.name);
            let active = |last: Option<u64>, cooldown: Duration| {
                last.is_some_and(|ms| planner::from_ms(ms) + cooldown > now)
            };
            let up = active(h.and_then(|h| h.last_scale_up_ms), pool.scale_up.cooldown);
            let down = active(
                h.and_then(|h| {
                    h.last_scale_up_ms
                        .into_iter()
                        .chain(h.last_scale_down_ms)
                        .max()
                }),
                pool.scale_down.cooldown,
            );
            self.stats
                .cooldown
                .with_label_values(&[&pool.name, "up"])
                .set(i64::from(up));
            self.stats
                .cooldown
                .with_label_values(&[&pool.name, "down"])
                .set(i64::from(down));
        }
    }

    /// Applies the configured pool files to the store (the leader does this on election).
    async fn apply_pool_files(&self) {
        for file in &self.settings.pool_files {
            match load_pool_file(file) {
                Ok(pools) => {
                    for pool in pools {
                        let name = pool.name.clone();
                        match self.store.apply_pool(pool, 0).await {
                            Ok(p) => {
                                tracing::info!(pool = %name, revision = p.revision, %file, "pool applied from file")
                            }
                            Err(err) => {
                                tracing::warn!(pool = %name, %file, error = %err, "pool file could not be applied")
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(%file, error = %err, "pool file unreadable"),
            }
        }
    }

    /// The control loop (supervised): while leading, apply the pool files and plan every
    /// snapshot; the moment leadership ends the term's work is dropped.
    pub async fn control_loop(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), String> {
        let Some(leader) = self.leader.clone() else {
            return Ok(());
        };
        while_leading(leader, shutdown, |leadership, _term| {
            let me = self.clone();
            async move {
                tracing::info!(
                    term = leadership.term(),
                    "leading the decider: following snapshots"
                );
                shoal_runtime::supervise::panic_point("control-loop");
                me.apply_pool_files().await;
                let book = {
                    let me = me.clone();
                    async move {
                        match me.provreqs.clone() {
                            Some(provreqs) => {
                                tokio::join!(
                                    me.capacity.clone().run(me.clone()),
                                    provreqs.run(me.clone())
                                );
                            }
                            None => me.capacity.clone().run(me.clone()).await,
                        }
                    }
                };
                match me.kube.clone() {
                    Some(kube) => {
                        tokio::select! {
                            _ = me.follow_snapshots() => {}
                            _ = kube.run(me.clone()) => {}
                            _ = book => {}
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = me.follow_snapshots() => {}
                            _ = book => {}
                        }
                    }
                }
                Ok(())
            }
        })
        .await
    }

    async fn follow_snapshots(&self) {
        let open = || async {
            self.metrics
                .clone()
                .watch_snapshots(WatchSnapshotsRequest { send_initial: true })
                .await
        };
        loop {
            let opened = open
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(200))
                        .with_max_delay(Duration::from_secs(5))
                        .with_jitter()
                        .without_max_times(),
                )
                .notify(|status: &tonic::Status, retry_in| {
                    self.stats
                        .stream_errors
                        .with_label_values(&["connect"])
                        .inc();
                    tracing::warn!(code = ?status.code(), message = status.message(), ?retry_in, "cannot follow snapshots");
                })
                .await;
            let Ok(stream) = opened else { continue };
            let mut stream = stream.into_inner();
            // A pool applied or changed is planned for at once, not at the next snapshot.
            let mut pools_changed = self.pools.changes();
            pools_changed.borrow_and_update();
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    changed = pools_changed.changed() => {
                        if changed.is_ok() {
                            match self.fetch_snapshot().await {
                                Ok(snapshot) => self.decide_snapshot(snapshot).await,
                                Err(status) => tracing::debug!(code = ?status.code(), "no snapshot after a pool change"),
                            }
                        } else {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        continue;
                    }
                };
                match message {
                    Ok(Some(snapshot)) => {
                        self.decide_snapshot(snapshot).await;
                    }
                    Ok(None) => {
                        self.stats.stream_errors.with_label_values(&["ended"]).inc();
                        break;
                    }
                    Err(status) => {
                        self.stats.stream_errors.with_label_values(&["error"]).inc();
                        tracing::warn!(code = ?status.code(), message = status.message(), "snapshot stream failed; reopening");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn decide_snapshot(&self, snapshot: pb::ClusterSnapshot) {
        let mut snapshot = snapshot;
        // A pool capped by its batch size gets its next batch at once, from a fresh snapshot
        // that already shows the claims just made.
        for _ in 0..10 {
            let span = tracing::info_span!("decider.decide", sequence = snapshot.sequence);
            telemetry::continue_trace(&span, &snapshot.traceparent);
            let outcome = self.decide(&snapshot, Mode::Loop).instrument(span).await;
            match outcome {
                Ok(outcome) if outcome.batch_capped && !outcome.decision.dry_run => {
                    // Let the claims land in the cache before planning again.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(500),
                        self.claims.changes().changed(),
                    )
                    .await;
                    match self.fetch_snapshot().await {
                        Ok(fresh) => snapshot = fresh,
                        Err(_) => return,
                    }
                }
                Ok(_) => return,
                Err(DecideError::NotLeader(_)) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "decision failed");
                    return;
                }
            }
        }
    }
}

/// Plans on a blocking-capable thread when the runtime allows it (planning can take
/// hundreds of milliseconds at 10k nodes).
pub(crate) fn run_planner(input: &PlanInput<'_>) -> Plan {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(|| planner::plan(input))
    } else {
        planner::plan(input)
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The pools of a YAML file (one or more `---`-separated documents), validated.
pub fn load_pool_file(path: &str) -> Result<Vec<pb::NodePool>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let docs = shoal_core::pool::PoolDocument::all_from_yaml(&text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for doc in docs {
        let name = doc.metadata.name.clone();
        let proto = doc.to_proto().map_err(|e| format!("pool {name}: {e}"))?;
        Pool::from_proto(&proto).map_err(|e| format!("pool {name}: {e}"))?;
        out.push(proto);
    }
    Ok(out)
}

/// One action, as the audit log shows it (`scale up general +2`).
fn describe_action(action: &pb::ScaleAction) -> String {
    match &action.action {
        Some(pb::scale_action::Action::ScaleUp(up)) => {
            format!("scale up {} +{}", up.pool, up.count)
        }
        Some(pb::scale_action::Action::ScaleDown(down)) => {
            format!(
                "scale down {} -{} ({})",
                down.pool,
                down.nodes.len(),
                down.nodes.join(", ")
            )
        }
        None => "nothing".into(),
    }
}
