//! Every backend call goes through a [`Guarded`] backend: a timeout per attempt, retries of
//! transient errors with exponential backoff and jitter (backon), and a per-backend circuit
//! breaker — open after `breakerFailures` consecutive transient failures, one half-open probe after
//! `breakerRecovery`, closed again when the probe succeeds. Calls and their outcomes are counted.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use shoal_core::ValidationErrors;
use shoal_proto::v1 as pb;

use crate::{
    backend::{InstanceSpec, NodeProvider, ProviderError},
    stats::Stats,
};

/// Timeouts, retries and the breaker, for every backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resilience {
    /// Deadline of one call attempt.
    #[serde(with = "humantime_serde", default = "d_timeout")]
    pub call_timeout: Duration,
    /// Attempts per call (1 = no retry).
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// First retry delay (doubles, with jitter).
    #[serde(with = "humantime_serde", default = "d_min")]
    pub retry_min_delay: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde", default = "d_max")]
    pub retry_max_delay: Duration,
    /// Consecutive transient failures that open the breaker.
    #[serde(default = "d_failures")]
    pub breaker_failures: u32,
    /// How long the breaker stays open before a half-open probe.
    #[serde(with = "humantime_serde", default = "d_recovery")]
    pub breaker_recovery: Duration,
}

fn d_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_attempts() -> u32 {
    4
}
fn d_min() -> Duration {
    Duration::from_millis(200)
}
fn d_max() -> Duration {
    Duration::from_secs(5)
}
fn d_failures() -> u32 {
    5
}
fn d_recovery() -> Duration {
    Duration::from_secs(10)
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            call_timeout: d_timeout(),
            attempts: d_attempts(),
            retry_min_delay: d_min(),
            retry_max_delay: d_max(),
            breaker_failures: d_failures(),
            breaker_recovery: d_recovery(),
        }
    }
}

impl Resilience {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        if self.call_timeout < Duration::from_millis(100) {
            errors.add(format!("{path}.callTimeout"), "must be at least 100ms");
        }
        if !(1..=20).contains(&self.attempts) {
            errors.add(format!("{path}.attempts"), "must be between 1 and 20");
        }
        if self.retry_min_delay > self.retry_max_delay {
            errors.add(
                format!("{path}.retryMinDelay"),
                "must not exceed retryMaxDelay",
            );
        }
        if self.breaker_failures == 0 {
            errors.add(format!("{path}.breakerFailures"), "must be at least 1");
        }
    }
}

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the probe time.
    Open,
    /// One probe call is in flight.
    HalfOpen,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    consecutive: u32,
    opened_at: Option<Instant>,
    last_error: String,
    probing: bool,
}

/// One backend behind timeouts, retries and a breaker.
pub struct Guarded {
    name: String,
    provider: Arc<dyn NodeProvider>,
    settings: Resilience,
    breaker: Mutex<Breaker>,
    in_flight: AtomicI32,
    stats: Stats,
}

fn result_label(r: &Result<(), &ProviderError>) -> &'static str {
    match r {
        Ok(()) => "ok",
        Err(ProviderError::Transient(m)) if m.contains("timed out after") => "timeout",
        Err(ProviderError::Transient(_)) => "transient",
        Err(ProviderError::Permanent(_)) => "permanent",
        Err(ProviderError::Conflict(_)) => "conflict",
        Err(ProviderError::BreakerOpen { .. }) => "breaker_open",
    }
}

impl Guarded {
    /// Wraps `provider` under `name`.
    pub fn new(
        name: &str,
        provider: Arc<dyn NodeProvider>,
        settings: Resilience,
        stats: Stats,
    ) -> Guarded {
        stats.breaker.with_label_values(&[name]).set(0);
        Guarded {
            name: name.to_string(),
            provider,
            settings,
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                consecutive: 0,
                opened_at: None,
                last_error: String::new(),
                probing: false,
            }),
            in_flight: AtomicI32::new(0),
            stats,
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, b: &mut Breaker, state: BreakerState) {
        if b.state != state {
            tracing::warn!(backend = %self.name, from = ?b.state, to = ?state, last_error = %b.last_error, "circuit breaker");
        }
        b.state = state;
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.stats.breaker.with_label_values(&[&self.name]).set(v);
    }

    /// May a call go through now? Moves Open → HalfOpen after the recovery time.
    fn admit(&self) -> Result<bool, ProviderError> {
        let mut b = self.lock();
        match b.state {
            BreakerState::Closed => Ok(false),
            BreakerState::Open => {
                let since = b.opened_at.map_or(Duration::MAX, |t| t.elapsed());
                if since >= self.settings.breaker_recovery && !b.probing {
                    self.set_state(&mut b, BreakerState::HalfOpen);
                    b.probing = true;
                    Ok(true)
                } else {
                    Err(self.open_error(&b))
                }
            }
            BreakerState::HalfOpen => {
                if b.probing {
                    Err(self.open_error(&b))
                } else {
                    b.probing = true;
                    Ok(true)
                }
            }
        }
    }

    fn open_error(&self, b: &Breaker) -> ProviderError {
        let since = b.opened_at.map_or(Duration::ZERO, |t| t.elapsed());
        ProviderError::BreakerOpen {
            backend: self.name.clone(),
            failures: b.consecutive,
            last: b.last_error.clone(),
            retry_in_ms: self
                .settings
                .breaker_recovery
                .saturating_sub(since)
                .as_millis() as u64,
        }
    }

    fn record(&self, probe: bool, outcome: &Result<(), &ProviderError>) {
        let mut b = self.lock();
        if probe {
            b.probing = false;
        }
        match outcome {
            Ok(()) | Err(ProviderError::Conflict(_) | ProviderError::Permanent(_)) => {
                // The backend answered: it is healthy, whatever it thought of the request.
                b.consecutive = 0;
                if b.state != BreakerState::Closed {
                    self.set_state(&mut b, BreakerState::Closed);
                }
            }
            Err(e @ ProviderError::Transient(_)) => {
                b.consecutive += 1;
                b.last_error = e.to_string();
                if probe || b.consecutive >= self.settings.breaker_failures {
                    b.opened_at = Some(Instant::now());
                    self.set_state(&mut b, BreakerState::Open);
                }
            }
            Err(ProviderError::BreakerOpen { .. }) => {}
        }
    }

    /// One attempt: breaker check, timeout, accounting.
    async fn attempt<T, F, Fut>(&self, op: &str, call: &F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let probe = match self.admit() {
            Ok(p) => p,
            Err(e) => {
                self.stats
                    .backend_calls
                    .with_label_values(&[&self.name, op, "breaker_open"])
                    .inc();
                return Err(e);
            }
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match tokio::time::timeout(self.settings.call_timeout, call()).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Transient(format!(
                "{} {op} timed out after {:?}",
                self.name, self.settings.call_timeout
            ))),
        };
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .backend_seconds
            .with_label_values(&[&self.name, op])
            .observe(started.elapsed().as_secs_f64());
        let outcome = result.as_ref().map(|_| ());
        self.stats
            .backend_calls
            .with_label_values(&[&self.name, op, result_label(&outcome)])
            .inc();
        self.record(probe, &outcome);
        result
    }

    /// Runs `call` with retries of transient errors (not of an open breaker: that fails fast).
    async fn run<T, F, Fut>(&self, op: &str, call: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_min_delay)
            .with_max_delay(self.settings.retry_max_delay)
            .with_max_times(self.settings.attempts.saturating_sub(1) as usize)
            .with_jitter();
        (|| self.attempt(op, &call))
            .retry(backoff)
            .when(|e: &ProviderError| matches!(e, ProviderError::Transient(_)))
            .notify(|e: &ProviderError, after: Duration| {
                self.stats
                    .retries
                    .with_label_values(&[&self.name, op])
                    .inc();
                tracing::debug!(backend = %self.name, op, error = %e, retry_in = ?after, "retrying backend call");
            })
            .await
    }

    /// Creates an instance.
    pub async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        self.run("create", || self.provider.create(spec)).await
    }

    /// Deletes an instance (absent is fine).
    pub async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.run("delete", || self.provider.delete(instance_id))
            .await
    }

    /// Our instances with these labels.
    pub async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        self.run("list", || self.provider.list_owned(owner)).await
    }

    /// Health for `GetBackendStatus`.
    pub fn status(&self) -> pb::BackendStatus {
        let b = self.lock();
        pb::BackendStatus {
            backend: self.name.clone(),
            healthy: b.state == BreakerState::Closed,
            breaker: match b.state {
                BreakerState::Closed => pb::BreakerState::Closed,
                BreakerState::Open => pb::BreakerState::Open,
                BreakerState::HalfOpen => pb::BreakerState::HalfOpen,
            } as i32,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            consecutive_failures: b.consecutive as i32,
            last_error: b.last_error.clone(),
        }
    }
}
