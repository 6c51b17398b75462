//! `shoal-provisioner`: the provisioner as its own process.
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's provisioner: node lifecycle on every backend.
#[derive(Parser)]
#[command(name = "shoal-provisioner", version)]
struct Cli {
    #[command(flatten)]
    args: shoal_runtime::ServiceArgs,
}

fn main() -> ExitCode {
    shoal_runtime::run_service(Cli::parse().args, shoal_provisioner::serve)
}
