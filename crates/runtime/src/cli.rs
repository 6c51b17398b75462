//! The thin `main` every service binary shares: flags → config (file → env → flags) → telemetry
//! → signals → `serve` → exit code. Exit codes: 0 after a clean shutdown, 1 when the service
//! failed, 2 when the configuration is invalid (nothing was started).

use std::{future::Future, path::PathBuf, process::ExitCode};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, Config, ServiceSettings, Sources},
    telemetry::Telemetry,
};

/// Flags every service accepts. Each named flag is shorthand for `--set <path>=<value>`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// YAML config file (also SHOAL_CONFIG).
    #[arg(long, short = 'c', env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (grpc.addr).
    #[arg(long)]
    pub grpc_addr: Option<String>,
    /// Admin HTTP listen address (admin.addr).
    #[arg(long)]
    pub admin_addr: Option<String>,
    /// State store backend: etcd or memory (store.backend).
    #[arg(long)]
    pub store: Option<String>,
    /// Comma-separated etcd endpoints (store.endpoints).
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// This replica's identity (instanceId).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// human or json (telemetry.logFormat).
    #[arg(long)]
    pub log_format: Option<String>,
    /// Tracing filter such as info or debug (telemetry.logLevel).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Any setting by path, e.g. --set election.leaseTtl=3s (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServiceArgs {
    /// The config sources these flags and the process environment describe.
    pub fn sources(&self) -> Result<Sources, String> {
        let mut overrides = Vec::new();
        let named = [
            ("grpc.addr", &self.grpc_addr),
            ("admin.addr", &self.admin_addr),
            ("store.backend", &self.store),
            ("store.endpoints", &self.etcd_endpoints),
            ("instanceId", &self.instance_id),
            ("telemetry.logFormat", &self.log_format),
            ("telemetry.logLevel", &self.log_level),
        ];
        for (path, value) in named {
            if let Some(value) = value {
                overrides.push((path.to_string(), value.clone()));
            }
        }
        for item in &self.set {
            let (path, value) = item
                .split_once('=')
                .ok_or_else(|| format!("--set {item:?}: expected PATH=VALUE"))?;
            overrides.push((path.trim().to_string(), value.to_string()));
        }
        Ok(Sources {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            overrides,
        })
    }
}

/// Loads the config, sets up telemetry and signals, runs `serve`, and maps the result to an exit
/// code. Used by each service binary and by `shoal run <service>`.
pub fn run_service<S, F, Fut, E>(args: ServiceArgs, serve: F) -> ExitCode
where
    S: ServiceSettings,
    F: FnOnce(Config<S>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let binary = format!("shoal-{}", S::SERVICE);
    let sources = match args.sources() {
        Ok(sources) => sources,
        Err(err) => {
            eprintln!("{binary}: {err}");
            return ExitCode::from(2);
        }
    };
    let loaded = match config::load::<S>(&sources) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("{binary}: {err}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        match serde_yaml_ng::to_string(&loaded.config) {
            Ok(yaml) => {
                print!("{yaml}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("{binary}: cannot print config: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{binary}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match Telemetry::init(&loaded.config.telemetry) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("{binary}: {err}");
                return ExitCode::from(2);
            }
        };
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = serve(loaded.config, shutdown).await;
        let code = match result {
            Ok(()) => {
                tracing::info!("stopped cleanly");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = %err, "service failed");
                eprintln!("{binary}: {err}");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        code
    })
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second signal exits at once.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("signal received; shutting down (send again to exit immediately)");
    shutdown.cancel();
    wait_for_signal().await;
    eprintln!("second signal: exiting immediately");
    std::process::exit(130);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
