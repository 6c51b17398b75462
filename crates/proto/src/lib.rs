//! Generated gRPC code for the `shoal.v1` API, plus the encoded FileDescriptorSet that server
//! reflection serves.
#![allow(missing_docs, clippy::all)]

/// The `shoal.v1` package: messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// Encoded `FileDescriptorSet` of every `shoal.v1` file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shoal_v1_descriptor");

/// Fully qualified gRPC service names, as health checks and reflection know them.
pub mod service_names {
    /// `shoal.v1.MetricsService`
    pub const METRICS: &str = "shoal.v1.MetricsService";
    /// `shoal.v1.DeciderService`
    pub const DECIDER: &str = "shoal.v1.DeciderService";
    /// `shoal.v1.PoolService`
    pub const POOL: &str = "shoal.v1.PoolService";
    /// `shoal.v1.ProvisionerService`
    pub const PROVISIONER: &str = "shoal.v1.ProvisionerService";
    /// `shoal.v1.ReconcilerService`
    pub const RECONCILER: &str = "shoal.v1.ReconcilerService";
    /// `shoal.v1.NodeProvider`
    pub const NODE_PROVIDER: &str = "shoal.v1.NodeProvider";
    /// `shoal.v1.AuditService`
    pub const AUDIT: &str = "shoal.v1.AuditService";
}
