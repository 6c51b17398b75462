//! Planner scenarios (the seed systems' and ours) and property tests of its invariants.

use std::{collections::BTreeMap, time::Duration};

use proptest::prelude::*;
use shoal_core::{
    ClaimPhase, Resources,
    claim::NodeClaim,
    fit::{PodDemand, constraint_misfit, misfits},
    pool::Pool,
    snapshot::{node_facts, pod_demand, timestamp},
};

use super::*;

const GI: i64 = 1 << 30;

fn pool(name: &str, extra: &str) -> Pool {
    let down = if extra.contains("scaleDown") {
        ""
    } else {
        "  scaleDown: { unneededFor: 10m, cooldown: 0s }\n"
    };
    let yaml = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {name} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"4\", memory: 8Gi }}\n  limits: {{ minNodes: 0, maxNodes: 10 }}\n{down}{extra}"
    );
    Pool::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("pool {name}: {e}\n{yaml}"))
        .1
}

fn res(cpu: i64, mem: i64, pods: i64) -> pb::Resources {
    pb::Resources {
        cpu_millis: cpu,
        memory_bytes: mem,
        pods,
        ephemeral_storage_bytes: 0,
        extended: BTreeMap::new(),
    }
}

fn class(id: u64, owner: &str, cpu: i64, mem: i64) -> pb::PodClass {
    pb::PodClass {
        id,
        namespace: "default".into(),
        owner: Some(pb::OwnerRef {
            kind: "Deployment".into(),
            name: owner.into(),
        }),
        requests: Some(res(cpu, mem, 1)),
        ..Default::default()
    }
}

fn node(name: &str, pool: &str, pods: &[(u64, i32)], classes: &[pb::PodClass]) -> pb::NodeInfo {
    let mut requested = res(0, 0, 0);
    for (id, count) in pods {
        let c = classes.iter().find(|c| c.id == *id).expect("class");
        let r = c.requests.clone().unwrap_or_default();
        requested.cpu_millis += r.cpu_millis * *count as i64;
        requested.memory_bytes += r.memory_bytes * *count as i64;
        requested.pods += *count as i64;
    }
    pb::NodeInfo {
        name: name.into(),
        pool: pool.into(),
        allocatable: Some(pb::Resources {
            ephemeral_storage_bytes: 100 * GI,
            ..res(4000, 8 * GI, 110)
        }),
        requested: Some(requested),
        labels: [
            ("shoal.dev/pool".to_string(), pool.to_string()),
            ("kubernetes.io/hostname".to_string(), name.to_string()),
        ]
        .into_iter()
        .collect(),
        readiness: pb::NodeReadiness::Ready as i32,
        created_at: Some(timestamp(epoch(1000))),
        pods: pods
            .iter()
            .map(|(id, count)| pb::ClassCount {
                class_id: *id,
                count: *count,
            })
            .collect(),
        ..Default::default()
    }
}

fn epoch(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_770_000_000 + secs)
}

fn pending(id: u64, count: i32, since: u64) -> pb::PendingPods {
    pb::PendingPods {
        class_id: id,
        count,
        unschedulable_since: Some(timestamp(epoch(since))),
        scheduler_message: "0/1 nodes are available: 1 Insufficient cpu.".into(),
    }
}

fn snap(
    nodes: Vec<pb::NodeInfo>,
    classes: Vec<pb::PodClass>,
    pending: Vec<pb::PendingPods>,
) -> pb::ClusterSnapshot {
    pb::ClusterSnapshot {
        sequence: 7,
        nodes,
        classes,
        pending,
        ..Default::default()
    }
}

fn run(
    s: &pb::ClusterSnapshot,
    pools: &[Pool],
    claims: &[NodeClaim],
    history: &History,
    now: SystemTime,
) -> Plan {
    plan(&PlanInput {
        snapshot: s,
        pools,
        claims,
        history,
        now,
        expanders: &[Expander::LeastWaste],
        seed: 1,
        packing_budget: super::packing::DEFAULT_BUDGET,
        backoff: Default::default(),
        bookings: Default::default(),
    })
}

fn ups(plan: &Plan) -> Vec<(String, i32)> {
    plan.decision
        .actions
        .iter()
        .filter_map(|a| match &a.action {
            Some(pb::scale_action::Action::ScaleUp(u)) => Some((u.pool.clone(), u.count)),
            _ => None,
        })
        .collect()
}

fn downs(plan: &Plan) -> Vec<(String, Vec<String>)> {
    plan.decision
        .actions
        .iter()
        .filter_map(|a| match &a.action {
            Some(pb::scale_action::Action::ScaleDown(d)) => Some((d.pool.clone(), d.nodes.clone())),
            _ => None,
        })
        .collect()
}

fn claim(id: &str, pool: &str, node: &str, phase: ClaimPhase) -> NodeClaim {
    NodeClaim {
        version: 1,
        id: id.into(),
        pool: pool.into(),
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

fn reasons(plan: &Plan) -> String {
    plan.decision.reasons.join("\n")
}

#[test]
fn scales_up_for_pending_pods_with_the_right_count_and_says_why() {
    let web = class(1, "web", 1000, GI);
    let s = snap(
        vec![node(
            "general-1",
            "general",
            &[(1, 4)],
            std::slice::from_ref(&web),
        )],
        vec![web],
        vec![pending(1, 7, 0)],
    );
    let p = run(
        &s,
        &[pool("general", "")],
        &[],
        &History::default(),
        epoch(10),
    );
    assert_eq!(ups(&p), [("general".to_string(), 2)], "{}", reasons(&p));
    let outcome = &p.decision.outcomes[0];
    assert_eq!(outcome.placed_new.get("general"), Some(&7));
    assert_eq!(outcome.unplaced, 0);
    assert!(
        reasons(&p).contains("7 pending pod(s) (default/web ×7)"),
        "{}",
        reasons(&p)
    );
    assert!(reasons(&p).contains("least-waste"), "{}", reasons(&p));
    assert!(p.oldest_helped_since.is_some());
}

#[test]
fn no_scale_up_at_max_and_the_reason_says_so() {
    let web = class(1, "web", 3000, GI);
    let nodes: Vec<_> = (0..3)
        .map(|i| {
            node(
                &format!("g-{i}"),
                "general",
                &[(1, 1)],
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let s = snap(nodes, vec![web], vec![pending(1, 2, 0)]);
    let general = pool("general", "").with_max(3);
    let p = run(&s, &[general], &[], &History::default(), epoch(10));
    assert!(ups(&p).is_empty(), "{}", reasons(&p));
    let v = &p.decision.outcomes[0].verdicts[0];
    assert!(v.fits, "the pool could host the pods");
    assert_eq!(v.reason, "maxNodes 3 reached");
    assert!(reasons(&p).contains("no action"), "{}", reasons(&p));
}

trait WithMax {
    fn with_max(self, max: u32) -> Self;
}

impl WithMax for Pool {
    fn with_max(mut self, max: u32) -> Pool {
        self.max_nodes = max;
        self
    }
}

#[test]
fn boundary_at_max_adds_only_up_to_it() {
    let web = class(1, "web", 3000, GI);
    let s = snap(
        vec![node(
            "g-0",
            "general",
            &[(1, 1)],
            std::slice::from_ref(&web),
        )],
        vec![web],
        vec![pending(1, 5, 0)],
    );
    let p = run(
        &s,
        &[pool("general", "").with_max(3)],
        &[],
        &History::default(),
        epoch(10),
    );
    assert_eq!(ups(&p), [("general".to_string(), 2)]);
    assert_eq!(p.decision.outcomes[0].unplaced, 3);
}

#[test]
fn taints_selectors_and_size_are_explained_per_pool() {
    let mut gpu_job = class(1, "train", 2000, 2 * GI);
    gpu_job
        .node_selector
        .insert("accelerator".into(), "a100".into());
    let huge = class(2, "huge", 16000, GI);
    let s = snap(
        vec![],
        vec![gpu_job, huge],
        vec![pending(1, 1, 0), pending(2, 1, 0)],
    );
    let gpu = pool("gpu", "  weight: 1\n");
    let mut gpu = gpu;
    gpu.labels.insert("accelerator".into(), "a100".into());
    gpu.taints.push(shoal_core::fit::Taint {
        key: "nvidia.com/gpu".into(),
        value: "true".into(),
        effect: shoal_core::fit::Effect::NoSchedule,
    });
    let p = run(
        &s,
        &[pool("general", ""), gpu],
        &[],
        &History::default(),
        epoch(10),
    );
    assert!(ups(&p).is_empty(), "{}", reasons(&p));
    let train = p
        .decision
        .outcomes
        .iter()
        .find(|o| o.class_id == 1)
        .expect("train");
    let by_pool: BTreeMap<&str, &str> = train
        .verdicts
        .iter()
        .map(|v| (v.pool.as_str(), v.reason.as_str()))
        .collect();
    assert_eq!(
        by_pool["general"],
        "nodeSelector accelerator=a100 does not match the pool's labels"
    );
    assert_eq!(
        by_pool["gpu"],
        "taint nvidia.com/gpu=true:NoSchedule not tolerated"
    );
    let huge = p
        .decision
        .outcomes
        .iter()
        .find(|o| o.class_id == 2)
        .expect("huge");
    let by_pool: BTreeMap<&str, &str> = huge
        .verdicts
        .iter()
        .map(|v| (v.pool.as_str(), v.reason.as_str()))
        .collect();
    assert_eq!(
        by_pool["general"],
        "a pod requests cpu 16000m, a node has 4000m"
    );
    assert_eq!(
        by_pool["gpu"], "taint nvidia.com/gpu=true:NoSchedule not tolerated",
        "taints are filtered before resources"
    );
    assert!(reasons(&p).contains("cannot be helped"), "{}", reasons(&p));
}

#[test]
fn pending_pods_use_existing_room_and_in_flight_claims_first() {
    let web = class(1, "web", 1000, GI);
    let s = snap(
        vec![node(
            "g-0",
            "general",
            &[(1, 2)],
            std::slice::from_ref(&web),
        )],
        vec![web],
        vec![pending(1, 6, 0)],
    );
    // 2 fit on g-0, 4 on the claim still booting: no new node.
    let claims = [claim("c1", "general", "g-1", ClaimPhase::Launched)];
    let p = run(
        &s,
        &[pool("general", "")],
        &claims,
        &History::default(),
        epoch(10),
    );
    assert!(ups(&p).is_empty(), "{}", reasons(&p));
    assert_eq!(p.decision.outcomes[0].placed_existing, 6);
    // A claim whose node is already in the snapshot is not counted twice.
    let claims = [claim("c1", "general", "g-0", ClaimPhase::Ready)];
    let p = run(
        &s,
        &[pool("general", "")],
        &claims,
        &History::default(),
        epoch(10),
    );
    assert_eq!(ups(&p), [("general".to_string(), 1)]);
}

#[test]
fn scale_down_waits_for_unneeded_for_then_removes_and_respects_min() {
    let web = class(1, "web", 500, GI);
    let nodes = vec![
        node("g-0", "general", &[(1, 6)], std::slice::from_ref(&web)),
        node("g-1", "general", &[(1, 1)], std::slice::from_ref(&web)),
        node("g-2", "general", &[], std::slice::from_ref(&web)),
    ];
    let s = snap(nodes, vec![web], vec![]);
    let pools = [pool("general", "")];
    let first = run(&s, &pools, &[], &History::default(), epoch(100));
    assert!(downs(&first).is_empty(), "not unneeded long enough yet");
    assert!(
        reasons(&first).contains("none unneeded long enough"),
        "{}",
        reasons(&first)
    );
    let later = run(&s, &pools, &[], &first.history, epoch(100 + 601));
    // g-2 is empty: it goes. max_concurrent 1: g-1 waits for the next decision.
    assert_eq!(
        downs(&later),
        [("general".to_string(), vec!["g-2".to_string()])],
        "{}",
        reasons(&later)
    );
    assert!(
        reasons(&later).contains("empty node"),
        "{}",
        reasons(&later)
    );
    // With room for two: the empty one and then g-1, whose pod fits on g-0.
    let mut two = pool("general", "");
    two.scale_down.max_concurrent = 2;
    let both = run(&s, &[two.clone()], &[], &first.history, epoch(100 + 601));
    assert_eq!(downs(&both)[0].1, ["g-2", "g-1"], "{}", reasons(&both));
    // Never below minNodes.
    two.min_nodes = 2;
    let at_min = run(&s, &[two], &[], &first.history, epoch(100 + 601));
    assert_eq!(downs(&at_min)[0].1, ["g-2"], "{}", reasons(&at_min));
}

#[test]
fn scale_down_respects_permanent_nodes_annotations_blockers_and_pdbs() {
    let web = class(1, "web", 500, GI);
    let mut local = class(2, "cache", 500, GI);
    local
        .blockers
        .push(pb::EvictionBlocker::LocalStorage as i32);
    let mut guarded = class(3, "db", 500, GI);
    guarded.pdb = "db".into();
    let all = vec![web.clone(), local.clone(), guarded.clone()];
    let mut disabled = node("g-3", "general", &[(1, 1)], &all);
    disabled.scale_down_disabled = true;
    let nodes = vec![
        node("g-0", "general", &[(1, 2)], &all),
        node("perm", "general", &[], &all),
        node("g-1", "general", &[(2, 1)], &all),
        node("g-2", "general", &[(3, 1)], &all),
        disabled,
    ];
    let mut s = snap(nodes, all, vec![]);
    s.pdbs.push(pb::PdbAllowance {
        namespace: "default".into(),
        name: "db".into(),
        disruptions_allowed: 0,
    });
    let mut general = pool("general", "  permanentNodes: [perm]\n");
    general.scale_down.max_concurrent = 10;
    let pools = [general];
    let first = run(&s, &pools, &[], &History::default(), epoch(0));
    let later = run(&s, &pools, &[], &first.history, epoch(700));
    let removed: Vec<String> = downs(&later).into_iter().flat_map(|(_, n)| n).collect();
    assert!(
        !removed.contains(&"perm".to_string()),
        "permanent: {removed:?}"
    );
    assert!(
        !removed.contains(&"g-3".to_string()),
        "annotated: {removed:?}"
    );
    assert!(
        !removed.contains(&"g-1".to_string()),
        "local storage: {removed:?}"
    );
    assert!(
        !removed.contains(&"g-2".to_string()),
        "PDB at 0: {removed:?}"
    );
    assert_eq!(removed, ["g-0"], "{}", reasons(&later));
    let text = reasons(&later);
    assert!(
        text.contains("local storage") || text.contains("PodDisruptionBudget"),
        "{text}"
    );
}

#[test]
fn cooldowns_hold_both_directions() {
    let web = class(1, "web", 1000, GI);
    let s = snap(vec![], vec![web.clone()], vec![pending(1, 2, 0)]);
    let cooling = pool("general", "  scaleUp: { cooldown: 60s }\n");
    let mut history = History::default();
    history
        .pools
        .entry("general".into())
        .or_default()
        .last_scale_up_ms = Some(ms(epoch(100)));
    let p = run(
        &s,
        std::slice::from_ref(&cooling),
        &[],
        &history,
        epoch(130),
    );
    assert!(ups(&p).is_empty());
    assert!(
        p.decision.outcomes[0].verdicts[0]
            .reason
            .starts_with("scale-up cooldown until")
    );
    let p = run(
        &s,
        std::slice::from_ref(&cooling),
        &[],
        &history,
        epoch(161),
    );
    assert_eq!(ups(&p), [("general".to_string(), 1)]);

    // Scale-down waits out its cooldown after a scale-up.
    let empty = snap(vec![node("g-0", "general", &[], &[web])], vec![], vec![]);
    let mut down_cool = pool(
        "general",
        "  scaleDown: { unneededFor: 0s, cooldown: 5m }\n",
    );
    down_cool.scale_down.unneeded_for = Duration::ZERO;
    let p = run(
        &empty,
        std::slice::from_ref(&down_cool),
        &[],
        &history,
        epoch(200),
    );
    assert!(downs(&p).is_empty());
    assert!(
        reasons(&p).contains("scale-down cooldown until"),
        "{}",
        reasons(&p)
    );
    let p = run(&empty, &[down_cool], &[], &history, epoch(401));
    assert_eq!(downs(&p).len(), 1, "{}", reasons(&p));
}

#[test]
fn business_hours_raise_min_nodes() {
    let general = pool(
        "general",
        "  schedule:\n    - { name: business-hours, days: Mon-Fri, between: \"09:00-17:00\", timezone: Europe/Berlin, minNodes: 3 }\n",
    );
    let s = snap(vec![], vec![], vec![]);
    // 2026-03-04 (Wednesday) 10:00 UTC = 11:00 in Berlin.
    let wednesday = SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_618_400);
    let p = run(
        &s,
        std::slice::from_ref(&general),
        &[],
        &History::default(),
        wednesday,
    );
    assert_eq!(ups(&p), [("general".to_string(), 3)]);
    assert!(
        reasons(&p).contains("below minNodes 3 (schedule business-hours)"),
        "{}",
        reasons(&p)
    );
    // Saturday: min 0, nothing to do.
    let saturday = wednesday + Duration::from_secs(3 * 86_400);
    assert!(ups(&run(&s, &[general], &[], &History::default(), saturday)).is_empty());
}

#[test]
fn pending_threshold_and_stabilization_window_hold_back_scale_up() {
    let web = class(1, "web", 1000, GI);
    let s = snap(vec![], vec![web], vec![pending(1, 2, 100)]);
    let picky = pool("general", "  scaleUp: { pendingPods: 3 }\n");
    let p = run(&s, &[picky], &[], &History::default(), epoch(200));
    assert!(ups(&p).is_empty());
    assert_eq!(
        p.decision.outcomes[0].verdicts[0].reason,
        "pendingPods threshold 3 not reached (2 pending)"
    );
    let patient = pool("general", "  scaleUp: { stabilizationWindow: 30s }\n");
    let p = run(
        &s,
        std::slice::from_ref(&patient),
        &[],
        &History::default(),
        epoch(110),
    );
    assert!(ups(&p).is_empty());
    assert!(
        p.decision.outcomes[0].verdicts[0]
            .reason
            .starts_with("stabilization window 30s")
    );
    assert_eq!(
        ups(&run(&s, &[patient], &[], &History::default(), epoch(131))).len(),
        1
    );
}

#[test]
fn cpu_above_threshold_adds_nodes_once_stable_and_not_while_in_flight() {
    let mut nodes: Vec<pb::NodeInfo> = (0..2)
        .map(|i| node(&format!("g-{i}"), "general", &[], &[]))
        .collect();
    for n in &mut nodes {
        n.usage = Some(pb::NodeUsage {
            cpu: 0.9,
            memory: 0.2,
            sampled_at: None,
        });
    }
    let s = snap(nodes, vec![], vec![]);
    let hot = pool(
        "general",
        "  scaleUp: { cpuAbove: 80, stabilizationWindow: 20s }\n",
    );
    let first = run(
        &s,
        std::slice::from_ref(&hot),
        &[],
        &History::default(),
        epoch(0),
    );
    assert!(ups(&first).is_empty(), "must hold for the window first");
    let second = run(
        &s,
        std::slice::from_ref(&hot),
        &[],
        &first.history,
        epoch(25),
    );
    assert_eq!(
        ups(&second),
        [("general".to_string(), 1)],
        "{}",
        reasons(&second)
    );
    assert!(
        reasons(&second).contains("average CPU 90% > cpuAbove 80%"),
        "{}",
        reasons(&second)
    );
    let claims = [claim("c", "general", "g-9", ClaimPhase::Launched)];
    let third = run(
        &s,
        std::slice::from_ref(&hot),
        &claims,
        &first.history,
        epoch(30),
    );
    assert!(ups(&third).is_empty());
    assert!(
        reasons(&third).contains("waiting for 1 node(s) in flight"),
        "{}",
        reasons(&third)
    );
    let mut stale = s.clone();
    stale.utilization_stale = true;
    assert!(ups(&run(&stale, &[hot], &[], &first.history, epoch(30))).is_empty());
}

#[test]
fn the_expander_chain_picks_between_pools() {
    let web = class(1, "web", 3000, 2 * GI);
    let s = snap(vec![], vec![web], vec![pending(1, 4, 0)]);
    let small = pool("small", "");
    let big = {
        let yaml = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: big }\nspec:\n  provider: { backend: sim }\n  template: { capacity: { cpu: \"6\", memory: 8Gi }, price: 0.5 }\n  limits: { maxNodes: 10 }\n  weight: 5\n";
        Pool::from_yaml(yaml).expect("big").1
    };
    let pools = [small, big];
    // 3-CPU pods: 4-CPU nodes waste 25 %, 6-CPU nodes none.
    let p = run(&s, &pools, &[], &History::default(), epoch(0));
    assert_eq!(ups(&p), [("big".to_string(), 2)], "{}", reasons(&p));
    let by_priority = plan(&PlanInput {
        snapshot: &s,
        pools: &pools,
        claims: &[],
        history: &History::default(),
        now: epoch(0),
        expanders: &[Expander::Price],
        seed: 0,
        packing_budget: super::packing::DEFAULT_BUDGET,
        backoff: Default::default(),
        bookings: Default::default(),
    });
    assert_eq!(
        ups(&by_priority),
        [("small".to_string(), 4)],
        "{}",
        reasons(&by_priority)
    );
}

#[test]
fn batch_size_caps_one_decision_and_asks_for_another() {
    let web = class(1, "web", 4000, GI);
    let s = snap(vec![], vec![web], vec![pending(1, 8, 0)]);
    let p = run(
        &s,
        &[pool("general", "  scaleUp: { batchSize: 3 }\n")],
        &[],
        &History::default(),
        epoch(0),
    );
    assert_eq!(ups(&p), [("general".to_string(), 3)]);
    assert!(p.batch_capped);
    assert!(
        p.decision.outcomes[0].verdicts[0]
            .reason
            .contains("batch size 3")
    );
}

// ---- properties ------------------------------------------------------------------------------

/// Class: (cpu, memory in half GiB, local storage, PDB at 0).
type ClassSpec = (i64, i64, bool, bool);
/// Node: (pool, (class, pods), permanent).
type NodeSpec = (u8, Vec<(usize, i32)>, bool);
/// Pool: (min, max, tainted).
type PoolSpec = (u32, u32, bool);

/// A whole case: classes, nodes, pending (class, count), pools.
type Case = (
    Vec<ClassSpec>,
    Vec<NodeSpec>,
    Vec<(usize, i32)>,
    Vec<PoolSpec>,
);

fn arb_case() -> impl Strategy<Value = Case> {
    // classes: (cpu, mem GiB-ish, local storage, pdb at 0)
    let classes = prop::collection::vec(
        (
            100i64..4000,
            1i64..6,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        ),
        1..6,
    );
    // nodes: (pool, pods per class, permanent)
    let nodes = prop::collection::vec(
        (
            0u8..3,
            prop::collection::vec((0usize..6, 0i32..4), 0..4),
            prop::bool::weighted(0.1),
        ),
        0..12,
    );
    let pending = prop::collection::vec((0usize..6, 1i32..20), 0..4);
    // pools: (min, max, tainted)
    let pools = prop::collection::vec((0u32..3, 1u32..8, prop::bool::weighted(0.3)), 1..4);
    (classes, nodes, pending, pools)
}

fn build_case(
    classes: &[ClassSpec],
    nodes: &[NodeSpec],
    pending_in: &[(usize, i32)],
    pools_in: &[PoolSpec],
) -> (pb::ClusterSnapshot, Vec<Pool>) {
    let mut pcs: Vec<pb::PodClass> = classes
        .iter()
        .enumerate()
        .map(|(i, (cpu, mem, local, pdb))| {
            let mut c = class(i as u64 + 1, &format!("app{i}"), *cpu, mem * GI / 2);
            if *local {
                c.blockers.push(pb::EvictionBlocker::LocalStorage as i32);
            }
            if *pdb {
                c.pdb = format!("pdb{i}");
            }
            c
        })
        .collect();
    let mut pools: Vec<Pool> = pools_in
        .iter()
        .enumerate()
        .map(|(i, (min, max, tainted))| {
            let mut p = pool(&format!("p{i}"), "");
            p.max_nodes = (*max).max(*min).max(1);
            p.min_nodes = (*min).min(p.max_nodes);
            p.scale_down.unneeded_for = Duration::ZERO;
            p.scale_down.max_concurrent = 3;
            if *tainted {
                p.taints.push(shoal_core::fit::Taint {
                    key: "dedicated".into(),
                    value: format!("p{i}"),
                    effect: shoal_core::fit::Effect::NoSchedule,
                });
            }
            p
        })
        .collect();
    let mut infos = Vec::new();
    for (k, (pool_i, pods, permanent)) in nodes.iter().enumerate() {
        let pool_name = format!("p{}", (*pool_i as usize) % pools.len());
        let mut counts: BTreeMap<u64, i32> = BTreeMap::new();
        let mut cpu = 0;
        let mut mem = 0;
        for (c, n) in pods {
            let c = c % pcs.len();
            let r = pcs[c].requests.clone().unwrap_or_default();
            // Keep nodes honest: never more requested than allocatable.
            let n = (*n)
                .min(((4000 - cpu) / r.cpu_millis.max(1)) as i32)
                .min(((8 * GI - mem) / r.memory_bytes.max(1)) as i32);
            if n <= 0 {
                continue;
            }
            cpu += r.cpu_millis * n as i64;
            mem += r.memory_bytes * n as i64;
            *counts.entry(pcs[c].id).or_default() += n;
        }
        let pods: Vec<(u64, i32)> = counts.into_iter().collect();
        let name = format!("n{k}");
        let mut info = node(&name, &pool_name, &pods, &pcs);
        if let Some(p) = pools.iter().find(|p| p.name == pool_name) {
            for t in &p.taints {
                info.taints.push(shoal_core::snapshot::taint_to_proto(t));
            }
        }
        if *permanent && let Some(p) = pools.iter_mut().find(|p| p.name == pool_name) {
            p.permanent_nodes.insert(name.clone());
        }
        infos.push(info);
    }
    let mut s = snap(infos, Vec::new(), Vec::new());
    for (c, count) in pending_in {
        let c = c % pcs.len();
        s.pending.push(pending(pcs[c].id, *count, 0));
    }
    s.pending.sort_by_key(|p| p.class_id);
    s.pending.dedup_by_key(|p| p.class_id);
    for (i, c) in pcs.iter().enumerate() {
        if !c.pdb.is_empty() {
            s.pdbs.push(pb::PdbAllowance {
                namespace: "default".into(),
                name: c.pdb.clone(),
                disruptions_allowed: if classes[i].3 { 0 } else { 5 },
            });
        }
    }
    s.classes = std::mem::take(&mut pcs);
    (s, pools)
}

/// An independent check that the removed nodes' pods fit on the nodes that stay: first fit with
/// the scheduler's own filter (`fit::misfits`).
fn replaceable(s: &pb::ClusterSnapshot, removed: &[String]) -> bool {
    let mut rest: Vec<shoal_core::fit::NodeFacts> = s
        .nodes
        .iter()
        .filter(|n| !removed.contains(&n.name))
        .map(node_facts)
        .collect();
    for n in s.nodes.iter().filter(|n| removed.contains(&n.name)) {
        for cc in &n.pods {
            let class = s
                .classes
                .iter()
                .find(|c| c.id == cc.class_id)
                .expect("class");
            let demand: PodDemand = pod_demand(class);
            for _ in 0..cc.count {
                let Some(target) = rest.iter_mut().find(|f| misfits(&demand, f).is_empty()) else {
                    return false;
                };
                target.requested = target.requested.saturating_add(&demand.requests);
            }
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn plans_keep_every_invariant((classes, nodes, pending_in, pools_in) in arb_case()) {
        let (s, pools) = build_case(&classes, &nodes, &pending_in, &pools_in);
        let history = History::default();
        // Twice: the second plan sees nodes unneeded (unneededFor is 0).
        let first = run(&s, &pools, &[], &history, epoch(0));
        let p = run(&s, &pools, &[], &first.history, epoch(1));
        for (pool_name, count) in ups(&p) {
            let pool = pools.iter().find(|x| x.name == pool_name).expect("pool");
            let live = s.nodes.iter().filter(|n| n.pool == pool_name).count() as u32;
            let bounds = pool.bounds(epoch(1));
            // Never beyond maxNodes or the resource limits.
            prop_assert!(live + count as u32 <= bounds.max.max(live), "{pool_name}: {live} + {count} > {}", bounds.max);
        }
        let removed: Vec<String> = downs(&p).into_iter().flat_map(|(_, n)| n).collect();
        for (pool_name, nodes) in downs(&p) {
            let pool = pools.iter().find(|x| x.name == pool_name).expect("pool");
            let live = s.nodes.iter().filter(|n| n.pool == pool_name).count();
            // Never below minNodes, never a permanent node.
            prop_assert!(live - nodes.len() >= pool.min_nodes as usize);
            for n in &nodes {
                prop_assert!(!pool.is_permanent(n), "removed permanent {n}");
            }
        }
        // Never a node whose pods cannot be evicted or placed elsewhere.
        for name in &removed {
            let n = s.nodes.iter().find(|x| &x.name == name).expect("node");
            for cc in &n.pods {
                let class = s.classes.iter().find(|c| c.id == cc.class_id).expect("class");
                prop_assert!(!class.blockers.contains(&(pb::EvictionBlocker::LocalStorage as i32)), "{name} has local storage");
                if !class.pdb.is_empty() {
                    let allowed = s.pdbs.iter().find(|x| x.name == class.pdb).map_or(0, |x| x.disruptions_allowed);
                    prop_assert!(allowed >= cc.count, "{name}: PDB {} allows {allowed}", class.pdb);
                }
            }
        }
        prop_assert!(replaceable(&s, &removed), "pods of {removed:?} do not fit elsewhere");
        // New nodes only for pods the scheduler would put on them.
        for outcome in &p.decision.outcomes {
            let class = s.classes.iter().find(|c| c.id == outcome.class_id).expect("class");
            let demand = pod_demand(class);
            for pool_name in outcome.placed_new.keys() {
                let pool = pools.iter().find(|x| &x.name == pool_name).expect("pool");
                prop_assert!(misfits(&demand, &pool.template_node()).is_empty(), "class {} on {pool_name}", class.id);
                prop_assert!(constraint_misfit(&demand, &pool.labels, &pool.taints, false).is_none());
            }
            prop_assert_eq!(
                outcome.placed_existing + outcome.placed_new.values().sum::<i32>() + outcome.unplaced,
                outcome.count
            );
        }
        let _ = Resources::default();
    }
}

#[test]
fn a_registered_node_that_is_not_ready_yet_counts_as_in_flight_not_as_a_reason_to_grow() {
    // Two nodes were asked for; one registered (NotReady), one still booting. The six pending
    // pods fit on them: no second scale-up.
    let web = class(1, "web", 1000, GI);
    let mut coming = node("general-1", "general", &[], std::slice::from_ref(&web));
    coming.readiness = pb::NodeReadiness::NotReady as i32;
    let s = snap(vec![coming], vec![web], vec![pending(1, 6, 0)]);
    let claims = [
        claim("c1", "general", "general-1", ClaimPhase::Registered),
        claim("c2", "general", "general-2", ClaimPhase::Launched),
    ];
    let p = run(
        &s,
        &[pool("general", "")],
        &claims,
        &History::default(),
        epoch(10),
    );
    assert!(ups(&p).is_empty(), "{}", reasons(&p));
}

#[test]
fn a_ready_claim_whose_node_the_snapshot_shows_unusable_still_counts_as_in_flight() {
    // The claim turned Ready a moment ago, but the snapshot was taken before: its node is
    // NotReady there (or still carries the startup taint). The pending pods wait for it: no
    // second node for the same pods.
    let web = class(1, "web", 1000, GI);
    let mut with_startup = pool("general", "");
    with_startup.startup_taints.push(shoal_core::fit::Taint {
        key: "shoal.dev/unregistered".into(),
        value: String::new(),
        effect: shoal_core::fit::Effect::NoExecute,
    });
    let mut stale = node("general-1", "general", &[], std::slice::from_ref(&web));
    stale.readiness = pb::NodeReadiness::NotReady as i32;
    let mut tainted = node("general-1", "general", &[], std::slice::from_ref(&web));
    tainted.taints.push(pb::Taint {
        key: "shoal.dev/unregistered".into(),
        value: String::new(),
        effect: pb::TaintEffect::NoExecute as i32,
    });
    let mut ready = claim("c1", "general", "general-1", ClaimPhase::Ready);
    let turned_ready_ms = planner_ms(epoch(8));
    ready.history.push(shoal_core::claim::Transition {
        phase: ClaimPhase::Ready,
        at_ms: turned_ready_ms,
        reason: "node Ready".into(),
    });
    for seen in [stale, tainted] {
        let s = snap(vec![seen], vec![web.clone()], vec![pending(1, 4, 0)]);
        let p = run(
            &s,
            std::slice::from_ref(&with_startup),
            std::slice::from_ref(&ready),
            &History::default(),
            epoch(10),
        );
        assert!(ups(&p).is_empty(), "{}", reasons(&p));
        // Long after it turned Ready a node that never became usable is broken, not coming:
        // the pods get a node.
        let later = run(
            &s,
            std::slice::from_ref(&with_startup),
            std::slice::from_ref(&ready),
            &History::default(),
            epoch(8 + SETTLE_MS / 1000 + 1),
        );
        assert_eq!(
            ups(&later),
            [("general".to_string(), 1)],
            "{}",
            reasons(&later)
        );
    }
}

fn planner_ms(t: SystemTime) -> u64 {
    ms(t)
}

#[test]
fn scale_up_packs_beyond_first_fit_decreasing_and_reports_it() {
    // Six triplets of pods that each fill a 4-CPU node exactly; first-fit decreasing pairs the
    // big pods badly and needs more nodes.
    let sizes = [
        [1840, 1080, 1080],
        [1800, 1200, 1000],
        [1760, 1160, 1080],
        [1720, 1240, 1040],
        [1680, 1280, 1040],
        [1640, 1320, 1040],
    ];
    let mut classes = Vec::new();
    let mut wanted = BTreeMap::new();
    for cpu in sizes.iter().flatten() {
        *wanted.entry(*cpu).or_insert(0) += 1;
    }
    let mut pend = Vec::new();
    for (k, (cpu, count)) in wanted.iter().enumerate() {
        classes.push(class(k as u64 + 1, &format!("job-{cpu}"), *cpu, GI / 4));
        pend.push(pending(k as u64 + 1, *count, 0));
    }
    let s = snap(vec![], classes, pend);
    let plan = run(&s, &[pool("a", "")], &[], &History::default(), epoch(100));
    assert_eq!(ups(&plan), vec![("a".to_string(), 6)], "{}", reasons(&plan));
    let Some(pb::scale_action::Action::ScaleUp(up)) = &plan.decision.actions[0].action else {
        panic!("not a scale-up");
    };
    let report = up.packing.as_ref().expect("the packing is reported");
    assert_eq!(report.nodes, 6);
    assert_eq!(report.pods, 18);
    assert_eq!(report.lower_bound, 6);
    assert!(report.first_fit_decreasing > 6, "{report:?}");
    assert!(
        up.reason.contains(&format!(
            "lower bound 6, first-fit decreasing {}",
            report.first_fit_decreasing
        )),
        "{}",
        up.reason
    );
}

#[test]
fn consolidation_empties_several_half_empty_nodes_onto_one() {
    // Three nodes, each 1 of 4 CPU used: two can move onto the third.
    let web = class(1, "web", 500, GI / 2);
    let nodes: Vec<pb::NodeInfo> = (0..3)
        .map(|k| {
            node(
                &format!("g-{k}"),
                "general",
                &[(1, 2)],
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let s = snap(nodes, vec![web], vec![]);
    let mut general = pool("general", "");
    general.scale_down.max_concurrent = 5;
    let first = run(&s, &[general.clone()], &[], &History::default(), epoch(0));
    let later = run(&s, &[general.clone()], &[], &first.history, epoch(700));
    let removed: Vec<String> = downs(&later).into_iter().flat_map(|(_, n)| n).collect();
    assert_eq!(removed.len(), 2, "{}", reasons(&later));
    let text = reasons(&later);
    assert!(text.contains("takes pods moved off another node"), "{text}");
    // Two half-empty nodes become one, one decision at the default maxConcurrent of 1.
    let two = snap(s.nodes[..2].to_vec(), s.classes.clone(), vec![]);
    let one = run(
        &two,
        &[pool("general", "")],
        &[],
        &first.history,
        epoch(700),
    );
    assert_eq!(
        downs(&one).into_iter().flat_map(|(_, n)| n).count(),
        1,
        "{}",
        reasons(&one)
    );
}

#[test]
fn do_not_disrupt_pods_keep_their_node_and_say_so() {
    let web = class(1, "web", 500, GI / 2);
    let mut pinned = class(2, "batch", 500, GI / 2);
    pinned
        .blockers
        .push(pb::EvictionBlocker::DoNotDisrupt as i32);
    let all = vec![web.clone(), pinned.clone()];
    let nodes = vec![
        node("g-0", "general", &[(1, 2)], &all),
        node("g-1", "general", &[(2, 1)], &all),
    ];
    let s = snap(nodes, all, vec![]);
    let mut general = pool("general", "");
    general.scale_down.max_concurrent = 5;
    let first = run(&s, &[general.clone()], &[], &History::default(), epoch(0));
    let later = run(&s, &[general], &[], &first.history, epoch(700));
    let removed: Vec<String> = downs(&later).into_iter().flat_map(|(_, n)| n).collect();
    assert_eq!(removed, ["g-0"], "{}", reasons(&later));
    assert!(
        reasons(&later).contains(
            "g-1: pod(s) of default/batch cannot be evicted: it is annotated do-not-disrupt"
        ),
        "{}",
        reasons(&later)
    );
}

#[test]
fn the_disruption_budget_counts_nodes_already_draining() {
    let web = class(1, "web", 500, GI / 2);
    let nodes: Vec<pb::NodeInfo> = (0..4)
        .map(|k| {
            node(
                &format!("g-{k}"),
                "general",
                &[],
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let s = snap(nodes, vec![web], vec![]);
    let mut general = pool("general", "");
    general.scale_down.max_concurrent = 10;
    general.scale_down.disruption_budget = Some(shoal_core::pool::DisruptionBudget::Nodes(1));
    let first = run(&s, &[general.clone()], &[], &History::default(), epoch(0));
    let later = run(&s, &[general.clone()], &[], &first.history, epoch(700));
    assert_eq!(
        downs(&later).into_iter().flat_map(|(_, n)| n).count(),
        1,
        "a budget of 1: {}",
        reasons(&later)
    );
    // One node draining already: the budget is used up.
    let draining = [claim("c-0", "general", "g-0", ClaimPhase::Draining)];
    let held = run(
        &s,
        &[general.clone()],
        &draining,
        &first.history,
        epoch(700),
    );
    assert!(downs(&held).is_empty(), "{}", reasons(&held));
    assert!(
        reasons(&held).contains("disruption budget 1 used (1 node(s) draining)"),
        "{}",
        reasons(&held)
    );
    // 50 % of 4 nodes: 2 at once.
    general.scale_down.disruption_budget = Some(shoal_core::pool::DisruptionBudget::Percent(50));
    let half = run(&s, &[general], &[], &first.history, epoch(700));
    assert_eq!(downs(&half).into_iter().flat_map(|(_, n)| n).count(), 2);
}

#[test]
fn a_disruption_budget_window_holds_scale_down_only_while_active() {
    use shoal_core::{pool::DisruptionBudget, schedule::Window};
    let web = class(1, "web", 500, GI / 2);
    let nodes: Vec<pb::NodeInfo> = (0..4)
        .map(|k| {
            node(
                &format!("g-{k}"),
                "general",
                &[],
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let s = snap(nodes, vec![web], vec![]);
    let window = |name: &str, days: &str| {
        Window::parse(name, days, "02:00-04:00", "UTC", None, None).expect("window")
    };
    let mut general = pool("general", "");
    general.scale_down.max_concurrent = 10;
    general.scale_down.disruption_budget = Some(DisruptionBudget::Percent(50));
    // The tests' clock starts on a Monday at 02:40 UTC.
    general.scale_down.disruption_windows = vec![
        (DisruptionBudget::Nodes(0), window("night-freeze", "Mon")),
        (DisruptionBudget::Nodes(1), window("weekend", "Sat,Sun")),
    ];
    let first = run(&s, &[general.clone()], &[], &History::default(), epoch(0));
    let frozen = run(&s, &[general.clone()], &[], &first.history, epoch(700));
    assert!(downs(&frozen).is_empty(), "{}", reasons(&frozen));
    assert!(
        reasons(&frozen).contains("disruption budget 0 (window night-freeze) used"),
        "{}",
        reasons(&frozen)
    );
    // After the window (04:20): the pool's own 50 % applies again.
    let after = run(&s, &[general], &[], &first.history, epoch(6000));
    assert_eq!(
        downs(&after).into_iter().flat_map(|(_, n)| n).count(),
        2,
        "{}",
        reasons(&after)
    );
}

#[test]
fn consolidate_after_waits_for_pods_to_stop_changing() {
    let web = class(1, "web", 500, GI / 2);
    let busy = |count: i32| {
        snap(
            vec![
                node("g-0", "general", &[(1, 3)], std::slice::from_ref(&web)),
                node("g-1", "general", &[(1, count)], std::slice::from_ref(&web)),
            ],
            vec![web.clone()],
            vec![],
        )
    };
    let mut general = pool("general", "");
    general.scale_down.consolidate_after = Duration::from_secs(300);
    let first = run(
        &busy(1),
        &[general.clone()],
        &[],
        &History::default(),
        epoch(0),
    );
    // Pods changed a moment ago (2 instead of 1 on g-1): no consolidation yet.
    let churned = run(
        &busy(2),
        &[general.clone()],
        &[],
        &first.history,
        epoch(700),
    );
    assert!(downs(&churned).is_empty(), "{}", reasons(&churned));
    assert!(
        reasons(&churned).contains("consolidateAfter 5m"),
        "{}",
        reasons(&churned)
    );
    // Five minutes later with the same pods: g-1 goes.
    let settled = run(
        &busy(2),
        &[general],
        &[],
        &churned.history,
        epoch(700 + 301),
    );
    assert_eq!(
        downs(&settled),
        [("general".to_string(), vec!["g-1".to_string()])],
        "{}",
        reasons(&settled)
    );
}

fn sized_pool(name: &str, cpu: &str, memory: &str, price: f64) -> Pool {
    let yaml = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {name} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"{cpu}\", memory: {memory} }}\n    price: {price}\n  limits: {{ minNodes: 0, maxNodes: 10 }}\n"
    );
    Pool::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("pool {name}: {e}"))
        .1
}

#[test]
fn scale_up_mixes_node_types_when_a_smaller_node_is_cheaper_for_the_rest() {
    // 17 pods of 1 CPU. Big nodes (8 CPU, price 3) are cheaper per pod than small ones
    // (2 CPU, price 1.2), but the third big node would hold one pod: a small node holds it for
    // less.
    let job = class(1, "job", 1000, GI);
    let s = snap(vec![], vec![job], vec![pending(1, 17, 0)]);
    let pools = [
        sized_pool("big", "8", "32Gi", 3.0),
        sized_pool("small", "2", "8Gi", 1.2),
    ];
    let plan = super::plan(&PlanInput {
        snapshot: &s,
        pools: &pools,
        claims: &[],
        history: &History::default(),
        now: epoch(100),
        expanders: &[Expander::Price],
        seed: 1,
        packing_budget: super::packing::DEFAULT_BUDGET,
        backoff: Default::default(),
        bookings: Default::default(),
    });
    let mut grown = ups(&plan);
    grown.sort();
    assert_eq!(
        grown,
        vec![("big".to_string(), 2), ("small".to_string(), 1)],
        "{}",
        reasons(&plan)
    );
    assert!(
        reasons(&plan).contains("fit one node of this pool: price 1.2 < 3 of pool big"),
        "{}",
        reasons(&plan)
    );
    assert_eq!(plan.decision.outcomes[0].unplaced, 0);
    // Without prices, size decides: the smaller node wastes less.
    let unpriced = [
        sized_pool("big", "8", "32Gi", 0.0),
        sized_pool("small", "2", "8Gi", 0.0),
    ];
    let plan = run(&s, &unpriced, &[], &History::default(), epoch(100));
    let total: i32 = ups(&plan).iter().map(|(_, n)| n).sum();
    assert!(
        ups(&plan).iter().any(|(p, _)| p == "small"),
        "{}",
        reasons(&plan)
    );
    assert!(total >= 3, "{}", reasons(&plan));
}

#[test]
fn an_expensive_node_is_replaced_by_a_cheaper_one_then_drained_onto_it() {
    // One big node (8 CPU, price 3) running two 1-CPU pods that fit nowhere else; a small pool
    // (2 CPU, price 1.2) could hold them on one node.
    let job = class(1, "job", 1000, GI);
    let mut big_node = node("big-0", "big", &[(1, 2)], std::slice::from_ref(&job));
    big_node.allocatable = Some(pb::Resources {
        ephemeral_storage_bytes: 100 * GI,
        ..res(8000, 32 * GI, 110)
    });
    let s = snap(vec![big_node.clone()], vec![job.clone()], vec![]);
    let pools = [
        sized_pool("big", "8", "32Gi", 3.0),
        sized_pool("small", "2", "8Gi", 1.2),
    ];
    let first = run(&s, &pools, &[], &History::default(), epoch(0));
    let later = run(&s, &pools, &[], &first.history, epoch(700));
    assert_eq!(
        ups(&later),
        vec![("small".to_string(), 1)],
        "{}",
        reasons(&later)
    );
    assert!(downs(&later).is_empty(), "not before its replacement runs");
    assert!(
        reasons(&later).contains("replaces node big-0: its pods fit one node of price 1.2 < 3"),
        "{}",
        reasons(&later)
    );
    // While the replacement is coming, no second one.
    let coming = [claim("c-1", "small", "small-0", ClaimPhase::Launched)];
    let waiting = run(&s, &pools, &coming, &later.history, epoch(760));
    assert!(ups(&waiting).is_empty(), "{}", reasons(&waiting));
    assert!(
        reasons(&waiting).contains("big-0 waits for its replacement"),
        "{}",
        reasons(&waiting)
    );
    // The replacement is Ready and empty: big-0 drains onto it.
    let mut small_node = node("small-0", "small", &[], std::slice::from_ref(&job));
    small_node.allocatable = Some(pb::Resources {
        ephemeral_storage_bytes: 100 * GI,
        ..res(2000, 8 * GI, 110)
    });
    let ready = snap(vec![big_node, small_node], vec![job], vec![]);
    let drained = run(&ready, &pools, &[], &waiting.history, epoch(820));
    assert_eq!(
        downs(&drained),
        [("big".to_string(), vec!["big-0".to_string()])],
        "{}",
        reasons(&drained)
    );
}

#[test]
fn a_pool_whose_launches_failed_backs_off_doubling_and_others_take_the_pods() {
    let web = class(1, "web", 1000, GI);
    let s = snap(vec![], vec![web], vec![pending(1, 7, 0)]);
    let pools = [
        pool("vms", "  weight: 10\n"),
        pool("other", "  weight: 1\n"),
    ];
    let failed = |id: &str, op: &str, at: u64| {
        let mut c = claim(id, "vms", id, ClaimPhase::Failed);
        c.operation_id = op.into();
        c.failure_reason = "backend proxmox: VMID range 9100-9139 exhausted".into();
        c.history = vec![shoal_core::claim::Transition {
            phase: ClaimPhase::Failed,
            at_ms: planner_ms(epoch(at)),
            reason: c.failure_reason.clone(),
        }];
        c
    };
    let prefer_vms = |claims: &[NodeClaim], at: u64| {
        plan(&PlanInput {
            snapshot: &s,
            pools: &pools,
            claims,
            history: &History::default(),
            now: epoch(at),
            expanders: &[Expander::Priority, Expander::LeastWaste],
            seed: 1,
            packing_budget: super::packing::DEFAULT_BUDGET,
            backoff: Default::default(),
            bookings: Default::default(),
        })
    };
    // Nothing failed: the preferred pool grows.
    let p = prefer_vms(&[], 10);
    assert_eq!(ups(&p)[0].0, "vms", "{}", reasons(&p));

    // One failed scale-up (two claims of one operation) at t=0: a minute of backoff, the pods go
    // to the other pool meanwhile, and the decision says why.
    let one = [failed("c1", "op-1", 0), failed("c2", "op-1", 0)];
    let p = prefer_vms(&one, 30);
    assert_eq!(ups(&p)[0].0, "other", "{}", reasons(&p));
    let why = reasons(&p);
    assert!(
        why.contains("backing off after 1 failed scale-up(s) until")
            && why.contains("VMID range 9100-9139 exhausted"),
        "{why}"
    );
    assert_eq!(ups(&prefer_vms(&one, 61))[0].0, "vms");

    // A second failed scale-up at t=70: two minutes from then.
    let two = [
        failed("c1", "op-1", 0),
        failed("c2", "op-1", 0),
        failed("c3", "op-2", 70),
    ];
    assert_eq!(ups(&prefer_vms(&two, 180))[0].0, "other");
    assert_eq!(ups(&prefer_vms(&two, 191))[0].0, "vms");

    // A node of the pool turning Ready after them ends the streak.
    let mut ready = claim("c4", "vms", "vms-4", ClaimPhase::Ready);
    ready.history = vec![shoal_core::claim::Transition {
        phase: ClaimPhase::Ready,
        at_ms: planner_ms(epoch(80)),
        reason: String::new(),
    }];
    let recovered = [two[0].clone(), two[1].clone(), two[2].clone(), ready];
    assert_eq!(ups(&prefer_vms(&recovered, 100))[0].0, "vms");
}

#[test]
fn min_nodes_are_not_forced_on_a_pool_in_backoff() {
    let s = snap(vec![], vec![], vec![]);
    let mut vms = pool("vms", "");
    vms.min_nodes = 2;
    let pools = [vms];
    let mut c = claim("c1", "vms", "vms-1", ClaimPhase::Failed);
    c.failure_reason = "backend proxmox: template \"k3s\" not found".into();
    c.history = vec![shoal_core::claim::Transition {
        phase: ClaimPhase::Failed,
        at_ms: planner_ms(epoch(0)),
        reason: c.failure_reason.clone(),
    }];
    let p = run(&s, &pools, &[c.clone()], &History::default(), epoch(20));
    assert!(ups(&p).is_empty(), "{}", reasons(&p));
    assert!(
        reasons(&p).contains("below minNodes 2 with 0 node(s), backing off"),
        "{}",
        reasons(&p)
    );
    let p = run(&s, &pools, &[c], &History::default(), epoch(70));
    assert_eq!(ups(&p), [("vms".to_string(), 2)], "{}", reasons(&p));
}

fn plan_with(s: &pb::ClusterSnapshot, pools: &[Pool], bookings: Bookings<'_>) -> Plan {
    plan(&PlanInput {
        snapshot: s,
        pools,
        claims: &[],
        history: &History::default(),
        now: epoch(10),
        expanders: &[Expander::LeastWaste],
        seed: 1,
        packing_budget: super::packing::DEFAULT_BUDGET,
        backoff: Default::default(),
        bookings,
    })
}

fn booking(id: &str, cpu: i64, count: i64, nodes: &[&str]) -> Reservation {
    Reservation {
        id: id.into(),
        pods: vec![(class(900, "booked", cpu, GI), count)],
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        pools: vec![],
    }
}

#[test]
fn booked_room_is_not_planned_for_pending_pods_and_its_node_stays() {
    // Two empty nodes; a booking takes node b-1 whole (its own node), so 4 pending pods of 2 CPU
    // fit on b-0 only half and need one new node; b-1 is never scaled down while booked.
    let web = class(1, "web", 2000, GI);
    let s = snap(
        vec![
            node("b-0", "general", &[], &[]),
            node("b-1", "general", &[], &[]),
        ],
        vec![web],
        vec![pending(1, 4, 0)],
    );
    let mut general = pool(
        "general",
        "  scaleDown: { unneededFor: 0s, cooldown: 0s }\n",
    );
    general.scale_down.unneeded_for = Duration::ZERO;
    let free = plan_with(&s, std::slice::from_ref(&general), Bookings::default());
    assert!(
        ups(&free).is_empty(),
        "without a booking the pods fit: {}",
        reasons(&free)
    );

    let reserved = [booking("pr-1", 2000, 2, &["b-1"])];
    let p = plan_with(
        &s,
        std::slice::from_ref(&general),
        Bookings {
            reserved: &reserved,
            ..Default::default()
        },
    );
    assert_eq!(ups(&p), [("general".to_string(), 1)], "{}", reasons(&p));
    assert!(
        p.bookings_short.is_empty(),
        "the booking fits: {:?}",
        p.bookings_short
    );
    assert!(
        reasons(&p).contains("2 pod(s) of 1 capacity request(s) have booked room"),
        "{}",
        reasons(&p)
    );

    // No pending pods: the booked node stays, the other empty one goes.
    let idle = snap(
        vec![
            node("b-0", "general", &[], &[]),
            node("b-1", "general", &[], &[]),
        ],
        vec![],
        vec![],
    );
    let mut history = History::default();
    let input = |history: &History| {
        plan(&PlanInput {
            snapshot: &idle,
            pools: std::slice::from_ref(&general),
            claims: &[],
            history,
            now: epoch(10),
            expanders: &[Expander::LeastWaste],
            seed: 1,
            packing_budget: super::packing::DEFAULT_BUDGET,
            backoff: Default::default(),
            bookings: Bookings {
                reserved: &reserved,
                ..Default::default()
            },
        })
    };
    for _ in 0..2 {
        let p = input(&history);
        history = p.history.clone();
        if !downs(&p).is_empty() {
            assert_eq!(
                downs(&p),
                [("general".to_string(), vec!["b-0".to_string()])]
            );
            return;
        }
    }
    panic!("the unbooked empty node is removed");
}

#[test]
fn consuming_pending_pods_are_not_planned_again_and_lost_room_is_reported() {
    let consumer = pb::PodClass {
        provisioning_request: "job-a".into(),
        ..class(1, "job", 2000, GI)
    };
    let s = snap(vec![], vec![consumer], vec![pending(1, 4, 0)]);
    let general = pool("general", "");
    let consumers: std::collections::HashSet<u64> = [1].into_iter().collect();
    // The booking's nodes went away: nothing holds its 2 pods any more.
    let reserved = [booking("pr-1", 2000, 2, &["gone-1"])];
    let p = plan_with(
        &s,
        std::slice::from_ref(&general),
        Bookings {
            reserved: &reserved,
            consumers: Some(&consumers),
            request: false,
        },
    );
    assert!(
        ups(&p).is_empty(),
        "consumers wait for their booking: {}",
        reasons(&p)
    );
    assert!(
        reasons(&p).contains("4 pending pod(s) consume booked capacity"),
        "{}",
        reasons(&p)
    );
    assert_eq!(p.bookings_short.get("pr-1"), Some(&2));
}

#[test]
fn a_capacity_request_plan_ignores_batch_size_cooldown_and_threshold() {
    let job = class(1, "job", 2000, GI);
    let s = snap(vec![], vec![job], vec![pending(1, 20, 9)]);
    let general = pool(
        "general",
        "  scaleUp: { batchSize: 2, cooldown: 10m, pendingPods: 50, stabilizationWindow: 5m }\n",
    )
    .with_max(20);
    let mut history = History::default();
    history
        .pools
        .entry("general".into())
        .or_default()
        .last_scale_up_ms = Some(ms(epoch(5)));
    let input = |request: bool| {
        plan(&PlanInput {
            snapshot: &s,
            pools: std::slice::from_ref(&general),
            claims: &[],
            history: &history,
            now: epoch(10),
            expanders: &[Expander::LeastWaste],
            seed: 1,
            packing_budget: super::packing::DEFAULT_BUDGET,
            backoff: Default::default(),
            bookings: Bookings {
                request,
                ..Default::default()
            },
        })
    };
    assert!(ups(&input(false)).is_empty(), "the loop waits");
    let p = input(true);
    assert_eq!(ups(&p), [("general".to_string(), 10)], "{}", reasons(&p));
}

#[test]
fn room_now_books_asks_in_order_on_usable_nodes_only() {
    let s = snap(
        vec![
            node("r-0", "general", &[], &[]),
            node("r-1", "general", &[], &[]),
        ],
        vec![],
        vec![],
    );
    let general = pool("general", "");
    // A booking elsewhere takes one node; a claim still booting is not room "now".
    let others = [booking("pr-0", 4000, 1, &["r-0"])];
    let claims = [claim("c-9", "general", "r-9", ClaimPhase::Launched)];
    let input = PlanInput {
        snapshot: &s,
        pools: std::slice::from_ref(&general),
        claims: &claims,
        history: &History::default(),
        now: epoch(10),
        expanders: &[Expander::LeastWaste],
        seed: 1,
        packing_budget: Duration::ZERO,
        backoff: Default::default(),
        bookings: Bookings {
            reserved: &others,
            ..Default::default()
        },
    };
    let asks = [
        booking("a", 2000, 2, &[]),
        booking("b", 1000, 1, &[]),
        booking("c", 1000, 5, &[]),
    ];
    assert_eq!(bookings::room_now(&input, &asks), [0, 1, 5]);
}
