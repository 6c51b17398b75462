//! Shoal's domain types, free of I/O: Kubernetes quantities, [`Resources`], the scheduler's fit
//! rules, NodePools (YAML, wire and validated forms) with their schedules, NodeClaims and
//! operations as stored, claim phases and their legal transitions, well-known labels, and
//! field-path validation errors.

pub mod claim;
pub mod crd;
pub mod fit;
pub mod labels;
pub mod phase;
pub mod pool;
pub mod quantity;
pub mod resources;
pub mod schedule;
pub mod snapshot;
pub mod validation;

pub use phase::ClaimPhase;
pub use quantity::{QuantityError, parse_cpu_millis, parse_memory_bytes};
pub use resources::Resources;
pub use validation::{FieldError, ValidationErrors};
