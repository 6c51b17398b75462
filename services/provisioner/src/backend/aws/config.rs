//! `service.backends.aws`: the region (and an endpoint override), how long a (capacity type,
//! instance type, zone) that ran out of capacity is skipped, and the provider classes pools pick.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use shoal_core::ValidationErrors;
use shoal_runtime::secret::Secret;

/// `service.backends.aws`. Credentials come the standard way (environment, shared profile, web
/// identity / IRSA, instance metadata); none is ever part of this config or a log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsBackend {
    /// e.g. `eu-west-1`.
    pub region: String,
    /// Another EC2 endpoint (a VPC endpoint, or a test server); the region's by default.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// A (capacity type, instance type, zone) that answered a capacity error is skipped this
    /// long (as Karpenter does).
    #[serde(with = "humantime_serde", default = "default_unavailable")]
    pub unavailable_for: Duration,
    /// Provider classes by name; a pool's `provider.class` picks one (`default` when empty).
    #[serde(default)]
    pub classes: BTreeMap<String, AwsClass>,
}

fn default_unavailable() -> Duration {
    Duration::from_secs(180)
}

/// `on-demand` or `spot`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    /// Regular instances.
    #[default]
    OnDemand,
    /// Spot instances.
    Spot,
}

impl std::fmt::Display for CapacityType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CapacityType::OnDemand => "on-demand",
            CapacityType::Spot => "spot",
        })
    }
}

/// A launch template by id or name, at a version (`$Default` when empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchTemplateRef {
    /// `lt-…`.
    #[serde(default)]
    pub id: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// A number, `$Latest` or `$Default`.
    #[serde(default)]
    pub version: String,
}

/// One provider class: what an instance of a pool is launched from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsClass {
    /// The launch template (AMI, key, IAM profile, disks… come from it).
    #[serde(default)]
    pub launch_template: Option<LaunchTemplateRef>,
    /// An AMI, when there is no launch template (or to override its AMI).
    #[serde(default)]
    pub image_id: String,
    /// Instance types in order of preference (flexibility: the next is tried when one has no
    /// capacity). The pool's `template.capacity` should be the smallest one's allocatable.
    pub instance_types: Vec<String>,
    /// Subnets, one per zone usually; tried in order for each type.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Security groups.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// User data (e.g. the k3s join with its token: `{ fromFile: /secrets/join.sh }`).
    /// `{{nodeName}}` and `{{nodeLabels}}` (comma-separated `k=v`) are filled in per node.
    #[serde(default)]
    pub user_data: Option<Secret>,
    /// `on-demand` (default) or `spot`.
    #[serde(default)]
    pub capacity_type: CapacityType,
    /// With `spot`: launch on-demand when no spot capacity is found.
    #[serde(default)]
    pub fallback_to_on_demand: bool,
}

impl AwsBackend {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        if self.region.is_empty() {
            errors.add(
                format!("{path}.region"),
                "must name a region, e.g. eu-west-1",
            );
        }
        if let Some(endpoint) = &self.endpoint {
            shoal_runtime::validate_address(&format!("{path}.endpoint"), endpoint, errors);
        }
        if self.unavailable_for < Duration::from_secs(1) {
            errors.add(format!("{path}.unavailableFor"), "must be at least 1s");
        }
        if self.classes.is_empty() {
            errors.add(
                format!("{path}.classes"),
                "needs at least one class (pools pick one with provider.class)",
            );
        }
        for (name, class) in &self.classes {
            class.validate(&format!("{path}.classes.{name}"), errors);
        }
    }
}

impl AwsClass {
    fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        match &self.launch_template {
            Some(t) if t.id.is_empty() == t.name.is_empty() => errors.add(
                format!("{path}.launchTemplate"),
                "needs exactly one of id and name",
            ),
            None if self.image_id.is_empty() => errors.add(
                format!("{path}.imageId"),
                "needs an AMI when there is no launchTemplate",
            ),
            _ => {}
        }
        if self.instance_types.is_empty() {
            errors.add(
                format!("{path}.instanceTypes"),
                "needs at least one instance type",
            );
        }
        for (i, t) in self.instance_types.iter().enumerate() {
            if !t.contains('.') {
                errors.add(
                    format!("{path}.instanceTypes[{i}]"),
                    format!("{t:?} is not an instance type (family.size, e.g. m5.large)"),
                );
            }
        }
        if self.fallback_to_on_demand && self.capacity_type != CapacityType::Spot {
            errors.add(
                format!("{path}.fallbackToOnDemand"),
                "only means something with capacityType: spot",
            );
        }
    }
}
