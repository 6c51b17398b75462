//! One reconciliation pass: gather the three views (claims and name reservations from the store,
//! instances from the provisioner's `ListInstances`, Nodes with our labels from Kubernetes),
//! classify the drift ([`crate::drift`]), repair through the provisioner's `Repair`, and record
//! every finding (`drifts/<ms>-<id>`) with what was done.

use std::{collections::BTreeMap, sync::Mutex, time::Instant};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};
use prost::Message;
use shoal_core::claim::{NodeClaim, Operation, now_ms};
use shoal_proto::v1::{
    self as pb, ListInstancesRequest, RepairRequest,
    provisioner_service_client::ProvisionerServiceClient, repair_request::Action,
};
use shoal_runtime::TracedChannel;
use shoal_state::{SharedStore, keys, records::Records};

use crate::{
    ReconcilerSettings,
    drift::{self, Finding, NodeView, Repair, Reservation, Views},
    stats::Stats,
};

/// Runs passes and remembers the last.
pub struct Reconciler {
    pub(crate) settings: ReconcilerSettings,
    pub(crate) cluster: String,
    pub(crate) store: SharedStore,
    pub(crate) provisioner: ProvisionerServiceClient<TracedChannel>,
    pub(crate) kube: kube::Client,
    pub(crate) stats: Stats,
    pub(crate) last: Mutex<Option<pb::ReconcileReport>>,
    pub(crate) lock: tokio::sync::Mutex<()>,
    pub(crate) repaired: std::sync::atomic::AtomicI64,
    /// When the previous pass started (Unix ms; 0 before the first).
    pub(crate) previous_pass_ms: std::sync::atomic::AtomicU64,
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn ready_of(node: &Node) -> (bool, u64) {
    let cond = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let ready = cond.is_some_and(|c| c.status == "True");
    let changed = cond
        .and_then(|c| c.last_transition_time.as_ref())
        .map_or(0, |t| {
            shoal_kube::convert::time(&t.0)
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        });
    (ready, changed)
}

impl Reconciler {
    /// Every `compaction.interval` while leading: compacts the store's history to the last
    /// `compaction.keepRevisions` revisions.
    async fn compact(
        &self,
        leadership: &shoal_state::Leadership,
        term: &tokio_util::sync::CancellationToken,
    ) {
        let settings = self.settings.compaction;
        if !settings.enabled {
            return;
        }
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(settings.interval) => {}
            }
            match shoal_state::records::compact_history(
                &self.store,
                leadership,
                settings.keep_revisions,
                settings.defragment_above,
            )
            .await
            {
                Ok(Some(done)) => {
                    self.stats.compactions.inc();
                    if done.defragmented {
                        self.stats.defragmentations.inc();
                    }
                    if let Some(size) = done.size {
                        self.stats
                            .db_bytes
                            .with_label_values(&["file"])
                            .set(size.file_bytes);
                        self.stats
                            .db_bytes
                            .with_label_values(&["in_use"])
                            .set(size.in_use_bytes);
                    }
                    tracing::debug!(
                        revision = done.revision,
                        defragmented = done.defragmented,
                        "store history compacted"
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "store compaction failed; next interval retries")
                }
            }
        }
    }

    /// One pass, given up (DEADLINE_EXCEEDED) after `passTimeout`: a hung backend or Kubernetes
    /// API never holds the reconciler.
    pub async fn bounded_pass(&self, dry_run: bool) -> Result<pb::ReconcileReport, tonic::Status> {
        let limit = self.settings.pass_timeout;
        match tokio::time::timeout(limit, self.pass(dry_run)).await {
            Ok(result) => result,
            Err(_) => {
                self.stats.timeouts.inc();
                Err(tonic::Status::deadline_exceeded(format!(
                    "reconciliation pass gave up after passTimeout ({})",
                    humantime::format_duration(limit)
                )))
            }
        }
    }

    /// One pass; `dry_run` reports without repairing.
    pub async fn pass(&self, dry_run: bool) -> Result<pb::ReconcileReport, tonic::Status> {
        let _one_at_a_time = self.lock.lock().await;
        let started = Instant::now();
        let started_ms = now_ms();
        let pass_id = format!("pass-{:012x}", rand::random::<u64>() >> 16);
        let unavailable =
            |what: &str, e: String| tonic::Status::unavailable(format!("{what}: {e}"));

        let records = Records::new(self.store.clone());
        let store_down = |e: shoal_state::StoreError| unavailable("state store", e.to_string());
        let claims: Vec<NodeClaim> = records.claims().await.map_err(store_down)?;
        let reservations: Vec<Reservation> = records.reservations().await.map_err(store_down)?;
        let operations: Vec<Operation> = records.operations().await.map_err(store_down)?;
        let listed = self
            .provisioner
            .clone()
            .list_instances(ListInstancesRequest::default())
            .await?
            .into_inner();
        let mut instances: BTreeMap<String, Vec<pb::Instance>> = BTreeMap::new();
        for i in listed.instances {
            instances.entry(i.backend.clone()).or_default().push(i);
        }
        // Backends that answered with nothing are empty, not unknown.
        for c in &claims {
            if !listed.errors.contains_key(&c.backend) {
                instances.entry(c.backend.clone()).or_default();
            }
        }
        let api: Api<Node> = Api::all(self.kube.clone());
        let nodes: Vec<NodeView> = api
            .list(&ListParams::default().labels(&format!(
                "shoal.dev/cluster={},shoal.dev/claim",
                self.cluster
            )))
            .await
            .map_err(|e| unavailable("Kubernetes API", e.to_string()))?
            .items
            .iter()
            .map(|n| {
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let (ready, changed) = ready_of(n);
                NodeView {
                    name: n.metadata.name.clone().unwrap_or_default(),
                    claim: labels.get("shoal.dev/claim").cloned().unwrap_or_default(),
                    pool: labels.get("shoal.dev/pool").cloned().unwrap_or_default(),
                    ready,
                    ready_changed_ms: changed,
                }
            })
            .collect();

        let findings = drift::classify(
            &Views {
                claims: &claims,
                instances: &instances,
                nodes: &nodes,
                reservations: &reservations,
                operations: &operations,
                now_ms: now_ms(),
            },
            &self.settings.policy(),
        );
        self.verify_operations(&operations, &findings, started_ms);
        let mut drifts = Vec::new();
        for f in findings {
            drifts.push(self.repair(&pass_id, f, dry_run).await);
        }
        self.record(started_ms, &drifts).await;
        let duration = started.elapsed();
        self.stats.cycles.inc();
        self.stats.duration.observe(duration.as_secs_f64());
        let report = pb::ReconcileReport {
            pass_id,
            started_at: Some(timestamp(started_ms)),
            duration: Some(prost_types::Duration {
                seconds: duration.as_secs() as i64,
                nanos: duration.subsec_nanos() as i32,
            }),
            claims: claims.len() as i32,
            instances: instances.values().map(Vec::len).sum::<usize>() as i32,
            nodes: nodes.len() as i32,
            drifts,
            dry_run,
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// Joins the trace of every operation that changed since the previous pass with a
    /// `reconciler.verify_operation` span saying whether this pass found drift on its claims,
    /// so one scale-up reads as one trace from the snapshot to the check that it held.
    fn verify_operations(&self, operations: &[Operation], findings: &[Finding], started_ms: u64) {
        use std::sync::atomic::Ordering;
        let since = self.previous_pass_ms.swap(started_ms, Ordering::Relaxed);
        let since = if since == 0 {
            started_ms.saturating_sub(self.settings.interval.as_millis() as u64)
        } else {
            since
        };
        for op in operations
            .iter()
            .filter(|o| !o.traceparent.is_empty() && o.updated_at_ms >= since)
        {
            let drifts = findings
                .iter()
                .filter(|f| op.claim_ids.contains(&f.subject))
                .count();
            let span = tracing::info_span!(
                "reconciler.verify_operation",
                op = %op.id,
                kind = ?op.kind,
                state = ?op.state,
                claims = op.claim_ids.len(),
                drifts
            );
            shoal_runtime::telemetry::continue_trace(&span, &op.traceparent);
            span.in_scope(|| tracing::debug!(drifts, "operation checked by the reconciler"));
        }
    }

    /// Stores the pass's drifts and drops the oldest records beyond `driftHistory`. Best
    /// effort: the report carries them either way.
    async fn record(&self, started_ms: u64, drifts: &[pb::Drift]) {
        if drifts.is_empty() {
            return;
        }
        for d in drifts {
            if let Err(e) = self
                .store
                .put(&keys::drift(started_ms, &d.id), d.encode_to_vec(), None)
                .await
            {
                tracing::warn!(error = %e, "cannot record a drift");
            }
        }
        let Ok(all) = self.store.keys(keys::DRIFTS).await else {
            return;
        };
        let cutoff = started_ms.saturating_sub(self.settings.drift_max_age.as_millis() as u64);
        let by_count = all.len().saturating_sub(self.settings.drift_history);
        let by_age = all
            .iter()
            .take_while(|k| keys::history_time(k).is_some_and(|t| t < cutoff))
            .count();
        let excess = by_count.max(by_age);
        if let Err(e) =
            shoal_state::records::delete_in_chunks(&self.store, None, &all[..excess]).await
        {
            tracing::warn!(error = %e, "cannot trim drift records yet");
        }
    }

    async fn repair(&self, pass_id: &str, f: Finding, dry_run: bool) -> pb::Drift {
        let kind = format!("{:?}", f.kind);
        self.stats.drifts.with_label_values(&[&kind]).inc();
        let (action_text, action) = match &f.repair {
            Repair::DeleteInstance { backend, instance } => (
                "delete instance",
                Some(Action::DeleteInstance(format!("{backend}/{instance}"))),
            ),
            Repair::AdoptInstance {
                backend,
                instance,
                pool,
            } => (
                "adopt instance",
                Some(Action::AdoptInstance(pb::AdoptInstance {
                    backend: backend.clone(),
                    instance_id: instance.clone(),
                    pool: pool.clone(),
                })),
            ),
            Repair::FailClaim(id) => ("mark claim failed", Some(Action::FailClaim(id.clone()))),
            Repair::DeleteNode(name) => ("delete node", Some(Action::DeleteNode(name.clone()))),
            Repair::ReleaseId(id) => ("release id", Some(Action::ReleaseId(id.clone()))),
            Repair::SettleOperation(id) => (
                "settle operation",
                Some(Action::SettleOperation(id.clone())),
            ),
            Repair::None => ("none", None),
        };
        let (result, error) = match action {
            _ if f.deferred => (pb::RepairResult::Deferred, String::new()),
            None => (pb::RepairResult::Reported, String::new()),
            Some(_) if dry_run || self.settings.dry_run => {
                (pb::RepairResult::Reported, String::new())
            }
            Some(action) => {
                let call = self
                    .provisioner
                    .clone()
                    .repair(RepairRequest {
                        pass_id: pass_id.to_string(),
                        reason: f.details.clone(),
                        action: Some(action),
                    })
                    .await;
                match call {
                    Ok(_) => {
                        self.repaired
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (pb::RepairResult::Repaired, String::new())
                    }
                    Err(s) => (
                        pb::RepairResult::Failed,
                        format!("{:?}: {}", s.code(), s.message()),
                    ),
                }
            }
        };
        let result_label = match result {
            pb::RepairResult::Repaired => "repaired",
            pb::RepairResult::Failed => "failed",
            pb::RepairResult::Deferred => "deferred",
            _ => "reported",
        };
        self.stats
            .repairs
            .with_label_values(&[&kind, result_label])
            .inc();
        tracing::info!(pass = pass_id, drift = %kind, subject = %f.subject, action = action_text, result = result_label, %error, details = %f.details, "drift");
        pb::Drift {
            id: format!("{:016x}", rand::random::<u64>()),
            r#type: f.kind as i32,
            subject: f.subject,
            backend: f.backend,
            pool: f.pool,
            detected_at: Some(timestamp(now_ms())),
            details: f.details,
            repair_action: action_text.to_string(),
            repair_result: result as i32,
            repair_error: error,
        }
    }
}

/// The pass loop (supervised): while this replica leads, a pass every `interval`, each bounded
/// by `passTimeout`; a pass in progress is dropped the moment leadership ends.
pub async fn run(
    reconciler: std::sync::Arc<Reconciler>,
    leader: Option<shoal_runtime::LeaderWatch>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let Some(leader) = leader else { return Ok(()) };
    shoal_runtime::while_leading(leader, shutdown, |leadership, term| {
        let reconciler = reconciler.clone();
        async move {
            tracing::info!(term = leadership.term(), "leading the reconciler");
            let passes = async {
                loop {
                    tokio::select! {
                        _ = term.cancelled() => return,
                        _ = tokio::time::sleep(reconciler.settings.interval) => {}
                    }
                    if let Err(status) = reconciler.bounded_pass(false).await {
                        tracing::warn!(code = ?status.code(), message = status.message(), "reconciliation pass failed; next pass in {:?}", reconciler.settings.interval);
                    }
                }
            };
            tokio::join!(passes, reconciler.compact(&leadership, &term));
            Ok(())
        }
    })
    .await
}
