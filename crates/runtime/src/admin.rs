//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process answers; degraded
//! dependencies are listed, still 200) and `/readyz` (the service is ready to serve; 503 with the
//! reason otherwise).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::RuntimeMetrics;

/// Whether the service is ready, and if not, why; which dependencies are degraded; and which of
/// its supervised loops are down. Every change bumps [`Readiness::changes`], so the gRPC health
/// status and the campaign gate follow it.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<Mutex<ReadyState>>,
    changes: Arc<watch::Sender<u64>>,
}

#[derive(Debug)]
struct ReadyState {
    status: Result<(), String>,
    degraded: BTreeMap<String, String>,
    /// Supervised loops that are down, and why.
    loops_down: BTreeMap<String, String>,
}

impl Readiness {
    /// Not ready, for `reason`.
    pub fn new(reason: &str) -> Readiness {
        Readiness {
            state: Arc::new(Mutex::new(ReadyState {
                status: Err(reason.to_string()),
                degraded: BTreeMap::new(),
                loops_down: BTreeMap::new(),
            })),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    fn edit(&self, f: impl FnOnce(&mut ReadyState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Marks dependency `name` degraded for `reason` (`None` clears it). A degraded dependency
    /// does not make the service unready: it still serves, with less (e.g. stale utilization).
    pub fn set_degraded(&self, name: &str, reason: Option<String>) {
        self.edit(|s| match reason {
            Some(reason) => {
                s.degraded.insert(name.to_string(), reason);
            }
            None => {
                s.degraded.remove(name);
            }
        });
    }

    /// Degraded dependencies and why.
    pub fn degraded(&self) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .degraded
            .clone()
    }

    /// Marks ready (as far as the host is concerned; a loop that is down still makes it unready).
    pub fn set_ready(&self) {
        self.edit(|s| s.status = Ok(()));
    }

    /// Marks not ready, for `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.edit(|s| s.status = Err(reason));
    }

    /// Records that supervised loop `name` is down for `reason` (`None`: it runs again).
    pub fn set_loop_down(&self, name: &str, reason: Option<String>) {
        self.edit(|s| match reason {
            Some(reason) => {
                s.loops_down.insert(name.to_string(), reason);
            }
            None => {
                s.loops_down.remove(name);
            }
        });
    }

    /// True while every supervised loop runs.
    pub fn loops_up(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .loops_down
            .is_empty()
    }

    /// The current state: ready, or why not (the host's reason first, then each loop that is down).
    pub fn get(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut reasons: Vec<String> = Vec::new();
        if let Err(reason) = &s.status {
            reasons.push(reason.clone());
        }
        for (name, why) in &s.loops_down {
            reasons.push(format!("loop {name} is down: {why}"));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// A receiver that changes whenever readiness does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: RuntimeMetrics,
    readiness: Readiness,
}

async fn metrics_handler(
    State(state): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.encode(),
    )
}

async fn healthz(State(state): State<AdminState>) -> String {
    let mut out = "ok\n".to_string();
    for (name, reason) in state.readiness.degraded() {
        out.push_str(&format!("degraded: {name}: {reason}\n"));
    }
    out
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.readiness.get() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: RuntimeMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
