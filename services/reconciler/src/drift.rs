//! Drift classification: a pure function of the three views — NodeClaims in the store,
//! instances the backends report, Nodes in Kubernetes — plus name reservations and the time,
//! to the differences between them and the repair each calls for. No I/O: the pass gathers the
//! views, this decides, the provisioner repairs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, Operation, OperationState},
};
use shoal_proto::v1 as pb;

/// What Kubernetes says of one Node carrying our labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `shoal.dev/claim` label.
    pub claim: String,
    /// `shoal.dev/pool` label.
    pub pool: String,
    /// Ready condition True.
    pub ready: bool,
    /// When the Ready condition last changed (Unix ms).
    pub ready_changed_ms: u64,
}

pub use shoal_state::records::Reservation;

/// What to do about an orphan instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrphanPolicy {
    /// Delete it (after the grace period).
    Delete,
    /// Create a claim for it and keep it.
    Adopt,
    /// Only report it.
    ReportOnly,
}

/// Thresholds of the classification.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Orphan instances younger than this are left alone (they may still be booting, with
    /// their claim being written).
    pub orphan_grace: Duration,
    /// What to do with orphan instances.
    pub orphans: OrphanPolicy,
    /// A Node NotReady this long is acted on (orphan node, phase mismatch).
    pub not_ready_grace: Duration,
    /// A claim in Pending/Launched/Registered longer than this is stuck (the provisioner's
    /// node TTL plus a margin).
    pub launch_ttl: Duration,
    /// A claim in Draining/Terminating longer than this is stuck.
    pub removal_ttl: Duration,
    /// An operation still Running this long after its last claim settled has lost its
    /// result (the leader records it within seconds).
    pub operation_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            orphan_grace: Duration::from_secs(300),
            orphans: OrphanPolicy::Delete,
            not_ready_grace: Duration::from_secs(300),
            launch_ttl: Duration::from_secs(900),
            removal_ttl: Duration::from_secs(1800),
            operation_grace: Duration::from_secs(60),
        }
    }
}

/// The repair a drift calls for (carried out through `ProvisionerService/Repair`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Delete an instance no claim owns.
    DeleteInstance {
        /// Backend.
        backend: String,
        /// Instance id.
        instance: String,
    },
    /// Create a claim for an instance and keep it.
    AdoptInstance {
        /// Backend.
        backend: String,
        /// Instance id.
        instance: String,
        /// Pool.
        pool: String,
    },
    /// Mark a claim Failed (the provisioner cleans up what it holds).
    FailClaim(String),
    /// Delete a Node object.
    DeleteNode(String),
    /// Release a name reservation (`<backend>/<name>`).
    ReleaseId(String),
    /// Rewrite an operation's state from its claims.
    SettleOperation(String),
    /// Nothing now: reported only (policy) or within its grace period.
    None,
}

/// One difference between the views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Kind.
    pub kind: pb::DriftType,
    /// Claim id, instance id, node name or reserved id.
    pub subject: String,
    /// Backend, when it concerns one.
    pub backend: String,
    /// Pool, when known.
    pub pool: String,
    /// What was seen.
    pub details: String,
    /// What to do.
    pub repair: Repair,
    /// Within a grace period: look again next pass.
    pub deferred: bool,
}

/// Everything one pass looks at.
pub struct Views<'a> {
    /// Every claim in the store.
    pub claims: &'a [NodeClaim],
    /// Instances by backend, for backends that could be listed.
    pub instances: &'a BTreeMap<String, Vec<pb::Instance>>,
    /// Nodes with our claim label.
    pub nodes: &'a [NodeView],
    /// Name reservations.
    pub reservations: &'a [Reservation],
    /// Provisioner operations.
    pub operations: &'a [Operation],
    /// Now (Unix ms).
    pub now_ms: u64,
}

fn age(now: u64, since: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(since))
}

fn created_ms(i: &pb::Instance) -> u64 {
    i.created_at.as_ref().map_or(0, |t| {
        t.seconds.max(0) as u64 * 1000 + t.nanos.max(0) as u64 / 1_000_000
    })
}

/// Classifies every difference between the views.
pub fn classify(views: &Views<'_>, policy: &Policy) -> Vec<Finding> {
    let now = views.now_ms;
    let mut out = Vec::new();
    let live: HashMap<&str, &NodeClaim> = views
        .claims
        .iter()
        .filter(|c| !c.phase.is_terminal())
        .map(|c| (c.id.as_str(), c))
        .collect();

    // Instances without a live claim.
    let mut instance_claims: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (backend, instances) in views.instances {
        for i in instances {
            instance_claims.insert((backend.as_str(), i.id.as_str()));
            instance_claims.insert((backend.as_str(), i.claim_id.as_str()));
            if live.contains_key(i.claim_id.as_str()) {
                continue;
            }
            let young = age(now, created_ms(i)) < policy.orphan_grace;
            let repair = match policy.orphans {
                _ if young => Repair::None,
                OrphanPolicy::Delete => Repair::DeleteInstance {
                    backend: backend.clone(),
                    instance: i.id.clone(),
                },
                OrphanPolicy::Adopt => Repair::AdoptInstance {
                    backend: backend.clone(),
                    instance: i.id.clone(),
                    pool: i.pool.clone(),
                },
                OrphanPolicy::ReportOnly => Repair::None,
            };
            out.push(Finding {
                kind: pb::DriftType::OrphanInstance,
                subject: i.id.clone(),
                backend: backend.clone(),
                pool: i.pool.clone(),
                details: format!(
                    "instance {} ({}) carries claim {:?}, which is not a live claim",
                    i.id, i.node_name, i.claim_id
                ),
                repair,
                deferred: young,
            });
        }
    }

    let nodes: HashMap<&str, &NodeView> =
        views.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    for claim in live.values() {
        // Claims whose instance the backend no longer has (only for backends that answered).
        let holds_instance = matches!(
            claim.phase,
            ClaimPhase::Launched
                | ClaimPhase::Registered
                | ClaimPhase::Ready
                | ClaimPhase::Draining
        );
        if holds_instance
            && views.instances.contains_key(&claim.backend)
            && !instance_claims.contains(&(claim.backend.as_str(), claim.instance_id.as_str()))
            && !instance_claims.contains(&(claim.backend.as_str(), claim.id.as_str()))
        {
            out.push(Finding {
                kind: pb::DriftType::MissingInstance,
                subject: claim.id.clone(),
                backend: claim.backend.clone(),
                pool: claim.pool.clone(),
                details: format!(
                    "claim {} ({:?}, node {}) says instance {} exists; backend {} does not have it",
                    claim.id, claim.phase, claim.node_name, claim.instance_id, claim.backend
                ),
                repair: Repair::FailClaim(claim.id.clone()),
                deferred: false,
            });
            continue;
        }
        // Stuck in a transient phase.
        let in_phase = age(now, claim.phase_since_ms());
        let ttl = match claim.phase {
            ClaimPhase::Pending | ClaimPhase::Launched | ClaimPhase::Registered => {
                Some(policy.launch_ttl)
            }
            ClaimPhase::Draining | ClaimPhase::Terminating => Some(policy.removal_ttl),
            _ => None,
        };
        if let Some(ttl) = ttl
            && in_phase > ttl
        {
            out.push(Finding {
                kind: pb::DriftType::StuckClaim,
                subject: claim.id.clone(),
                backend: claim.backend.clone(),
                pool: claim.pool.clone(),
                details: format!(
                    "claim {} has been {:?} for {}s (limit {}s)",
                    claim.id,
                    claim.phase,
                    in_phase.as_secs(),
                    ttl.as_secs()
                ),
                repair: Repair::FailClaim(claim.id.clone()),
                deferred: false,
            });
            continue;
        }
        // Ready claim, node NotReady for long (or gone).
        if claim.phase == ClaimPhase::Ready {
            let bad = match nodes.get(claim.node_name.as_str()) {
                Some(n) if !n.ready => age(now, n.ready_changed_ms) > policy.not_ready_grace,
                Some(_) => false,
                None => age(now, claim.phase_since_ms()) > policy.not_ready_grace,
            };
            if bad {
                out.push(Finding {
                    kind: pb::DriftType::PhaseMismatch,
                    subject: claim.id.clone(),
                    backend: claim.backend.clone(),
                    pool: claim.pool.clone(),
                    details: format!(
                        "claim {} is Ready but node {} is NotReady or gone for more than {}s",
                        claim.id,
                        claim.node_name,
                        policy.not_ready_grace.as_secs()
                    ),
                    repair: Repair::FailClaim(claim.id.clone()),
                    deferred: false,
                });
            }
        }
    }

    // Nodes with our labels and no live claim, NotReady beyond the grace (a Ready one may be a
    // node whose claim is being written; it is reported, not deleted).
    for node in views.nodes {
        if live.contains_key(node.claim.as_str()) {
            continue;
        }
        if policy.orphans == OrphanPolicy::Adopt
            && views
                .instances
                .values()
                .flatten()
                .any(|i| i.claim_id == node.claim)
        {
            // Its instance is adopted with the same claim id, and the Node with it.
            continue;
        }
        let stale = !node.ready && age(now, node.ready_changed_ms) > policy.not_ready_grace;
        out.push(Finding {
            kind: pb::DriftType::OrphanNode,
            subject: node.name.clone(),
            backend: String::new(),
            pool: node.pool.clone(),
            details: format!(
                "node {} carries claim {:?}, which is not a live claim ({})",
                node.name,
                node.claim,
                if node.ready { "Ready" } else { "NotReady" }
            ),
            repair: if stale {
                Repair::DeleteNode(node.name.clone())
            } else {
                Repair::None
            },
            deferred: !stale,
        });
    }

    // Reservations no live claim holds.
    for r in views.reservations {
        // A node name is held by the live claim of that name; a backend's own id
        // (`<kind>:<id>`, e.g. a Proxmox `vmid:105`) by any live claim on that backend.
        let held = live
            .get(r.claim.as_str())
            .is_some_and(|c| c.backend == r.backend && (c.node_name == r.id || r.id.contains(':')));
        let adopted = policy.orphans == OrphanPolicy::Adopt
            && views
                .instances
                .get(&r.backend)
                .is_some_and(|is| is.iter().any(|i| i.claim_id == r.claim));
        if !held && !adopted {
            out.push(Finding {
                kind: pb::DriftType::LeakedId,
                subject: format!("{}/{}", r.backend, r.id),
                backend: r.backend.clone(),
                pool: String::new(),
                details: format!(
                    "name {} on {} is reserved for claim {:?}, which does not hold it",
                    r.id, r.backend, r.claim
                ),
                repair: Repair::ReleaseId(format!("{}/{}", r.backend, r.id)),
                deferred: false,
            });
        }
    }

    // Operations whose recorded state disagrees with their claims.
    let by_id: HashMap<&str, &NodeClaim> =
        views.claims.iter().map(|c| (c.id.as_str(), c)).collect();
    let adopting = |claim: &str| {
        policy.orphans == OrphanPolicy::Adopt
            && views
                .instances
                .values()
                .flatten()
                .any(|i| i.claim_id == claim)
    };
    for op in views.operations {
        if op
            .claim_ids
            .iter()
            .any(|id| !by_id.contains_key(id.as_str()) && adopting(id))
        {
            // Judged once the lost claim is adopted back.
            continue;
        }
        if op.is_finished()
            && op
                .claim_ids
                .iter()
                .any(|id| !by_id.contains_key(id.as_str()))
        {
            // A finished operation whose claims retention removed: nothing left to judge.
            continue;
        }
        let Some((settled, failures)) = op.outcome(|id| by_id.get(id).copied()) else {
            continue;
        };
        let last_settled = op
            .claim_ids
            .iter()
            .filter_map(|id| by_id.get(id.as_str()))
            .map(|c| c.updated_at_ms)
            .max()
            .unwrap_or(op.updated_at_ms);
        let wrong = if op.state == OperationState::Running {
            age(now, last_settled.max(op.updated_at_ms)) > policy.operation_grace
        } else {
            op.state != settled
        };
        if wrong {
            out.push(Finding {
                kind: pb::DriftType::CounterMismatch,
                subject: op.id.clone(),
                backend: String::new(),
                pool: op.pool.clone(),
                details: format!(
                    "operation {} ({:?}, {} claims) is recorded {:?}; its claims say {:?}{}",
                    op.id,
                    op.kind,
                    op.claim_ids.len(),
                    op.state,
                    settled,
                    if failures.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", failures.join("; "))
                    }
                ),
                repair: Repair::SettleOperation(op.id.clone()),
                deferred: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 10_000_000;

    fn claim(id: &str, node: &str, phase: ClaimPhase, since: u64) -> NodeClaim {
        NodeClaim {
            version: 1,
            id: id.into(),
            pool: "general".into(),
            phase,
            backend: "sim".into(),
            instance_id: format!("i-{id}"),
            node_name: node.into(),
            operation_id: "op".into(),
            created_at_ms: since,
            updated_at_ms: since,
            failure_reason: String::new(),
            history: vec![shoal_core::claim::Transition {
                phase,
                at_ms: since,
                reason: String::new(),
            }],
            labels: BTreeMap::new(),
        }
    }

    fn instance(id: &str, claim: &str, created_ms: u64) -> pb::Instance {
        pb::Instance {
            id: id.into(),
            backend: "sim".into(),
            pool: "general".into(),
            claim_id: claim.into(),
            state: "running".into(),
            created_at: Some(prost_types::Timestamp {
                seconds: (created_ms / 1000) as i64,
                nanos: 0,
            }),
            node_name: format!("n-{claim}"),
            ..Default::default()
        }
    }

    fn node(name: &str, claim: &str, ready: bool, changed: u64) -> NodeView {
        NodeView {
            name: name.into(),
            claim: claim.into(),
            pool: "general".into(),
            ready,
            ready_changed_ms: changed,
        }
    }

    fn run(
        claims: &[NodeClaim],
        instances: Vec<pb::Instance>,
        nodes: &[NodeView],
        reservations: &[Reservation],
    ) -> Vec<Finding> {
        let instances: BTreeMap<String, Vec<pb::Instance>> =
            [("sim".to_string(), instances)].into_iter().collect();
        classify(
            &Views {
                claims,
                instances: &instances,
                nodes,
                reservations,
                operations: &[],
                now_ms: NOW,
            },
            &Policy::default(),
        )
    }

    fn kinds(f: &[Finding]) -> Vec<pb::DriftType> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn agreeing_views_have_no_drift() {
        let c = claim("c1", "general-1", ClaimPhase::Ready, NOW - 1000);
        let f = run(
            std::slice::from_ref(&c),
            vec![instance("i-c1", "c1", NOW - 1000)],
            &[node("general-1", "c1", true, NOW - 900)],
            &[Reservation {
                backend: "sim".into(),
                id: "general-1".into(),
                claim: "c1".into(),
            }],
        );
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn an_orphan_instance_is_deleted_after_its_grace_and_left_alone_before() {
        let old = run(&[], vec![instance("i-x", "gone", NOW - 600_000)], &[], &[]);
        assert_eq!(kinds(&old), [pb::DriftType::OrphanInstance]);
        assert_eq!(
            old[0].repair,
            Repair::DeleteInstance {
                backend: "sim".into(),
                instance: "i-x".into()
            }
        );
        let young = run(&[], vec![instance("i-y", "new", NOW - 10_000)], &[], &[]);
        assert!(young[0].deferred && young[0].repair == Repair::None);
    }

    #[test]
    fn a_claim_whose_instance_vanished_is_failed_unless_the_backend_could_not_be_listed() {
        let c = claim("c1", "general-1", ClaimPhase::Ready, NOW - 1000);
        let f = run(
            std::slice::from_ref(&c),
            vec![],
            &[node("general-1", "c1", true, 0)],
            &[],
        );
        assert_eq!(kinds(&f), [pb::DriftType::MissingInstance]);
        assert_eq!(f[0].repair, Repair::FailClaim("c1".into()));
        // Unknown is not absent: no backend listing, no finding.
        let none = BTreeMap::new();
        let f = classify(
            &Views {
                claims: std::slice::from_ref(&c),
                instances: &none,
                nodes: &[],
                reservations: &[],
                operations: &[],
                now_ms: NOW,
            },
            &Policy::default(),
        );
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn orphan_nodes_stuck_claims_mismatches_and_leaked_ids() {
        let stuck = claim("c2", "general-2", ClaimPhase::Launched, NOW - 3_600_000);
        let mismatch = claim("c3", "general-3", ClaimPhase::Ready, NOW - 3_600_000);
        let f = run(
            &[stuck, mismatch],
            vec![instance("i-c2", "c2", 0), instance("i-c3", "c3", 0)],
            &[
                node("general-3", "c3", false, NOW - 600_000),
                node("rogue-1", "nobody", false, NOW - 600_000),
                node("rogue-2", "nobody", true, NOW - 600_000),
            ],
            &[Reservation {
                backend: "sim".into(),
                id: "general-9".into(),
                claim: "c9".into(),
            }],
        );
        let mut k = kinds(&f);
        k.sort_by_key(|k| *k as i32);
        assert_eq!(
            k,
            [
                pb::DriftType::OrphanNode,
                pb::DriftType::OrphanNode,
                pb::DriftType::StuckClaim,
                pb::DriftType::PhaseMismatch,
                pb::DriftType::LeakedId
            ]
        );
        let rogue = |name: &str| f.iter().find(|x| x.subject == name).expect("finding");
        assert_eq!(
            rogue("rogue-1").repair,
            Repair::DeleteNode("rogue-1".into())
        );
        assert!(
            rogue("rogue-2").deferred,
            "a Ready orphan node is reported, not deleted"
        );
        assert_eq!(
            rogue("sim/general-9").repair,
            Repair::ReleaseId("sim/general-9".into())
        );
    }

    fn operation(id: &str, state: OperationState, claims: &[&str]) -> Operation {
        Operation {
            version: 1,
            id: id.into(),
            kind: shoal_core::claim::OperationKind::Create,
            pool: "general".into(),
            idempotency_key: id.into(),
            claim_ids: claims.iter().map(|c| c.to_string()).collect(),
            state,
            reason: String::new(),
            created_at_ms: NOW - 600_000,
            updated_at_ms: NOW - 600_000,
            error: String::new(),
            traceparent: String::new(),
            planned: vec![],
            backend: String::new(),
            labels: Default::default(),
        }
    }

    #[test]
    fn operations_whose_record_disagrees_with_their_claims_are_settled() {
        let mut failed = claim("c1", "general-1", ClaimPhase::Failed, NOW - 500_000);
        failed.failure_reason = "boot failed".into();
        let ready = claim("c2", "general-2", ClaimPhase::Ready, NOW - 500_000);
        let booting = claim("c3", "general-3", ClaimPhase::Launched, NOW - 1000);
        let claims = [failed, ready, booting];
        let ops = [
            // Recorded Succeeded, one claim failed: wrong.
            operation("op-a", OperationState::Succeeded, &["c1", "c2"]),
            // Right.
            operation("op-b", OperationState::Succeeded, &["c2"]),
            // Running with every claim settled long ago: its result was lost.
            operation("op-c", OperationState::Running, &["c2"]),
            // Running with a claim still booting: fine.
            operation("op-d", OperationState::Running, &["c3"]),
        ];
        let instances = BTreeMap::new();
        let f = classify(
            &Views {
                claims: &claims,
                instances: &instances,
                nodes: &[],
                reservations: &[],
                operations: &ops,
                now_ms: NOW,
            },
            &Policy {
                launch_ttl: Duration::from_secs(3600),
                ..Policy::default()
            },
        );
        let mismatches: Vec<&Finding> = f
            .iter()
            .filter(|f| f.kind == pb::DriftType::CounterMismatch)
            .collect();
        let settled: Vec<&Repair> = mismatches.iter().map(|f| &f.repair).collect();
        assert_eq!(
            settled,
            [
                &Repair::SettleOperation("op-a".into()),
                &Repair::SettleOperation("op-c".into())
            ],
            "{f:#?}"
        );
        let details = &mismatches[0].details;
        assert!(
            details.contains("PartiallyFailed") && details.contains("boot failed"),
            "{details}"
        );
    }

    #[test]
    fn a_backend_id_is_held_by_a_live_claim_and_leaks_when_its_claim_is_gone() {
        let live = claim("c1", "general-1", ClaimPhase::Ready, NOW - 60_000);
        let vmid = |id: &str, claim: &str| Reservation {
            backend: "sim".into(),
            id: id.into(),
            claim: claim.into(),
        };
        let f = run(
            &[live],
            vec![instance("i-c1", "c1", 0)],
            &[node("general-1", "c1", true, NOW - 60_000)],
            &[vmid("vmid:9000", "c1"), vmid("vmid:9001", "c-gone")],
        );
        assert_eq!(kinds(&f), [pb::DriftType::LeakedId], "{f:#?}");
        assert_eq!(f[0].subject, "sim/vmid:9001");
        assert_eq!(f[0].repair, Repair::ReleaseId("sim/vmid:9001".into()));
    }

    #[test]
    fn under_the_adopt_policy_an_orphan_is_adopted_with_its_node_and_name() {
        let instances: BTreeMap<String, Vec<pb::Instance>> = [(
            "sim".to_string(),
            vec![instance("i-x", "c-lost", NOW - 600_000)],
        )]
        .into();
        let f = classify(
            &Views {
                claims: &[],
                instances: &instances,
                nodes: &[node("n-c-lost", "c-lost", false, NOW - 600_000)],
                reservations: &[Reservation {
                    backend: "sim".into(),
                    id: "n-c-lost".into(),
                    claim: "c-lost".into(),
                }],
                operations: &[],
                now_ms: NOW,
            },
            &Policy {
                orphans: OrphanPolicy::Adopt,
                ..Policy::default()
            },
        );
        assert_eq!(kinds(&f), [pb::DriftType::OrphanInstance], "{f:#?}");
        assert_eq!(
            f[0].repair,
            Repair::AdoptInstance {
                backend: "sim".into(),
                instance: "i-x".into(),
                pool: "general".into()
            }
        );
    }
}
