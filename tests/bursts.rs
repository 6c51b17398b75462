//! No double scale-up: 20 seeded bursts of pending pods, each in a pool of its own so it starts
//! from zero nodes, on a simulator whose nodes boot with up to 2.5 s of jitter — so snapshots,
//! claims turning Ready, Nodes appearing and pods being bound interleave in every order. The
//! nodes created for each burst never exceed what one plan made with every pod known needs, and
//! every pod runs. Every piece is its own process with real etcd.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;
use shoal_e2e::{EtcdReader, Running, kubectl, sim_get};
use shoal_testkit::{EtcdServer, SimServer, wait_for};

const BURSTS: u64 = 20;

struct Burst {
    seed: u64,
    pods: u32,
    cpu_millis: u32,
    /// What one plan with every pod known asks for: the pods are alike, so ceil(pods / per node).
    single_shot: u32,
}

impl Burst {
    fn new(seed: u64) -> Burst {
        let mut rng = StdRng::seed_from_u64(seed);
        let pods = rng.random_range(3..=30);
        let cpu_millis = [500, 1000, 1500, 2000][rng.random_range(0..4)];
        let per_node = 4000 / cpu_millis;
        Burst {
            seed,
            pods,
            cpu_millis,
            single_shot: pods.div_ceil(per_node),
        }
    }

    fn pool(&self) -> String {
        format!("b{}", self.seed)
    }

    fn pool_yaml(&self) -> String {
        format!(
            "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {pool} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    labels: {{ burst: {pool} }}\n    startupTaints: [{{ key: shoal.dev/unregistered, effect: NoSchedule }}]\n    capacity: {{ cpu: \"4\", memory: 16Gi }}\n  limits: {{ minNodes: 0, maxNodes: 30 }}\n  scaleDown: {{ enabled: false }}\n",
            pool = self.pool()
        )
    }

    fn deployment(&self) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: {pool}, namespace: default }}\nspec:\n  replicas: {pods}\n  selector: {{ matchLabels: {{ app: {pool} }} }}\n  template:\n    metadata: {{ labels: {{ app: {pool} }} }}\n    spec:\n      nodeSelector: {{ burst: {pool} }}\n      containers:\n      - name: app\n        image: registry.example/app:1\n        resources: {{ requests: {{ cpu: \"{cpu}m\", memory: 256Mi }} }}\n",
            pool = self.pool(),
            pods = self.pods,
            cpu = self.cpu_millis
        )
    }
}

fn running(sim: &SimServer, pool: &str) -> u32 {
    shoal_e2e::running_pods(
        sim.addr(),
        &format!("/api/v1/namespaces/default/pods?labelSelector=app%3D{pool}"),
    ) as u32
}

fn claims_of(store: &EtcdReader, pool: &str) -> Vec<Value> {
    store
        .json_under("claims/")
        .into_iter()
        .filter(|c| c["pool"] == pool)
        .collect()
}

#[test]
fn twenty_seeded_bursts_with_boot_jitter_never_get_more_nodes_than_one_plan_needs() {
    let bursts: Vec<Burst> = (1..=BURSTS).map(Burst::new).collect();
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=500ms", "--boot-jitter=2500ms"]);
    let store = EtcdReader::new(&etcd);
    let dir = tempfile::tempdir().expect("dir");
    let pools = dir.path().join("pools.yaml");
    std::fs::write(
        &pools,
        bursts
            .iter()
            .map(Burst::pool_yaml)
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .expect("pool file");
    let mut metrics = Running::start(
        "shoal-metrics",
        "burst-metrics",
        None,
        &[
            &format!(
                "--set=service.kube.kubeconfig={}",
                sim.kubeconfig().display()
            ),
            "--set=service.batchIdle=300ms",
        ],
        &[],
    );
    metrics.wait_ready();
    let config = shoal_e2e::sim_provisioner_config(
        dir.path(),
        &sim,
        "election: { leaseTtl: 3s }\n",
        "  instanceCheckInterval: 2s\n",
    );
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "burst-provisioner",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    provisioner.wait_ready();
    let mut decider = Running::start(
        "shoal-decider",
        "burst-decider",
        Some(&etcd),
        &[
            &format!("--set=service.metricsAddr=http://{}", metrics.grpc),
            &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
            &format!("--set=service.poolFiles={}", pools.display()),
            "--set=election.leaseTtl=3s",
        ],
        &[],
    );
    decider.wait_ready();
    let applied = wait_for(Duration::from_secs(20), || {
        (store.values_under("pools/").len() == bursts.len()).then_some(())
    });
    assert!(
        applied.is_some(),
        "the pool file is applied\n{}",
        decider.process.logs()
    );

    // Bursts 1.5 s apart: while one's nodes boot (with jitter), the next one's pods go pending.
    let started = Instant::now();
    for burst in &bursts {
        kubectl(
            &sim.kubeconfig(),
            &["apply", "-f", "-"],
            &burst.deployment(),
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    let all = wait_for(Duration::from_secs(120), || {
        bursts
            .iter()
            .all(|b| running(&sim, &b.pool()) == b.pods)
            .then_some(())
    });
    assert!(
        all.is_some(),
        "every pod runs: {:?}\n{}",
        bursts
            .iter()
            .map(|b| (b.pool(), running(&sim, &b.pool()), b.pods))
            .collect::<Vec<_>>(),
        decider.process.logs()
    );
    println!(
        "all {} bursts running after {:?}",
        bursts.len(),
        started.elapsed()
    );
    // Late duplicates would come from snapshots taken while the last nodes came up: give them
    // time to show.
    std::thread::sleep(Duration::from_secs(5));
    let mut report = Vec::new();
    for b in &bursts {
        let claims = claims_of(&store, &b.pool());
        report.push(format!(
            "seed {}: {} pods of {}m → {} node(s) created, one plan needs {}",
            b.seed,
            b.pods,
            b.cpu_millis,
            claims.len(),
            b.single_shot
        ));
        assert!(
            claims.len() as u32 <= b.single_shot,
            "seed {}: {} pods of {}m on 4-CPU nodes need {} node(s); {} were created:\n{:#?}\n{}",
            b.seed,
            b.pods,
            b.cpu_millis,
            b.single_shot,
            claims.len(),
            claims
                .iter()
                .map(|c| (
                    c["nodeName"].clone(),
                    c["phase"].clone(),
                    c["history"][0]["reason"].clone()
                ))
                .collect::<Vec<_>>(),
            decider.process.logs()
        );
        assert!(claims.iter().all(|c| c["phase"] == "Ready"));
    }
    println!("{}", report.join("\n"));
    let nodes = sim_get(sim.addr(), "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim");
    let total: u32 = bursts.iter().map(|b| b.single_shot).sum();
    assert_eq!(
        nodes["items"].as_array().map(Vec::len),
        Some(total as usize),
        "as many Nodes as the plans need, in all"
    );
}
