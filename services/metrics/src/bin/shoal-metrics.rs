//! `shoal-metrics`: the metrics service as its own process.
use std::process::ExitCode;

use clap::Parser;

// Snapshots are built from many small allocations; mimalloc makes that several times cheaper than
// the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shoal's metrics service: cluster snapshots and node utilization over gRPC.
#[derive(Parser)]
#[command(name = "shoal-metrics", version)]
struct Cli {
    #[command(flatten)]
    args: shoal_runtime::ServiceArgs,
}

fn main() -> ExitCode {
    shoal_runtime::run_service(Cli::parse().args, shoal_metrics::serve)
}
