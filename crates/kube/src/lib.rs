//! Shoal's Kubernetes adapters: building a client (kubeconfig or in-cluster), reading pods and
//! nodes the way the scheduler does ([`convert`]), following objects with watches that re-list
//! on 410 ([`watch`]), and the node operations of scale-down.
//!
//! Works against any API server: the simulator in tests, a real cluster in production.

pub mod client;
pub mod convert;
pub mod drain;
pub mod watch;

pub use client::{KubeError, KubeSettings, connect, connect_direct, connect_for_watch};
pub use drain::{Eviction, NodeOps};
