//! Failover during a scale-up: two deciders and two provisioners against real etcd. Right after
//! the first decision, the decider leader and the provisioner leader are killed with SIGKILL.
//! The standbys take over within the lease TTL + 1 s, the operation the dead leader was driving
//! is finished by the new one, and the cluster ends with exactly the nodes the first decision
//! asked for — no duplicate scale-up.

use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_e2e::{Running, deployment_yaml, kubectl, sim_get};
use shoal_testkit::{EtcdServer, SimServer, wait_for};

const LEASE_TTL: Duration = Duration::from_secs(3);
const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 10 }\n";

fn leads(r: &Running, service: &str) -> bool {
    r.metric(&format!("shoal_leader{{service=\"{service}\"}}")) == Some(1.0)
}

fn claims(provisioner: &Running) -> Vec<Value> {
    shoal_e2e::node_claims(provisioner, "general")
}

#[test]
fn killing_both_leaders_mid_scale_up_neither_loses_nor_duplicates_nodes() {
    let etcd = EtcdServer::start();
    // Slow boots keep the scale-up in flight while the leaders die.
    let sim = SimServer::start(&["--boot-delay=4s", "--boot-jitter=500ms"]);
    let kube = format!(
        "--set=service.kube.kubeconfig={}",
        sim.kubeconfig().display()
    );
    let ttl = format!("--set=election.leaseTtl={}s", LEASE_TTL.as_secs());
    let dir = tempfile::tempdir().expect("dir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, POOL).expect("pools");

    let mut metrics = Running::start(
        "shoal-metrics",
        "fo-metrics",
        None,
        &[&kube, "--set=service.batchIdle=200ms"],
        &[],
    );
    metrics.wait_ready();
    let config =
        shoal_e2e::sim_provisioner_config(dir.path(), &sim, "", "  instanceCheckInterval: 2s\n");
    let config = format!("--config={}", config.display());
    let provisioner_args = [config.as_str(), ttl.as_str()];
    let mut prov_a = Running::start(
        "shoal-provisioner",
        "prov-a",
        Some(&etcd),
        &provisioner_args,
        &[],
    );
    prov_a.wait_ready();
    assert!(
        wait_for(Duration::from_secs(15), || leads(&prov_a, "provisioner")
            .then_some(()))
        .is_some(),
        "prov-a leads"
    );
    let mut prov_b = Running::start(
        "shoal-provisioner",
        "prov-b",
        Some(&etcd),
        &provisioner_args,
        &[],
    );
    prov_b.wait_ready();
    // The deciders reach the provisioners through the standby's address (as through a Service,
    // any replica accepts CreateNodes); the leader drives the work.
    let decider_args = [
        format!("--set=service.metricsAddr=http://{}", metrics.grpc),
        format!("--set=service.provisionerAddr=http://{}", prov_b.grpc),
        format!("--set=service.poolFiles={}", pools.display()),
        ttl.clone(),
    ];
    let decider_args: Vec<&str> = decider_args.iter().map(String::as_str).collect();
    let mut dec_a = Running::start("shoal-decider", "dec-a", Some(&etcd), &decider_args, &[]);
    dec_a.wait_ready();
    assert!(
        wait_for(Duration::from_secs(15), || leads(&dec_a, "decider")
            .then_some(()))
        .is_some(),
        "dec-a leads"
    );
    let mut dec_b = Running::start("shoal-decider", "dec-b", Some(&etcd), &decider_args, &[]);
    dec_b.wait_ready();

    // Twelve pods of 500m on 2-CPU nodes: three nodes.
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 12, "500m", "256Mi", None),
    );
    // The pods may turn pending over more than one snapshot (the ReplicaSet creates them in
    // steps), so the scale-up may take a decision or two: wait for all three claims.
    let first = wait_for(Duration::from_secs(20), || {
        let c = claims(&prov_b);
        (c.len() >= 3).then_some(c)
    })
    .unwrap_or_else(|| {
        panic!(
            "the scale-up creates claims for all twelve pods: {:#?}",
            claims(&prov_b)
        )
    });
    let asked = first.len();
    assert!(
        first.iter().all(|c| c["phase"] != "CLAIM_PHASE_READY"),
        "the scale-up is still in flight when the leaders die: {first:#?}"
    );

    dec_a.process.kill();
    prov_a.process.kill();
    let killed = Instant::now();
    let takeover = wait_for(Duration::from_secs(15), || {
        let d = leads(&dec_b, "decider").then(|| killed.elapsed());
        let p = leads(&prov_b, "provisioner").then(|| killed.elapsed());
        Some((d?, p?))
    });
    let Some((decider_took, provisioner_took)) = takeover else {
        panic!(
            "the standbys take over\n{}\n{}",
            dec_b.process.logs(),
            prov_b.process.logs()
        );
    };

    let running = wait_for(Duration::from_secs(60), || {
        let n = shoal_e2e::running_pods(
            sim.addr(),
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb",
        );
        (n == 12).then_some(())
    });
    assert!(
        running.is_some(),
        "every pod runs after the failover\n{}",
        prov_b.process.logs()
    );
    // A few more snapshots: nothing else is created.
    std::thread::sleep(Duration::from_secs(4));
    let end = claims(&prov_b);
    let ready = end
        .iter()
        .filter(|c| c["phase"] == "CLAIM_PHASE_READY")
        .count();
    let nodes = sim_get(sim.addr(), "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim")["items"]
        .as_array()
        .map_or(0, Vec::len);
    println!(
        "failover: the scale-up asked for {asked} nodes; decider standby led after {:.2} s, provisioner standby after {:.2} s (lease TTL {} s); end: {} claims, {ready} Ready, {nodes} Nodes",
        decider_took.as_secs_f64(),
        provisioner_took.as_secs_f64(),
        LEASE_TTL.as_secs(),
        end.len()
    );
    assert_eq!(asked, 3, "the scale-up asks for three nodes");
    assert_eq!(end.len(), asked, "no duplicate scale-up: {end:#?}");
    assert_eq!(ready, asked);
    assert_eq!(nodes, asked);
    let limit = LEASE_TTL + Duration::from_secs(1);
    assert!(
        decider_took <= limit && provisioner_took <= limit,
        "standbys lead within lease TTL + 1 s"
    );
}
