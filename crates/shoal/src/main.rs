//! `shoal`: every Shoal service in one binary.
//!
//! - `shoal run <service> [flags]` runs one service, exactly as its own binary would.
//! - `shoal demo` runs all four services in this process on loopback ports, talking real gRPC to
//!   each other, with the in-memory store (or etcd with `--etcd`).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_runtime::{
    ServiceArgs,
    cli::cancel_on_signal,
    config::{self, Config, ServiceSettings, Sources},
    telemetry::Telemetry,
};
use tokio_util::sync::CancellationToken;

mod plugin_check;
mod view;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal: a node autoscaler for k3s and Kubernetes.
#[derive(Parser)]
#[command(name = "shoal", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one service.
    Run {
        #[command(subcommand)]
        service: Service,
    },
    /// Run all four services in this process on loopback, for a trial.
    Demo(DemoArgs),
    /// Print the NodePool and NodeClaim CustomResourceDefinitions (`kubectl apply -f -`).
    Crds,
    /// Out-of-tree backends (`plugin:<name>`).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run the NodeProvider contract against a plugin and print pass/fail per point.
    Check(plugin_check::CheckArgs),
}

#[derive(Subcommand)]
enum Service {
    /// The metrics service.
    Metrics(ServiceArgs),
    /// The decider.
    Decider(ServiceArgs),
    /// The provisioner.
    Provisioner(ServiceArgs),
    /// The reconciler.
    Reconciler(ServiceArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Use etcd at this URL instead of the in-memory store.
    #[arg(long)]
    etcd: Option<String>,
    /// gRPC port of the metrics service; decider, provisioner and reconciler use the next three.
    #[arg(long, default_value_t = 50051)]
    grpc_base_port: u16,
    /// Admin port of the metrics service; the others use the next three.
    #[arg(long, default_value_t = 9091)]
    admin_base_port: u16,
    /// Scenario to play instead of the built-in ramp (see deploy/scenarios/).
    #[arg(long)]
    scenario: Option<std::path::PathBuf>,
    /// Log filter of the services (the live view is printed whatever it is).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { service } => match service {
            Service::Metrics(args) => shoal_runtime::run_service(args, shoal_metrics::serve),
            Service::Decider(args) => shoal_runtime::run_service(args, shoal_decider::serve),
            Service::Provisioner(args) => {
                shoal_runtime::run_service(args, shoal_provisioner::serve)
            }
            Service::Reconciler(args) => shoal_runtime::run_service(args, shoal_reconciler::serve),
        },
        Command::Crds => {
            print!("{}", shoal_core::crd::definitions_yaml());
            ExitCode::SUCCESS
        }
        Command::Plugin {
            command: PluginCommand::Check(args),
        } => {
            let checked = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(plugin_check::check(args)));
            match checked {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(err) => {
                    eprintln!("shoal plugin check: {err:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo(args) => match demo(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shoal demo: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The demo's config for one service: defaults, loopback ports, the shared store.
fn demo_config<S: ServiceSettings>(args: &DemoArgs, index: u16) -> anyhow::Result<Config<S>> {
    let base = |port: u16| format!("http://127.0.0.1:{port}");
    let mut overrides = vec![
        (
            "grpc.addr".to_string(),
            format!("127.0.0.1:{}", args.grpc_base_port + index),
        ),
        (
            "admin.addr".to_string(),
            format!("127.0.0.1:{}", args.admin_base_port + index),
        ),
        ("telemetry.logLevel".to_string(), args.log_level.clone()),
        ("instanceId".to_string(), format!("demo-{}", S::SERVICE)),
        // The all-in-one demo listens on loopback only.
        ("grpc.plaintext".to_string(), "true".to_string()),
    ];
    match &args.etcd {
        Some(url) => {
            overrides.push(("store.backend".into(), "etcd".into()));
            overrides.push(("store.endpoints".into(), url.clone()));
        }
        None => overrides.push(("store.backend".into(), "memory".into())),
    }
    let peers = [("metricsAddr", 0), ("provisionerAddr", 2)];
    let defaults = service_setting_names::<S>();
    for (key, offset) in peers {
        if defaults.iter().any(|k| k == key) {
            overrides.push((format!("service.{key}"), base(args.grpc_base_port + offset)));
        }
    }
    let sources = Sources {
        file: None,
        env: Vec::new(),
        overrides,
    };
    Ok(config::load::<S>(&sources)
        .with_context(|| format!("{} config", S::SERVICE))?
        .config)
}

/// Names of the `service:` settings of `S` (so the demo only wires peers a service has).
fn service_setting_names<S: ServiceSettings>() -> Vec<String> {
    match serde_json::to_value(S::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The demo's NodePool: simulated nodes of 2 CPU / 4 GiB, quick to shrink.
const DEMO_POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 1, maxNodes: 8 }\n  scaleDown: { unneededFor: 10s, cooldown: 5s, maxConcurrent: 2, drainTimeout: 30s }\n";

/// The load the demo plays.
const DEMO_SCENARIO: &str = include_str!("../../../deploy/scenarios/ramp.yaml");

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut metrics = demo_config::<shoal_metrics::MetricsSettings>(&args, 0)?;
    let mut decider = demo_config::<shoal_decider::DeciderSettings>(&args, 1)?;
    let mut provisioner = demo_config::<shoal_provisioner::ProvisionerSettings>(&args, 2)?;
    let mut reconciler = demo_config::<shoal_reconciler::ReconcilerSettings>(&args, 3)?;
    // The simulated cluster: its kubeconfig and the demo's NodePool in a folder of our own.
    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kubeconfig = dir.join("kubeconfig");
    let pool_file = dir.join("pool-general.yaml");
    std::fs::write(&pool_file, DEMO_POOL)
        .with_context(|| format!("writing {}", pool_file.display()))?;
    let scenario = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading scenario {}", path.display()))?;
            shoal_sim::scenario::Scenario::parse(&path.display().to_string(), &text)
        }
        None => shoal_sim::scenario::Scenario::parse("deploy/scenarios/ramp.yaml", DEMO_SCENARIO),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let kube = kubeconfig.display().to_string();
    metrics.service.kube.kubeconfig = kube.clone();
    provisioner.service.kube.kubeconfig = kube.clone();
    reconciler.service.kube.kubeconfig = kube;
    decider.service.pool_files = vec![pool_file.display().to_string()];
    let grpc: Vec<SocketAddr> = vec![
        metrics.grpc.addr,
        decider.grpc.addr,
        provisioner.grpc.addr,
        reconciler.grpc.addr,
    ];
    let admin: Vec<SocketAddr> = vec![
        metrics.admin.addr,
        decider.admin.addr,
        provisioner.admin.addr,
        reconciler.admin.addr,
    ];
    let mut telemetry_config = metrics.telemetry.clone();
    telemetry_config.service_name = "shoal-demo".into();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let telemetry = Telemetry::init(&telemetry_config)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let sim = shoal_sim::Sim::start(
            shoal_sim::SimConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..shoal_sim::SimConfig::default()
            },
            shutdown.clone(),
        )
        .await
        .context("starting the simulated cluster")?;
        shoal_sim::kubeconfig::write(&kubeconfig, &sim.url())
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        provisioner.service.backends.sim = Some(shoal_provisioner::SimBackend { url: sim.url() });
        sim.play(scenario, shutdown.clone());
        let services = vec![
            (
                "metrics",
                tokio::spawn(shoal_metrics::serve(metrics, shutdown.clone())),
            ),
            (
                "decider",
                tokio::spawn(shoal_decider::serve(decider, shutdown.clone())),
            ),
            (
                "provisioner",
                tokio::spawn(shoal_provisioner::serve(provisioner, shutdown.clone())),
            ),
            (
                "reconciler",
                tokio::spawn(shoal_reconciler::serve(reconciler, shutdown.clone())),
            ),
        ];
        wait_until_listening(&grpc).await;
        print_banner(&grpc, &admin, args.etcd.as_deref());
        println!(
            "  kubectl --kubeconfig {} get nodes,pods",
            kubeconfig.display()
        );
        println!(
            "  Prometheus: scrape {} (the simulated cluster's node-exporter/cAdvisor series) and each service's metrics URL above\n",
            format_args!("{}/metrics", sim.url())
        );
        println!("Live view (nodes by phase, pending pods, every decision with its reasons):");
        tokio::spawn(view::run(
            view::Endpoints {
                metrics: grpc[0],
                decider: grpc[1],
                provisioner: grpc[2],
            },
            Duration::from_secs(2),
            shutdown.clone(),
        ));
        let mut failed = None;
        for (name, task) in services {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    shutdown.cancel();
                    failed.get_or_insert_with(|| format!("{name}: {err}"));
                }
                Err(err) => {
                    shutdown.cancel();
                    failed.get_or_insert_with(|| format!("{name}: {err}"));
                }
            }
        }
        telemetry.shutdown();
        match failed {
            Some(err) => Err(anyhow::anyhow!(err)),
            None => Ok(()),
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn wait_until_listening(addrs: &[SocketAddr]) {
    for addr in addrs {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn print_banner(grpc: &[SocketAddr], admin: &[SocketAddr], etcd: Option<&str>) {
    let names = ["metrics", "decider", "provisioner", "reconciler"];
    println!(
        "\nShoal demo is running (store: {}). Ctrl-C stops it.\n",
        etcd.unwrap_or("in-memory")
    );
    for ((name, g), a) in names.iter().zip(grpc).zip(admin) {
        println!("  {name:<12} gRPC {g:<16} metrics http://{a}/metrics");
    }
    println!("\nTry:");
    println!("  grpcurl -plaintext {} list", grpc[1]);
    println!(
        "  grpcurl -plaintext {} shoal.v1.DeciderService/GetStatus",
        grpc[1]
    );
    println!(
        "  grpcurl -plaintext {} grpc.health.v1.Health/Check\n",
        grpc[0]
    );
}
