//! Service scaffolding shared by every Shoal service: configuration (file → `SHOAL_*` env →
//! flags, validated with field paths), telemetry (logs, OTLP traces), a gRPC server with health,
//! reflection and tower layers for trace propagation, metrics and leader routing, the admin HTTP
//! port, the leader loop and the "while leading" helper, supervised background loops, and
//! graceful shutdown.
//!
//! A service crate builds its API on top of a [`Host`] and stays free of all of this.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod host;
pub mod layers;
pub mod leader;
pub mod metrics;
pub mod routing;
pub mod secret;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use cli::{ServiceArgs, run_service};
pub use config::{Config, ServiceSettings};
pub use host::{Host, HostError, status_from_store};
pub use layers::{TracedChannel, traced_channel};
pub use leader::{LeaderWatch, current_leadership, describe_leadership, while_leading};
pub use shoal_core::ValidationErrors;
pub use supervise::Supervisor;
pub use upstream::{Upstream, invalid_argument, not_yet_implemented, validate_address};
