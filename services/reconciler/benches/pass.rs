//! One reconciliation pass over N claims with the `sim` backend: real etcd (claims, name
//! reservations, operations), the provisioner's `ListInstances` over gRPC against the sim cloud,
//! and the Kubernetes Node list from the simulator's API server. The cluster is consistent, so
//! the pass reads and compares everything and repairs nothing; the timed work is the pass as a
//! user triggers it (`ReconcilerService/Reconcile`, client-side). The baseline, in the same run,
//! is the same pass at a tenth of the claims.
//!
//! `cargo bench -p shoal-reconciler --bench pass` (`RECONCILE_BENCH_CLAIMS=1000`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::json;
use shoal_core::{
    ClaimPhase,
    claim::{NodeClaim, RECORD_VERSION, Transition},
};
use shoal_proto::v1::{ReconcileRequest, reconciler_service_client::ReconcilerServiceClient};
use shoal_runtime::config::{self, Config, ServiceSettings, Sources};
use shoal_sim::{Sim, SimConfig, cloud::BootTiming};
use shoal_state::{EtcdConfig, EtcdStore, StateStore, keys};
use shoal_testkit::{EtcdServer, free_port, http_get, http_request};
use tokio_util::sync::CancellationToken;

fn config<S: ServiceSettings>(etcd: &EtcdServer, grpc: u16, name: &str) -> Config<S> {
    let sources = Sources {
        file: None,
        env: Vec::new(),
        overrides: vec![
            ("grpc.addr".into(), format!("127.0.0.1:{grpc}")),
            ("admin.addr".into(), format!("127.0.0.1:{}", free_port())),
            ("store.backend".into(), "etcd".into()),
            ("store.endpoints".into(), etcd.endpoint()),
            ("telemetry.logLevel".into(), "warn".into()),
            ("instanceId".into(), name.into()),
            ("grpc.plaintext".into(), "true".into()),
        ],
    };
    config::load::<S>(&sources).expect("bench config").config
}

/// Adds claims `from..to`: a sim instance with our labels (it registers a Node), a Ready claim
/// and its name reservation.
async fn add_claims(sim: SocketAddr, store: &EtcdStore, from: usize, to: usize) {
    let created = tokio::task::spawn_blocking(move || {
        (from..to)
            .map(|n| {
                let (name, id) = (format!("general-{n}"), format!("c-{n:06}"));
                let body = json!({ "name": name, "labels": { "shoal.dev/cluster": "default", "shoal.dev/pool": "general", "shoal.dev/claim": id }, "capacity": { "cpu": "2", "memory": "4Gi" } }).to_string();
                let (code, answer) =
                    http_request(sim, "POST", "/cloud/v1/instances", Some(&body)).expect("sim");
                assert_eq!(code, 201, "{answer}");
                let instance: serde_json::Value = serde_json::from_str(&answer).expect("json");
                (name, id, instance["id"].as_str().expect("id").to_string())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("instances");
    for (name, id, instance) in created {
        let now = shoal_core::claim::now_ms();
        let history = [
            ClaimPhase::Pending,
            ClaimPhase::Launched,
            ClaimPhase::Registered,
            ClaimPhase::Ready,
        ]
        .into_iter()
        .map(|phase| Transition {
            phase,
            at_ms: now,
            reason: "bench".into(),
        })
        .collect();
        let claim = NodeClaim {
            version: RECORD_VERSION,
            id: id.clone(),
            pool: "general".into(),
            phase: ClaimPhase::Ready,
            backend: "sim".into(),
            instance_id: instance,
            node_name: name.clone(),
            operation_id: "op-bench".into(),
            created_at_ms: now,
            updated_at_ms: now,
            failure_reason: String::new(),
            history,
            labels: BTreeMap::new(),
        };
        store
            .put(
                &keys::claim(&id),
                serde_json::to_vec(&claim).expect("claim"),
                None,
            )
            .await
            .expect("put claim");
        store
            .put(&keys::reserved_id("sim", &name), id.into_bytes(), None)
            .await
            .expect("put reservation");
    }
    // Every instance's Node is registered and Ready.
    loop {
        let (_, body) =
            http_get(sim, "/api/v1/nodes?labelSelector=shoal.dev%2Fclaim").expect("nodes");
        let nodes: serde_json::Value = serde_json::from_str(&body).expect("json");
        let ready = nodes["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .count();
        if ready == to {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Median client-side time of `runs` passes; each must be clean.
async fn passes(
    client: &mut ReconcilerServiceClient<tonic::transport::Channel>,
    claims: usize,
    runs: usize,
) -> f64 {
    let mut times = Vec::new();
    // One warm-up pass (connections, caches), then the timed ones.
    for run in 0..=runs {
        let started = Instant::now();
        let report = client
            .reconcile(ReconcileRequest::default())
            .await
            .expect("Reconcile")
            .into_inner();
        if run > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
        assert_eq!(report.claims as usize, claims, "claims seen");
        assert_eq!(report.instances as usize, claims, "instances seen");
        assert_eq!(report.nodes as usize, claims, "nodes seen");
        assert!(
            report.drifts.is_empty(),
            "a consistent cluster has no drift: {:?}",
            report.drifts
        );
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[tokio::main]
async fn main() {
    let claims: usize = std::env::var("RECONCILE_BENCH_CLAIMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let baseline = claims / 10;
    let etcd = EtcdServer::start();
    let shutdown = CancellationToken::new();
    let sim = Sim::start(
        SimConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            boot: BootTiming {
                delay: Duration::ZERO,
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
        request_timeout: Duration::from_secs(5),
        ..EtcdConfig::default()
    })
    .await
    .expect("etcd");

    let provisioner_port = free_port();
    let mut provisioner = config::<shoal_provisioner::ProvisionerSettings>(
        &etcd,
        provisioner_port,
        "bench-provisioner",
    );
    // The instances the bench makes carry this cluster id.
    provisioner.cluster = "default".into();
    provisioner.service.kube.kubeconfig = kubeconfig.display().to_string();
    provisioner.service.backends.sim = Some(shoal_provisioner::SimBackend { url: sim.url() });
    provisioner.service.instance_check_interval = Duration::from_secs(3600);
    let reconciler_port = free_port();
    let mut reconciler =
        config::<shoal_reconciler::ReconcilerSettings>(&etcd, reconciler_port, "bench-reconciler");
    reconciler.cluster = "default".into();
    reconciler.service.kube.kubeconfig = kubeconfig.display().to_string();
    reconciler.service.provisioner_addr = format!("http://127.0.0.1:{provisioner_port}");
    reconciler.service.interval = Duration::from_secs(3600);
    let services = [
        tokio::spawn(shoal_provisioner::serve(provisioner, shutdown.clone())),
        tokio::spawn(shoal_reconciler::serve(reconciler, shutdown.clone())),
    ];
    let endpoint = format!("http://127.0.0.1:{reconciler_port}");
    let mut client = loop {
        match ReconcilerServiceClient::connect(endpoint.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };

    add_claims(sim.addr, &store, 0, baseline).await;
    let small = passes(&mut client, baseline, 11).await;
    println!(
        "pass over {baseline} claims (baseline): median {:.1} ms",
        small * 1000.0
    );
    add_claims(sim.addr, &store, baseline, claims).await;
    let large = passes(&mut client, claims, 11).await;
    println!("pass over {claims} claims: median {:.1} ms", large * 1000.0);
    println!(
        "ratio: {:.1}x the time for {:.0}x the claims",
        large / small,
        claims as f64 / baseline as f64
    );
    shutdown.cancel();
    for s in services {
        let _ = s.await;
    }
}
