//! Scale-up parallelism: 50 nodes on the `sim` backend with a 5 s boot delay, all Ready — with
//! the pool's `maxConcurrent` at 50 and, as the same-run baseline, at 1 (node by node, as the
//! seed prototypes did). Real processes: etcd, the provisioner binary, the simulator (in this
//! process), gRPC between them.
//!
//! `cargo bench -p shoal-provisioner --bench parallel` (`PARALLEL_BENCH_NODES=50`,
//! `PARALLEL_BENCH_BASELINE=0` skips the ~250 s baseline).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use prost::Message;
use shoal_proto::v1::{
    ClaimPhase, CreateNodesRequest, ListNodeClaimsRequest,
    provisioner_service_client::ProvisionerServiceClient,
};
use shoal_sim::{Sim, SimConfig, cloud::BootTiming};
use shoal_state::{EtcdConfig, EtcdStore, StateStore, keys};
use shoal_testkit::{EtcdServer, free_port};
use tokio_util::sync::CancellationToken;

fn pool(name: &str, max_concurrent: u32, nodes: u32) -> shoal_proto::v1::NodePool {
    let yaml = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {name} }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"4\", memory: 8Gi }}\n  limits: {{ minNodes: 0, maxNodes: {nodes} }}\n  scaleUp: {{ batchSize: {nodes}, maxConcurrent: {max_concurrent} }}\n"
    );
    shoal_core::pool::Pool::from_yaml(&yaml)
        .expect("bench pool")
        .0
}

async fn run(
    client: &mut ProvisionerServiceClient<tonic::transport::Channel>,
    pool: &str,
    nodes: i32,
) -> f64 {
    let started = Instant::now();
    client
        .create_nodes(CreateNodesRequest {
            pool: pool.into(),
            count: nodes,
            idempotency_key: format!("bench/{pool}"),
            reason: "parallelism bench".into(),
        })
        .await
        .expect("CreateNodes");
    loop {
        let claims = client
            .list_node_claims(ListNodeClaimsRequest {
                pool: pool.into(),
                phases: vec![],
            })
            .await
            .expect("ListNodeClaims")
            .into_inner()
            .claims;
        let ready = claims
            .iter()
            .filter(|c| c.phase == ClaimPhase::Ready as i32)
            .count();
        let failed = claims
            .iter()
            .filter(|c| c.phase == ClaimPhase::Failed as i32)
            .count();
        assert_eq!(failed, 0, "no claim may fail in the bench: {claims:#?}");
        if ready == nodes as usize {
            return started.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let nodes: u32 = std::env::var("PARALLEL_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let baseline = std::env::var("PARALLEL_BENCH_BASELINE").map_or(true, |v| v != "0");
    let etcd = EtcdServer::start();
    let shutdown = CancellationToken::new();
    let sim = Sim::start(
        SimConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            boot: BootTiming {
                delay: Duration::from_secs(5),
                jitter: Duration::ZERO,
            },
            ..SimConfig::default()
        },
        shutdown.clone(),
    )
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    shoal_sim::kubeconfig::write(&kubeconfig, &sim.url()).expect("kubeconfig");

    let store = EtcdStore::connect(&EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        namespace: keys::DEFAULT_NAMESPACE.into(),
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::default()
    })
    .await
    .expect("etcd");
    for (name, concurrent) in [("parallel", nodes), ("serial", 1)] {
        let p = pool(name, concurrent, nodes);
        store
            .put(&keys::pool(name), p.encode_to_vec(), None)
            .await
            .expect("pool");
    }

    let config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n  instanceCheckInterval: 2s\n",
            kubeconfig.display(),
            sim.url()
        ),
    )
    .expect("config");
    let grpc = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-provisioner"))
        .arg(format!("--grpc-addr=127.0.0.1:{grpc}"))
        .arg(format!("--admin-addr=127.0.0.1:{}", free_port()))
        .arg(format!("--etcd-endpoints={}", etcd.endpoint()))
        .arg(format!("--config={}", config.display()))
        .arg("--log-level=warn")
        .env("SHOAL_GRPC__PLAINTEXT", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("shoal-provisioner starts");
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut client = loop {
        match ProvisionerServiceClient::connect(endpoint.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Leadership first (the provisioner acts only as leader).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fast = run(&mut client, "parallel", nodes as i32).await;
    println!("{nodes} nodes, 5 s boot, maxConcurrent {nodes}: all Ready in {fast:.2} s");
    if baseline {
        let slow = run(&mut client, "serial", nodes as i32).await;
        println!("{nodes} nodes, 5 s boot, maxConcurrent 1 (baseline): all Ready in {slow:.2} s");
        println!("speed-up: {:.1}x", slow / fast);
    }
    let _ = child.kill();
    let _ = child.wait();
    shutdown.cancel();
}
