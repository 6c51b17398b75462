//! [`Host`]: what every service process shares — listeners bound up front, the admin port, the
//! state store connection, the leader loop, and a gRPC server with health, reflection and the
//! tower layers — with an orderly shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use shoal_state::{Election, ElectionConfig, EtcdStore, MemoryStore, SharedStore, StoreError};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    admin::{Readiness, serve_admin},
    audit::{AuditLayer, AuditLog},
    auth::{AuthLayer, Authenticator},
    config::{Config, ServiceSettings, StoreBackend},
    layers::{GrpcMetricsLayer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, ServerTraceLayer},
    leader::{LeaderWatch, run_leader_loop},
    metrics::{MetricsError, RuntimeMetrics},
    routing::{LeaderRouteLayer, LeaderRouter},
    supervise::Supervisor,
    tls::Tls,
};

/// Why a service could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A listen address could not be bound.
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config field of the address.
        field: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Metrics registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Server reflection could not be built from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A dependency of the service (Kubernetes client, backend) could not be set up.
    #[error("{what}: {message}")]
    Dependency {
        /// What could not be set up.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The gRPC server task ended unexpectedly.
    #[error("gRPC server stopped unexpectedly: {0}")]
    Stopped(String),
    /// The configured cluster id is not the store's.
    #[error(transparent)]
    Cluster(#[from] shoal_state::records::ClusterIdError),
    /// TLS material could not be loaded.
    #[error("grpc.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A channel to another service could not be built.
    #[error(transparent)]
    Channel(#[from] crate::layers::ChannelError),
}

/// A service process's shared machinery.
pub struct Host<S: ServiceSettings> {
    /// The validated configuration.
    pub config: Config<S>,
    /// Metrics registry (register service metrics here).
    pub metrics: RuntimeMetrics,
    readiness: Readiness,
    health: HealthReporter,
    grpc_listener: Option<TcpListener>,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_shutdown: CancellationToken,
    admin_task: JoinHandle<()>,
    store: Option<SharedStore>,
    leader: Option<(LeaderWatch, JoinHandle<()>)>,
    election: Option<Election>,
    cluster: String,
    advertise: String,
    supervisor: Supervisor,
    leader_only: Vec<&'static str>,
    tls: Option<Tls>,
    audit: Option<AuditLog>,
}

async fn bind(
    field: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), HostError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Bind {
            field,
            addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| HostError::Bind {
        field,
        addr,
        source,
    })?;
    Ok((listener, local))
}

impl<S: ServiceSettings> Host<S> {
    /// Binds both ports, starts the admin server, connects the store (retrying until it answers)
    /// and, for campaigning services, starts the leader loop. Returns `None` when `shutdown`
    /// fires while still waiting for the store.
    pub async fn start(
        config: Config<S>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Host<S>>, HostError> {
        let metrics = RuntimeMetrics::new(S::SERVICE)?;
        let tls = if config.grpc.tls.is_set() {
            Some(Tls::load(&config.grpc.tls)?)
        } else {
            None
        };
        if tls.is_none() {
            tracing::warn!(addr = %config.grpc.addr, "grpc.plaintext: serving and calling other services without TLS; anyone who can reach this port can call it (set grpc.tls outside development)");
        }
        config
            .grpc
            .auth
            .check_tokens()
            .map_err(|message| HostError::Dependency {
                what: "tokens",
                message,
            })?;
        if !config.grpc.auth_enabled() {
            tracing::warn!("grpc.auth is off: every caller may make every call");
        }
        let readiness = Readiness::new("starting");
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;

        let (grpc_listener, grpc_addr) = bind("grpc.addr", config.grpc.addr).await?;
        let (admin_listener, admin_addr) = bind("admin.addr", config.admin.addr).await?;
        let admin_shutdown = CancellationToken::new();
        let admin_task = tokio::spawn({
            let (metrics, readiness, stop) =
                (metrics.clone(), readiness.clone(), admin_shutdown.clone());
            async move {
                if let Err(err) = serve_admin(admin_listener, metrics, readiness, stop).await {
                    tracing::error!(error = %err, "admin server failed");
                }
            }
        });
        tracing::info!(service = S::SERVICE, grpc = %grpc_addr, admin = %admin_addr, instance = %config.instance_id, "listening");

        let advertise = advertise_address(&config.grpc.advertise_addr, grpc_addr, tls.is_some());
        let supervisor = Supervisor::new(
            S::SERVICE,
            readiness.clone(),
            metrics.loop_restarts.clone(),
            shutdown.clone(),
        );
        let mut host = Host {
            cluster: config.cluster.clone(),
            config,
            metrics,
            readiness,
            health,
            grpc_listener: Some(grpc_listener),
            grpc_addr,
            admin_addr,
            admin_shutdown,
            admin_task,
            store: None,
            leader: None,
            election: None,
            advertise,
            supervisor,
            leader_only: Vec::new(),
            tls,
            audit: None,
        };
        if S::USES_STORE {
            // The etcd settings (TLS files read once, here): a bad file stops the service.
            let etcd = match host.config.store.backend {
                StoreBackend::Memory => None,
                StoreBackend::Etcd => match host.config.store.etcd() {
                    Ok(etcd) => Some(etcd),
                    Err(message) => {
                        host.stop_admin().await;
                        return Err(HostError::Dependency {
                            what: "state store",
                            message,
                        });
                    }
                },
            };
            let Some(store) = host.connect_store(etcd, shutdown).await else {
                host.stop_admin().await;
                return Ok(None);
            };
            match shoal_state::records::cluster_id(&store, &host.config.cluster).await {
                Ok(id) => host.cluster = id,
                Err(err) => {
                    host.stop_admin().await;
                    return Err(err.into());
                }
            }
            let audit = AuditLog::new(
                store.clone(),
                S::SERVICE,
                &host.config.instance_id,
                host.metrics.audit_failures.clone(),
            );
            tokio::spawn({
                let (audit, config, stop) = (
                    audit.clone(),
                    host.config.audit.clone(),
                    shutdown.child_token(),
                );
                async move { audit.retain(config, stop).await }
            });
            host.audit = Some(audit);
            host.store = Some(store);
        }
        if S::CAMPAIGNS
            && let Some(store) = host.store.clone()
        {
            let election = Election::new(
                store,
                S::SERVICE,
                host.config.instance_id.clone(),
                ElectionConfig {
                    lease_ttl: host.config.election.lease_ttl,
                    ..ElectionConfig::default()
                },
            )
            .with_address(host.advertise.clone());
            let (publish, watch) = watch::channel(None);
            host.election = Some(election.clone());
            let task = tokio::spawn(run_leader_loop(
                election,
                host.config.election.record_interval,
                host.metrics.clone(),
                publish,
                fit_to_lead(host.readiness.clone(), shutdown.clone()),
                shutdown.clone(),
            ));
            host.leader = Some((watch, task));
        }
        Ok(Some(host))
    }

    /// The store: this process's memory store (`etcd` None), or etcd, retried until it answers.
    async fn connect_store(
        &self,
        etcd: Option<shoal_state::EtcdConfig>,
        shutdown: &CancellationToken,
    ) -> Option<SharedStore> {
        let Some(etcd) = etcd else {
            return Some(process_memory_store());
        };
        let endpoints = etcd.endpoints.join(",");
        let connect = (|| EtcdStore::connect(&etcd))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .without_max_times(),
            )
            .notify(|err, retry_in| {
                let reason = format!("cannot reach etcd at {endpoints}: {err}");
                tracing::warn!(%reason, ?retry_in, "waiting for the state store");
                self.readiness.set_not_ready(reason);
            });
        let store = tokio::select! {
            _ = shutdown.cancelled() => return None,
            store = connect => store.ok()?,
        };
        tracing::info!(%endpoints, "connected to etcd");
        Some(Arc::new(store))
    }

    /// The state store (services with `USES_STORE`).
    pub fn store(&self) -> Option<SharedStore> {
        self.store.clone()
    }

    /// The cluster id every instance and Node is labelled with (`shoal.dev/cluster`): the
    /// store's, settled at start (the configured one for services without a store).
    pub fn cluster_id(&self) -> &str {
        &self.cluster
    }

    /// The address this replica advertises to the others (`http://host:port`).
    pub fn advertise_address(&self) -> &str {
        &self.advertise
    }

    /// A client of another service at `address` (`https://` over this service's TLS).
    pub fn upstream(
        &self,
        name: &'static str,
        address: &str,
        service: &'static str,
    ) -> Result<crate::upstream::Upstream, HostError> {
        if address.starts_with("http://") && !self.config.grpc.plaintext {
            return Err(HostError::Dependency {
                what: name,
                message: format!(
                    "{address} is plaintext (http://) but grpc.plaintext is not set: use https:// or set grpc.plaintext: true"
                ),
            });
        }
        Ok(crate::upstream::Upstream::new(
            name,
            address,
            service,
            self.tls.as_ref(),
        )?)
    }

    /// TLS material for calls to other services (when `grpc.tls` is set).
    pub fn tls(&self) -> Option<Tls> {
        self.tls.clone()
    }

    /// The audit log (services with a store), for actions the service takes on its own.
    pub fn audit_log(&self) -> Option<AuditLog> {
        self.audit.clone()
    }

    /// The supervisor of this service's background loops.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Marks `methods` (full paths) leader-only: a call reaching a standby is forwarded to the
    /// leader (see [`crate::routing`]).
    pub fn leader_only(&mut self, methods: &[&'static str]) {
        self.leader_only.extend_from_slice(methods);
    }

    /// This replica's leadership (campaigning services).
    pub fn leader(&self) -> Option<LeaderWatch> {
        self.leader.as_ref().map(|(watch, _)| watch.clone())
    }

    /// This service's election (campaigning services), for looking up the current leader.
    pub fn election(&self) -> Option<Election> {
        self.election.clone()
    }

    /// The service's readiness and degraded dependencies (shown on `/readyz` and `/healthz`).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    async fn stop_admin(&mut self) {
        self.admin_shutdown.cancel();
        let _ = (&mut self.admin_task).await;
    }

    /// Serves `routes` (plus health and reflection) until `shutdown`, then drains: health turns
    /// NOT_SERVING, leadership is resigned, in-flight RPCs get `shutdown.grace` to finish.
    pub async fn serve(
        mut self,
        routes: Routes,
        service_names: &[&str],
        shutdown: CancellationToken,
    ) -> Result<(), HostError> {
        // Every service with a store serves the audit log.
        let mut names: Vec<&str> = service_names.to_vec();
        let mut routes = routes;
        if let Some(store) = self.store.clone() {
            routes = routes.add_service(crate::audit::service(store));
            names.push(shoal_proto::service_names::AUDIT);
        }
        let service_names = names.as_slice();
        // Advertise only what this port serves: health, reflection itself, and our services.
        let reflection = || {
            service_names.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(shoal_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    )
                    .with_service_name("grpc.health.v1.Health")
                    .with_service_name("grpc.reflection.v1.ServerReflection")
                    .with_service_name("grpc.reflection.v1alpha.ServerReflection"),
                |builder, name| builder.with_service_name(*name),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| HostError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| HostError::Reflection(e.to_string()))?;
        let router = match (&self.leader, &self.election) {
            (Some((watch, _)), Some(election)) if !self.leader_only.is_empty() => {
                Some(LeaderRouter::new(
                    &self.leader_only,
                    watch.clone(),
                    election.clone(),
                    &self.config.instance_id,
                    &self.advertise,
                    self.tls.clone(),
                ))
            }
            _ => None,
        };
        let auth = &self.config.grpc.auth;
        let own_identity = self.tls.as_ref().and_then(Tls::own_identity);
        let authenticator = Arc::new(Authenticator::new(
            auth,
            self.config.grpc.auth_enabled(),
            own_identity,
            self.metrics.refused.clone(),
            self.audit.clone(),
        ));
        // Who calls and may they (auth, limits) → the leader runs leader-only calls (routing)
        // → what changed is recorded where it runs (audit).
        let layers = tower::ServiceBuilder::new()
            .layer(ServerTraceLayer)
            .layer(GrpcMetricsLayer::new(
                self.metrics.grpc_handled.clone(),
                self.metrics.grpc_seconds.clone(),
            ))
            .layer(AuthLayer::new(authenticator))
            .layer(LeaderRouteLayer::new(router))
            .layer(AuditLayer::new(
                self.audit.clone(),
                auth.limits.max_request_bytes,
            ))
            .into_inner();
        let stop_server = CancellationToken::new();
        let listener = self
            .grpc_listener
            .take()
            .ok_or_else(|| HostError::Stopped("serve called twice".to_string()))?;
        let router = tonic::transport::Server::builder()
            // Pings find clients that vanished without closing (a half-open watch stream).
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(auth.limits.max_concurrent_streams))
            .layer(layers)
            .add_routes(routes)
            .add_service(HealthServer::new(HealthService::from_health_reporter(
                self.health.clone(),
            )))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let stopped = stop_server.clone().cancelled_owned();
        let mut server = match &self.tls {
            // Handshakes with the certificate as the files hold it now (rotation).
            Some(tls) => {
                tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped))
            }
            None => tokio::spawn(router.serve_with_incoming_shutdown(
                // Our own listener (bound up front), so tonic's default TCP_NODELAY must be set
                // here: without it a response's frames wait for delayed ACKs (~40 ms a call).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped,
            )),
        };

        self.readiness.set_ready();
        // gRPC health and `shoal_ready` follow readiness: a supervised loop that is down makes
        // the service NOT_SERVING until it runs again.
        let stop_health = CancellationToken::new();
        tokio::spawn(follow_readiness(
            self.readiness.clone(),
            self.health.clone(),
            service_names.iter().map(|s| s.to_string()).collect(),
            self.metrics.ready.clone(),
            stop_health.clone(),
        ));
        tracing::info!(service = S::SERVICE, services = ?service_names, advertise = %self.advertise, "serving");

        let early = tokio::select! {
            _ = shutdown.cancelled() => None,
            result = &mut server => Some(result),
        };

        // Drain.
        stop_health.cancel();
        for name in service_names.iter().copied().chain([""]) {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        self.readiness.set_not_ready("shutting down");
        self.metrics.ready.set(0);
        tracing::info!(service = S::SERVICE, "shutting down");
        if let Some((_, task)) = self.leader.take() {
            // The loop resigns when `shutdown` fires; bound the wait on a store that is down.
            let _ = tokio::time::timeout(
                self.config.store.request_timeout + Duration::from_secs(1),
                task,
            )
            .await;
        }
        stop_server.cancel();
        let result = match early {
            Some(result) => Err(HostError::Stopped(match result {
                Ok(Ok(())) => "the server returned".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            })),
            None => match tokio::time::timeout(self.config.shutdown.grace, &mut server).await {
                Ok(Ok(result)) => result.map_err(HostError::from),
                Ok(Err(join)) => Err(HostError::Stopped(join.to_string())),
                Err(_) => {
                    tracing::warn!(grace = ?self.config.shutdown.grace, "in-flight RPCs did not finish in time; closing them");
                    server.abort();
                    Ok(())
                }
            },
        };
        self.stop_admin().await;
        result
    }
}

/// gRPC health (overall and per service) and the `shoal_ready` gauge, kept equal to readiness.
async fn follow_readiness(
    readiness: Readiness,
    health: HealthReporter,
    names: Vec<String>,
    ready: prometheus::IntGauge,
    stop: CancellationToken,
) {
    let mut changes = readiness.changes();
    let mut last = None;
    loop {
        let serving = readiness.get().is_ok();
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in names.iter().map(String::as_str).chain([""]) {
                health.set_service_status(name, status).await;
            }
            ready.set(i64::from(serving));
            last = Some(serving);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            c = changes.changed() => if c.is_err() { return },
        }
    }
}

/// True while every supervised loop runs: the replica may campaign and lead.
fn fit_to_lead(readiness: Readiness, shutdown: CancellationToken) -> watch::Receiver<bool> {
    let (fit, receiver) = watch::channel(readiness.loops_up());
    tokio::spawn(async move {
        let mut changes = readiness.changes();
        loop {
            fit.send_if_modified(|f| {
                let now = readiness.loops_up();
                std::mem::replace(f, now) != now
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.changed() => if c.is_err() { return },
            }
        }
    });
    receiver
}

/// `grpc.advertiseAddr`, or the bound address (the host name when bound to every interface),
/// `https://` when this server speaks TLS.
fn advertise_address(configured: &str, bound: SocketAddr, tls: bool) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let scheme = if tls { "https" } else { "http" };
    if bound.ip().is_unspecified() {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{scheme}://{host}:{}", bound.port())
    } else {
        format!("{scheme}://{bound}")
    }
}

/// The in-memory store of this process. Every service in one process (as in `shoal demo`)
/// shares it, as separate processes share etcd.
fn process_memory_store() -> SharedStore {
    static STORE: std::sync::OnceLock<MemoryStore> = std::sync::OnceLock::new();
    Arc::new(STORE.get_or_init(MemoryStore::new).clone())
}

/// Maps a store error to the gRPC status a caller should see — the one mapping every service
/// uses. A fenced write means this replica lost leadership mid-call: UNAVAILABLE, retry (the
/// new leader will take it).
pub fn status_from_store(err: &StoreError) -> tonic::Status {
    match err {
        StoreError::Unavailable(_) => tonic::Status::unavailable(err.to_string()),
        StoreError::Fenced { .. } => tonic::Status::unavailable(format!(
            "{err}; leadership changed during the call: retry (the new leader takes it)"
        )),
        StoreError::Compacted { .. } => tonic::Status::out_of_range(err.to_string()),
        StoreError::LeaseNotFound(_) | StoreError::Rejected(_) => {
            tonic::Status::failed_precondition(err.to_string())
        }
        StoreError::Decode { .. } => tonic::Status::data_loss(err.to_string()),
    }
}
