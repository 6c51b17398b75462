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
    },
}

fn main() -> ExitCode {
    let Command::Serve {
        addr,
        kubeconfig,
        watch_history,
        bookmark_interval,
    } = Cli::parse().command;
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
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let config = shoal_sim::SimConfig {
            addr,
            watch_history,
            bookmark_interval,
            ..shoal_sim::SimConfig::default()
        };
        let sim = match shoal_sim::Sim::start(config, shutdown.clone()).await {
            Ok(sim) => sim,
            Err(err) => {
                eprintln!("shoal-sim: cannot listen on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = &kubeconfig
            && let Err(err) = shoal_sim::kubeconfig::write(path, &sim.url())
        {
            eprintln!(
                "shoal-sim: cannot write kubeconfig {}: {err}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
        tracing::info!(url = %sim.url(), kubeconfig = ?kubeconfig, "simulated cluster serving");
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        });
        #[cfg(unix)]
        {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            if let Ok(mut term) = term {
                let stop = sim.store.clone();
                tokio::spawn(async move {
                    term.recv().await;
                    drop(stop);
                    std::process::exit(0);
                });
            }
        }
        match sim.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shoal-sim: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
