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
    control::{DecideError, Decider, Mode},
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
        let plan = d.evaluate(&snapshot, &pools, &claims, &history, now);
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
        Ok(Response::new(store::decode_decision(kv)?))
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
        if r.pods.is_empty() {
            errors.add("pods", "must list at least one pod");
        }
        if r.pods.len() > 100 {
            errors.add(
                "pods",
                format!("{} pod sets; at most 100 in one request", r.pods.len()),
            );
        }
        for (i, item) in r.pods.iter().enumerate() {
            if item.count <= 0 || item.count > 10_000 {
                errors.add(
                    format!("pods[{i}].count"),
                    format!("{} is not between 1 and 10000", item.count),
                );
            }
            let requests = item
                .pod
                .as_ref()
                .and_then(|p| p.requests.clone())
                .unwrap_or_default();
            if requests.cpu_millis <= 0 && requests.memory_bytes <= 0 {
                errors.add(
                    format!("pods[{i}].pod.requests"),
                    "must request some cpu or memory",
                );
            }
            if requests.cpu_millis < 0 || requests.memory_bytes < 0 {
                errors.add(format!("pods[{i}].pod.requests"), "must not be negative");
            }
        }
        if !errors.is_empty() {
            return Err(invalid_argument(&errors, ""));
        }
        let d = &self.decider;
        let mut snap = d.fetch_snapshot().await.map_err(|s| {
            Status::unavailable(format!(
                "the metrics service did not answer: {}",
                s.message()
            ))
        })?;
        let pools = d.pools_now().await?;
        // An explicit request is already stable: it does not wait out stabilization windows.
        let patience = pools
            .iter()
            .map(|p| p.scale_up.stabilization_window)
            .max()
            .unwrap_or_default();
        let since = snapshot::timestamp(SystemTime::now() - patience);
        let base = snap.classes.iter().map(|c| c.id).max().unwrap_or(0) + 1;
        for (i, item) in r.pods.iter().enumerate() {
            let mut class = item.pod.clone().unwrap_or_default();
            class.id = base + i as u64;
            if class.namespace.is_empty() {
                class.namespace = "external".into();
            }
            if class.owner.is_none() {
                class.owner = Some(pb::OwnerRef {
                    kind: "CapacityRequest".into(),
                    name: r.requester.clone(),
                });
            }
            snap.pending.push(pb::PendingPods {
                class_id: class.id,
                count: item.count,
                unschedulable_since: Some(since),
                scheduler_message: format!("capacity requested by {}", r.requester),
            });
            snap.classes.push(class);
        }
        if r.dry_run {
            let claims = d.claims_now().await?;
            let history = d.history_now().await?;
            let plan = d.evaluate(&snap, &pools, &claims, &history, SystemTime::now());
            return Ok(Response::new(RequestCapacityResponse {
                decision: Some(plan.decision),
                operation_ids: vec![],
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
        let outcome = d
            .decide(
                &snap,
                Mode::Capacity {
                    requester: r.requester,
                },
            )
            .await?;
        Ok(Response::new(RequestCapacityResponse {
            decision: Some(outcome.decision),
            operation_ids: outcome.operations,
        }))
    }
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
