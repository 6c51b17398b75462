//! Shoal's domain types, free of I/O: Kubernetes quantities, [`Resources`], NodeClaim phases and
//! their legal transitions, well-known labels, and field-path validation errors.

pub mod fit;
pub mod labels;
pub mod phase;
pub mod quantity;
pub mod resources;
pub mod validation;

pub use phase::ClaimPhase;
pub use quantity::{QuantityError, parse_cpu_millis, parse_memory_bytes};
pub use resources::Resources;
pub use validation::{FieldError, ValidationErrors};
