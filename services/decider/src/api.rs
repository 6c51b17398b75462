//! gRPC handlers of `shoal.v1.DeciderService` and `shoal.v1.PoolService`: decode, validate,
//! call the decider core or the store, encode. Errors map to status codes in one place.

use std::{pin::Pin, sync::Arc, time::SystemTime};

use futures::StreamExt;
use shoal_core::{ValidationErrors, claim::NodeClaim, pool::Pool, snapshot};
use shoal_proto::v1::{
    self as pb, ApplyPoolRequest, DeciderStatus, Decision, DeletePoolRequest, DeletePoolResponse,
    EvaluateRequest, GetDeciderStatusRequest, GetDecisionRequest, GetPoolRequest,
    ListDecisionsRequest, ListDecisionsResponse, ListPoolsRequest, ListPoolsResponse, NodePool,
    PauseRequest, RequestCapacityRequest, RequestCapacityResponse, ResumeRequest,
    WatchDecisionsRequest, apply_pool_request::Source, decider_service_server::DeciderService,
    pool_service_server::PoolService,
};
use shoal_runtime::{Upstream, describe_leadership, invalid_argument, status_from_store};
use shoal_state::{EventKind, keys};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    capacity,
    control::{DecideError, Decider},
    store::{self, PauseRecord},
};

impl From<store::Error> for Status {
    fn from(err: store::Error) -> Status {
        match &err {
            store::Error::Store(e) => status_from_store(e),
            store::Error::Corrupt { .. } => Status::data_loss(err.to_string()),
            store::Error::Invalid(errors) => invalid_argument(errors, ""),
            store::Error::NotFound(_) => Status::not_found(err.to_string()),
            store::Error::Conflict { .. } => Status::aborted(err.to_string()),
            store::Error::InUse { .. } => Status::failed_precondition(err.to_string()),
        }
    }
}

impl From<DecideError> for Status {
    fn from(err: DecideError) -> Status {
        match err {
            DecideError::NotLeader(_) => Status::unavailable(err.to_string()),
            DecideError::Store(e) => e.into(),
        }
    }
}

/// Checks that a snapshot given by a caller is self-consistent.
fn validate_snapshot(s: &pb::ClusterSnapshot) -> Result<(), Status> {
    let mut errors = ValidationErrors::default();
    let ids: std::collections::HashSet<u64> = s.classes.iter().map(|c| c.id).collect();
    if ids.len() != s.classes.len() {
        errors.add("snapshot.classes", "class ids must be unique");
    }
    for (i, p) in s.pending.iter().enumerate() {
        if !ids.contains(&p.class_id) {
            errors.add(
                format!("snapshot.pending[{i}].classId"),
                format!("{} is not in snapshot.classes", p.class_id),
            );
        }
        if p.count < 0 {
            errors.add(
                format!("snapshot.pending[{i}].count"),
                "must not be negative",
            );
        }
    }
    for (i, n) in s.nodes.iter().enumerate() {
        if n.name.is_empty() {
            errors.add(format!("snapshot.nodes[{i}].name"), "must not be empty");
        }
        for (j, c) in n.pods.iter().enumerate() {
            if !ids.contains(&c.class_id) {
                errors.add(
                    format!("snapshot.nodes[{i}].pods[{j}].classId"),
                    format!("{} is not in snapshot.classes", c.class_id),
                );
            }
        }
    }
    for (i, c) in s.classes.iter().enumerate() {
        let r = c.requests.clone().unwrap_or_default();
        if r.cpu_millis < 0 || r.memory_bytes < 0 {
            errors.add(
                format!("snapshot.classes[{i}].requests"),
                "must not be negative",
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(invalid_argument(&errors, ""))
    }
}

fn validate_pools(pools: &[NodePool]) -> Result<Vec<Pool>, Status> {
    let mut errors = ValidationErrors::default();
    let mut out = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        match Pool::from_proto(p) {
            Ok(pool) => out.push(pool),
            Err(e) => {
                for f in e.errors {
                    errors.add(format!("pools[{i}].{}", f.path), f.reason);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(invalid_argument(&errors, ""))
    }
}

/// The DeciderService handlers.
pub struct DeciderApi {
    pub(crate) decider: Arc<Decider>,
    pub(crate) upstreams: Vec<Upstream>,
}

impl DeciderApi {
    /// A recorded decision by id.
    async fn find_decision(&self, id: &str) -> Result<Decision, Status> {
        let suffix = format!("-{id}");
        let kvs = self
            .decider
            .store
            .raw()
            .range(keys::DECISIONS)
            .await
            .map_err(|e| status_from_store(&e))?;
        let kv = kvs
            .kvs
            .iter()
            .rev()
            .find(|kv| kv.key.ends_with(&suffix))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "decision {id} not found (history keeps the latest {})",
                    self.decider.settings.history_limit
                ))
            })?;
        Ok(store::decode_decision(kv)?)
    }

    async fn status(&self) -> Result<DeciderStatus, Status> {
        let d = &self.decider;
        let (leader, upstreams, paused) = tokio::join!(
            describe_leadership(d.leader.as_ref(), d.election.as_ref()),
            probe_upstreams(&self.upstreams),
            d.store.paused(),
        );
        let paused = paused?;
        let last = *d.last_decision_at.lock().unwrap_or_else(|p| p.into_inner());
        Ok(DeciderStatus {
            leader: Some(leader),
            paused: paused.paused,
            pause_reason: paused.reason,
            dry_run: d.settings.dry_run,
            upstreams,
            last_decision_at: last.map(snapshot::timestamp),
        })
    }
}

#[tonic::async_trait]
impl DeciderService for DeciderApi {
    async fn evaluate(
        &self,
        request: Request<EvaluateRequest>,
    ) -> Result<Response<Decision>, Status> {
        let r = request.into_inner();
        let d = &self.decider;
        let snapshot = match r.snapshot {
            Some(s) => {
                validate_snapshot(&s)?;
                s
            }
            None => d.fetch_snapshot().await.map_err(|s| {
                Status::unavailable(format!(
                    "no snapshot given and none could be fetched from the metrics service: {}",
                    s.message()
                ))
            })?,
        };
        let pools = if r.pools.is_empty() {
            d.pools_now().await?
        } else {
            validate_pools(&r.pools)?
        };
        let claims = if r.claims.is_empty() {
            d.claims_now().await?
        } else {
            let mut errors = ValidationErrors::default();
            let claims: Vec<NodeClaim> = r
                .claims
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let claim = NodeClaim::from_proto(c);
                    if claim.is_none() {
                        errors.add(format!("claims[{i}].phase"), "must be set");
                    }
                    claim
                })
                .collect();
            if !errors.is_empty() {
                return Err(invalid_argument(&errors, ""));
            }
            claims
        };
        let now = r
            .now
            .as_ref()
            .map_or_else(SystemTime::now, snapshot::system_time);
        let history = d.history_now().await?;
        let booked = d.capacity.for_loop(&snapshot, &claims).await;
        let plan = d.evaluate(
            &snapshot,
            &pools,
            &claims,
            &history,
            now,
            booked.bookings(false),
        );
        Ok(Response::new(plan.decision))
    }

    async fn get_decision(
        &self,
        request: Request<GetDecisionRequest>,
    ) -> Result<Response<Decision>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id: must not be empty"));
        }
        Ok(Response::new(self.find_decision(&id).await?))
    }

    async fn list_decisions(
        &self,
        request: Request<ListDecisionsRequest>,
    ) -> Result<Response<ListDecisionsResponse>, Status> {
        let r = request.into_inner();
        if !(0..=1000).contains(&r.limit) {
            return Err(Status::invalid_argument(format!(
                "limit: {} is not between 0 and 1000 (0 means 50)",
                r.limit
            )));
        }
        let limit = if r.limit == 0 { 50 } else { r.limit as usize };
        let decisions = self
            .decider
            .store
            .decisions()
            .await?
            .into_iter()
            .rev()
            .map(|(_, d)| d)
            .filter(|d| !r.actions_only || !d.actions.is_empty())
            .take(limit)
            .collect();
        Ok(Response::new(ListDecisionsResponse { decisions }))
    }

    type WatchDecisionsStream = Pin<Box<dyn Stream<Item = Result<Decision, Status>> + Send>>;

    async fn watch_decisions(
        &self,
        _request: Request<WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        let events = self
            .decider
            .store
            .raw()
            .watch(keys::DECISIONS, None)
            .await
            .map_err(|e| status_from_store(&e))?;
        let stream = events.filter_map(|event| async move {
            match event {
                Ok(e) if e.kind == EventKind::Put => {
                    Some(store::decode_decision(&e.kv).map_err(Status::from))
                }
                Ok(_) => None,
                Err(err) => Some(Err(status_from_store(&err))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pause(
        &self,
        request: Request<PauseRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        let reason = request.into_inner().reason;
        let reason = if reason.is_empty() {
            "paused by an operator".to_string()
        } else {
            reason
        };
        self.decider
            .store
            .set_paused(&PauseRecord {
                paused: true,
                reason,
                since_ms: crate::planner::ms(SystemTime::now()),
            })
            .await?;
        self.decider.stats.paused.set(1);
        Ok(Response::new(self.status().await?))
    }

    async fn resume(
        &self,
        _request: Request<ResumeRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        self.decider
            .store
            .set_paused(&PauseRecord::default())
            .await?;
        self.decider.stats.paused.set(0);
        Ok(Response::new(self.status().await?))
    }

    async fn get_status(
        &self,
        _request: Request<GetDeciderStatusRequest>,
    ) -> Result<Response<DeciderStatus>, Status> {
        Ok(Response::new(self.status().await?))
    }

    async fn request_capacity(
        &self,
        request: Request<RequestCapacityRequest>,
    ) -> Result<Response<RequestCapacityResponse>, Status> {
        let caller = shoal_runtime::auth::Caller::of(&request).cloned();
        let mut r = request.into_inner();
        // Who asks is who called: an authenticated caller cannot ask in another's name.
        if let Some(caller) =
            caller.filter(|c| c.by != shoal_runtime::auth::AuthenticatedBy::Anonymous)
        {
            if r.requester.is_empty() {
                r.requester = caller.identity.clone();
            } else if r.requester != caller.identity {
                return Err(Status::permission_denied(format!(
                    "requester {:?} is not the caller {:?}: leave it empty or give your own identity",
                    r.requester, caller.identity
                )));
            }
        }
        let mut errors = ValidationErrors::default();
        if r.requester.trim().is_empty() {
            errors.add("requester", "must name who is asking");
        }
        if r.requester.len() > 253 {
            errors.add("requester", "must be at most 253 characters");
        }
        if r.idempotency_key.len() > 128 {
            errors.add("idempotencyKey", "must be at most 128 characters");
        }
        if !(0..=7 * 86400).contains(&r.valid_until_seconds) {
            errors.add(
                "validUntilSeconds",
                format!("{} is not between 0 and 604800", r.valid_until_seconds),
            );
        }
        let class = pb::CapacityClass::try_from(r.class).unwrap_or_else(|_| {
            errors.add("class", format!("{} is not a CapacityClass", r.class));
            pb::CapacityClass::Unspecified
        });
        let class = if class == pb::CapacityClass::Unspecified {
            pb::CapacityClass::AtomicScaleUp
        } else {
            class
        };
        if class == pb::CapacityClass::CheckCapacity && r.valid_until_seconds != 0 {
            errors.add(
                "validUntilSeconds",
                "applies to ATOMIC_SCALE_UP only (check-capacity never creates nodes)",
            );
        }
        capacity::validate_pods(&r.pods, "pods", &mut errors);
        if !errors.is_empty() {
            return Err(invalid_argument(&errors, ""));
        }
        let d = &self.decider;
        let now = SystemTime::now();
        let record = pb::CapacityRequest {
            id: capacity::request_id(&r.requester, &r.idempotency_key),
            requester: r.requester.clone(),
            class: class as i32,
            pods: r.pods.clone(),
            valid_until: (r.valid_until_seconds > 0).then(|| {
                snapshot::timestamp(
                    now + std::time::Duration::from_secs(r.valid_until_seconds as u64),
                )
            }),
            source: "grpc".into(),
            ..Default::default()
        };
        if r.dry_run {
            let snap = d.fetch_snapshot().await.map_err(|s| {
                Status::unavailable(format!(
                    "the metrics service did not answer: {}",
                    s.message()
                ))
            })?;
            let (snap, _) = capacity::request_snapshot(&snap, std::slice::from_ref(&record));
            let pools = d.pools_now().await?;
            let claims = d.claims_now().await?;
            let history = d.history_now().await?;
            let booked = d.capacity.for_loop(&snap, &claims).await;
            let plan = d.evaluate(&snap, &pools, &claims, &history, now, booked.bookings(true));
            return Ok(Response::new(RequestCapacityResponse {
                decision: Some(plan.decision),
                operation_ids: vec![],
                request: None,
            }));
        }
        if d.leadership().is_none() {
            // Leader routing forwards this call to the leader; this is the term-change race.
            let leader = describe_leadership(d.leader.as_ref(), d.election.as_ref()).await;
            return Err(Status::unavailable(format!(
                "this replica does not lead the decider; the leader is {:?} at {:?}: retry (or ask with dry_run)",
                leader.leader_id, leader.address
            )));
        }
        let stored = d.capacity.submit(d, record).await?;
        // Answer with the first step taken: the plan made for it, or its verdict.
        let first = d
            .capacity
            .await_step(&stored.id, std::time::Duration::from_secs(10))
            .await?;
        let decision = match first.decision_ids.first() {
            Some(id) => self.find_decision(id).await.ok(),
            None => None,
        };
        Ok(Response::new(RequestCapacityResponse {
            decision,
            operation_ids: vec![],
            request: Some(first),
        }))
    }

    async fn get_capacity_request(
        &self,
        request: Request<pb::GetCapacityRequestRequest>,
    ) -> Result<Response<pb::CapacityRequest>, Status> {
        let id = request.into_inner().id;
        validate_request_id(&id)?;
        Ok(Response::new(self.decider.capacity.get(&id).await?))
    }

    async fn list_capacity_requests(
        &self,
        request: Request<pb::ListCapacityRequestsRequest>,
    ) -> Result<Response<pb::ListCapacityRequestsResponse>, Status> {
        let r = request.into_inner();
        if !(0..=1000).contains(&r.limit) {
            return Err(Status::invalid_argument(format!(
                "limit: {} is not between 0 and 1000 (0 means 100)",
                r.limit
            )));
        }
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let requests = self
            .decider
            .capacity
            .all()
            .await?
            .into_iter()
            .rev()
            .filter(|c| r.requester.is_empty() || c.requester == r.requester)
            .filter(|c| !r.active_only || !c.finished)
            .take(limit)
            .collect();
        Ok(Response::new(pb::ListCapacityRequestsResponse { requests }))
    }

    type WatchCapacityRequestsStream =
        Pin<Box<dyn Stream<Item = Result<pb::CapacityRequest, Status>> + Send>>;

    async fn watch_capacity_requests(
        &self,
        request: Request<pb::WatchCapacityRequestsRequest>,
    ) -> Result<Response<Self::WatchCapacityRequestsStream>, Status> {
        let r = request.into_inner();
        if !r.id.is_empty() {
            validate_request_id(&r.id)?;
        }
        let store = self.decider.capacity.store().clone();
        let prefix = if r.id.is_empty() {
            keys::CAPACITY.to_string()
        } else {
            keys::capacity_request(&r.id)
        };
        let current = store
            .range(&prefix)
            .await
            .map_err(|e| status_from_store(&e))?;
        let initial: Vec<Result<pb::CapacityRequest, Status>> = if r.send_initial {
            current
                .kvs
                .iter()
                .filter(|kv| r.id.is_empty() || kv.key == prefix)
                .map(decode_capacity)
                .collect()
        } else {
            Vec::new()
        };
        let events = store
            .watch(&prefix, Some(current.revision + 1))
            .await
            .map_err(|e| status_from_store(&e))?;
        let only = r.id.clone();
        let changes = events.filter_map(move |event| {
            let only = only.clone();
            async move {
                match event {
                    Ok(e) if e.kind == EventKind::Put => {
                        let decoded = decode_capacity(&e.kv);
                        match &decoded {
                            Ok(c) if !only.is_empty() && c.id != only => None,
                            _ => Some(decoded),
                        }
                    }
                    Ok(_) => None,
                    Err(err) => Some(Err(status_from_store(&err))),
                }
            }
        });
        Ok(Response::new(Box::pin(
            futures::stream::iter(initial).chain(changes),
        )))
    }

    async fn cancel_capacity_request(
        &self,
        request: Request<pb::CancelCapacityRequestRequest>,
    ) -> Result<Response<pb::CapacityRequest>, Status> {
        let caller = shoal_runtime::auth::Caller::of(&request).cloned();
        let r = request.into_inner();
        validate_request_id(&r.id)?;
        if r.reason.len() > 1024 {
            return Err(Status::invalid_argument(
                "reason: must be at most 1024 characters",
            ));
        }
        let d = &self.decider;
        let existing = d.capacity.get(&r.id).await?;
        if !existing.name.is_empty() {
            return Err(Status::failed_precondition(format!(
                "capacity request {} is {}: delete that resource instead",
                r.id, existing.source
            )));
        }
        if let Some(caller) = caller.filter(|c| {
            c.by != shoal_runtime::auth::AuthenticatedBy::Anonymous
                && c.role < shoal_runtime::auth::Role::Admin
        }) && caller.identity != existing.requester
        {
            return Err(Status::permission_denied(format!(
                "capacity request {} belongs to {:?}: only its requester or an admin may cancel it",
                r.id, existing.requester
            )));
        }
        Ok(Response::new(d.capacity.cancel(d, &r.id, &r.reason).await?))
    }
}

impl From<capacity::Error> for Status {
    fn from(err: capacity::Error) -> Status {
        match &err {
            capacity::Error::Store(e) => status_from_store(e),
            capacity::Error::Corrupt { .. } => Status::data_loss(err.to_string()),
            capacity::Error::NotFound(_) => Status::not_found(err.to_string()),
            capacity::Error::TooMany { .. } => Status::resource_exhausted(err.to_string()),
            capacity::Error::NotLeader => Status::unavailable(err.to_string()),
        }
    }
}

fn decode_capacity(kv: &shoal_state::KeyValue) -> Result<pb::CapacityRequest, Status> {
    use prost::Message;
    pb::CapacityRequest::decode(kv.value.as_slice()).map_err(|e| {
        Status::data_loss(format!(
            "{} holds an unreadable capacity request: {e}",
            kv.key
        ))
    })
}

fn validate_request_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Status::invalid_argument(format!(
            "id: {id:?} is not a capacity request id (letters, digits and '-', at most 128)"
        )));
    }
    Ok(())
}

/// Probes every upstream concurrently, in configuration order.
async fn probe_upstreams(upstreams: &[Upstream]) -> Vec<pb::UpstreamStatus> {
    let probes = upstreams.iter().map(|u| {
        let u = u.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            u.health().await
        }))
    });
    let mut out = Vec::with_capacity(upstreams.len());
    for (probe, upstream) in probes.collect::<Vec<_>>().into_iter().zip(upstreams) {
        out.push(probe.await.unwrap_or_else(|e| pb::UpstreamStatus {
            name: upstream.name.to_string(),
            address: upstream.address.clone(),
            status: format!("UNREACHABLE: probe failed: {e}"),
        }));
    }
    out
}

/// The PoolService handlers.
pub struct PoolApi {
    pub(crate) store: store::DeciderStore,
    /// Why pools cannot be changed through this API (their source is elsewhere).
    pub(crate) read_only: Option<&'static str>,
}

impl PoolApi {
    fn writable(&self) -> Result<(), Status> {
        match self.read_only {
            Some(why) => Err(Status::failed_precondition(why)),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn list_pools(
        &self,
        _request: Request<ListPoolsRequest>,
    ) -> Result<Response<ListPoolsResponse>, Status> {
        Ok(Response::new(ListPoolsResponse {
            pools: self.store.list_pools().await?,
        }))
    }

    async fn get_pool(
        &self,
        request: Request<GetPoolRequest>,
    ) -> Result<Response<NodePool>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        Ok(Response::new(self.store.get_pool(&name).await?))
    }

    async fn apply_pool(
        &self,
        request: Request<ApplyPoolRequest>,
    ) -> Result<Response<NodePool>, Status> {
        self.writable()?;
        let r = request.into_inner();
        let pool = match r.source {
            Some(Source::Pool(pool)) => pool,
            Some(Source::Yaml(yaml)) => shoal_core::pool::PoolDocument::from_yaml(&yaml)
                .and_then(|doc| doc.to_proto())
                .map_err(|e| invalid_argument(&e, ""))?,
            None => return Err(Status::invalid_argument("source: give either pool or yaml")),
        };
        if r.expected_revision < 0 {
            return Err(Status::invalid_argument(
                "expectedRevision: must not be negative",
            ));
        }
        let applied = self.store.apply_pool(pool, r.expected_revision).await?;
        tracing::info!(pool = %applied.name, revision = applied.revision, "pool applied");
        Ok(Response::new(applied))
    }

    async fn delete_pool(
        &self,
        request: Request<DeletePoolRequest>,
    ) -> Result<Response<DeletePoolResponse>, Status> {
        self.writable()?;
        let r = request.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        self.store.delete_pool(&r.name, r.expected_revision).await?;
        tracing::info!(pool = %r.name, "pool deleted");
        Ok(Response::new(DeletePoolResponse {}))
    }
}
