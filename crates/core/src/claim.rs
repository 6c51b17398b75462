//! NodeClaims and provisioner operations as stored (`claims/<id>`, `ops/<id>`: versioned JSON),
//! with their wire forms. The provisioner writes them; the decider and the reconciler read them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_proto::v1 as pb;

use crate::ClaimPhase;

/// Version of the stored JSON.
pub const RECORD_VERSION: u32 = 1;

fn version() -> u32 {
    RECORD_VERSION
}

fn ts(ms: u64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One phase change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// The new phase.
    pub phase: ClaimPhase,
    /// When (Unix ms).
    pub at_ms: u64,
    /// Why.
    pub reason: String,
}

/// Shoal's record of one node it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeClaim {
    /// Record version.
    #[serde(default = "version")]
    pub version: u32,
    /// Claim id (also the `shoal.dev/claim` label).
    pub id: String,
    /// Pool.
    pub pool: String,
    /// Phase.
    pub phase: ClaimPhase,
    /// Backend.
    pub backend: String,
    /// Backend instance id, once launched.
    #[serde(default)]
    pub instance_id: String,
    /// Kubernetes node name.
    pub node_name: String,
    /// Operation that created or is deleting it.
    pub operation_id: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub updated_at_ms: u64,
    /// Why it failed.
    #[serde(default)]
    pub failure_reason: String,
    /// Phase changes, oldest first.
    #[serde(default)]
    pub history: Vec<Transition>,
    /// Ownership and pool labels put on the instance and node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A phase change the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("claim {id}: {from:?} cannot become {to:?}")]
pub struct IllegalTransition {
    /// Claim.
    pub id: String,
    /// Current phase.
    pub from: ClaimPhase,
    /// Requested phase.
    pub to: ClaimPhase,
}

impl NodeClaim {
    /// Moves the claim to `next`, recording why; refuses transitions the lifecycle forbids.
    pub fn transition(
        &mut self,
        next: ClaimPhase,
        reason: impl Into<String>,
        now_ms: u64,
    ) -> Result<(), IllegalTransition> {
        if !self.phase.can_become(next) {
            return Err(IllegalTransition {
                id: self.id.clone(),
                from: self.phase,
                to: next,
            });
        }
        let reason = reason.into();
        if next == ClaimPhase::Failed {
            self.failure_reason = reason.clone();
        }
        self.phase = next;
        self.updated_at_ms = now_ms;
        self.history.push(Transition {
            phase: next,
            at_ms: now_ms,
            reason,
        });
        Ok(())
    }

    /// When the claim entered its current phase (Unix ms).
    pub fn phase_since_ms(&self) -> u64 {
        self.history
            .iter()
            .rev()
            .find(|t| t.phase == self.phase)
            .map_or(self.created_at_ms, |t| t.at_ms)
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::NodeClaim {
        pb::NodeClaim {
            id: self.id.clone(),
            pool: self.pool.clone(),
            phase: pb::ClaimPhase::from(self.phase) as i32,
            backend: self.backend.clone(),
            instance_id: self.instance_id.clone(),
            node_name: self.node_name.clone(),
            operation_id: self.operation_id.clone(),
            created_at: ts(self.created_at_ms),
            updated_at: ts(self.updated_at_ms),
            failure_reason: self.failure_reason.clone(),
            history: self
                .history
                .iter()
                .map(|t| pb::PhaseTransition {
                    phase: pb::ClaimPhase::from(t.phase) as i32,
                    at: ts(t.at_ms),
                    reason: t.reason.clone(),
                })
                .collect(),
            labels: self.labels.clone(),
        }
    }

    /// From the wire form (as `Evaluate` callers pass claims); `None` for an unspecified phase.
    pub fn from_proto(c: &pb::NodeClaim) -> Option<NodeClaim> {
        let ms = |t: &Option<prost_types::Timestamp>| {
            t.as_ref().map_or(0, |t| {
                (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
            })
        };
        Some(NodeClaim {
            version: RECORD_VERSION,
            id: c.id.clone(),
            pool: c.pool.clone(),
            phase: ClaimPhase::try_from(pb::ClaimPhase::try_from(c.phase).ok()?).ok()?,
            backend: c.backend.clone(),
            instance_id: c.instance_id.clone(),
            node_name: c.node_name.clone(),
            operation_id: c.operation_id.clone(),
            created_at_ms: ms(&c.created_at),
            updated_at_ms: ms(&c.updated_at),
            failure_reason: c.failure_reason.clone(),
            history: Vec::new(),
            labels: c.labels.clone(),
        })
    }
}

/// Kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum OperationKind {
    /// CreateNodes.
    Create,
    /// DeleteNodes.
    Delete,
}

/// Progress of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum OperationState {
    /// Claims are still moving.
    Running,
    /// Every claim reached its goal.
    Succeeded,
    /// Some claims failed.
    PartiallyFailed,
    /// Every claim failed, or the operation as a whole did.
    Failed,
}

/// One CreateNodes or DeleteNodes call and its claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Record version.
    #[serde(default = "version")]
    pub version: u32,
    /// Operation id.
    pub id: String,
    /// Create or delete.
    pub kind: OperationKind,
    /// Pool (creates; the first node's pool for deletes).
    pub pool: String,
    /// Caller's idempotency key.
    pub idempotency_key: String,
    /// Claims it creates or deletes.
    pub claim_ids: Vec<String>,
    /// Progress.
    pub state: OperationState,
    /// Why it was asked for.
    pub reason: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub updated_at_ms: u64,
    /// What went wrong, if anything.
    #[serde(default)]
    pub error: String,
    /// W3C traceparent of the request, so work resumed after a restart joins its trace.
    #[serde(default)]
    pub traceparent: String,
    /// Creates: the claims to write (id and node name). The operation is written first, in one
    /// small transaction whatever its size; its claims follow in chunks, written by the request
    /// and — after a crash half way — by the leader, from this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<PlannedClaim>,
    /// Creates: the backend the claims use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// Creates: labels every claim carries (ownership and the pool's template labels); each
    /// claim adds its own `shoal.dev/claim`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One claim a create operation will write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedClaim {
    /// Claim id.
    pub id: String,
    /// Node name.
    pub node_name: String,
}

impl Operation {
    /// The wire form.
    pub fn to_proto(&self) -> pb::Operation {
        pb::Operation {
            id: self.id.clone(),
            kind: match self.kind {
                OperationKind::Create => pb::OperationKind::Create,
                OperationKind::Delete => pb::OperationKind::Delete,
            } as i32,
            pool: self.pool.clone(),
            idempotency_key: self.idempotency_key.clone(),
            claim_ids: self.claim_ids.clone(),
            state: match self.state {
                OperationState::Running => pb::OperationState::Running,
                OperationState::Succeeded => pb::OperationState::Succeeded,
                OperationState::PartiallyFailed => pb::OperationState::PartiallyFailed,
                OperationState::Failed => pb::OperationState::Failed,
            } as i32,
            reason: self.reason.clone(),
            created_at: ts(self.created_at_ms),
            updated_at: ts(self.updated_at_ms),
            error: self.error.clone(),
        }
    }

    /// The Pending claim record of a planned claim of this create operation: the same record
    /// whoever writes it (the request or, after a crash, the leader), so either may.
    pub fn planned_claim(&self, planned: &PlannedClaim) -> NodeClaim {
        let mut labels = self.labels.clone();
        labels.insert(crate::labels::CLAIM.to_string(), planned.id.clone());
        NodeClaim {
            version: RECORD_VERSION,
            id: planned.id.clone(),
            pool: self.pool.clone(),
            phase: ClaimPhase::Pending,
            backend: self.backend.clone(),
            instance_id: String::new(),
            node_name: planned.node_name.clone(),
            operation_id: self.id.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.created_at_ms,
            failure_reason: String::new(),
            history: vec![Transition {
                phase: ClaimPhase::Pending,
                at_ms: self.created_at_ms,
                reason: self.reason.clone(),
            }],
            labels,
        }
    }

    /// True once nothing more will happen.
    pub fn is_finished(&self) -> bool {
        self.state != OperationState::Running
    }

    /// What the operation's state should be, judged from its claims (`claim` looks one up;
    /// `None` = its record is gone): `None` while any claim is still moving, else the state and
    /// the claims that did not reach the goal. A create succeeded for a claim that was Ready at
    /// some point (it may be draining or deleted since); a delete for a claim it removed (a
    /// claim a later delete took over counts against this one).
    pub fn outcome<'a>(
        &self,
        claim: impl Fn(&str) -> Option<&'a NodeClaim>,
    ) -> Option<(OperationState, Vec<String>)> {
        let mut failures = Vec::new();
        for id in &self.claim_ids {
            let Some(c) = claim(id) else {
                failures.push(format!("{id}: claim record is gone"));
                continue;
            };
            if self.kind == OperationKind::Delete && c.operation_id != self.id {
                // A later DeleteNodes took the claim over: this one did not remove it.
                failures.push(format!("{id}: handed to operation {}", c.operation_id));
                continue;
            }
            let reached = match self.kind {
                OperationKind::Create => c.history.iter().any(|t| t.phase == ClaimPhase::Ready),
                OperationKind::Delete => c.phase == ClaimPhase::Deleted,
            };
            let moving = match self.kind {
                OperationKind::Create => matches!(
                    c.phase,
                    ClaimPhase::Pending | ClaimPhase::Launched | ClaimPhase::Registered
                ),
                OperationKind::Delete => {
                    matches!(c.phase, ClaimPhase::Draining | ClaimPhase::Terminating)
                }
            };
            if reached {
                continue;
            }
            if moving {
                return None;
            }
            let why = if c.failure_reason.is_empty() {
                format!("{:?}", c.phase)
            } else {
                c.failure_reason.clone()
            };
            failures.push(format!("{id}: {why}"));
        }
        let state = if failures.is_empty() {
            OperationState::Succeeded
        } else if failures.len() == self.claim_ids.len() {
            OperationState::Failed
        } else {
            OperationState::PartiallyFailed
        };
        Some((state, failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> NodeClaim {
        NodeClaim {
            version: RECORD_VERSION,
            id: "c1".into(),
            pool: "general".into(),
            phase: ClaimPhase::Pending,
            backend: "sim".into(),
            instance_id: String::new(),
            node_name: "general-1".into(),
            operation_id: "op1".into(),
            created_at_ms: 1000,
            updated_at_ms: 1000,
            failure_reason: String::new(),
            history: vec![],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn transitions_are_checked_and_recorded() {
        let mut c = claim();
        c.transition(ClaimPhase::Launched, "instance i-1", 2000)
            .expect("legal");
        assert_eq!(c.phase_since_ms(), 2000);
        let err = c
            .transition(ClaimPhase::Pending, "back", 3000)
            .expect_err("illegal");
        assert_eq!(err.from, ClaimPhase::Launched);
        c.transition(ClaimPhase::Failed, "never registered", 4000)
            .expect("legal");
        assert_eq!(c.failure_reason, "never registered");
        assert_eq!(c.history.len(), 2);
        let json = serde_json::to_string(&c).expect("json");
        assert!(json.contains("\"phase\":\"Failed\""), "{json}");
        let back: NodeClaim = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, c);
        assert_eq!(
            NodeClaim::from_proto(&c.to_proto()).map(|p| p.phase),
            Some(ClaimPhase::Failed)
        );
    }

    #[test]
    fn an_operation_outcome_is_judged_from_its_claims() {
        let op = |kind, ids: &[&str]| Operation {
            version: RECORD_VERSION,
            id: "op1".into(),
            kind,
            pool: "general".into(),
            idempotency_key: "k".into(),
            claim_ids: ids.iter().map(|s| s.to_string()).collect(),
            state: OperationState::Running,
            reason: String::new(),
            created_at_ms: 1000,
            updated_at_ms: 1000,
            error: String::new(),
            traceparent: String::new(),
            planned: vec![],
            backend: String::new(),
            labels: BTreeMap::new(),
        };
        let mut ready = claim();
        ready.id = "c1".into();
        for p in [
            ClaimPhase::Launched,
            ClaimPhase::Registered,
            ClaimPhase::Ready,
        ] {
            ready.transition(p, "up", 2000).expect("legal");
        }
        let mut draining = ready.clone();
        draining.id = "c3".into();
        draining.operation_id = "op1".into();
        draining
            .transition(ClaimPhase::Draining, "scale down", 3000)
            .expect("legal");
        let mut failed = claim();
        failed.id = "c2".into();
        failed
            .transition(ClaimPhase::Failed, "boot failed", 2000)
            .expect("legal");
        let pending = claim();
        let all = [&ready, &failed, &draining];
        let look = |id: &str| all.iter().copied().find(|c| c.id == id);

        let create = op(OperationKind::Create, &["c1", "c3"]);
        assert_eq!(
            create.outcome(look).map(|o| o.0),
            Some(OperationState::Succeeded)
        );
        let (state, failures) = op(OperationKind::Create, &["c1", "c2"])
            .outcome(look)
            .expect("settled");
        assert_eq!(state, OperationState::PartiallyFailed);
        assert_eq!(failures, ["c2: boot failed"]);
        let gone = op(OperationKind::Create, &["c9"])
            .outcome(look)
            .expect("settled");
        assert_eq!(gone.0, OperationState::Failed);
        let moving = [&pending];
        assert_eq!(
            op(OperationKind::Create, &["c1"])
                .outcome(|id| moving.iter().copied().find(|c| c.id == id)),
            None,
            "a Pending claim is still moving"
        );
        // A delete is done when its claims are Deleted; a claim back to Ready failed it.
        assert_eq!(op(OperationKind::Delete, &["c3"]).outcome(look), None);
        let mut later = draining.clone();
        later.operation_id = "op2".into();
        let (state, failures) = op(OperationKind::Delete, &["c3"])
            .outcome(|_| Some(&later))
            .expect("handed over");
        assert_eq!(state, OperationState::Failed);
        assert_eq!(failures, ["c3: handed to operation op2"]);
        assert_eq!(
            op(OperationKind::Delete, &["c1"])
                .outcome(look)
                .map(|o| o.0),
            Some(OperationState::Failed)
        );
    }
}
