//! `shoal-decider`: the decider as its own process.
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's decider: scaling decisions, their reasons and history, and NodePools.
#[derive(Parser)]
#[command(name = "shoal-decider", version)]
struct Cli {
    #[command(flatten)]
    args: shoal_runtime::ServiceArgs,
}

fn main() -> ExitCode {
    shoal_runtime::run_service(Cli::parse().args, shoal_decider::serve)
}
