//! Draining one node: cordon and taint it, evict its pods through the Eviction API (a PDB's 429
//! is retried every `drainPollInterval`), until it is empty or `drainTimeout` has passed. Every
//! round is bounded by the time left, so a Kubernetes API that accepts connections and never
//! answers cannot hold a drain past its timeout.

use std::time::Duration;

use shoal_core::claim::{NodeClaim, now_ms};
use shoal_kube::Eviction;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{DISRUPTED_TAINT, Provisioner};

/// Why a drain did not finish.
pub(crate) enum DrainError {
    /// `drainTimeout` passed; what it was still waiting for.
    TimedOut(String),
    /// Leadership ended.
    Interrupted,
}

impl Provisioner {
    /// Drains the claim's node; `Ok` once nothing is left on it (or it is gone).
    pub(crate) async fn drain(
        &self,
        claim: &NodeClaim,
        timeout: Duration,
        force: bool,
        term: &CancellationToken,
    ) -> Result<(), DrainError> {
        let node = &claim.node_name;
        let started = claim.phase_since_ms();
        let deadline_ms = started + timeout.as_millis() as u64;
        let mut cordoned = false;
        loop {
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            // A forced drain deletes pods after the timeout: give that round time of its own.
            let budget = if force {
                left.max(self.settings.kube.request_timeout)
            } else {
                left
            };
            let round = tokio::time::timeout(
                budget,
                self.drain_round(node, &mut cordoned, force, started, timeout),
            );
            let result = tokio::select! {
                _ = term.cancelled() => return Err(DrainError::Interrupted),
                r = round => r,
            };
            shoal_runtime::supervise::pause_point("mid-drain").await;
            tracing::debug!(%node, result = ?result.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "drain round");
            let waiting_for = match result {
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(what))) => what,
                Ok(Err(e)) => format!("Kubernetes API: {e}"),
                Err(_) => "the Kubernetes API did not answer".to_string(),
            };
            if !force && now_ms() >= deadline_ms {
                return Err(DrainError::TimedOut(waiting_for));
            }
            tokio::select! {
                _ = term.cancelled() => return Err(DrainError::Interrupted),
                _ = tokio::time::sleep(self.settings.drain_poll_interval) => {}
            }
        }
    }

    /// One round: cordon (once), evict what is left. `None` when the node is empty or gone,
    /// else what it still waits for.
    async fn drain_round(
        &self,
        node: &str,
        cordoned: &mut bool,
        force: bool,
        started: u64,
        timeout: Duration,
    ) -> Result<Option<String>, shoal_kube::KubeError> {
        if !*cordoned {
            if !self.kube.cordon(node, DISRUPTED_TAINT).await? {
                return Ok(None); // no Node: nothing to drain
            }
            *cordoned = true;
        }
        let pods = self.kube.pods_to_drain(node).await?;
        if pods.is_empty() {
            return Ok(None);
        }
        let mut blocked = None;
        for pod in &pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue; // terminating: wait for it
            }
            let result = self.kube.evict(pod).await?;
            let label = match &result {
                Eviction::Evicted => "evicted",
                Eviction::Blocked(_) => "blocked",
                Eviction::Gone => "gone",
            };
            self.stats.evictions.with_label_values(&[label]).inc();
            if let Eviction::Blocked(msg) = result {
                let name = pod.metadata.name.clone().unwrap_or_default();
                blocked = Some(format!("pod {name}: {msg}"));
                if force && now_ms().saturating_sub(started) >= timeout.as_millis() as u64 {
                    tracing::warn!(%node, pod = %name, "drainTimeout passed and the pool forces: deleting the pod");
                    self.kube.delete_pod(pod).await?;
                }
            }
        }
        Ok(Some(blocked.unwrap_or_else(|| {
            format!("{} pod(s) still terminating", pods.len())
        })))
    }
}
