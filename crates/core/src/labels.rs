//! Labels, annotations and taints Shoal puts on (or reads from) nodes and instances.

/// Cluster an instance belongs to (ownership label on every backend instance).
pub const CLUSTER: &str = "shoal.dev/cluster";
/// NodePool a node or instance belongs to.
pub const POOL: &str = "shoal.dev/pool";
/// NodeClaim id of a node or instance.
pub const CLAIM: &str = "shoal.dev/claim";
/// Node annotation that exempts a node from scale-down.
pub const SCALE_DOWN_DISABLED: &str = "shoal.dev/scale-down-disabled";
/// Taint put on a node while it is being drained.
pub const DISRUPTED_TAINT: &str = "shoal.dev/disrupted";
/// Startup taint a node carries until Shoal has seen it Ready.
pub const UNREGISTERED_TAINT: &str = "shoal.dev/unregistered";
/// Pod or node annotation: never disrupt it voluntarily (scale-down, consolidation).
pub const DO_NOT_DISRUPT: &str = "shoal.dev/do-not-disrupt";
/// Karpenter's name for [`DO_NOT_DISRUPT`], honoured the same way.
pub const KARPENTER_DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";

/// Pods annotated with a ProvisioningRequest's name consume the capacity it booked.
pub const CONSUME_PROVISIONING_REQUEST: &str = "autoscaling.x-k8s.io/consume-provisioning-request";

/// The older annotation Cluster Autoscaler also reads.
pub const CONSUME_PROVISIONING_REQUEST_OLD: &str =
    "cluster-autoscaler.kubernetes.io/consume-provisioning-request";
/// Pod annotation (Cluster Autoscaler's) that marks a pod safe or unsafe to evict.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
