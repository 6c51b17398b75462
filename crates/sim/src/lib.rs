//! `shoal-sim`: a Kubernetes-API-compatible cluster in one process, in the spirit of KWOK, so
//! that the `kube` crate, `kubectl` and Shoal's services work against it unchanged.
//!
//! Served: the API-server subset (discovery, Namespaces, Nodes, Pods + status/binding, Events,
//! PodTemplates, Deployments and ReplicaSets + status/scale, PodDisruptionBudgets, Leases,
//! CustomResourceDefinitions and their resources; get/list with selectors and
//! pagination, watch with resourceVersion/bookmarks/410, create/update/patch/delete, `Status`
//! errors), a scheduler with the real filters, simulated kubelets, a deployment controller, and
//! the sim cloud API, and pod eviction honouring PodDisruptionBudgets. Metrics in node-exporter/kube-state-metrics/cAdvisor form on `/metrics`. Not yet: node
//! heartbeats through Leases and NotReady detection,  Table output and OpenAPI for kubectl.

pub mod agent;
pub mod api;
pub mod cloud;
pub mod crd;
pub mod deployments;
pub mod disruption;
pub mod error;
pub mod events;
pub mod kubeconfig;
pub mod kubelet;
pub mod lifecycle;
pub mod metrics;
pub mod namespaces;
pub mod openapi;
pub mod patch;
pub mod resources;
pub mod scenario;
pub mod scheduler;
pub mod selector;
pub mod store;
pub mod table;
pub mod tls;
pub mod validation;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

/// How to run the simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Listen address of the API server.
    pub addr: SocketAddr,
    /// Past changes kept for watches that resume from a resourceVersion.
    pub watch_history: usize,
    /// Interval of watch bookmarks.
    pub bookmark_interval: Duration,
    /// Simulated kubelet timing.
    pub kubelet: kubelet::KubeletTiming,
    /// Sim cloud instance boot timing.
    pub boot: cloud::BootTiming,
    /// Heartbeats and the node lifecycle controller.
    pub lifecycle: lifecycle::LifecycleTiming,
    /// Serve HTTPS with a CA generated at start ([`Sim::ca_pem`]).
    pub tls: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 6443)),
            watch_history: 200_000,
            bookmark_interval: Duration::from_secs(5),
            kubelet: kubelet::KubeletTiming::default(),
            boot: cloud::BootTiming::default(),
            lifecycle: lifecycle::LifecycleTiming::default(),
            tls: false,
        }
    }
}

/// A running simulator.
pub struct Sim {
    /// The bound address.
    pub addr: SocketAddr,
    /// The object store (for in-process controllers and tests).
    pub store: Arc<store::Store>,
    /// In-process kubelets that are stopped (their nodes stop heartbeating).
    pub killed: lifecycle::KilledNodes,
    /// The CA of the serving certificate, when serving HTTPS.
    pub ca_pem: Option<String>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sim {
    /// Binds and starts serving until `shutdown`.
    pub async fn start(config: SimConfig, shutdown: CancellationToken) -> std::io::Result<Sim> {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let serving = if config.tls {
            Some(tls::generate(addr).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let ca_pem = serving.as_ref().map(|s| s.ca_pem.clone());
        let store = store::Store::new(config.watch_history);
        let state = Arc::new(api::ApiState {
            store: store.clone(),
            exporter: metrics::Exporter::default(),
            bookmark_interval: config.bookmark_interval,
        });
        let killed = lifecycle::KilledNodes::default();
        let cloud = cloud::Cloud::new(store.clone(), config.boot, shutdown.clone());
        let app = api::router(state)
            .merge(cloud::router(cloud))
            .merge(kubelet_chaos_router(killed.clone()));
        tokio::spawn(scheduler::run(store.clone(), shutdown.clone()));
        tokio::spawn(kubelet::run(
            store.clone(),
            config.kubelet,
            shutdown.clone(),
        ));
        tokio::spawn(deployments::run(store.clone(), shutdown.clone()));
        tokio::spawn(disruption::run(store.clone(), shutdown.clone()));
        tokio::spawn(namespaces::run(store.clone(), shutdown.clone()));
        tokio::spawn(lifecycle::run_heartbeats(
            store.clone(),
            config.lifecycle,
            killed.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(lifecycle::run_controller(
            store.clone(),
            config.lifecycle,
            shutdown.clone(),
        ));
        let task = match serving {
            Some(serving) => {
                let listener = tls::TlsListener::new(listener, serving.config, shutdown.clone())?;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown.cancelled_owned())
                        .await
                })
            }
            None => tokio::spawn(async move {
                // Small responses go out at once (Nagle + delayed ACK would add ~40 ms per call).
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }),
        };
        Ok(Sim {
            addr,
            store,
            killed,
            ca_pem,
            task,
        })
    }

    /// Plays a scenario in the background until it ends or `shutdown`.
    pub fn play(
        &self,
        scenario: scenario::Scenario,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(scenario::play(
            self.store.clone(),
            self.killed.clone(),
            scenario,
            shutdown,
        ))
    }

    /// `http://<addr>`, or `https://` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Writes a kubeconfig for this simulator (trusting its CA when it serves HTTPS).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        kubeconfig::write_with_ca(path, &self.url(), self.ca_pem.as_deref())
    }

    /// Waits for the server to stop.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// `POST /sim/v1/nodes/{name}/kill` stops a node's in-process kubelet (it stops heartbeating and
/// goes NotReady after the grace period); `.../revive` starts it again.
fn kubelet_chaos_router(killed: lifecycle::KilledNodes) -> axum::Router {
    use axum::{
        extract::{Path, State},
        routing::post,
    };
    axum::Router::new()
        .route(
            "/sim/v1/nodes/{name}/kill",
            post(
                |State(k): State<lifecycle::KilledNodes>, Path(name): Path<String>| async move {
                    k.kill(&name);
                    "killed\n"
                },
            ),
        )
        .route(
            "/sim/v1/nodes/{name}/revive",
            post(
                |State(k): State<lifecycle::KilledNodes>, Path(name): Path<String>| async move {
                    k.revive(&name);
                    "revived\n"
                },
            ),
        )
        .with_state(killed)
}
