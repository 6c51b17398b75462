//! The demo's live terminal view, read over the services' own gRPC APIs (what a user would call
//! with grpcurl): nodes by claim phase and pending pods every few seconds, and each decision
//! with its reasons as the decider makes it.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use shoal_proto::v1::{
    ClaimPhase, Decision, GetSnapshotRequest, ListNodeClaimsRequest, WatchDecisionsRequest,
    decider_service_client::DeciderServiceClient, metrics_service_client::MetricsServiceClient,
    provisioner_service_client::ProvisionerServiceClient, scale_action::Action,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Addresses the view reads from.
pub struct Endpoints {
    /// Metrics service gRPC.
    pub metrics: SocketAddr,
    /// Decider gRPC.
    pub decider: SocketAddr,
    /// Provisioner gRPC.
    pub provisioner: SocketAddr,
}

fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// One decision as a line, or `None` when it changed nothing.
pub fn decision_line(d: &Decision) -> Option<String> {
    let mut out = String::new();
    for action in d.actions.iter().filter_map(|a| a.action.as_ref()) {
        match action {
            Action::ScaleUp(up) => {
                let _ = write!(out, "scale up {} +{}: {}", up.pool, up.count, up.reason);
            }
            Action::ScaleDown(down) => {
                let _ = write!(
                    out,
                    "scale down {} −{} ({}): {}",
                    down.pool,
                    down.nodes.len(),
                    down.nodes.join(", "),
                    down.reason
                );
            }
        }
        out.push_str("; ");
    }
    if out.is_empty() {
        return None;
    }
    out.truncate(out.len() - 2);
    let dry = if d.dry_run { " (dry run)" } else { "" };
    Some(format!("[{}] decision{dry}: {out}", clock()))
}

fn phase_name(phase: i32) -> &'static str {
    match ClaimPhase::try_from(phase) {
        Ok(ClaimPhase::Pending) => "Pending",
        Ok(ClaimPhase::Launched) => "Launched",
        Ok(ClaimPhase::Registered) => "Registered",
        Ok(ClaimPhase::Ready) => "Ready",
        Ok(ClaimPhase::Draining) => "Draining",
        Ok(ClaimPhase::Terminating) => "Terminating",
        Ok(ClaimPhase::Deleted) => "Deleted",
        Ok(ClaimPhase::Failed) => "Failed",
        _ => "?",
    }
}

/// Clients of the services the status line reads, connected once (lazily, so a service that is
/// not up yet only fails that round).
struct Readers {
    provisioner: ProvisionerServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
}

impl Readers {
    fn new(e: &Endpoints) -> Result<Readers, String> {
        let channel = |a: SocketAddr| {
            Endpoint::from_shared(format!("http://{a}"))
                .map(|e| e.connect_lazy())
                .map_err(|e| e.to_string())
        };
        Ok(Readers {
            provisioner: ProvisionerServiceClient::new(channel(e.provisioner)?),
            metrics: MetricsServiceClient::new(channel(e.metrics)?),
        })
    }
}

async fn status_line(readers: &mut Readers) -> Result<String, String> {
    let claims = readers
        .provisioner
        .list_node_claims(ListNodeClaimsRequest::default())
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .claims;
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &claims {
        let name = phase_name(c.phase);
        if !matches!(name, "Deleted" | "Failed") {
            *phases.entry(name).or_default() += 1;
        }
    }
    let snapshot = readers
        .metrics
        .get_snapshot(GetSnapshotRequest::default())
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let pending: i32 = snapshot.pending.iter().map(|p| p.count).sum();
    let running: i32 = snapshot
        .nodes
        .iter()
        .map(|n| n.pods.iter().map(|p| p.count).sum::<i32>())
        .sum();
    let phases = if phases.is_empty() {
        "none".to_string()
    } else {
        phases
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "[{}] nodes {} (Shoal's: {phases}) | pods on nodes {running} | unschedulable {pending}",
        clock(),
        snapshot.nodes.len()
    ))
}

/// Prints the view until `shutdown`.
pub async fn run(e: Endpoints, every: Duration, shutdown: CancellationToken) {
    let decider = format!("http://{}", e.decider);
    let watch = shutdown.clone();
    tokio::spawn(async move {
        // The decider streams every decision; reconnect if it is not up yet or restarts.
        while !watch.is_cancelled() {
            if let Ok(mut client) = DeciderServiceClient::connect(decider.clone()).await
                && let Ok(stream) = client.watch_decisions(WatchDecisionsRequest {}).await
            {
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        _ = watch.cancelled() => return,
                        next = stream.message() => match next {
                            Ok(Some(d)) => if let Some(line) = decision_line(&d) {
                                println!("{line}");
                                // Reasons the action lines do not already say.
                                for reason in d.reasons.iter().filter(|r| {
                                    !line.contains(r.split_once(": ").map_or(r.as_str(), |(_, rest)| rest))
                                }).take(3) {
                                    println!("           because {reason}");
                                }
                            },
                            _ => break,
                        },
                    }
                }
            }
            tokio::select! {
                _ = watch.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    let mut readers = match Readers::new(&e) {
        Ok(r) => r,
        Err(err) => {
            println!("[{}] (no status view: {err})", clock());
            return;
        }
    };
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match status_line(&mut readers).await {
            // Print when something changed (the clock aside), so the screen reads as a log.
            Ok(line) => {
                let body = line.split_once(']').map_or("", |(_, b)| b).to_string();
                if body != last {
                    println!("{line}");
                    last = body;
                }
            }
            Err(err) => println!("[{}] (status unavailable: {err})", clock()),
        }
    }
}
