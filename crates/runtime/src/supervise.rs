//! Supervised background loops. A service's long-running loops (control loop, provisioner
//! driver, reconciler pass loop, metrics publisher) run under a [`Supervisor`]: a loop that
//! panics, fails or returns before shutdown is restarted with exponential backoff, counted in
//! `shoal_loop_restarts_total{service,loop}`, and while it is down the service is NOT_SERVING
//! (`/readyz` says which loop and why) and does not lead — a replica that cannot do its leader
//! work resigns so a standby takes over.
//!
//! Owns no domain logic: it only starts, watches and restarts futures.

use std::{future::Future, time::Duration};

use prometheus::IntCounterVec;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;

/// Restart timing.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Wait before the first restart.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// A loop that ran this long before failing starts over at `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Starts and restarts a service's loops.
#[derive(Clone)]
pub struct Supervisor {
    service: &'static str,
    readiness: Readiness,
    restarts: IntCounterVec,
    backoff: Backoff,
    shutdown: CancellationToken,
}

/// Why a loop stopped.
fn describe(outcome: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match outcome {
        Ok(Ok(())) => "it returned".to_string(),
        Ok(Err(why)) => format!("it failed: {why}"),
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            format!("it panicked: {message}")
        }
        Err(join) => format!("it was cancelled: {join}"),
    }
}

impl Supervisor {
    /// A supervisor reporting into `readiness` and counting restarts in `restarts`
    /// (`{service, loop}`); its loops stop at `shutdown`.
    pub fn new(
        service: &'static str,
        readiness: Readiness,
        restarts: IntCounterVec,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            service,
            readiness,
            restarts,
            backoff: Backoff::default(),
            shutdown,
        }
    }

    /// The same supervisor with other restart timing.
    pub fn with_backoff(mut self, backoff: Backoff) -> Supervisor {
        self.backoff = backoff;
        self
    }

    /// Runs `start(token)` as loop `name` until shutdown, restarting it whenever it panics,
    /// fails or returns early. `token` is cancelled at shutdown and when the loop is restarted.
    pub fn spawn<F, Fut>(&self, name: &'static str, start: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let me = self.clone();
        me.restarts.with_label_values(&[me.service, name]);
        tokio::spawn(async move {
            let mut delay = me.backoff.initial;
            loop {
                let started = Instant::now();
                let token = me.shutdown.child_token();
                let mut task = tokio::spawn(start(token.clone()));
                let outcome = tokio::select! {
                    _ = me.shutdown.cancelled() => {
                        token.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(5), &mut task).await;
                        return;
                    }
                    outcome = &mut task => outcome,
                };
                token.cancel();
                if me.shutdown.is_cancelled() {
                    return;
                }
                if started.elapsed() >= me.backoff.reset_after {
                    delay = me.backoff.initial;
                }
                let why = describe(outcome);
                me.restarts.with_label_values(&[me.service, name]).inc();
                tracing::error!(service = me.service, %name, reason = %why, restart_in = ?delay, "supervised loop stopped; restarting");
                me.readiness.set_loop_down(
                    name,
                    Some(format!(
                        "{why}; restarting in {}",
                        humantime::format_duration(delay)
                    )),
                );
                tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(me.backoff.max);
                me.readiness.set_loop_down(name, None);
                tracing::info!(service = me.service, %name, "supervised loop restarted");
            }
        });
    }
}

/// Test hook: panics the first time a process reaches point `name` when `SHOAL_TEST_PANIC_ONCE`
/// lists it (comma-separated), so tests can check that supervision recovers.
pub fn panic_point(name: &str) {
    use std::sync::Mutex;
    static FIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let listed = std::env::var("SHOAL_TEST_PANIC_ONCE")
        .map(|v| v.split(',').any(|p| p.trim() == name))
        .unwrap_or(false);
    if !listed {
        return;
    }
    let first = {
        let mut fired = FIRED.lock().unwrap_or_else(|p| p.into_inner());
        if fired.iter().any(|f| f == name) {
            false
        } else {
            fired.push(name.to_string());
            true
        }
    };
    if first {
        panic!("SHOAL_TEST_PANIC_ONCE: injected panic at {name}");
    }
}

/// Test hook: pauses this task forever at point `name` when `SHOAL_TEST_PAUSE_AT` lists it, so
/// crash tests can `kill -9` the process exactly there. Printed, so the test knows it got there.
pub async fn pause_point(name: &str) {
    let listed = std::env::var("SHOAL_TEST_PAUSE_AT")
        .map(|v| v.split(',').any(|p| p.trim() == name))
        .unwrap_or(false);
    if listed {
        tracing::error!(point = name, "SHOAL_TEST_PAUSE_AT: paused at crash point");
        eprintln!("crash point {name} reached");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    fn counter() -> IntCounterVec {
        IntCounterVec::new(
            prometheus::Opts::new("restarts", "test"),
            &["service", "loop"],
        )
        .expect("counter")
    }

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_unready_while_down() {
        let readiness = Readiness::new("starting");
        readiness.set_ready();
        let restarts = counter();
        let stop = CancellationToken::new();
        let supervisor = Supervisor::new("test", readiness.clone(), restarts.clone(), stop.clone())
            .with_backoff(Backoff {
                initial: Duration::from_millis(300),
                max: Duration::from_secs(1),
                reset_after: Duration::from_secs(60),
            });
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        supervisor.spawn("worker", move |token| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("boom");
                }
                token.cancelled().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let why = readiness.get().expect_err("unready while the loop is down");
        assert!(
            why.contains("loop worker is down: it panicked: boom"),
            "{why}"
        );
        assert!(!readiness.loops_up());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(readiness.get(), Ok(()), "ready again after the restart");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(restarts.with_label_values(&["test", "worker"]).get(), 1);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_loop_that_returns_or_fails_is_restarted_with_growing_backoff() {
        let readiness = Readiness::new("starting");
        readiness.set_ready();
        let restarts = counter();
        let stop = CancellationToken::new();
        let supervisor = Supervisor::new("test", readiness.clone(), restarts.clone(), stop.clone())
            .with_backoff(Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                reset_after: Duration::from_secs(60),
            });
        supervisor.spawn("flaky", |_| async { Err("store unreachable".to_string()) });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let n = restarts.with_label_values(&["test", "flaky"]).get();
        // 50 + 100 + 200 + 200 ms of backoff fit in 700 ms; without growth it would be ~14.
        assert!((3..=6).contains(&n), "{n} restarts");
        let why = readiness.get().expect_err("down");
        assert!(why.contains("it failed: store unreachable"), "{why}");
        stop.cancel();
    }
}
