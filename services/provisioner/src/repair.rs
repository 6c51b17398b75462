//! `Repair`: the one repair the reconciler chose. Leader-only (leader routing forwards it here),
//! and only ever on what this cluster owns: an instance must carry this cluster's id, a Node
//! Shoal's pool label and this cluster's id, and neither may belong to a live claim — so a
//! stale or mistaken report cannot delete a good node, the k3s server, or someone else's VM.

use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation, OperationKind, OperationState, RECORD_VERSION, now_ms},
};
use shoal_proto::v1 as pb;

use crate::{
    backend::{CLAIM_LABEL, CLUSTER_LABEL, POOL_LABEL},
    lifecycle::{Provisioner, RequestError, invalid, random_id},
    store::{self, Written},
};

impl Provisioner {
    /// Carries out one repair. Returns the claim concerned, if any.
    pub async fn repair(
        &self,
        action: &pb::repair_request::Action,
        why: &str,
    ) -> Result<String, RequestError> {
        use pb::repair_request::Action;
        let leadership = self.require_leadership()?;
        let live: Vec<NodeClaim> = self
            .store
            .all_claims()
            .await?
            .into_values()
            .filter(|c| !c.phase.is_terminal())
            .collect();
        match action {
            Action::DeleteInstance(target) => {
                let Some((backend, id)) = target.split_once('/') else {
                    return Err(invalid("deleteInstance", "must be <backend>/<instance id>"));
                };
                self.delete_orphan_instance(backend, id, &live, why).await
            }
            Action::DeleteNode(name) => self.delete_orphan_node(name, &live, why).await,
            Action::ReleaseId(target) => {
                let Some((backend, name)) = target.split_once('/') else {
                    return Err(invalid("releaseId", "must be <backend>/<name>"));
                };
                if let Some(owner) = live
                    .iter()
                    .find(|c| c.backend == backend && c.node_name == name)
                {
                    return Err(RequestError::Precondition(format!(
                        "name {name} is held by live claim {}",
                        owner.id
                    )));
                }
                self.store.release_name(backend, name).await?;
                tracing::warn!(%backend, %name, %why, "repair: leaked name reservation released");
                Ok(String::new())
            }
            Action::FailClaim(id) => {
                let term = leadership.lost().clone();
                let claim = self
                    .transition(
                        &leadership,
                        &term,
                        id,
                        ClaimPhase::Failed,
                        &format!("reconciler: {why}"),
                        |_| {},
                    )
                    .await
                    .map_err(RequestError::Precondition)?;
                if claim.phase != ClaimPhase::Failed {
                    return Err(RequestError::Precondition(format!(
                        "claim {id} is {:?}: it cannot be failed",
                        claim.phase
                    )));
                }
                if let Err(e) = self.release(&claim).await {
                    tracing::warn!(claim = %id, error = %e, "repair: claim failed; its instance or node could not be deleted yet");
                }
                Ok(id.clone())
            }
            Action::AdoptInstance(adopt) => self.adopt(adopt, why).await,
            Action::SettleOperation(id) => {
                let mut op = self.store.op(id).await?;
                let claims = self.store.all_claims().await?;
                let Some((state, failures)) = op.outcome(|c| claims.get(c)) else {
                    return Err(RequestError::Precondition(format!(
                        "operation {id} still has claims in progress"
                    )));
                };
                if op.state != state {
                    tracing::warn!(op = %id, recorded = ?op.state, settled = ?state, %why, "repair: operation state rewritten from its claims");
                    op.state = state;
                    op.error = failures.join("; ");
                    op.updated_at_ms = now_ms();
                    self.store.put_op(&leadership, &op).await?;
                }
                Ok(String::new())
            }
        }
    }

    async fn delete_orphan_instance(
        &self,
        backend: &str,
        id: &str,
        live: &[NodeClaim],
        why: &str,
    ) -> Result<String, RequestError> {
        let guarded = self.backend(backend).map_err(RequestError::NotFound)?;
        if let Some(owner) = live
            .iter()
            .find(|c| c.backend == backend && c.instance_id == id)
        {
            return Err(RequestError::Precondition(format!(
                "instance {id} belongs to live claim {} ({:?})",
                owner.id, owner.phase
            )));
        }
        let ours = guarded
            .list_owned(&self.owner())
            .await
            .map_err(|e| RequestError::Unavailable(format!("backend {backend}: {e}")))?;
        let Some(instance) = ours.iter().find(|i| i.id == id) else {
            return Err(RequestError::Precondition(format!(
                "instance {id} on backend {backend} does not carry {CLUSTER_LABEL}={}: it is not this cluster's, and is left alone",
                self.cluster
            )));
        };
        if let Some(owner) = live.iter().find(|c| c.id == instance.claim_id) {
            return Err(RequestError::Precondition(format!(
                "instance {id} carries live claim {} ({:?})",
                owner.id, owner.phase
            )));
        }
        guarded
            .delete(id)
            .await
            .map_err(|e| RequestError::Precondition(format!("backend {backend}: {e}")))?;
        tracing::warn!(instance = %id, %backend, %why, "repair: orphan instance deleted");
        Ok(String::new())
    }

    async fn delete_orphan_node(
        &self,
        name: &str,
        live: &[NodeClaim],
        why: &str,
    ) -> Result<String, RequestError> {
        if let Some(owner) = live.iter().find(|c| c.node_name == name) {
            return Err(RequestError::Precondition(format!(
                "node {name} belongs to live claim {} ({:?})",
                owner.id, owner.phase
            )));
        }
        let node = self
            .kube
            .get(name)
            .await
            .map_err(|e| RequestError::Unavailable(format!("reading node {name}: {e}")))?;
        let Some(node) = node else {
            return Ok(String::new()); // gone already
        };
        let labels = node.metadata.labels.unwrap_or_default();
        let cluster = labels.get(CLUSTER_LABEL).map(String::as_str);
        if !labels.contains_key(POOL_LABEL) || cluster != Some(self.cluster.as_str()) {
            return Err(RequestError::Precondition(format!(
                "node {name} does not carry {POOL_LABEL} and {CLUSTER_LABEL}={}: Shoal did not create it, and leaves it alone",
                self.cluster
            )));
        }
        if let Some(claim) = labels.get(CLAIM_LABEL)
            && let Some(owner) = live.iter().find(|c| &c.id == claim)
        {
            return Err(RequestError::Precondition(format!(
                "node {name} carries live claim {} ({:?})",
                owner.id, owner.phase
            )));
        }
        self.kube
            .delete(name)
            .await
            .map_err(|e| RequestError::Precondition(format!("deleting node {name}: {e}")))?;
        tracing::warn!(node = %name, %why, "repair: orphan node deleted");
        Ok(String::new())
    }

    /// Adopts an instance Shoal created whose claim record is gone: writes the claim again
    /// (Launched, same id, so the instance's and the Node's labels match) with a create
    /// operation, and the leader takes it to Ready or, past the node TTL, rolls it back. Grows
    /// the pool like a create: refused at maxNodes, guarded by the pool ledger.
    async fn adopt(&self, adopt: &pb::AdoptInstance, why: &str) -> Result<String, RequestError> {
        let backend = self
            .backend(&adopt.backend)
            .map_err(RequestError::NotFound)?;
        let instance = backend
            .list_owned(&self.owner())
            .await
            .map_err(|e| RequestError::Unavailable(format!("backend {}: {e}", adopt.backend)))?
            .into_iter()
            .find(|i| i.id == adopt.instance_id)
            .ok_or_else(|| {
                RequestError::NotFound(format!(
                    "backend {} has no instance {} of cluster {}",
                    adopt.backend, adopt.instance_id, self.cluster
                ))
            })?;
        if instance.claim_id.is_empty() {
            return Err(RequestError::Precondition(format!(
                "instance {} carries no {CLAIM_LABEL} label: only instances Shoal created can be adopted",
                instance.id
            )));
        }
        let pool_name = if adopt.pool.is_empty() {
            instance.pool.clone()
        } else {
            adopt.pool.clone()
        };
        let pool = self.pool_from_store(&pool_name).await?.ok_or_else(|| {
            RequestError::NotFound(format!(
                "pool {pool_name:?} of instance {} not found",
                instance.id
            ))
        })?;
        if pool.backend != adopt.backend {
            return Err(RequestError::Precondition(format!(
                "pool {} uses backend {}, not {}",
                pool.name, pool.backend, adopt.backend
            )));
        }
        let id = instance.claim_id.clone();
        match self.store.claim(&id).await {
            Ok((existing, _)) => {
                return Err(RequestError::Precondition(format!(
                    "claim {id} exists ({:?}): the instance is not an orphan",
                    existing.phase
                )));
            }
            Err(store::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let room = self.pool_room(&pool.name).await?;
        let max = pool.bounds(std::time::SystemTime::now()).max;
        if room.live >= max {
            return Err(RequestError::Precondition(format!(
                "pool {} is at maxNodes {max}: adopting {} would exceed it",
                pool.name, instance.id
            )));
        }
        let now = now_ms();
        let op_id = random_id("op");
        let reason = format!("adopted instance {}: {why}", instance.id);
        let mut labels = self.ownership(&pool);
        labels.insert(CLAIM_LABEL.into(), id.clone());
        let claim = NodeClaim {
            version: RECORD_VERSION,
            labels,
            id: id.clone(),
            pool: pool.name.clone(),
            phase: ClaimPhase::Launched,
            backend: adopt.backend.clone(),
            instance_id: instance.id.clone(),
            node_name: if instance.node_name.is_empty() {
                instance.id.clone()
            } else {
                instance.node_name.clone()
            },
            operation_id: op_id.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            failure_reason: String::new(),
            history: vec![shoal_core::claim::Transition {
                phase: ClaimPhase::Launched,
                at_ms: now,
                reason: reason.clone(),
            }],
        };
        let op = Operation {
            version: RECORD_VERSION,
            id: op_id,
            kind: OperationKind::Create,
            pool: pool.name.clone(),
            idempotency_key: format!("adopt/{}/{}", adopt.backend, instance.id),
            claim_ids: vec![id.clone()],
            state: OperationState::Running,
            reason,
            created_at_ms: now,
            updated_at_ms: now,
            error: String::new(),
            traceparent: String::new(),
            planned: vec![],
            backend: adopt.backend.clone(),
            labels: Default::default(),
        };
        match self.store.adopt(&op, &claim, &room.ledger).await? {
            Written::Created | Written::Exists(_) => {
                tracing::warn!(claim = %id, instance = %instance.id, node = %claim.node_name, %why, "repair: orphan instance adopted");
                Ok(id)
            }
            Written::Raced => Err(RequestError::Unavailable(format!(
                "name {} is reserved by another claim, claim {id} was written, or the pool grew meanwhile; retry",
                claim.node_name
            ))),
        }
    }
}
