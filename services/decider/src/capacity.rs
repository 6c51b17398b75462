//! Capacity requests: what external schedulers ask for before they admit work, with the
//! ProvisioningRequest lifecycle (`autoscaling.x-k8s.io/v1`), whether they come as
//! ProvisioningRequest resources or as `RequestCapacity` calls.
//!
//! A request is stored under `capacity/<id>` (protobuf `CapacityRequest`) and moved along by the
//! leader's [`Book::run`] loop:
//!
//! - **atomic** (`best-effort-atomic-scale-up`): planned as one batch with every other new
//!   request — their pods are the only pending ones, no cooldown or batch size applies — and a
//!   request that does not fit in full gets no node (Failed at once, with the pools' reasons;
//!   a pool backing off after failed launches is waited for until `validUntil`). The nodes
//!   packing needs are created; once the request's pods fit on Ready nodes it is Provisioned.
//! - **check-capacity**: Provisioned when its pods fit on the nodes there are, after every other
//!   booking; otherwise `Provisioned=False` (CapacityIsNotFound), checked again every second
//!   (or Failed at once with `noRetry`). Never creates nodes.
//!
//! Once Provisioned the room is *booked* for `bookingTime`: the planner places the booked pods
//! before pending ones (pending pods cannot plan on it, scale-down keeps the nodes holding it),
//! and pods annotated `…/consume-provisioning-request` consume the booking (they are not planned
//! again while pending; once running they shrink it). Then BookingExpired. A booking the
//! cluster can no longer hold (its nodes went away) is CapacityRevoked.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use shoal_core::{ClaimPhase, ValidationErrors, claim::NodeClaim, snapshot};
use shoal_proto::v1 as pb;
use shoal_state::{PrefixCache, SharedStore, StoreError, keys};

use crate::{
    control::{DecideError, Decider},
    planner::{self, Reservation},
};

/// Condition types, as ProvisioningRequest status uses them.
pub mod condition {
    /// The request was accepted and will be worked on.
    pub const ACCEPTED: &str = "Accepted";
    /// The room exists (created or found) and is booked.
    pub const PROVISIONED: &str = "Provisioned";
    /// The room cannot be had.
    pub const FAILED: &str = "Failed";
    /// The booking ran out before its pods consumed it.
    pub const BOOKING_EXPIRED: &str = "BookingExpired";
    /// The booked room went away.
    pub const CAPACITY_REVOKED: &str = "CapacityRevoked";
}

/// The upstream provisioning class names.
pub mod class_name {
    /// All pods get room or no node is created.
    pub const ATOMIC: &str = "best-effort-atomic-scale-up.autoscaling.x-k8s.io";
    /// Whether the room exists now; never creates nodes.
    pub const CHECK: &str = "check-capacity.autoscaling.x-k8s.io";
}

/// `service.capacity`: how capacity requests are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CapacitySettings {
    /// How long provisioned room stays booked for the request's pods (Cluster Autoscaler: 10m).
    #[serde(with = "humantime_serde")]
    pub booking_time: Duration,
    /// How long finished `RequestCapacity` requests stay readable (ProvisioningRequests stay
    /// until their resource is deleted).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Most requests not finished at once; more are refused (RESOURCE_EXHAUSTED).
    pub max_active: u32,
    /// Follow ProvisioningRequest resources (needs `service.kube`).
    pub provisioning_requests: bool,
}

impl Default for CapacitySettings {
    fn default() -> Self {
        CapacitySettings {
            booking_time: Duration::from_secs(600),
            retention: Duration::from_secs(3600),
            max_active: 1000,
            provisioning_requests: false,
        }
    }
}

impl CapacitySettings {
    /// Adds what is wrong to `errors`.
    pub fn validate(&self, errors: &mut ValidationErrors) {
        if self.booking_time < Duration::from_secs(1)
            || self.booking_time > Duration::from_secs(86400)
        {
            errors.add("service.capacity.bookingTime", "must be between 1s and 24h");
        }
        if self.retention < Duration::from_secs(1)
            || self.retention > Duration::from_secs(30 * 86400)
        {
            errors.add("service.capacity.retention", "must be between 1s and 30d");
        }
        if self.max_active == 0 || self.max_active > 100_000 {
            errors.add("service.capacity.maxActive", "must be between 1 and 100000");
        }
    }
}

/// Why a capacity request operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored request could not be decoded.
    #[error("{key} holds an unreadable capacity request: {reason}")]
    Corrupt {
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
    /// No such request.
    #[error("capacity request {0} not found")]
    NotFound(String),
    /// Too many requests are active.
    #[error(
        "{active} capacity requests are active (service.capacity.maxActive); retry once some finish"
    )]
    TooMany {
        /// How many.
        active: usize,
    },
    /// This replica does not lead.
    #[error("this replica does not lead the decider")]
    NotLeader,
}

/// The capacity request store and its lifecycle loop.
pub struct Book {
    pub(crate) settings: CapacitySettings,
    store: SharedStore,
    cache: PrefixCache,
    /// Serializes read-modify-write of records (the loop, submissions, cancellations).
    writer: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
    /// Bookings the control-loop plans could not place, without a break: id → (since when,
    /// pods without room in the latest plan).
    short: std::sync::Mutex<HashMap<String, (SystemTime, i64)>>,
}

/// New requests are planned once none has arrived for this long…
const BATCH_IDLE: Duration = Duration::from_millis(100);
/// …or this long after the first.
const BATCH_MAX: Duration = Duration::from_millis(500);

/// How long a request waiting for a pool (or for the provisioner) waits before it is planned
/// again.
const RETRY: Duration = Duration::from_secs(5);

/// What a capacity request is called when consuming pods name it.
fn consumer_key(r: &pb::CapacityRequest) -> (Option<&str>, &str) {
    if r.name.is_empty() {
        (None, r.id.as_str())
    } else {
        (Some(r.namespace.as_str()), r.name.as_str())
    }
}

/// Whether a class's pods consume request `r`.
fn consumes(class: &pb::PodClass, r: &pb::CapacityRequest) -> bool {
    if class.provisioning_request.is_empty() {
        return false;
    }
    match consumer_key(r) {
        (Some(ns), name) => class.namespace == ns && class.provisioning_request == name,
        (None, id) => class.provisioning_request == id,
    }
}

fn now_ts(now: SystemTime) -> prost_types::Timestamp {
    snapshot::timestamp(now)
}

fn at(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    ts.as_ref().map(snapshot::system_time)
}

/// The request's condition of `kind`, if set.
pub fn condition<'a>(r: &'a pb::CapacityRequest, kind: &str) -> Option<&'a pb::CapacityCondition> {
    r.conditions.iter().find(|c| c.r#type == kind)
}

/// Whether condition `kind` is True.
pub fn is_true(r: &pb::CapacityRequest, kind: &str) -> bool {
    condition(r, kind).is_some_and(|c| c.status == "True")
}

/// Sets a condition; the transition time moves only when the status changes.
fn set_condition(
    r: &mut pb::CapacityRequest,
    kind: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    now: SystemTime,
) {
    let status = if status { "True" } else { "False" };
    let message = message.into();
    match r.conditions.iter_mut().find(|c| c.r#type == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now_ts(now));
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
        }
        None => r.conditions.push(pb::CapacityCondition {
            r#type: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Some(now_ts(now)),
        }),
    }
}

/// Appends a line to the request's explanation (the latest 20 are kept).
fn explain(r: &mut pb::CapacityRequest, line: impl Into<String>) {
    let line = line.into();
    if r.explanation.last() == Some(&line) {
        return;
    }
    r.explanation.push(line);
    let excess = r.explanation.len().saturating_sub(20);
    r.explanation.drain(..excess);
}

/// Ends the request with `kind=True`.
fn finish(r: &mut pb::CapacityRequest, kind: &str, reason: &str, message: String, now: SystemTime) {
    explain(r, format!("{kind}: {message}"));
    set_condition(r, kind, true, reason, message, now);
    r.finished = true;
}

/// Marks a request refused before it starts (Failed with `reason`), for [`Book::submit`].
pub fn reject(r: &mut pb::CapacityRequest, reason: &str, message: String) {
    let now = SystemTime::now();
    set_condition(r, condition::ACCEPTED, false, reason, message.clone(), now);
    finish(r, condition::FAILED, reason, message, now);
}

fn is_check(r: &pb::CapacityRequest) -> bool {
    r.class == pb::CapacityClass::CheckCapacity as i32
}

/// Whether the request holds booked room (or, atomic, room being provisioned for it).
fn booked(r: &pb::CapacityRequest) -> bool {
    !r.finished
        && (is_true(r, condition::PROVISIONED) || (!is_check(r) && !r.decision_ids.is_empty()))
}

/// Total pods the request asks room for.
pub fn pod_total(r: &pb::CapacityRequest) -> i64 {
    r.pods.iter().map(|p| i64::from(p.count)).sum()
}

/// The id `RequestCapacity` gives a request: random, or derived from the requester and the
/// idempotency key so a retry finds the first one.
pub fn request_id(requester: &str, idempotency_key: &str) -> String {
    if idempotency_key.is_empty() {
        return format!("cr-{:016x}", rand::random::<u64>());
    }
    let digest = sha2::Sha256::digest(format!("{requester}\0{idempotency_key}"));
    format!("cr-{}", &hex::encode(digest)[..16])
}

/// What booked capacity means for one plan.
#[derive(Debug, Default)]
pub struct BookedNow {
    /// Booked pods still to come, per request.
    pub reserved: Vec<Reservation>,
    /// Pending classes consuming a booking.
    pub consumers: HashSet<u64>,
    /// Running pods consuming each request.
    pub consumed: HashMap<String, i64>,
}

impl Book {
    /// Starts following the stored requests.
    pub fn new(
        settings: CapacitySettings,
        store: SharedStore,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Book {
        Book {
            settings,
            cache: PrefixCache::start(store.clone(), keys::CAPACITY, shutdown),
            store,
            writer: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            short: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn decode(kv: &shoal_state::KeyValue) -> Result<pb::CapacityRequest, Error> {
        pb::CapacityRequest::decode(kv.value.as_slice()).map_err(|e| Error::Corrupt {
            key: kv.key.clone(),
            reason: e.to_string(),
        })
    }

    /// Every stored request (from the cache once it synced), oldest first.
    pub async fn all(&self) -> Result<Vec<pb::CapacityRequest>, Error> {
        let kvs = if self.cache.synced() {
            self.cache.values()
        } else {
            self.store.range(keys::CAPACITY).await?.kvs
        };
        let mut out: Vec<pb::CapacityRequest> = kvs
            .iter()
            .filter_map(|kv| match Self::decode(kv) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable capacity request");
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let t = |r: &pb::CapacityRequest| at(&r.created_at).unwrap_or(SystemTime::UNIX_EPOCH);
            t(a).cmp(&t(b)).then(a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// One request, read from the store (not the cache: a caller that just wrote sees it).
    pub async fn get(&self, id: &str) -> Result<pb::CapacityRequest, Error> {
        let kv = self
            .store
            .get(&keys::capacity_request(id))
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        Self::decode(&kv)
    }

    /// Waits (bounded) until request `id` took its first step — planned, checked, refused or
    /// finished — and returns it as it then is.
    pub async fn await_step(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<pb::CapacityRequest, Error> {
        let key = keys::capacity_request(id);
        let mut changes = self.cache.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = match self.cache.get(&key) {
                Some(kv) => Self::decode(&kv)?,
                None => self.get(id).await?,
            };
            if r.finished
                || !r.decision_ids.is_empty()
                || condition(&r, condition::PROVISIONED).is_some()
            {
                return Ok(r);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(r),
                c = changes.changed() => if c.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                },
            }
        }
    }

    /// The store the requests live in (for watchers).
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    async fn write(&self, d: &Decider, r: &mut pb::CapacityRequest) -> Result<(), Error> {
        let leadership = d.leadership().ok_or(Error::NotLeader)?;
        r.updated_at = Some(now_ts(SystemTime::now()));
        leadership
            .fenced_put(&keys::capacity_request(&r.id), r.encode_to_vec())
            .await?;
        Ok(())
    }

    /// Records a new request (Accepted) unless one with its id exists, which is returned
    /// instead. The loop plans it at once.
    pub async fn submit(
        &self,
        d: &Decider,
        mut r: pb::CapacityRequest,
    ) -> Result<pb::CapacityRequest, Error> {
        let _w = self.writer.lock().await;
        match self.get(&r.id).await {
            Ok(existing) => return Ok(existing),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let active = self.all().await?.iter().filter(|r| !r.finished).count();
        if active >= self.settings.max_active as usize {
            return Err(Error::TooMany { active });
        }
        let now = SystemTime::now();
        r.created_at = Some(now_ts(now));
        if r.valid_until.is_none()
            && !is_check(&r)
            && let Some(secs) = r
                .parameters
                .get("ValidUntilSeconds")
                .and_then(|v| v.trim().parse::<u64>().ok())
        {
            r.valid_until = Some(now_ts(now + Duration::from_secs(secs)));
        }
        if r.finished {
            // Refused before it started (invalid): recorded so its status says why.
            self.write(d, &mut r).await?;
            return Ok(r);
        }
        let pods = pod_total(&r);
        let sets = r.pods.len();
        let class = if is_check(&r) {
            class_name::CHECK
        } else {
            class_name::ATOMIC
        };
        set_condition(
            &mut r,
            condition::ACCEPTED,
            true,
            "Accepted",
            "ProvisioningRequest is accepted by Shoal",
            now,
        );
        explain(
            &mut r,
            format!("accepted: {pods} pod(s) in {sets} pod set(s), {class}"),
        );
        self.write(d, &mut r).await?;
        drop(_w);
        self.wake.notify_one();
        Ok(r)
    }

    /// Ends a request on its owner's behalf: Failed (Cancelled), booking released.
    pub async fn cancel(
        &self,
        d: &Decider,
        id: &str,
        reason: &str,
    ) -> Result<pb::CapacityRequest, Error> {
        let _w = self.writer.lock().await;
        let mut r = self.get(id).await?;
        if !r.finished {
            let why = if reason.is_empty() {
                "cancelled by its requester".to_string()
            } else {
                format!("cancelled: {reason}")
            };
            finish(
                &mut r,
                condition::FAILED,
                "Cancelled",
                why,
                SystemTime::now(),
            );
            self.write(d, &mut r).await?;
        }
        Ok(r)
    }

    /// Deletes a request (its ProvisioningRequest was deleted): its booking ends with it.
    pub async fn remove(&self, d: &Decider, id: &str) -> Result<(), Error> {
        let _w = self.writer.lock().await;
        let leadership = d.leadership().ok_or(Error::NotLeader)?;
        leadership
            .fenced_txn(shoal_state::Txn {
                compares: vec![],
                success: vec![shoal_state::TxnOp::Delete {
                    key: keys::capacity_request(id),
                }],
                failure: vec![],
            })
            .await?;
        Ok(())
    }

    /// Changes of the stored requests (for the loop and the ProvisioningRequest status writer).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cache.changes()
    }

    /// Records which bookings the last control-loop plan could not place.
    pub fn note_short(&self, planned_at: SystemTime, short: &BTreeMap<String, i64>) {
        let mut known = self.short.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|id, _| short.contains_key(id));
        for (id, missing) in short {
            let entry = known.entry(id.clone()).or_insert((planned_at, *missing));
            entry.1 = *missing;
        }
    }

    /// What the booked requests mean for a plan of `snapshot`: reservations (minus pods that
    /// already consume them), consuming pending classes, consumption counts. `except` is left
    /// out (its pods are the pending ones of the plan).
    pub fn booked_now(
        requests: &[pb::CapacityRequest],
        snapshot: &pb::ClusterSnapshot,
        claims: &[NodeClaim],
        except: &HashSet<String>,
    ) -> BookedNow {
        let mut out = BookedNow::default();
        let active: Vec<&pb::CapacityRequest> = requests
            .iter()
            .filter(|r| !r.finished && !except.contains(&r.id))
            .collect();
        if active.is_empty() {
            return out;
        }
        let consuming: Vec<&pb::PodClass> = snapshot
            .classes
            .iter()
            .filter(|c| !c.provisioning_request.is_empty())
            .collect();
        let claim_by_id: HashMap<&str, &NodeClaim> =
            claims.iter().map(|c| (c.id.as_str(), c)).collect();
        for r in active {
            let classes: HashSet<u64> = consuming
                .iter()
                .filter(|c| consumes(c, r))
                .map(|c| c.id)
                .collect();
            if classes.is_empty() && !booked(r) {
                continue;
            }
            let mut consumed: i64 = 0;
            if !classes.is_empty() {
                for n in &snapshot.nodes {
                    consumed += n
                        .pods
                        .iter()
                        .filter(|c| classes.contains(&c.class_id))
                        .map(|c| i64::from(c.count))
                        .sum::<i64>();
                }
                out.consumed.insert(r.id.clone(), consumed);
            }
            if !booked(r) {
                continue;
            }
            // Pending consumers are coming to the booked room: not planned again.
            out.consumers.extend(classes.iter().copied());
            let mut left = consumed;
            let pods: Vec<(pb::PodClass, i64)> = r
                .pods
                .iter()
                .filter_map(|item| {
                    let count = i64::from(item.count);
                    let used = left.min(count);
                    left -= used;
                    (count > used).then(|| (item.pod.clone().unwrap_or_default(), count - used))
                })
                .collect();
            if pods.is_empty() {
                continue;
            }
            let own: Vec<&NodeClaim> = r
                .claim_ids
                .iter()
                .filter_map(|id| claim_by_id.get(id.as_str()).copied())
                .collect();
            let mut pools: Vec<String> = own.iter().map(|c| c.pool.clone()).collect();
            pools.sort();
            pools.dedup();
            out.reserved.push(Reservation {
                id: r.id.clone(),
                pods,
                nodes: own
                    .iter()
                    .filter(|c| !c.node_name.is_empty())
                    .map(|c| c.node_name.clone())
                    .collect(),
                pools,
            });
        }
        out
    }

    /// The bookings a control-loop plan of `snapshot` must respect.
    pub async fn for_loop(
        &self,
        snapshot: &pb::ClusterSnapshot,
        claims: &[NodeClaim],
    ) -> BookedNow {
        match self.all().await {
            Ok(requests) => Self::booked_now(&requests, snapshot, claims, &HashSet::new()),
            Err(e) => {
                tracing::warn!(error = %e, "capacity requests unreadable: planning without bookings");
                BookedNow::default()
            }
        }
    }

    /// The lifecycle loop (leader only): moves every active request along whenever a request,
    /// a claim or a second passes.
    pub async fn run(self: Arc<Self>, decider: Arc<Decider>) {
        let mut claims = decider.claims.changes();
        let mut last_gc = tokio::time::Instant::now();
        loop {
            let woken = self.wake.notified();
            if let Err(e) = self.tick(&decider).await {
                tracing::warn!(error = %e, "capacity requests: tick failed; retrying");
            }
            if last_gc.elapsed() > Duration::from_secs(10) {
                last_gc = tokio::time::Instant::now();
                self.collect_garbage(&decider).await;
            }
            tokio::select! {
                _ = woken => {
                    // A request arrived: let the ones sent with it join its batch (one packing
                    // of all their pods), for at most BATCH_MAX.
                    let deadline = tokio::time::Instant::now() + BATCH_MAX;
                    loop {
                        tokio::select! {
                            _ = self.wake.notified() => if tokio::time::Instant::now() >= deadline { break },
                            _ = tokio::time::sleep(BATCH_IDLE) => break,
                        }
                    }
                }
                _ = claims.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Deletes finished `RequestCapacity` requests past the retention time.
    async fn collect_garbage(&self, d: &Decider) {
        let Ok(all) = self.all().await else { return };
        let now = SystemTime::now();
        let old: Vec<String> = all
            .iter()
            .filter(|r| r.finished && r.name.is_empty())
            .filter(|r| at(&r.updated_at).is_some_and(|t| t + self.settings.retention < now))
            .map(|r| keys::capacity_request(&r.id))
            .collect();
        if old.is_empty() {
            return;
        }
        let Some(leadership) = d.leadership() else {
            return;
        };
        if let Err(e) =
            shoal_state::records::delete_in_chunks(&self.store, Some(&leadership), &old).await
        {
            tracing::warn!(error = %e, "cannot delete finished capacity requests yet");
        }
    }

    async fn tick(&self, d: &Decider) -> Result<(), TickError> {
        let _w = self.writer.lock().await;
        let all = self.all().await?;
        if all.iter().all(|r| r.finished) {
            return Ok(());
        }
        let now = SystemTime::now();
        let mut changed: BTreeMap<String, pb::CapacityRequest> = BTreeMap::new();
        // Time alone: bookings and validity run out.
        for r in all.iter().filter(|r| !r.finished) {
            let mut r = r.clone();
            if is_true(&r, condition::PROVISIONED) && at(&r.booked_until).is_some_and(|t| t <= now)
            {
                finish(
                    &mut r,
                    condition::BOOKING_EXPIRED,
                    "CapacityReservationTimeExpired",
                    "Capacity reservation time is expired".into(),
                    now,
                );
                changed.insert(r.id.clone(), r);
            } else if !is_true(&r, condition::PROVISIONED)
                && at(&r.valid_until).is_some_and(|t| t <= now)
            {
                finish(
                    &mut r,
                    condition::FAILED,
                    "Expired",
                    "not provisioned within its validUntilSeconds".into(),
                    now,
                );
                changed.insert(r.id.clone(), r);
            }
        }
        let current = |all: &[pb::CapacityRequest],
                       changed: &BTreeMap<String, pb::CapacityRequest>|
         -> Vec<pb::CapacityRequest> {
            all.iter()
                .map(|r| changed.get(&r.id).cloned().unwrap_or_else(|| r.clone()))
                .collect()
        };
        let state = current(&all, &changed);
        let snapshot = match d.fetch_snapshot().await {
            Ok(snapshot) => snapshot,
            Err(status) => {
                // Expiries need no snapshot: keep them while the metrics service is away.
                for (_, mut r) in changed {
                    self.write(d, &mut r).await?;
                }
                return Err(TickError::Metrics(status));
            }
        };
        let claims = d.claims_now().await.map_err(DecideError::from)?;
        let by_id: HashMap<&str, &NodeClaim> = claims.iter().map(|c| (c.id.as_str(), c)).collect();

        // Atomic requests that need a plan: new ones, and those whose nodes failed.
        let mut batch: Vec<pb::CapacityRequest> = Vec::new();
        for r in state.iter().filter(|r| !r.finished && !is_check(r)) {
            if is_true(r, condition::PROVISIONED) {
                continue;
            }
            let gone = |id: &String| {
                by_id.get(id.as_str()).is_none_or(|c| {
                    matches!(
                        c.phase,
                        ClaimPhase::Failed
                            | ClaimPhase::Draining
                            | ClaimPhase::Terminating
                            | ClaimPhase::Deleted
                    )
                })
            };
            let failed = r.claim_ids.iter().any(gone);
            let retry_due = condition(r, condition::PROVISIONED).is_some_and(|c| {
                matches!(
                    c.reason.as_str(),
                    "WaitingForPools" | "FailedToScaleUp" | "WaitingForRoom"
                )
            }) && at(&r.updated_at).is_some_and(|t| t + RETRY <= now);
            if condition(r, condition::PROVISIONED).is_none() || failed || retry_due {
                let mut r = r.clone();
                if failed {
                    let lost: Vec<String> =
                        r.claim_ids.iter().filter(|id| gone(id)).cloned().collect();
                    r.claim_ids.retain(|id| !gone(id));
                    explain(
                        &mut r,
                        format!(
                            "node(s) of claim(s) {} failed or went away: planning again",
                            lost.join(", ")
                        ),
                    );
                }
                batch.push(r);
            }
        }
        if !batch.is_empty() {
            let planned = d.plan_capacity(&snapshot, &batch, &state).await?;
            for (mut r, verdict) in batch.into_iter().zip(planned) {
                apply_verdict(&mut r, verdict, now);
                changed.insert(r.id.clone(), r);
            }
        }

        // Which requests' room is there now: check-capacity ones not provisioned yet, and
        // atomic ones whose nodes are all Ready.
        let state = current(&all, &changed);
        // Atomic requests with nodes of their own: provisioned once those are Ready and usable
        // (the plan that made them placed the pods there).
        let usable: HashSet<&str> = snapshot
            .nodes
            .iter()
            .filter(|n| n.readiness == pb::NodeReadiness::Ready as i32 && !n.unschedulable)
            .map(|n| n.name.as_str())
            .collect();
        let planned = |r: &&pb::CapacityRequest| {
            !r.finished
                && !is_check(r)
                && !is_true(r, condition::PROVISIONED)
                && !r.decision_ids.is_empty()
        };
        let up: Vec<pb::CapacityRequest> = state
            .iter()
            .filter(planned)
            .filter(|r| {
                !r.claim_ids.is_empty()
                    && r.claim_ids.iter().all(|id| {
                        by_id.get(id.as_str()).is_some_and(|c| {
                            c.phase == ClaimPhase::Ready && usable.contains(c.node_name.as_str())
                        })
                    })
            })
            .cloned()
            .collect();
        for mut r in up {
            mark_provisioned(&mut r, now, self.settings.booking_time);
            changed.insert(r.id.clone(), r);
        }
        // Check-capacity requests, and atomic ones planned onto room that existed or was booting
        // for others: provisioned once their pods fit on usable nodes after every booking.
        let state = current(&all, &changed);
        let candidates: Vec<&pb::CapacityRequest> = state
            .iter()
            .filter(|r| !r.finished && !is_true(r, condition::PROVISIONED))
            .filter(|r| is_check(r) || (planned(r) && r.claim_ids.is_empty()))
            .collect();
        if !candidates.is_empty() {
            let except: HashSet<String> = candidates.iter().map(|r| r.id.clone()).collect();
            let others = Self::booked_now(&state, &snapshot, &claims, &except);
            let asks: Vec<Reservation> = candidates
                .iter()
                .map(|r| {
                    let mine = Self::booked_now(
                        std::slice::from_ref(&force_booked(r)),
                        &snapshot,
                        &claims,
                        &HashSet::new(),
                    );
                    mine.reserved.into_iter().next().unwrap_or(Reservation {
                        id: r.id.clone(),
                        ..Default::default()
                    })
                })
                .collect();
            let missing = d
                .room_now(&snapshot, &claims, &others.reserved, &asks)
                .await?;
            for (r, missing) in candidates.into_iter().zip(missing) {
                let mut r = r.clone();
                let total = pod_total(&r);
                if missing == 0 {
                    mark_provisioned(&mut r, now, self.settings.booking_time);
                    changed.insert(r.id.clone(), r);
                } else if !is_check(&r) {
                    // Its nodes are Ready, yet its pods do not all fit on them (another
                    // request's plan took part of the room): planned again after RETRY.
                    let message = format!(
                        "{missing} of {total} pod(s) find no room on the Ready nodes yet; planning again if that lasts"
                    );
                    set_condition(
                        &mut r,
                        condition::PROVISIONED,
                        false,
                        "WaitingForRoom",
                        message,
                        now,
                    );
                    if changed_from(&all, &r) {
                        changed.insert(r.id.clone(), r);
                    }
                } else {
                    let message =
                        format!("{missing} of {total} pod(s) find no room on the nodes there are");
                    if no_retry(&r) {
                        finish(
                            &mut r,
                            condition::FAILED,
                            "CapacityIsNotFound",
                            message,
                            now,
                        );
                    } else {
                        explain(&mut r, format!("not provisioned: {message}"));
                        set_condition(
                            &mut r,
                            condition::PROVISIONED,
                            false,
                            "CapacityIsNotFound",
                            message,
                            now,
                        );
                    }
                    if changed_from(&all, &r) {
                        changed.insert(r.id.clone(), r);
                    }
                }
            }
        }

        // Provisioned ones: consumption, and room the last plan could not hold.
        let state = current(&all, &changed);
        let booked = Self::booked_now(&state, &snapshot, &claims, &HashSet::new());
        let short = self.short.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for r in state.iter().filter(|r| !r.finished) {
            let mut r = r.clone();
            let consumed = booked.consumed.get(&r.id).copied().unwrap_or(0) as i32;
            let mut dirty = false;
            if consumed > r.consumed {
                explain(&mut r, format!("{consumed} pod(s) consume the booking"));
                r.consumed = consumed;
                dirty = true;
            }
            let provisioned_at = condition(&r, condition::PROVISIONED)
                .filter(|c| c.status == "True")
                .and_then(|c| at(&c.last_transition_time));
            if let Some(since) = provisioned_at
                && let Some(why) = revoked(&r, since, &by_id, short.get(&r.id), now)
            {
                finish(
                    &mut r,
                    condition::CAPACITY_REVOKED,
                    "CapacityRevoked",
                    why,
                    now,
                );
                dirty = true;
            }
            if dirty {
                changed.insert(r.id.clone(), r);
            }
        }
        for (_, mut r) in changed {
            self.write(d, &mut r).await?;
        }
        Ok(())
    }
}

/// Provisioned=True, booked for `booking` from `now`.
fn mark_provisioned(r: &mut pb::CapacityRequest, now: SystemTime, booking: Duration) {
    let until = now + booking;
    r.booked_until = Some(now_ts(until));
    let (reason, message) = if is_check(r) {
        (
            "CapacityIsFound",
            "Capacity is found in the cluster".to_string(),
        )
    } else {
        let nodes: i32 = r.nodes_per_pool.values().sum();
        (
            "CapacityIsProvisioned",
            format!("Capacity is provisioned: {nodes} new node(s) are Ready"),
        )
    };
    set_condition(
        r,
        condition::PROVISIONED,
        true,
        reason,
        message.clone(),
        now,
    );
    explain(
        r,
        format!(
            "{message}; {} pod(s) booked until {}",
            pod_total(r),
            humantime::format_rfc3339_seconds(until)
        ),
    );
}

/// How long the control loop must find a check-capacity booking without room before it is
/// revoked (a plan places bookings first-fit, which may briefly miss a packing that exists).
const REVOKE_AFTER: Duration = Duration::from_secs(10);

/// Why a request provisioned at `since` lost its room, if it did: an atomic request's nodes went
/// away; a check-capacity booking found no room in the control loop's plans for
/// [`REVOKE_AFTER`] (`short`: since when, and how many pods).
fn revoked(
    r: &pb::CapacityRequest,
    since: SystemTime,
    claims: &HashMap<&str, &NodeClaim>,
    short: Option<&(SystemTime, i64)>,
    now: SystemTime,
) -> Option<String> {
    if !is_check(r) {
        let lost: Vec<&str> = r
            .claim_ids
            .iter()
            .filter(|id| {
                claims.get(id.as_str()).is_none_or(|c| {
                    matches!(
                        c.phase,
                        ClaimPhase::Failed
                            | ClaimPhase::Draining
                            | ClaimPhase::Terminating
                            | ClaimPhase::Deleted
                    )
                })
            })
            .map(String::as_str)
            .collect();
        return (!lost.is_empty()).then(|| {
            format!(
                "booked node(s) went away (claims {}) before the pods consumed them",
                lost.join(", ")
            )
        });
    }
    let (first, missing) = short?;
    (*first > since && *first + REVOKE_AFTER <= now).then(|| {
        format!("{missing} booked pod(s) no longer fit the nodes there are (nodes went away or were taken)")
    })
}

/// Whether `r` differs from its stored version (conditions and explanation aside from times).
fn changed_from(all: &[pb::CapacityRequest], r: &pb::CapacityRequest) -> bool {
    all.iter().find(|s| s.id == r.id).is_none_or(|s| {
        s.finished != r.finished
            || s.explanation != r.explanation
            || s.conditions
                .iter()
                .map(|c| (&c.r#type, &c.status, &c.reason, &c.message))
                .ne(r
                    .conditions
                    .iter()
                    .map(|c| (&c.r#type, &c.status, &c.reason, &c.message)))
    })
}

/// `r` as if booked (to reserve its pods in a what-if).
fn force_booked(r: &pb::CapacityRequest) -> pb::CapacityRequest {
    let mut r = r.clone();
    set_condition(
        &mut r,
        condition::PROVISIONED,
        true,
        "",
        "",
        SystemTime::UNIX_EPOCH,
    );
    r
}

/// What planning decided for one atomic request.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Room is planned: the decision, the nodes added per pool (for the whole batch), the
    /// claims created, and how its own pods were placed.
    Planned {
        /// Decision id.
        decision: String,
        /// New nodes per pool in the decision.
        nodes: BTreeMap<String, i32>,
        /// Claims created by the decision.
        claims: Vec<String>,
        /// How this request's pods were placed.
        placement: String,
        /// Requests sharing the decision.
        batch: usize,
    },
    /// It cannot fit: the decision recording it, and why (no node is created for it).
    Refused(String, String),
    /// It cannot fit yet (a pool backs off after failed launches): why.
    Waiting(String),
    /// Planning failed (the provisioner refused): why; retried.
    Error(String),
}

fn apply_verdict(r: &mut pb::CapacityRequest, verdict: Verdict, now: SystemTime) {
    match verdict {
        Verdict::Planned {
            decision,
            nodes,
            claims,
            placement,
            batch,
        } => {
            let added: i32 = nodes.values().sum();
            let pools = nodes
                .iter()
                .map(|(p, n)| format!("{p} +{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let with = if batch > 1 {
                format!(" (planned with {} other request(s))", batch - 1)
            } else {
                String::new()
            };
            explain(
                r,
                format!(
                    "decision {decision}: {placement}; new nodes: {}{with}",
                    if added == 0 { "none".into() } else { pools }
                ),
            );
            for (p, n) in nodes {
                *r.nodes_per_pool.entry(p).or_default() += n;
            }
            r.claim_ids.extend(claims);
            r.decision_ids.push(decision);
            let excess = r.decision_ids.len().saturating_sub(20);
            r.decision_ids.drain(..excess);
            set_condition(
                r,
                condition::PROVISIONED,
                false,
                "Provisioning",
                if added == 0 {
                    "the room exists; waiting until it is usable".to_string()
                } else {
                    format!("waiting for {added} new node(s) to be Ready")
                },
                now,
            );
        }
        Verdict::Refused(decision, why) => {
            r.decision_ids.push(decision.clone());
            finish(
                r,
                condition::FAILED,
                "CapacityIsNotFound",
                format!("{why} (decision {decision})"),
                now,
            )
        }
        Verdict::Waiting(why) => {
            explain(r, format!("waiting: {why}"));
            set_condition(
                r,
                condition::PROVISIONED,
                false,
                "WaitingForPools",
                why,
                now,
            );
        }
        Verdict::Error(why) => {
            explain(r, format!("retrying: {why}"));
            set_condition(
                r,
                condition::PROVISIONED,
                false,
                "FailedToScaleUp",
                why,
                now,
            );
        }
    }
}

/// Why a tick failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TickError {
    #[error(transparent)]
    Book(#[from] Error),
    #[error(transparent)]
    Decide(#[from] DecideError),
    #[error("the metrics service did not answer: {}", .0.message())]
    Metrics(tonic::Status),
}

impl From<StoreError> for TickError {
    fn from(e: StoreError) -> Self {
        TickError::Book(Error::Store(e))
    }
}

/// `parameters.noRetry: "true"`: a check-capacity request without room fails at once.
fn no_retry(r: &pb::CapacityRequest) -> bool {
    r.parameters
        .get("noRetry")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The planner's side: what the pods of a batch of requests look like as pending pods.
pub(crate) fn request_snapshot(
    snapshot: &pb::ClusterSnapshot,
    batch: &[pb::CapacityRequest],
) -> (pb::ClusterSnapshot, Vec<Vec<u64>>) {
    let mut snap = pb::ClusterSnapshot {
        pending: Vec::new(),
        ..snapshot.clone()
    };
    let mut next = snap.classes.iter().map(|c| c.id).max().unwrap_or(0) + 1;
    let long_ago = snapshot::timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1));
    let mut ids = Vec::with_capacity(batch.len());
    for r in batch {
        let mut mine = Vec::new();
        for item in &r.pods {
            let mut class = item.pod.clone().unwrap_or_default();
            class.id = next;
            next += 1;
            if class.namespace.is_empty() {
                class.namespace = if r.namespace.is_empty() {
                    "external".into()
                } else {
                    r.namespace.clone()
                };
            }
            if class.owner.is_none() {
                class.owner = Some(pb::OwnerRef {
                    kind: "CapacityRequest".into(),
                    name: r.id.clone(),
                });
            }
            snap.pending.push(pb::PendingPods {
                class_id: class.id,
                count: item.count,
                unschedulable_since: Some(long_ago),
                scheduler_message: format!("capacity request {} by {}", r.id, r.requester),
            });
            mine.push(class.id);
            snap.classes.push(class);
        }
        ids.push(mine);
    }
    (snap, ids)
}

/// Why the pods of `classes` did not all fit, from a plan's outcomes (None: they all did).
pub(crate) fn refusal(decision: &pb::Decision, classes: &[u64]) -> Option<(String, bool)> {
    let mut unplaced = 0;
    let mut total = 0;
    let mut why: Vec<String> = Vec::new();
    let mut transient = false;
    for o in decision
        .outcomes
        .iter()
        .filter(|o| classes.contains(&o.class_id))
    {
        total += o.count;
        if o.unplaced == 0 {
            continue;
        }
        unplaced += o.unplaced;
        for v in &o.verdicts {
            if v.reason.contains("backing off") {
                transient = true;
            }
            let line = format!("pool {}: {}", v.pool, v.reason);
            if !why.contains(&line) {
                why.push(line);
            }
        }
    }
    (unplaced > 0).then(|| {
        let reasons = if why.is_empty() {
            "no pool can host them".to_string()
        } else {
            why.join("; ")
        };
        (
            format!("{unplaced} of {total} pod(s) fit no pool, so no node is created: {reasons}"),
            transient,
        )
    })
}

/// How a request's pods were placed, from a plan's outcomes.
pub(crate) fn placement(decision: &pb::Decision, classes: &[u64]) -> String {
    let mut existing = 0;
    let mut new: BTreeMap<String, i32> = BTreeMap::new();
    for o in decision
        .outcomes
        .iter()
        .filter(|o| classes.contains(&o.class_id))
    {
        existing += o.placed_existing;
        for (p, n) in &o.placed_new {
            *new.entry(p.clone()).or_default() += n;
        }
    }
    let mut parts = Vec::new();
    if existing > 0 {
        parts.push(format!("{existing} pod(s) on existing or booting nodes"));
    }
    for (p, n) in new {
        parts.push(format!("{n} pod(s) on new nodes of pool {p}"));
    }
    if parts.is_empty() {
        "nothing to place".into()
    } else {
        parts.join(", ")
    }
}

/// Validation of a request's pod sets, with field paths under `prefix`.
pub fn validate_pods(
    items: &[pb::CapacityRequestItem],
    prefix: &str,
    errors: &mut ValidationErrors,
) {
    if items.is_empty() {
        errors.add(prefix, "must list at least one pod set");
    }
    if items.len() > 32 {
        errors.add(
            prefix,
            format!("{} pod sets; at most 32 in one request", items.len()),
        );
    }
    for (i, item) in items.iter().enumerate() {
        if item.count <= 0 || item.count > 10_000 {
            errors.add(
                format!("{prefix}[{i}].count"),
                format!("{} is not between 1 and 10000", item.count),
            );
        }
        let requests = item
            .pod
            .as_ref()
            .and_then(|p| p.requests.clone())
            .unwrap_or_default();
        if requests.cpu_millis < 0 || requests.memory_bytes < 0 {
            errors.add(
                format!("{prefix}[{i}].pod.requests"),
                "must not be negative",
            );
        } else if requests.cpu_millis == 0 && requests.memory_bytes == 0 {
            errors.add(
                format!("{prefix}[{i}].pod.requests"),
                "must request some cpu or memory",
            );
        }
    }
}

impl BookedNow {
    /// These bookings for a plan (`request`: see [`planner::Bookings::request`]).
    pub fn bookings(&self, request: bool) -> planner::Bookings<'_> {
        planner::Bookings {
            reserved: &self.reserved,
            consumers: Some(&self.consumers),
            request,
        }
    }
}

/// The decider's planning entry points for capacity requests.
impl Decider {
    /// Plans one batch of atomic requests (see the module docs) and carries the plan out.
    pub(crate) async fn plan_capacity(
        &self,
        snapshot: &pb::ClusterSnapshot,
        batch: &[pb::CapacityRequest],
        all: &[pb::CapacityRequest],
    ) -> Result<Vec<Verdict>, DecideError> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
        // Requests that do not fit are refused and the rest planned again without them, so a
        // refused request never gets a node and never holds another's.
        for _ in 0..4 {
            let live: Vec<usize> = (0..batch.len())
                .filter(|i| verdicts[*i].is_none())
                .collect();
            if live.is_empty() {
                break;
            }
            let members: Vec<pb::CapacityRequest> =
                live.iter().map(|i| batch[*i].clone()).collect();
            let (snap, classes) = request_snapshot(snapshot, &members);
            let except: HashSet<String> = members.iter().map(|r| r.id.clone()).collect();
            let claims = self.claims_now().await?;
            let booked = Book::booked_now(all, snapshot, &claims, &except);
            let preview = self.plan_for_requests(&snap, &booked, &claims).await?;
            let mut refused_any = false;
            for (k, i) in live.iter().enumerate() {
                if let Some((why, transient)) = refusal(&preview.decision, &classes[k]) {
                    refused_any = true;
                    verdicts[*i] = Some(if transient {
                        Verdict::Waiting(why)
                    } else {
                        // Recorded as a decision too: GetDecision shows each pool's verdict.
                        let r = &members[k];
                        let outcomes = preview
                            .decision
                            .outcomes
                            .iter()
                            .filter(|o| classes[k].contains(&o.class_id))
                            .cloned()
                            .collect();
                        let reasons = vec![format!(
                            "capacity request {} ({}) refused: {why}",
                            r.id, r.requester
                        )];
                        let id = self
                            .record_refusal(reasons, outcomes, snapshot.sequence)
                            .await?;
                        Verdict::Refused(id, why)
                    });
                }
            }
            if refused_any {
                continue;
            }
            // Everyone left fits: record and carry out the plan.
            let requesters: Vec<String> = members
                .iter()
                .map(|r| format!("{} ({})", r.id, r.requester))
                .collect();
            let outcome = self
                .decide_with(
                    &snap,
                    crate::control::Mode::Capacity {
                        requester: requesters.join(", "),
                    },
                    &booked,
                    true,
                )
                .await?;
            let mut nodes: BTreeMap<String, i32> = BTreeMap::new();
            for a in &outcome.decision.actions {
                if let Some(pb::scale_action::Action::ScaleUp(up)) = &a.action {
                    *nodes.entry(up.pool.clone()).or_default() += up.count;
                }
            }
            let refused_now: Vec<usize> = live
                .iter()
                .enumerate()
                .filter(|(k, _)| refusal(&outcome.decision, &classes[*k]).is_some())
                .map(|(_, i)| *i)
                .collect();
            for (k, i) in live.iter().enumerate() {
                verdicts[*i] = Some(if outcome.decision.dry_run {
                    Verdict::Error(format!(
                        "decision {} was not carried out (paused or dry run)",
                        outcome.decision.id
                    ))
                } else if !refused_now.is_empty() {
                    // The cluster changed between the preview and the decision.
                    Verdict::Error("the cluster changed while planning; planning again".into())
                } else if !outcome.executed {
                    Verdict::Error(format!(
                        "the provisioner refused decision {}'s scale-up; retrying",
                        outcome.decision.id
                    ))
                } else {
                    Verdict::Planned {
                        decision: outcome.decision.id.clone(),
                        nodes: nodes.clone(),
                        claims: outcome.claims.clone(),
                        placement: placement(&outcome.decision, &classes[k]),
                        batch: live.len(),
                    }
                });
            }
            break;
        }
        Ok(verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Verdict::Error("not planned yet".into())))
            .collect())
    }

    /// A what-if plan of the requests' pods (nothing recorded).
    async fn plan_for_requests(
        &self,
        snap: &pb::ClusterSnapshot,
        booked: &BookedNow,
        claims: &[NodeClaim],
    ) -> Result<planner::Plan, DecideError> {
        let pools = self.pools_now().await?;
        let history = self.history_now().await?;
        let input = planner::PlanInput {
            snapshot: snap,
            pools: &pools,
            claims,
            history: &history,
            now: SystemTime::now(),
            expanders: &self.settings.expanders,
            seed: snap.sequence,
            packing_budget: self.settings.packing_budget,
            backoff: self.settings.failure_backoff,
            bookings: booked.bookings(true),
        };
        Ok(crate::control::run_planner(&input))
    }

    /// Per ask, how many of its pods find no room on usable nodes after `others` are booked
    /// (see [`planner::bookings::room_now`]).
    pub(crate) async fn room_now(
        &self,
        snapshot: &pb::ClusterSnapshot,
        claims: &[NodeClaim],
        others: &[Reservation],
        asks: &[Reservation],
    ) -> Result<Vec<i64>, DecideError> {
        let pools = self.pools_now().await?;
        let history = self.history_now().await?;
        let input = planner::PlanInput {
            snapshot,
            pools: &pools,
            claims,
            history: &history,
            now: SystemTime::now(),
            expanders: &self.settings.expanders,
            seed: snapshot.sequence,
            packing_budget: Duration::ZERO,
            backoff: self.settings.failure_backoff,
            bookings: planner::Bookings {
                reserved: others,
                consumers: None,
                request: false,
            },
        };
        Ok(planner::bookings::room_now(&input, asks))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn class(id: u64, consumes: &str) -> pb::PodClass {
        pb::PodClass {
            id,
            namespace: "ml".into(),
            provisioning_request: consumes.into(),
            requests: Some(pb::Resources {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn provisioned(name: &str, count: i32, claims: &[&str]) -> pb::CapacityRequest {
        let mut r = pb::CapacityRequest {
            id: format!("pr-{name}"),
            namespace: "ml".into(),
            name: name.into(),
            pods: vec![pb::CapacityRequestItem {
                pod: Some(class(0, "")),
                count,
            }],
            claim_ids: claims.iter().map(|c| c.to_string()).collect(),
            decision_ids: vec!["d1".into()],
            ..Default::default()
        };
        set_condition(
            &mut r,
            condition::PROVISIONED,
            true,
            "CapacityIsProvisioned",
            "",
            SystemTime::UNIX_EPOCH + Duration::from_secs(100),
        );
        r
    }

    fn claim(id: &str, node: &str, phase: ClaimPhase) -> NodeClaim {
        NodeClaim {
            version: 1,
            id: id.into(),
            pool: "general".into(),
            phase,
            backend: "sim".into(),
            instance_id: String::new(),
            node_name: node.into(),
            operation_id: "op".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            failure_reason: String::new(),
            history: vec![],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn running_consumers_shrink_the_booking_and_pending_ones_are_not_planned() {
        // job-a booked 5 pods: 2 run (class 1 on a node), 1 is pending (class 2); pods of
        // another namespace naming the same request do not count.
        let snapshot = pb::ClusterSnapshot {
            classes: vec![
                class(1, "job-a"),
                class(2, "job-a"),
                pb::PodClass {
                    namespace: "other".into(),
                    ..class(3, "job-a")
                },
            ],
            nodes: vec![pb::NodeInfo {
                name: "n-1".into(),
                pods: vec![
                    pb::ClassCount {
                        class_id: 1,
                        count: 2,
                    },
                    pb::ClassCount {
                        class_id: 3,
                        count: 4,
                    },
                ],
                ..Default::default()
            }],
            pending: vec![pb::PendingPods {
                class_id: 2,
                count: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let requests = [provisioned("job-a", 5, &["c-1"])];
        let claims = [claim("c-1", "n-1", ClaimPhase::Ready)];
        let booked = Book::booked_now(&requests, &snapshot, &claims, &HashSet::new());
        assert_eq!(booked.consumed.get("pr-job-a"), Some(&2));
        assert!(booked.consumers.contains(&2) && !booked.consumers.contains(&3));
        assert_eq!(booked.reserved.len(), 1);
        assert_eq!(booked.reserved[0].pods[0].1, 3, "5 booked, 2 running");
        assert_eq!(booked.reserved[0].nodes, ["n-1"], "its own node first");

        // Finished requests book nothing.
        let mut done = requests[0].clone();
        done.finished = true;
        let none = Book::booked_now(&[done], &snapshot, &claims, &HashSet::new());
        assert!(none.reserved.is_empty() && none.consumers.is_empty());
    }

    #[test]
    fn room_is_revoked_when_an_atomic_requests_node_goes_or_a_check_stays_short() {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let now = since + Duration::from_secs(60);
        let atomic = provisioned("job-a", 4, &["c-1", "c-2"]);
        let ready = [
            claim("c-1", "n-1", ClaimPhase::Ready),
            claim("c-2", "n-2", ClaimPhase::Ready),
        ];
        let by_id = |claims: &[NodeClaim]| -> Vec<(String, NodeClaim)> {
            claims.iter().map(|c| (c.id.clone(), c.clone())).collect()
        };
        let owned = by_id(&ready);
        let map: HashMap<&str, &NodeClaim> = owned.iter().map(|(k, v)| (k.as_str(), v)).collect();
        assert_eq!(revoked(&atomic, since, &map, None, now), None);
        let one_gone = [
            ready[0].clone(),
            claim("c-2", "n-2", ClaimPhase::Terminating),
        ];
        let owned = by_id(&one_gone);
        let map: HashMap<&str, &NodeClaim> = owned.iter().map(|(k, v)| (k.as_str(), v)).collect();
        assert!(
            revoked(&atomic, since, &map, None, now).is_some_and(|why| why.contains("c-2")),
            "a booked node went away"
        );

        let mut check = provisioned("probe", 1, &[]);
        check.class = pb::CapacityClass::CheckCapacity as i32;
        let empty = HashMap::new();
        let briefly = (now - Duration::from_secs(2), 1);
        let long = (since + Duration::from_secs(5), 1);
        let before = (since - Duration::from_secs(5), 1);
        assert_eq!(
            revoked(&check, since, &empty, Some(&briefly), now),
            None,
            "a blip"
        );
        assert_eq!(
            revoked(&check, since, &empty, Some(&before), now),
            None,
            "short before it was provisioned"
        );
        assert!(revoked(&check, since, &empty, Some(&long), now).is_some());
    }

    #[test]
    fn ids_are_stable_for_one_requester_and_key() {
        assert_eq!(request_id("ci", "build-1"), request_id("ci", "build-1"));
        assert_ne!(request_id("ci", "build-1"), request_id("other", "build-1"));
        assert_ne!(request_id("ci", ""), request_id("ci", ""));
        assert!(request_id("ci", "k").starts_with("cr-"));
    }
}
