//! The leader's work, one supervised loop: for each term, drive every Running operation (new
//! ones at once, unfinished ones after a restart or failover), check launched claims against
//! their backends, heal nodes a failed drain left cordoned, and remove finished records past
//! their retention. A panicking operation driver fails the loop (the supervisor restarts it and
//! the replica resigns meanwhile); everything stops the moment the term ends.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation, OperationKind, OperationState, now_ms},
    pool::Pool,
};
use shoal_state::{Leadership, keys, records};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    backend::{CLAIM_LABEL, CLUSTER_LABEL, POOL_LABEL, ProviderError},
    drain::DrainError,
    lifecycle::{DISRUPTED_TAINT, Provisioner, retry_in_term},
    store,
};

enum CreateError {
    /// May succeed later (backend down, breaker open): wait, up to the node TTL.
    Transient(String),
    /// Will not succeed: fail the claim now.
    Permanent(String),
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Provisioner {
    /// The supervised leader loop.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), String> {
        let Some(leader) = self.leader.clone() else {
            return Ok(());
        };
        shoal_runtime::while_leading(leader, shutdown, |leadership, term| {
            let me = self.clone();
            async move {
                tracing::info!(
                    term = leadership.term(),
                    "leading the provisioner: resuming unfinished operations"
                );
                shoal_runtime::supervise::panic_point("provisioner-driver");
                tokio::select! {
                    r = me.clone().dispatch(leadership.clone(), term.clone()) => r,
                    () = me.clone().check_instances(leadership.clone(), term.clone()) => Ok(()),
                    () = me.clone().sweep(leadership.clone(), term.clone()) => Ok(()),
                }
            }
        })
        .await
    }

    /// Starts a driver for every Running operation, now and whenever the store changes.
    async fn dispatch(
        self: Arc<Self>,
        leadership: Leadership,
        term: CancellationToken,
    ) -> Result<(), String> {
        while !self.ops.wait_synced(Duration::from_secs(5)).await {
            if term.is_cancelled() {
                return Ok(());
            }
            tracing::warn!("operations not read from the store yet; waiting before driving");
        }
        let term_started_ms = now_ms();
        let mut changes = self.ops.changes();
        let mut drivers: JoinSet<String> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut active: HashSet<String> = HashSet::new();
        // Finished by this term; the cache may not show it for a moment.
        let mut done: HashSet<String> = HashSet::new();
        loop {
            for op in self.operations() {
                if op.is_finished() || active.contains(&op.id) || done.contains(&op.id) {
                    continue;
                }
                active.insert(op.id.clone());
                let me = self.clone();
                let (leadership, term) = (leadership.clone(), term.clone());
                let id = op.id.clone();
                let handle = drivers.spawn(async move {
                    let id = op.id.clone();
                    me.drive(op, &leadership, &term, term_started_ms).await;
                    id
                });
                running.insert(handle.id(), id);
            }
            tokio::select! {
                _ = term.cancelled() => return Ok(()),
                c = changes.changed() => if c.is_err() { return Ok(()) },
                Some(joined) = drivers.join_next_with_id(), if !drivers.is_empty() => match joined {
                    Ok((task, op)) => {
                        running.remove(&task);
                        active.remove(&op);
                        done.insert(op);
                    }
                    Err(e) => {
                        let op = running.remove(&e.id()).unwrap_or_default();
                        if e.is_panic() {
                            return Err(format!("the driver of operation {op} panicked: {}", panic_message(e)));
                        }
                        active.remove(&op);
                    }
                },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    async fn drive(
        self: &Arc<Self>,
        op: Operation,
        leadership: &Leadership,
        term: &CancellationToken,
        term_started_ms: u64,
    ) {
        let span = tracing::info_span!("provisioner.operation", op = %op.id, kind = ?op.kind, pool = %op.pool);
        shoal_runtime::telemetry::continue_trace(&span, &op.traceparent);
        async {
            if op.kind == OperationKind::Create && !self.materialized(&op) {
                // The request stopped before writing every claim: write the rest.
                let written = retry_in_term(
                    term,
                    crate::lifecycle::release_backoff(),
                    "writing planned claims",
                    |e: &store::Error| !matches!(e, store::Error::NotFound(_)),
                    || self.store.materialize(&op),
                )
                .await;
                match written {
                    None => return,
                    Some(Ok(n)) if n > 0 => {
                        tracing::info!(op = %op.id, claims = n, "wrote the claims the request had not")
                    }
                    _ => {}
                }
            }
            let pool = self.pools().remove(&op.pool);
            let op = &op;
            let tasks = op.claim_ids.iter().map(|id| {
                let pool = pool.clone();
                async move {
                    let outcome = match op.kind {
                        OperationKind::Create => {
                            self.drive_create(id, pool.as_ref(), leadership, term, term_started_ms)
                                .await
                        }
                        OperationKind::Delete => {
                            self.drive_delete(id, op, pool.as_ref(), leadership, term)
                                .await
                        }
                    };
                    (id.clone(), outcome)
                }
            });
            let outcomes = futures::future::join_all(tasks).await;
            if term.is_cancelled() {
                return;
            }
            self.finish(op.clone(), &outcomes, leadership, term).await;
        }
        .instrument(span)
        .await
    }

    /// True when the claims cache holds every planned claim of `op`.
    fn materialized(&self, op: &Operation) -> bool {
        op.planned
            .iter()
            .all(|p| self.claims.get(&keys::claim(&p.id)).is_some())
    }

    async fn finish(
        &self,
        op: Operation,
        outcomes: &[(String, Result<(), String>)],
        leadership: &Leadership,
        term: &CancellationToken,
    ) {
        let failures: Vec<String> = outcomes
            .iter()
            .filter_map(|(id, o)| o.as_ref().err().map(|why| format!("{id}: {why}")))
            .collect();
        let mut done = op;
        // Every planned claim is written by now: the finished record need not carry the plan.
        done.planned.clear();
        done.state = if failures.is_empty() {
            OperationState::Succeeded
        } else if failures.len() == outcomes.len() {
            OperationState::Failed
        } else {
            OperationState::PartiallyFailed
        };
        done.error = failures.join("; ");
        done.updated_at_ms = now_ms();
        let written = retry_in_term(
            term,
            crate::lifecycle::release_backoff(),
            "recording an operation's result",
            |e: &store::Error| matches!(e, store::Error::Store(s) if s.is_transient()),
            || self.store.put_op(leadership, &done),
        )
        .await;
        if !matches!(written, Some(Ok(()))) {
            return; // fenced or the term ended: the next leader settles it
        }
        let kind = match done.kind {
            OperationKind::Create => "create",
            OperationKind::Delete => "delete",
        };
        let state = match done.state {
            OperationState::Succeeded => "succeeded",
            OperationState::PartiallyFailed => "partially_failed",
            _ => "failed",
        };
        self.stats
            .operations
            .with_label_values(&[kind, state])
            .inc();
        tracing::info!(op = %done.id, state, error = %done.error, "operation finished");
    }

    /// The claim as the cache has it, if at least as new as `claim`.
    fn refreshed(&self, claim: NodeClaim) -> NodeClaim {
        match self
            .claims
            .get(&keys::claim(&claim.id))
            .and_then(|kv| records::decode_claim(&kv).ok())
        {
            Some(cached) if cached.updated_at_ms > claim.updated_at_ms => cached,
            _ => claim,
        }
    }

    /// Reads a claim, retrying while the store is unavailable (an etcd that stalls for a few
    /// seconds under a burst must not fail the claim).
    async fn read_claim(&self, id: &str, term: &CancellationToken) -> Result<NodeClaim, String> {
        match retry_in_term(
            term,
            crate::lifecycle::release_backoff(),
            "reading a claim",
            |e: &store::Error| matches!(e, store::Error::Store(s) if s.is_transient()),
            || self.store.claim(id),
        )
        .await
        {
            None => Err("leadership ended".into()),
            Some(Ok((claim, _))) => Ok(claim),
            Some(Err(store::Error::NotFound(_))) => Err("claim record is gone".into()),
            Some(Err(e)) => Err(e.to_string()),
        }
    }

    async fn drive_create(
        &self,
        id: &str,
        pool: Option<&Pool>,
        leadership: &Leadership,
        term: &CancellationToken,
        term_started_ms: u64,
    ) -> Result<(), String> {
        let limit = self.limit(
            pool.map_or("", |p| p.name.as_str()),
            pool.map_or(1, |p| p.scale_up.max_concurrent),
        );
        let mut node = self.nodes.subscribe(id);
        let mut claim = self.read_claim(id, term).await?;
        // Work resumed from an earlier term may have created the instance already.
        let mut look_first = claim.created_at_ms < term_started_ms;
        let mut last_instance_check = std::time::Instant::now();
        let mut last_error = String::new();
        loop {
            claim = self.refreshed(claim);
            let ttl_left = Duration::from_millis(
                (claim.created_at_ms + self.settings.node_ttl.as_millis() as u64)
                    .saturating_sub(now_ms()),
            );
            match claim.phase {
                ClaimPhase::Ready => return Ok(()),
                ClaimPhase::Failed => return Err(claim.failure_reason),
                ClaimPhase::Deleted | ClaimPhase::Draining | ClaimPhase::Terminating => {
                    return Err(format!("claim is {:?}: being removed", claim.phase));
                }
                ClaimPhase::Pending => {
                    if ttl_left.is_zero() {
                        let why = if last_error.is_empty() {
                            "not launched within the node TTL".to_string()
                        } else {
                            format!(
                                "not launched within the node TTL; backend {}: {last_error}",
                                claim.backend
                            )
                        };
                        return self.roll_back(leadership, &claim, &why, "ttl", term).await;
                    }
                    let launched = {
                        let _permit = tokio::select! {
                            _ = term.cancelled() => return Err("leadership ended".into()),
                            p = limit.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
                        };
                        let attempt = self.launch(&claim, pool, look_first).await;
                        look_first = true; // a call that timed out may have created it
                        attempt
                    };
                    match launched {
                        Ok(instance) => {
                            shoal_runtime::supervise::pause_point("after-backend-create").await;
                            claim = self
                                .transition(
                                    leadership,
                                    term,
                                    id,
                                    ClaimPhase::Launched,
                                    &format!("instance {} created", instance.id),
                                    |c| c.instance_id = instance.id.clone(),
                                )
                                .await?;
                        }
                        Err(CreateError::Transient(why)) => {
                            // The backend is down or its breaker open: keep the claim Pending
                            // and try again until the node TTL, then fail with this reason.
                            tracing::warn!(claim = id, error = %why, "backend unavailable; the claim waits");
                            last_error = why;
                            tokio::select! {
                                _ = term.cancelled() => return Err("leadership ended".into()),
                                _ = tokio::time::sleep(ttl_left.min(Duration::from_secs(2))) => {}
                            }
                        }
                        Err(CreateError::Permanent(why)) => {
                            let reason = format!("backend {}: {why}", claim.backend);
                            // Nothing may have been created, but a timed-out call might have:
                            // release by label before failing.
                            return self
                                .roll_back(leadership, &claim, &reason, "create_failed", term)
                                .await;
                        }
                    }
                }
                ClaimPhase::Launched | ClaimPhase::Registered => {
                    if ttl_left.is_zero() {
                        let why = format!(
                            "node {} did not become Ready within the node TTL ({})",
                            claim.node_name,
                            humantime::format_duration(self.settings.node_ttl)
                        );
                        return self.roll_back(leadership, &claim, &why, "ttl", term).await;
                    }
                    let view = node.borrow_and_update().clone();
                    if let Some(view) = view {
                        if claim.phase == ClaimPhase::Launched && !view.ready {
                            claim = self
                                .transition(
                                    leadership,
                                    term,
                                    id,
                                    ClaimPhase::Registered,
                                    "node registered",
                                    |c| c.node_name.clone_from(&view.name),
                                )
                                .await?;
                            continue;
                        }
                        if view.ready {
                            let startup: Vec<String> = pool
                                .map(|p| p.startup_taints.iter().map(|t| t.key.clone()).collect())
                                .unwrap_or_default();
                            if view.taints.iter().any(|t| startup.contains(t))
                                && let Err(e) = self.kube.remove_taints(&view.name, &startup).await
                            {
                                tracing::warn!(node = %view.name, error = %e, "cannot remove startup taints yet");
                                tokio::select! {
                                    _ = term.cancelled() => return Err("leadership ended".into()),
                                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                }
                                continue;
                            }
                            claim = self
                                .transition(
                                    leadership,
                                    term,
                                    id,
                                    ClaimPhase::Ready,
                                    "node Ready",
                                    |c| c.node_name.clone_from(&view.name),
                                )
                                .await?;
                            if claim.phase == ClaimPhase::Ready {
                                let secs =
                                    now_ms().saturating_sub(claim.created_at_ms) as f64 / 1000.0;
                                self.stats
                                    .node_ready
                                    .with_label_values(&[&claim.pool])
                                    .observe(secs);
                            }
                            continue;
                        }
                    }
                    // Boot failures show on the backend, not in Kubernetes.
                    if last_instance_check.elapsed() >= self.settings.instance_check_interval {
                        last_instance_check = std::time::Instant::now();
                        match self.find_instance(&claim).await {
                            Ok(None) => {
                                let why = format!(
                                    "instance {} disappeared before its node was Ready",
                                    claim.instance_id
                                );
                                return self
                                    .roll_back(leadership, &claim, &why, "instance_gone", term)
                                    .await;
                            }
                            Ok(Some(i))
                                if matches!(i.state.as_str(), "failed" | "exited" | "dead") =>
                            {
                                let why = format!("instance {} is {}: boot failed", i.id, i.state);
                                return self
                                    .roll_back(leadership, &claim, &why, "boot_failed", term)
                                    .await;
                            }
                            // A backend that cannot label its nodes names the providerID they
                            // report: find that Node and give it the claim's labels.
                            Ok(Some(i)) if !i.provider_id.is_empty() && node.borrow().is_none() => {
                                let mut labels =
                                    pool.map(|p| self.ownership(p)).unwrap_or_default();
                                labels.insert(CLUSTER_LABEL.into(), self.cluster.clone());
                                labels.insert(POOL_LABEL.into(), claim.pool.clone());
                                labels.insert(CLAIM_LABEL.into(), claim.id.clone());
                                match self
                                    .kube
                                    .label_by_provider_id(&i.provider_id, CLAIM_LABEL, &labels)
                                    .await
                                {
                                    Ok(Some(name)) => {
                                        tracing::info!(claim = id, node = %name, provider_id = %i.provider_id, "labelled the node its backend started")
                                    }
                                    Ok(None) => {}
                                    Err(e) => {
                                        tracing::warn!(claim = id, provider_id = %i.provider_id, error = %e, "cannot label the node yet")
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    tokio::select! {
                        _ = term.cancelled() => return Err("leadership ended".into()),
                        _ = node.changed() => {}
                        _ = tokio::time::sleep(ttl_left.min(self.settings.instance_check_interval)) => {}
                    }
                }
            }
        }
    }

    /// One attempt to get the claim's instance: adopt the one an earlier attempt created
    /// (`look_first`), else create it.
    async fn launch(
        &self,
        claim: &NodeClaim,
        pool: Option<&Pool>,
        look_first: bool,
    ) -> Result<shoal_proto::v1::Instance, CreateError> {
        if look_first {
            match self.find_instance(claim).await {
                // A VM cloned but not started yet: the backend's create continues it.
                Ok(Some(found))
                    if found.state == "stopped" || found.state.starts_with("locked") => {}
                Ok(Some(found)) => {
                    tracing::info!(claim = %claim.id, instance = %found.id, "adopting the instance an earlier attempt created");
                    return Ok(found);
                }
                Ok(None) => {}
                Err(e) => return Err(CreateError::Transient(e)),
            }
        }
        shoal_runtime::supervise::pause_point("before-backend-create").await;
        let spec = self.spec(claim, pool);
        let backend = self
            .backend(&claim.backend)
            .map_err(CreateError::Permanent)?;
        match backend.create(&spec).await {
            Ok(i) => Ok(i),
            Err(ProviderError::Conflict(m)) => match self.find_instance(claim).await {
                Ok(Some(found)) => Ok(found),
                _ => Err(CreateError::Permanent(format!(
                    "name {} is taken on the backend: {m}",
                    claim.node_name
                ))),
            },
            Err(e) if e.is_transient() => Err(CreateError::Transient(e.to_string())),
            Err(e) => Err(CreateError::Permanent(e.to_string())),
        }
    }

    async fn drive_delete(
        &self,
        id: &str,
        op: &Operation,
        pool: Option<&Pool>,
        leadership: &Leadership,
        term: &CancellationToken,
    ) -> Result<(), String> {
        let drain_timeout = pool.map_or(Duration::from_secs(300), |p| p.scale_down.drain_timeout);
        let force = pool.is_some_and(|p| p.scale_down.force_after_drain_timeout);
        loop {
            let claim = match self.store.claim(id).await {
                Ok((claim, _)) => claim,
                Err(store::Error::NotFound(_)) => return Err("claim record is gone".into()),
                Err(e) => {
                    tracing::warn!(claim = id, error = %e, "cannot read the claim; retrying");
                    tokio::select! {
                        _ = term.cancelled() => return Err("leadership ended".into()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let ours = claim.operation_id == op.id;
            match claim.phase {
                ClaimPhase::Deleted if ours => return Ok(()),
                ClaimPhase::Failed => return Err(claim.failure_reason),
                ClaimPhase::Deleted => {
                    return Err(format!("handed to operation {}", claim.operation_id));
                }
                ClaimPhase::Draining | ClaimPhase::Terminating if !ours => {
                    return Err(format!("handed to operation {}", claim.operation_id));
                }
                ClaimPhase::Ready | ClaimPhase::Registered | ClaimPhase::Launched if ours => {
                    // Returned to service (drain timed out): the last reason says why.
                    return Err(claim
                        .history
                        .last()
                        .map(|t| t.reason.clone())
                        .unwrap_or_default());
                }
                ClaimPhase::Ready | ClaimPhase::Registered | ClaimPhase::Launched => {
                    // The request wrote the operation but stopped before moving this claim.
                    match retry_in_term(
                        term,
                        crate::lifecycle::release_backoff(),
                        "taking a claim into a delete operation",
                        |e: &store::Error| matches!(e, store::Error::Store(s) if s.is_transient()),
                        || self.store.take_one(op, id, &op.reason, now_ms()),
                    )
                    .await
                    {
                        None => return Err("leadership ended".into()),
                        Some(r) => r.map_err(|e| e.to_string())?,
                    };
                }
                ClaimPhase::Pending => {
                    return Err("never launched: nothing to delete yet".into());
                }
                ClaimPhase::Draining => {
                    match self.drain(&claim, drain_timeout, force, term).await {
                        Ok(()) => {
                            self.transition(
                                leadership,
                                term,
                                id,
                                ClaimPhase::Terminating,
                                "drained",
                                |_| {},
                            )
                            .await?;
                        }
                        Err(DrainError::TimedOut(why)) => {
                            let mut reason = format!(
                                "drain timed out after {}: {why}; node uncordoned",
                                humantime::format_duration(drain_timeout)
                            );
                            if let Err(e) =
                                self.kube.uncordon(&claim.node_name, DISRUPTED_TAINT).await
                            {
                                // The instance check uncordons it once the API answers.
                                tracing::warn!(node = %claim.node_name, error = %e, "cannot uncordon yet");
                                reason = format!(
                                    "drain timed out after {}: {why}; uncordon pending ({e})",
                                    humantime::format_duration(drain_timeout)
                                );
                            }
                            self.transition(
                                leadership,
                                term,
                                id,
                                ClaimPhase::Ready,
                                &reason,
                                |_| {},
                            )
                            .await?;
                            return Err(reason);
                        }
                        Err(DrainError::Interrupted) => return Err("leadership ended".into()),
                    }
                }
                ClaimPhase::Terminating => {
                    self.release_in_term(&claim, term).await?;
                    self.transition(
                        leadership,
                        term,
                        id,
                        ClaimPhase::Deleted,
                        "instance and node deleted",
                        |_| {},
                    )
                    .await?;
                }
            }
        }
    }

    /// Every `instanceCheckInterval`: a Ready claim whose instance vanished from its backend
    /// (a container removed by hand) is failed and its Node deleted — never left Ready; a Ready
    /// node still cordoned by a drain that could not uncordon it is uncordoned.
    async fn check_instances(self: Arc<Self>, leadership: Leadership, term: CancellationToken) {
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(self.settings.instance_check_interval) => {}
            }
            let claims = self.claims();
            for (name, backend) in &self.backends {
                let Ok(instances) = backend.list_owned(&self.owner()).await else {
                    continue; // unknown is not absent
                };
                let present: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
                let by_claim: HashSet<&str> =
                    instances.iter().map(|i| i.claim_id.as_str()).collect();
                let cutoff = now_ms()
                    .saturating_sub(self.settings.instance_check_interval.as_millis() as u64);
                for claim in &claims {
                    if &claim.backend != name
                        || claim.phase != ClaimPhase::Ready
                        || claim.instance_id.is_empty()
                        || claim.updated_at_ms > cutoff
                        || present.contains(claim.instance_id.as_str())
                        || by_claim.contains(claim.id.as_str())
                    {
                        continue;
                    }
                    let why = format!(
                        "instance {} of node {} disappeared from backend {name}",
                        claim.instance_id, claim.node_name
                    );
                    if let Err(e) = self.kube.delete(&claim.node_name).await {
                        tracing::warn!(node = %claim.node_name, error = %e, "cannot delete the node of a vanished instance yet");
                        continue;
                    }
                    let _ = self
                        .transition(
                            &leadership,
                            &term,
                            &claim.id,
                            ClaimPhase::Failed,
                            &why,
                            |_| {},
                        )
                        .await;
                    self.stats
                        .rollbacks
                        .with_label_values(&[&claim.pool, "instance_gone"])
                        .inc();
                }
            }
            let nodes = self.nodes.all();
            for claim in claims.iter().filter(|c| c.phase == ClaimPhase::Ready) {
                let cordoned = nodes
                    .get(&claim.id)
                    .is_some_and(|n| n.taints.iter().any(|t| t == DISRUPTED_TAINT));
                if cordoned {
                    match self.kube.uncordon(&claim.node_name, DISRUPTED_TAINT).await {
                        Ok(_) => {
                            tracing::info!(node = %claim.node_name, "uncordoned a node a timed-out drain left cordoned")
                        }
                        Err(e) => {
                            tracing::warn!(node = %claim.node_name, error = %e, "cannot uncordon yet")
                        }
                    }
                }
            }
        }
    }

    /// Every `retention.interval`: removes finished claims and operations past their retention
    /// (fenced, in chunks).
    async fn sweep(self: Arc<Self>, leadership: Leadership, term: CancellationToken) {
        let retention = self.settings.retention;
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(retention.interval) => {}
            }
            let plan = records::plan_sweep(
                &self.claims(),
                &self.operations(),
                &retention.claims,
                &retention.operations,
                now_ms(),
            );
            if plan.operations.is_empty() && plan.claims.is_empty() {
                continue;
            }
            let store = self.store.records().store().clone();
            match records::delete_in_chunks(&store, Some(&leadership), &plan.keys()).await {
                Ok(_) => {
                    self.stats
                        .records_removed
                        .with_label_values(&["operation"])
                        .inc_by(plan.operations.len() as u64 / 2);
                    self.stats
                        .records_removed
                        .with_label_values(&["claim"])
                        .inc_by(plan.claims.len() as u64);
                    tracing::debug!(
                        operations = plan.operations.len() / 2,
                        claims = plan.claims.len(),
                        "retention: finished records removed"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention sweep failed; next interval retries")
                }
            }
        }
    }

    /// Exports claims by pool and phase (every replica, from its cache), at most once a second:
    /// thousands of claims changing at once must not each trigger a count of all of them.
    pub async fn export_claim_gauges(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.claims.changes();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        loop {
            let mut counts: HashMap<(String, String), i64> = HashMap::new();
            for claim in self.claims() {
                *counts
                    .entry((claim.pool.clone(), format!("{:?}", claim.phase)))
                    .or_default() += 1;
            }
            for key in seen.iter() {
                if !counts.contains_key(key) {
                    self.stats
                        .claims
                        .with_label_values(&[&key.0, &key.1])
                        .set(0);
                }
            }
            for (key, n) in &counts {
                self.stats
                    .claims
                    .with_label_values(&[&key.0, &key.1])
                    .set(*n);
                seen.insert(key.clone());
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.changed() => if c.is_err() { return },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
