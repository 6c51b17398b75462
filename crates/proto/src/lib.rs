//! Generated gRPC code for the `shoal.v1` API, plus the encoded FileDescriptorSet that server
//! reflection serves.
#![allow(missing_docs, clippy::all)]

/// The `shoal.v1` package: messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// Cluster Autoscaler's `clusterautoscaler.cloudprovider.v1.externalgrpc` protocol (Shoal's own
/// wire-compatible definition): the `CloudProvider` client and server.
pub mod externalgrpc {
    tonic::include_proto!("clusterautoscaler.cloudprovider.v1.externalgrpc");
}

/// The part of Kubernetes' protobuf encoding of a `core/v1` Node that template nodes need.
pub mod k8s {
    tonic::include_proto!("shoal.k8s.v1");
}

/// Encoded `FileDescriptorSet` of every `shoal.v1` file and the externalgrpc protocol, for
/// tonic-reflection.
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
    /// Cluster Autoscaler's external gRPC cloud provider.
    pub const EXTERNAL_GRPC: &str = "clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider";
}
