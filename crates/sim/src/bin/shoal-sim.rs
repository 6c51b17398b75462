//! `shoal-sim`: the cluster simulator as its own process.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// A Kubernetes-API-compatible cluster in one process.
#[derive(Parser)]
#[command(name = "shoal-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the simulated cluster's API.
    Serve {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:6443")]
        addr: SocketAddr,
        /// Write a kubeconfig for this cluster here.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Past changes kept for resuming watches (older versions get 410 Gone).
        #[arg(long, default_value_t = 200_000)]
        watch_history: usize,
        /// Interval of watch bookmarks.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        bookmark_interval: Duration,
        /// A node whose lease is older than this goes NotReady.
        #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
        node_grace_period: Duration,
        /// Pods of a node NotReady this long are evicted.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        pod_eviction_timeout: Duration,
        /// Play this scenario file (see deploy/scenarios/).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Sim cloud: time from creating an instance to its Node registering.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        boot_delay: Duration,
        /// Sim cloud: up to this much more, at random.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        boot_jitter: Duration,
        /// Serve HTTPS with a CA generated at start (written into the kubeconfig).
        #[arg(long)]
        tls: bool,
    },
    /// Run one simulated node as this process (registers, heartbeats, runs its pods).
    Agent {
        /// The simulator's API, e.g. http://sim:6443.
        #[arg(long)]
        api: String,
        /// Node name.
        #[arg(long)]
        name: String,
        /// CPU capacity.
        #[arg(long, default_value = "4")]
        cpu: String,
        /// Memory capacity.
        #[arg(long, default_value = "8Gi")]
        memory: String,
        /// Pod slots.
        #[arg(long, default_value_t = 110)]
        pods: u32,
        /// Node label key=value (repeatable, or comma-separated).
        #[arg(long = "label", value_delimiter = ',')]
        labels: Vec<String>,
        /// Node taint key=value:Effect (repeatable).
        #[arg(long = "taint")]
        taints: Vec<String>,
        /// Lease renewal interval.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        heartbeat_interval: Duration,
        /// Node `spec.providerID`, e.g. `fake://i-123` (how a cloud names its instance).
        #[arg(long, default_value = "")]
        provider_id: String,
        /// Exit when the process that started this one exits (a plugin's nodes die with it, even
        /// when it is killed with SIGKILL).
        #[arg(long)]
        exit_with_parent: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shoal-sim: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match Cli::parse().command {
        Command::Serve {
            addr,
            kubeconfig,
            watch_history,
            bookmark_interval,
            node_grace_period,
            pod_eviction_timeout,
            scenario,
            boot_delay,
            boot_jitter,
            tls,
        } => {
            let scenario = match scenario
                .as_deref()
                .map(shoal_sim::scenario::Scenario::load)
                .transpose()
            {
                Ok(scenario) => scenario,
                Err(err) => {
                    eprintln!("shoal-sim: {err}");
                    return ExitCode::from(2);
                }
            };
            let config = shoal_sim::SimConfig {
                addr,
                watch_history,
                bookmark_interval,
                lifecycle: shoal_sim::lifecycle::LifecycleTiming {
                    grace_period: node_grace_period,
                    eviction_timeout: pod_eviction_timeout,
                    ..Default::default()
                },
                boot: shoal_sim::cloud::BootTiming {
                    delay: boot_delay,
                    jitter: boot_jitter,
                },
                tls,
                ..shoal_sim::SimConfig::default()
            };
            runtime.block_on(serve(config, kubeconfig, scenario))
        }
        Command::Agent {
            api,
            name,
            cpu,
            memory,
            pods,
            labels,
            taints,
            heartbeat_interval,
            provider_id,
            exit_with_parent,
        } => {
            let mut label_map = std::collections::BTreeMap::new();
            for label in labels {
                match label.split_once('=') {
                    Some((k, v)) => {
                        label_map.insert(k.to_string(), v.to_string());
                    }
                    None => {
                        eprintln!("shoal-sim agent: --label {label:?}: expected key=value");
                        return ExitCode::from(2);
                    }
                }
            }
            let config = shoal_sim::agent::AgentConfig {
                api,
                name,
                cpu,
                memory,
                pods,
                labels: label_map,
                taints,
                heartbeat_interval,
                pod_start_delay: Duration::from_millis(200),
                provider_id,
            };
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                if exit_with_parent {
                    tokio::spawn(stop_when_orphaned(shutdown.clone()));
                }
                match shoal_sim::agent::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("shoal-sim agent: {err}");
                        ExitCode::from(2)
                    }
                }
            })
        }
    }
}

/// Cancels `shutdown` once this process is re-parented (its parent exited, however it died).
async fn stop_when_orphaned(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if parent == 1 || std::os::unix::process::parent_id() != parent {
                tracing::info!(parent, "the parent process exited; stopping");
                shutdown.cancel();
                return;
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            shutdown.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}

async fn serve(
    config: shoal_sim::SimConfig,
    kubeconfig: Option<PathBuf>,
    scenario: Option<shoal_sim::scenario::Scenario>,
) -> ExitCode {
    let addr = config.addr;
    let shutdown = CancellationToken::new();
    let sim = match shoal_sim::Sim::start(config, shutdown.clone()).await {
        Ok(sim) => sim,
        Err(err) => {
            eprintln!("shoal-sim: cannot listen on {addr}: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &kubeconfig
        && let Err(err) = sim.write_kubeconfig(path)
    {
        eprintln!(
            "shoal-sim: cannot write kubeconfig {}: {err}",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    tracing::info!(url = %sim.url(), kubeconfig = ?kubeconfig, "simulated cluster serving");
    if let Some(scenario) = scenario {
        sim.play(scenario, shutdown.clone());
    }
    tokio::spawn(stop_on_signal(shutdown));
    match sim.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal-sim: {err}");
            ExitCode::FAILURE
        }
    }
}
