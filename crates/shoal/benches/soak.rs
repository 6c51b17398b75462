//! Soak bench: does Shoal's state stay bounded over many node lifetimes? 20,000 nodes are
//! created, turn Ready and are deleted, in batches of 100 (one `CreateNodes`, one
//! `DeleteNodes` each), through the real services — every one its own process
//! (`shoal run <service>`, release build) — against real etcd and the simulator (in this
//! process). Retention trims finished records (provisioner, every 5 s here; 500 finished claims
//! and 4 finished operations — so that both bounds are reached, and
//! records are being removed, within the first 1,000 lifetimes: the baseline is the steady
//! state, not an empty store filling up) and the reconciler's leader compacts
//! etcd's history (every 5 s here, keeping 100 revisions) and defragments it when the file
//! has grown past twice the bytes in use (the default).
//!
//! After the first 1,000 lifetimes (the same-run baseline), half way and at the end it records:
//! etcd's database size — as found (file and in use: bbolt leaves freed pages in the file until a
//! defragmentation, which Shoal runs when the file passes twice the bytes in use) and what is
//! kept (the file right after a defragmentation the bench asks for), the records a full read of `claims/` returns and how long it
//! takes (median of 61 spread over 6 s), the keys under Shoal's namespace, and the decision latency
//! (`DeciderService/Evaluate` end to end, median of 61 spread over 6 s). Targets: each within 1.2× of its
//! baseline.
//!
//! `cargo bench -p shoal --bench soak` (`SOAK_LIFETIMES=20000`, `SOAK_BATCH=100`).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use shoal_proto::v1::{
    ClaimPhase, CreateNodesRequest, DeleteNodesRequest, EvaluateRequest, GetOperationRequest,
    ListNodeClaimsRequest, OperationState, decider_service_client::DeciderServiceClient,
    provisioner_service_client::ProvisionerServiceClient,
};
use shoal_state::{EtcdStore, StateStore, keys};
use shoal_testkit::{EtcdServer, free_port, http_get};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Service, put_pool, simulator, store};

fn start(service: &str, grpc: u16, admin: u16, etcd: &str, extra: &[String]) -> Service {
    common::start("soak", service, grpc, admin, etcd, extra)
}
use tonic::transport::Channel;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What the state looks like at one point.
#[derive(Debug, Clone, Copy)]
struct Reading {
    lifetimes: usize,
    db_bytes: f64,
    db_in_use_bytes: f64,
    /// The file right after a defragmentation: exactly what is kept (live keys and the
    /// history compaction leaves).
    db_kept_bytes: f64,
    claims: usize,
    claims_bytes: usize,
    claims_read_ms: f64,
    keys: usize,
    evaluate_ms: f64,
}

fn etcd_metric(etcd: &EtcdServer, name: &str) -> f64 {
    let addr: SocketAddr = etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    http_get(addr, "/metrics")
        .ok()
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

async fn read(
    lifetimes: usize,
    etcd: &EtcdServer,
    store: &EtcdStore,
    decider: &mut DeciderServiceClient<Channel>,
) -> Reading {
    let mut reads = Vec::new();
    let mut claims = (0, 0);
    // Samples spread over ~6 s, so a burst of background work (a pass, a sweep, a compaction)
    // moves single samples, not the median.
    for _ in 0..61 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let range = store.range(keys::CLAIMS).await.expect("claims");
        reads.push(started.elapsed().as_secs_f64() * 1000.0);
        claims = (
            range.kvs.len(),
            range.kvs.iter().map(|kv| kv.value.len()).sum(),
        );
    }
    let mut evaluations = Vec::new();
    for _ in 0..61 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        decider
            .evaluate(EvaluateRequest::default())
            .await
            .expect("Evaluate");
        evaluations.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let db_bytes = etcd_metric(etcd, "etcd_mvcc_db_total_size_in_bytes");
    let db_in_use_bytes = etcd_metric(etcd, "etcd_mvcc_db_total_size_in_use_in_bytes");
    store.defragment().await.expect("defragment");
    let kept = store
        .size()
        .await
        .expect("size")
        .expect("etcd reports its size");
    Reading {
        lifetimes,
        db_bytes,
        db_in_use_bytes,
        db_kept_bytes: kept.file_bytes as f64,
        claims: claims.0,
        claims_bytes: claims.1,
        claims_read_ms: median(reads),
        keys: store.keys("").await.expect("keys").len(),
        evaluate_ms: median(evaluations),
    }
}

async fn wait_op(provisioner: &mut ProvisionerServiceClient<Channel>, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let op = provisioner
            .get_operation(GetOperationRequest { id: id.into() })
            .await
            .expect("GetOperation")
            .into_inner();
        if op.state != OperationState::Running as i32 {
            assert_eq!(
                op.state,
                OperationState::Succeeded as i32,
                "operation {id} failed: {}",
                op.error
            );
            return;
        }
        assert!(Instant::now() < deadline, "operation {id} still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("SOAK_LIFETIMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let batch: usize = std::env::var("SOAK_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let etcd = EtcdServer::start();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (sim, kubeconfig) = simulator(
        Duration::from_millis(100),
        Duration::from_millis(50),
        dir.path(),
        &shutdown,
    )
    .await;
    let store = store(etcd.endpoint(), Duration::from_secs(10)).await;
    let pool = format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: soak }}\nspec:\n  provider: {{ backend: sim }}\n  template:\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: {batch} }}\n  scaleDown: {{ enabled: false, drainTimeout: 30s }}\n"
    );
    put_pool(&store, &pool).await;
    let provisioner_config = dir.path().join("provisioner.yaml");
    std::fs::write(
        &provisioner_config,
        format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n  retention: {{ interval: 5s, claims: {{ maxAge: 24h, maxCount: 500 }}, operations: {{ maxAge: 24h, maxCount: 4 }} }}\n",
            kubeconfig.display(),
            sim.url()
        ),
    )
    .expect("config");
    let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
    let endpoint = etcd.endpoint();
    let kube = format!("--set=service.kube.kubeconfig={}", kubeconfig.display());
    let _metrics = start(
        "metrics",
        ports[0],
        ports[1],
        &endpoint,
        std::slice::from_ref(&kube),
    );
    let _provisioner = start(
        "provisioner",
        ports[2],
        ports[3],
        &endpoint,
        &[format!("--config={}", provisioner_config.display())],
    );
    let _decider = start(
        "decider",
        ports[4],
        ports[5],
        &endpoint,
        &[
            format!("--set=service.metricsAddr=http://127.0.0.1:{}", ports[0]),
            format!(
                "--set=service.provisionerAddr=http://127.0.0.1:{}",
                ports[2]
            ),
        ],
    );
    let _reconciler = start(
        "reconciler",
        ports[6],
        ports[7],
        &endpoint,
        &[
            kube,
            format!(
                "--set=service.provisionerAddr=http://127.0.0.1:{}",
                ports[2]
            ),
            // The reconciler's leader compacts the history; often here, as the bench is fast.
            "--set=service.compaction.interval=5s".into(),
            "--set=service.compaction.keepRevisions=100".into(),
        ],
    );
    let connect = |port: u16| async move {
        loop {
            match Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .expect("uri")
                .connect()
                .await
            {
                Ok(channel) => return channel,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    let mut provisioner =
        ProvisionerServiceClient::new(connect(ports[2]).await).max_decoding_message_size(64 << 20);
    let mut decider =
        DeciderServiceClient::new(connect(ports[4]).await).max_decoding_message_size(64 << 20);
    // The provisioner leads before the first batch.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let started = Instant::now();
    let mut readings = Vec::new();
    let mut done = 0;
    let mut round = 0;
    while done < total {
        round += 1;
        let n = batch.min(total - done);
        let op = provisioner
            .create_nodes(CreateNodesRequest {
                pool: "soak".into(),
                count: n as i32,
                idempotency_key: format!("soak-up-{round}"),
                reason: "soak".into(),
            })
            .await
            .expect("CreateNodes")
            .into_inner();
        wait_op(&mut provisioner, &op.id).await;
        // The claims cache answering ListNodeClaims may trail the operation by a moment.
        let mut nodes: Vec<String> = Vec::new();
        for _ in 0..100 {
            let claims = provisioner
                .list_node_claims(ListNodeClaimsRequest {
                    pool: "soak".into(),
                    phases: vec![ClaimPhase::Ready as i32],
                })
                .await
                .expect("ListNodeClaims")
                .into_inner()
                .claims;
            nodes = claims
                .into_iter()
                .filter(|c| op.claim_ids.contains(&c.id))
                .map(|c| c.node_name)
                .collect();
            if nodes.len() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(nodes.len(), n, "every node of round {round} is Ready");
        let op = provisioner
            .delete_nodes(DeleteNodesRequest {
                nodes,
                idempotency_key: format!("soak-down-{round}"),
                reason: "soak".into(),
            })
            .await
            .expect("DeleteNodes")
            .into_inner();
        wait_op(&mut provisioner, &op.id).await;
        done += n;
        if done == 1000.min(total) || done == total / 2 || done == total {
            // Let retention and compaction do what they do between rounds, long enough that the
            // kept history is the quiet writes of the pause (leader records), not the tail of
            // the last batch: readings then compare like with like.
            tokio::time::sleep(Duration::from_secs(45)).await;
            let r = read(done, &etcd, &store, &mut decider).await;
            println!(
                "after {done} lifetimes ({:.0} s): etcd db kept {:.2} MB (file as found {:.1} MB, {:.1} MB in use); claims/ {} records, {:.0} KB, read in {:.1} ms; {} keys; Evaluate {:.1} ms",
                started.elapsed().as_secs_f64(),
                r.db_kept_bytes / 1e6,
                r.db_bytes / 1e6,
                r.db_in_use_bytes / 1e6,
                r.claims,
                r.claims_bytes as f64 / 1e3,
                r.claims_read_ms,
                r.keys,
                r.evaluate_ms
            );
            readings.push(r);
        } else if round % 5 == 0 {
            println!(
                "  {done} lifetimes ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
        let ratio = |a: f64, b: f64| b / a;
        println!(
            "\n| after | etcd db kept | file as found (in use) | claims/ records | claims/ read | keys | Evaluate |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &readings {
            println!(
                "| {} lifetimes | {:.2} MB | {:.1} MB ({:.1} MB) | {} ({:.0} KB) | {:.1} ms | {} | {:.1} ms |",
                r.lifetimes,
                r.db_kept_bytes / 1e6,
                r.db_bytes / 1e6,
                r.db_in_use_bytes / 1e6,
                r.claims,
                r.claims_bytes as f64 / 1e3,
                r.claims_read_ms,
                r.keys,
                r.evaluate_ms
            );
        }
        println!(
            "| ratio last/first | {:.2}x | {:.2}x ({:.2}x) | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            ratio(first.db_kept_bytes, last.db_kept_bytes),
            ratio(first.db_bytes, last.db_bytes),
            ratio(first.db_in_use_bytes, last.db_in_use_bytes),
            ratio(first.claims as f64, last.claims as f64),
            ratio(first.claims_read_ms, last.claims_read_ms),
            ratio(first.keys as f64, last.keys as f64),
            ratio(first.evaluate_ms, last.evaluate_ms)
        );
    }
    shutdown.cancel();
}
