//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process answers; degraded
//! dependencies are listed, still 200) and `/readyz` (the service is ready to serve; 503 with the
//! reason otherwise).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::RuntimeMetrics;

/// Whether the service is ready, and if not, why; and which dependencies are degraded.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<Mutex<Result<(), String>>>,
    degraded: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    /// Not ready, for `reason`.
    pub fn new(reason: &str) -> Readiness {
        Readiness {
            state: Arc::new(Mutex::new(Err(reason.to_string()))),
            degraded: Arc::default(),
        }
    }

    /// Marks dependency `name` degraded for `reason` (`None` clears it). A degraded dependency
    /// does not make the service unready: it still serves, with less (e.g. stale utilization).
    pub fn set_degraded(&self, name: &str, reason: Option<String>) {
        let mut degraded = self.degraded.lock().unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(reason) => {
                degraded.insert(name.to_string(), reason);
            }
            None => {
                degraded.remove(name);
            }
        }
    }

    /// Degraded dependencies and why.
    pub fn degraded(&self) -> BTreeMap<String, String> {
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks ready.
    pub fn set_ready(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    /// Marks not ready, for `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Err(reason.into());
    }

    /// The current state.
    pub fn get(&self) -> Result<(), String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
