//! `shoal-reconciler`: the reconciler as its own process.
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's reconciler: finds and repairs drift between the store, the backends and Kubernetes.
#[derive(Parser)]
#[command(name = "shoal-reconciler", version)]
struct Cli {
    #[command(flatten)]
    args: shoal_runtime::ServiceArgs,
}

fn main() -> ExitCode {
    shoal_runtime::run_service(Cli::parse().args, shoal_reconciler::serve)
}
