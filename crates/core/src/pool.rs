//! NodePools: the YAML form users write (`apiVersion: shoal.dev/v1alpha1`, `kind: NodePool`),
//! its wire form (`shoal.v1.NodePool`), and [`Pool`], the validated, parsed form the planner and
//! the provisioner use. Validation reports every problem with its field path
//! (`spec.limits.maxNodes: ...`), in the YAML's names.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use shoal_proto::v1 as pb;

use crate::{
    Resources, ValidationErrors,
    fit::{NodeFacts, Taint},
    labels,
    quantity::{parse_cpu_millis, parse_memory_bytes},
    schedule::{self, Window},
    snapshot::{effect_from_name, effect_from_proto, effect_name, effect_to_proto},
};

/// `apiVersion` of NodePool documents.
pub const API_VERSION: &str = "shoal.dev/v1alpha1";
/// Backends this build has; a pool naming another is refused.
pub const BACKENDS: [&str; 4] = ["aws", "docker", "proxmox", "sim"];
/// Pod slots of a node whose template does not say.
pub const DEFAULT_PODS: i64 = 110;
/// Default `scaleUp.batchSize`: the nodes one decision may add to a pool. Large, so a burst is
/// met in one decision (backend load is bounded by `maxConcurrent`, not by this).
pub const DEFAULT_BATCH_SIZE: u32 = 500;
/// Default `scaleUp.maxConcurrent`: backend create calls in flight per pool (booting nodes do
/// not hold a slot).
pub const DEFAULT_MAX_CONCURRENT: u32 = 50;
/// Most nodes a pool may hold (and one call may create): what a pool's records can carry.
pub const MAX_NODES: u32 = 10_000;
/// Most backend calls in flight a pool may ask for.
pub const MAX_CONCURRENT: u32 = 1_000;
/// Most pod slots a node template may declare.
pub const MAX_PODS_PER_NODE: i64 = 10_000;
/// Longest cooldown or stabilization window.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(24 * 3600);
/// Longest `scaleDown.unneededFor`.
pub const MAX_UNNEEDED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `scaleDown.drainTimeout`.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

// ---- the YAML form ---------------------------------------------------------------------------

/// A quantity as YAML gives it: `4`, `"500m"`, `8Gi`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuantityDoc {
    /// A number.
    Number(f64),
    /// A Kubernetes quantity string.
    Text(String),
}

/// A Kubernetes quantity in a schema: an integer or a string, as `IntOrString` is published.
fn quantity_schema() -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{ "type": "integer" }, { "type": "string" }]
    })
}

impl JsonSchema for QuantityDoc {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        quantity_schema()
    }
}

/// Resource amounts are a map in the schema (`cpu`, `memory`, `pods`, `ephemeral-storage` and
/// extended resources alike): a structural schema cannot mix fixed and free keys.
impl JsonSchema for ResourcesDoc {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Resources".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": quantity_schema()
        })
    }
}

impl QuantityDoc {
    fn text(&self) -> String {
        match self {
            QuantityDoc::Number(n) => n.to_string(),
            QuantityDoc::Text(s) => s.clone(),
        }
    }
}

/// Resource amounts as YAML gives them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcesDoc {
    /// CPU, e.g. `"4"` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<QuantityDoc>,
    /// Memory, e.g. `8Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<QuantityDoc>,
    /// Pod slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<QuantityDoc>,
    /// Ephemeral storage.
    #[serde(
        default,
        rename = "ephemeral-storage",
        skip_serializing_if = "Option::is_none"
    )]
    pub ephemeral_storage: Option<QuantityDoc>,
    /// Extended resources, e.g. `nvidia.com/gpu: 1`.
    #[serde(flatten)]
    pub extended: BTreeMap<String, QuantityDoc>,
}

/// A taint as YAML gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaintDoc {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    pub effect: String,
}

/// `spec.provider`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderDoc {
    /// sim, docker, proxmox, aws or plugin:<name>.
    pub backend: String,
    /// Backend-specific template.
    #[serde(default)]
    pub class: String,
}

fn on_demand() -> String {
    "on-demand".into()
}

/// `spec.template`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateDoc {
    /// Node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    #[serde(default)]
    pub taints: Vec<TaintDoc>,
    /// Taints until Shoal sees the node Ready.
    #[serde(default)]
    pub startup_taints: Vec<TaintDoc>,
    /// Allocatable resources of one node.
    #[serde(default)]
    pub capacity: ResourcesDoc,
    /// What the backend spends per node on top of capacity.
    #[serde(default)]
    pub overhead: ResourcesDoc,
    /// Price per node-hour.
    #[serde(default)]
    pub price: f64,
    /// on-demand or spot.
    #[serde(default = "on_demand")]
    pub capacity_type: String,
}

/// `spec.limits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsDoc {
    /// Fewest nodes.
    #[serde(default)]
    pub min_nodes: u32,
    /// Most nodes.
    pub max_nodes: u32,
    /// Most CPU over all nodes (capacity + overhead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<QuantityDoc>,
    /// Most memory over all nodes (capacity + overhead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<QuantityDoc>,
}

/// `spec.scaleUp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ScaleUpDoc {
    /// Nodes per decision.
    pub batch_size: u32,
    /// Creations in flight.
    pub max_concurrent: u32,
    /// After a scale-up.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub cooldown: Duration,
    /// How long a trigger must hold.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stabilization_window: Duration,
    /// Pending pods that trigger.
    pub pending_pods: u32,
    /// Average CPU % that triggers (0: off).
    pub cpu_above: f64,
    /// Average memory % that triggers (0: off).
    pub memory_above: f64,
}

impl Default for ScaleUpDoc {
    fn default() -> Self {
        ScaleUpDoc {
            batch_size: DEFAULT_BATCH_SIZE,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            cooldown: Duration::ZERO,
            stabilization_window: Duration::ZERO,
            pending_pods: 1,
            cpu_above: 0.0,
            memory_above: 0.0,
        }
    }
}

/// `spec.scaleDown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ScaleDownDoc {
    /// Whether the pool shrinks at all.
    pub enabled: bool,
    /// Requested/allocatable below which a node is unneeded.
    pub utilization_below: f64,
    /// Measured CPU % below which a node is unneeded (0: not checked).
    pub cpu_below: f64,
    /// Measured memory % below which a node is unneeded (0: not checked).
    pub memory_below: f64,
    /// How long a node must be unneeded.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub unneeded_for: Duration,
    /// After a scale-up or scale-down.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub cooldown: Duration,
    /// Nodes per decision.
    pub max_concurrent: u32,
    /// How long evictions may be retried.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// lifo or least-utilized.
    pub order: String,
    /// Delete pods still blocked after drainTimeout.
    pub force_after_drain_timeout: bool,
    /// Most nodes disrupted at once, draining ones included: "N" or "N%" (empty: no limit).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disruption_budget: String,
    /// Consolidate nodes with pods only after the pool's pods stop changing for this long.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub consolidate_after: Duration,
    /// Budgets that apply only while a recurring window is active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disruption_budgets: Vec<BudgetWindowDoc>,
}

/// One `spec.scaleDown.disruptionBudgets` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetWindowDoc {
    /// Shown in decisions.
    #[serde(default)]
    pub name: String,
    /// "N" or "N%".
    pub nodes: String,
    /// e.g. Mon-Fri.
    pub days: String,
    /// e.g. "09:00-17:00".
    pub between: String,
    /// IANA time zone (UTC when omitted).
    #[serde(default)]
    pub timezone: String,
}

impl Default for ScaleDownDoc {
    fn default() -> Self {
        ScaleDownDoc {
            enabled: true,
            utilization_below: 0.5,
            cpu_below: 0.0,
            memory_below: 0.0,
            unneeded_for: Duration::from_secs(600),
            cooldown: Duration::from_secs(120),
            max_concurrent: 1,
            drain_timeout: Duration::from_secs(300),
            order: "lifo".into(),
            force_after_drain_timeout: false,
            disruption_budget: String::new(),
            consolidate_after: Duration::ZERO,
            disruption_budgets: Vec::new(),
        }
    }
}

/// One `spec.schedule` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowDoc {
    /// Name.
    pub name: String,
    /// e.g. Mon-Fri.
    pub days: String,
    /// e.g. "09:00-17:00".
    pub between: String,
    /// IANA time zone (UTC when omitted).
    #[serde(default)]
    pub timezone: String,
    /// minNodes while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_nodes: Option<u32>,
    /// maxNodes while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<u32>,
}

/// `spec.predictive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PredictiveDoc {
    /// Whether forecasts adjust the bounds.
    pub enabled: bool,
    /// History looked at.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lookback: Duration,
    /// How far ahead.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub horizon: Duration,
}

impl Default for PredictiveDoc {
    fn default() -> Self {
        PredictiveDoc {
            enabled: false,
            lookback: Duration::from_secs(3600),
            horizon: Duration::from_secs(900),
        }
    }
}

/// `spec`. Also the spec of the `NodePool` custom resource (`kubectl get nodepools`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, kube::CustomResource)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "NodePool",
    shortname = "np",
    status = "crate::crd::NodePoolStatus",
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodes"}"#,
    printcolumn = r#"{"name":"Min","type":"integer","jsonPath":".spec.limits.minNodes"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.limits.maxNodes"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".spec.provider.backend","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    /// Where nodes come from.
    pub provider: ProviderDoc,
    /// What a node looks like.
    pub template: TemplateDoc,
    /// Size bounds.
    pub limits: LimitsDoc,
    /// Never removed.
    #[serde(default)]
    pub permanent_nodes: Vec<String>,
    /// Priority expander weight.
    #[serde(default)]
    pub weight: i32,
    /// Growing.
    #[serde(default)]
    pub scale_up: ScaleUpDoc,
    /// Shrinking.
    #[serde(default)]
    pub scale_down: ScaleDownDoc,
    /// Time-based bounds.
    #[serde(default)]
    pub schedule: Vec<WindowDoc>,
    /// Forecasts.
    #[serde(default)]
    pub predictive: PredictiveDoc,
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataDoc {
    /// The pool's name.
    pub name: String,
}

/// A NodePool document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolDocument {
    /// `shoal.dev/v1alpha1`.
    pub api_version: String,
    /// `NodePool`.
    pub kind: String,
    /// Name.
    pub metadata: MetadataDoc,
    /// Spec.
    pub spec: SpecDoc,
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn resources_doc(doc: &ResourcesDoc, path: &str, errors: &mut ValidationErrors) -> pb::Resources {
    let mut out = pb::Resources::default();
    let mut parse = |field: &str, q: &Option<QuantityDoc>, cpu: bool| -> i64 {
        let Some(q) = q else { return 0 };
        let text = q.text();
        let parsed = if cpu {
            parse_cpu_millis(&text)
        } else {
            parse_memory_bytes(&text)
        };
        parsed.unwrap_or_else(|e| {
            errors.add(format!("{path}.{field}"), e.to_string());
            0
        })
    };
    out.cpu_millis = parse("cpu", &doc.cpu, true);
    out.memory_bytes = parse("memory", &doc.memory, false);
    out.pods = parse("pods", &doc.pods, false);
    out.ephemeral_storage_bytes = parse("ephemeral-storage", &doc.ephemeral_storage, false);
    for (name, q) in &doc.extended {
        let v = parse(name, &Some(q.clone()), false);
        out.extended.insert(name.clone(), v);
    }
    out
}

fn taints_doc(taints: &[TaintDoc], path: &str, errors: &mut ValidationErrors) -> Vec<pb::Taint> {
    taints
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let effect = match effect_from_name(&t.effect) {
                Some(e) => effect_to_proto(e) as i32,
                None => {
                    errors.add(
                        format!("{path}[{i}].effect"),
                        format!(
                            "{:?} is not NoSchedule, PreferNoSchedule or NoExecute",
                            t.effect
                        ),
                    );
                    0
                }
            };
            pb::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect,
            }
        })
        .collect()
}

impl PoolDocument {
    /// Parses one YAML document. Type errors name the field where parsing stopped.
    pub fn from_yaml(text: &str) -> Result<PoolDocument, ValidationErrors> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let mut errors = ValidationErrors::default();
            let path = if path == "." {
                "(document)".into()
            } else {
                path
            };
            errors.add(path, e.inner().to_string());
            errors
        })
    }

    /// Parses every document of a multi-document YAML text (`---` separated).
    pub fn all_from_yaml(text: &str) -> Result<Vec<PoolDocument>, ValidationErrors> {
        let mut out = Vec::new();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let doc: PoolDocument = serde_path_to_error::deserialize(de).map_err(|e| {
                let mut errors = ValidationErrors::default();
                errors.add(
                    format!("document {} at {}", i + 1, e.path()),
                    e.inner().to_string(),
                );
                errors
            })?;
            out.push(doc);
        }
        Ok(out)
    }

    /// The wire form, with every default filled in; quantity and effect errors are collected.
    pub fn to_proto(&self) -> Result<pb::NodePool, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if self.api_version != API_VERSION {
            errors.add(
                "apiVersion",
                format!("{:?} is not {API_VERSION}", self.api_version),
            );
        }
        if self.kind != "NodePool" {
            errors.add("kind", format!("{:?} is not NodePool", self.kind));
        }
        let s = &self.spec;
        let limit = |q: &Option<QuantityDoc>,
                     path: &str,
                     cpu: bool,
                     errors: &mut ValidationErrors|
         -> i64 {
            let Some(q) = q else { return 0 };
            let text = q.text();
            let parsed = if cpu {
                parse_cpu_millis(&text)
            } else {
                parse_memory_bytes(&text)
            };
            parsed.unwrap_or_else(|e| {
                errors.add(path, e.to_string());
                0
            })
        };
        let max_resources = pb::Resources {
            cpu_millis: limit(&s.limits.cpu, "spec.limits.cpu", true, &mut errors),
            memory_bytes: limit(&s.limits.memory, "spec.limits.memory", false, &mut errors),
            ..Default::default()
        };
        let order = match s.scale_down.order.as_str() {
            "lifo" => pb::ScaleDownOrder::Lifo,
            "least-utilized" => pb::ScaleDownOrder::LeastUtilized,
            other => {
                errors.add(
                    "spec.scaleDown.order",
                    format!("{other:?} is not lifo or least-utilized"),
                );
                pb::ScaleDownOrder::Unspecified
            }
        };
        let spec = pb::NodePoolSpec {
            provider: Some(pb::ProviderRef {
                backend: s.provider.backend.clone(),
                class: s.provider.class.clone(),
            }),
            template: Some(pb::NodeTemplate {
                labels: s.template.labels.clone(),
                taints: taints_doc(&s.template.taints, "spec.template.taints", &mut errors),
                startup_taints: taints_doc(
                    &s.template.startup_taints,
                    "spec.template.startupTaints",
                    &mut errors,
                ),
                capacity: Some(resources_doc(
                    &s.template.capacity,
                    "spec.template.capacity",
                    &mut errors,
                )),
                overhead: Some(resources_doc(
                    &s.template.overhead,
                    "spec.template.overhead",
                    &mut errors,
                )),
                price: s.template.price,
                capacity_type: s.template.capacity_type.clone(),
            }),
            limits: Some(pb::PoolLimits {
                min_nodes: s.limits.min_nodes as i32,
                max_nodes: s.limits.max_nodes as i32,
                max_resources: Some(max_resources),
            }),
            permanent_nodes: s.permanent_nodes.clone(),
            weight: s.weight,
            scale_up: Some(pb::ScaleUpPolicy {
                batch_size: s.scale_up.batch_size as i32,
                max_concurrent: s.scale_up.max_concurrent as i32,
                cooldown: duration(s.scale_up.cooldown),
                stabilization_window: duration(s.scale_up.stabilization_window),
                pending_pods: s.scale_up.pending_pods as i32,
                cpu_above: s.scale_up.cpu_above,
                memory_above: s.scale_up.memory_above,
            }),
            scale_down: Some(pb::ScaleDownPolicy {
                enabled: s.scale_down.enabled,
                utilization_below: s.scale_down.utilization_below,
                cpu_below: s.scale_down.cpu_below,
                memory_below: s.scale_down.memory_below,
                unneeded_for: duration(s.scale_down.unneeded_for),
                cooldown: duration(s.scale_down.cooldown),
                max_concurrent: s.scale_down.max_concurrent as i32,
                drain_timeout: duration(s.scale_down.drain_timeout),
                order: order as i32,
                force_after_drain_timeout: s.scale_down.force_after_drain_timeout,
                disruption_budget: s.scale_down.disruption_budget.clone(),
                consolidate_after: duration(s.scale_down.consolidate_after),
                disruption_budgets: s
                    .scale_down
                    .disruption_budgets
                    .iter()
                    .map(|b| pb::DisruptionBudgetWindow {
                        name: b.name.clone(),
                        nodes: b.nodes.clone(),
                        days: b.days.clone(),
                        between: b.between.clone(),
                        timezone: b.timezone.clone(),
                    })
                    .collect(),
            }),
            schedule: s
                .schedule
                .iter()
                .map(|w| pb::ScheduleWindow {
                    name: w.name.clone(),
                    days: w.days.clone(),
                    between: w.between.clone(),
                    timezone: w.timezone.clone(),
                    min_nodes: w.min_nodes.map(|n| n as i32),
                    max_nodes: w.max_nodes.map(|n| n as i32),
                })
                .collect(),
            predictive: Some(pb::PredictivePolicy {
                enabled: s.predictive.enabled,
                lookback: duration(s.predictive.lookback),
                horizon: duration(s.predictive.horizon),
            }),
        };
        errors.into_result(pb::NodePool {
            name: self.metadata.name.clone(),
            spec: Some(spec),
            revision: 0,
            updated_at: None,
        })
    }
}

// ---- the validated form ----------------------------------------------------------------------

/// Growing a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleUpPolicy {
    /// Most nodes per decision.
    pub batch_size: u32,
    /// Creations in flight.
    pub max_concurrent: u32,
    /// After a scale-up.
    pub cooldown: Duration,
    /// How long a trigger must hold.
    pub stabilization_window: Duration,
    /// Pending pods that trigger.
    pub pending_pods: u32,
    /// Average CPU % that triggers (0: off).
    pub cpu_above: f64,
    /// Average memory % that triggers (0: off).
    pub memory_above: f64,
}

/// Order of scale-down candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDownOrder {
    /// Newest first.
    Lifo,
    /// Least requested first.
    LeastUtilized,
}

/// Shrinking a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDownPolicy {
    /// Whether the pool shrinks.
    pub enabled: bool,
    /// Requested/allocatable (0..1) below which a node is unneeded.
    pub utilization_below: f64,
    /// Measured CPU % (0: not checked).
    pub cpu_below: f64,
    /// Measured memory % (0: not checked).
    pub memory_below: f64,
    /// How long a node must be unneeded.
    pub unneeded_for: Duration,
    /// After a scale-up or scale-down.
    pub cooldown: Duration,
    /// Nodes per decision.
    pub max_concurrent: u32,
    /// How long evictions may be retried.
    pub drain_timeout: Duration,
    /// Candidate order.
    pub order: ScaleDownOrder,
    /// Delete pods still blocked after the drain timeout.
    pub force_after_drain_timeout: bool,
    /// Most nodes disrupted at once, draining ones included.
    pub disruption_budget: Option<DisruptionBudget>,
    /// Nodes with pods are consolidated only after the pool's pods stop changing this long.
    pub consolidate_after: Duration,
    /// Budgets that apply while their window is active.
    pub disruption_windows: Vec<(DisruptionBudget, Window)>,
}

impl ScaleDownPolicy {
    /// Most nodes of a pool of `nodes` that may be disrupted at `at`: the smallest of
    /// `disruptionBudget` and the budgets of the windows active then, with what set it ("2",
    /// or "0 (window business-hours)"). `None`: no budget applies.
    pub fn disruption_allowed(
        &self,
        nodes: u32,
        at: std::time::SystemTime,
    ) -> Option<(u32, String)> {
        let always = self
            .disruption_budget
            .map(|b| (b.allowed(nodes), b.to_string()));
        let windows = self
            .disruption_windows
            .iter()
            .filter(|(_, w)| w.is_active(at))
            .map(|(b, w)| (b.allowed(nodes), format!("{b} (window {})", w.name)));
        always.into_iter().chain(windows).min_by_key(|(n, _)| *n)
    }
}

impl std::fmt::Display for DisruptionBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisruptionBudget::Nodes(n) => write!(f, "{n}"),
            DisruptionBudget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `scaleDown.disruptionBudget`: a node count or a share of the pool's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisruptionBudget {
    /// At most this many nodes.
    Nodes(u32),
    /// At most this percentage of the pool's nodes, rounded up.
    Percent(u32),
}

impl DisruptionBudget {
    /// Parses "N" or "N%" (0–100 %).
    pub fn parse(text: &str) -> Result<DisruptionBudget, String> {
        let text = text.trim();
        let bad = || format!("{text:?} is not a node count (\"2\") or a percentage (\"10%\")");
        if let Some(percent) = text.strip_suffix('%') {
            let p: u32 = percent.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(format!("{text:?} is more than 100%"));
            }
            return Ok(DisruptionBudget::Percent(p));
        }
        text.parse().map(DisruptionBudget::Nodes).map_err(|_| bad())
    }

    /// Nodes the budget allows in a pool of `nodes`.
    pub fn allowed(self, nodes: u32) -> u32 {
        match self {
            DisruptionBudget::Nodes(n) => n,
            DisruptionBudget::Percent(p) => (nodes * p).div_ceil(100),
        }
    }
}

/// A validated NodePool.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Backend.
    pub backend: String,
    /// Provider class.
    pub class: String,
    /// Node labels, with `shoal.dev/pool: <name>` added.
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Taints until Ready.
    pub startup_taints: Vec<Taint>,
    /// Allocatable of one node (pods defaulted to 110).
    pub capacity: Resources,
    /// Spent per node on top of capacity.
    pub overhead: Resources,
    /// Per node-hour.
    pub price: f64,
    /// on-demand or spot.
    pub capacity_type: String,
    /// Fewest nodes.
    pub min_nodes: u32,
    /// Most nodes.
    pub max_nodes: u32,
    /// Most CPU (millicores) over all nodes, capacity + overhead.
    pub max_cpu_millis: Option<i64>,
    /// Most memory over all nodes, capacity + overhead.
    pub max_memory_bytes: Option<i64>,
    /// Never removed.
    pub permanent_nodes: BTreeSet<String>,
    /// Priority expander weight.
    pub weight: i32,
    /// Growing.
    pub scale_up: ScaleUpPolicy,
    /// Shrinking.
    pub scale_down: ScaleDownPolicy,
    /// Time-based bounds.
    pub schedule: Vec<Window>,
}

/// A pool's size bounds at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    /// Fewest nodes.
    pub min: u32,
    /// Most nodes (maxNodes and the resource limits).
    pub max: u32,
    /// The schedule window that set them, if any.
    pub window: Option<String>,
}

fn std_duration(
    d: &Option<prost_types::Duration>,
    path: &str,
    errors: &mut ValidationErrors,
) -> Duration {
    match d {
        None => Duration::ZERO,
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            errors.add(path, "must not be negative");
            Duration::ZERO
        }
        Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
    }
}

/// Seconds in the largest unit that divides them: `87600000h`, `1d`, `90s`.
fn whole_units(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A duration that must also not exceed `max` (a 10,000-year cooldown is a typo, not a policy).
fn bounded_duration(
    d: &Option<prost_types::Duration>,
    path: &str,
    max: Duration,
    errors: &mut ValidationErrors,
) -> Duration {
    if let Some(v) = d
        && v.seconds >= 0
        && (v.seconds as u64) > max.as_secs()
    {
        errors.add(
            path,
            format!(
                "{} is longer than the most allowed, {}",
                whole_units(v.seconds as u64),
                whole_units(max.as_secs())
            ),
        );
        return Duration::ZERO;
    }
    std_duration(d, path, errors)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn taints_from(taints: &[pb::Taint], path: &str, errors: &mut ValidationErrors) -> Vec<Taint> {
    let mut out = Vec::new();
    for (i, t) in taints.iter().enumerate() {
        if t.key.is_empty() {
            errors.add(format!("{path}[{i}].key"), "must not be empty");
        }
        match effect_from_proto(t.effect) {
            Some(effect) => out.push(Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect,
            }),
            None => errors.add(
                format!("{path}[{i}].effect"),
                "must be NoSchedule, PreferNoSchedule or NoExecute",
            ),
        }
    }
    out
}

fn percent(value: f64, path: &str, errors: &mut ValidationErrors) {
    if !(0.0..=100.0).contains(&value) {
        errors.add(
            path,
            format!("{value} is not a percentage between 0 and 100"),
        );
    }
}

impl Pool {
    /// Validates a wire-form pool; every problem is reported with its field path.
    pub fn from_proto(pool: &pb::NodePool) -> Result<Pool, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        if !is_dns_label(&pool.name) {
            errors.add(
                "metadata.name",
                format!(
                    "{:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                    pool.name
                ),
            );
        }
        let default_spec = pb::NodePoolSpec::default();
        let spec = pool.spec.as_ref().unwrap_or(&default_spec);
        let provider = spec.provider.clone().unwrap_or_default();
        let plugin = provider
            .backend
            .strip_prefix("plugin:")
            .or_else(|| provider.backend.strip_prefix("externalgrpc:"));
        if let Some(name) = plugin {
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid {
                errors.add(
                    "spec.provider.backend",
                    format!(
                        "{:?}: a plugin name is lower-case letters, digits and -",
                        provider.backend
                    ),
                );
            }
        } else if !BACKENDS.contains(&provider.backend.as_str()) {
            errors.add(
                "spec.provider.backend",
                format!(
                    "{:?} is not a backend this build has (it has: {}, plugin:<name> and externalgrpc:<name>)",
                    provider.backend,
                    BACKENDS.join(", ")
                ),
            );
        }
        let template = spec.template.clone().unwrap_or_default();
        let mut capacity: Resources = template
            .capacity
            .as_ref()
            .map(Resources::from)
            .unwrap_or_default();
        if capacity.pods == 0 {
            capacity.pods = DEFAULT_PODS;
        }
        if capacity.ephemeral_storage_bytes == 0 {
            // Unsaid: plenty (pods rarely request it; the simulator's nodes report 100Gi).
            capacity.ephemeral_storage_bytes = 100 << 30;
        }
        for (field, value) in [
            ("cpu", capacity.cpu_millis),
            ("memory", capacity.memory_bytes),
        ] {
            if value <= 0 {
                errors.add(
                    format!("spec.template.capacity.{field}"),
                    "must be set and above zero",
                );
            }
        }
        if capacity.pods < 0 || capacity.pods > MAX_PODS_PER_NODE {
            errors.add(
                "spec.template.capacity.pods",
                format!("{} is not between 0 and {MAX_PODS_PER_NODE}", capacity.pods),
            );
        }
        let overhead: Resources = template
            .overhead
            .as_ref()
            .map(Resources::from)
            .unwrap_or_default();
        if overhead.cpu_millis < 0 || overhead.memory_bytes < 0 {
            errors.add("spec.template.overhead", "must not be negative");
        }
        if !template.price.is_finite() || template.price < 0.0 {
            errors.add("spec.template.price", "must be a non-negative number");
        }
        let capacity_type = if template.capacity_type.is_empty() {
            "on-demand".to_string()
        } else {
            template.capacity_type.clone()
        };
        if capacity_type != "on-demand" && capacity_type != "spot" {
            errors.add(
                "spec.template.capacityType",
                format!("{capacity_type:?} is not on-demand or spot"),
            );
        }
        let taints = taints_from(&template.taints, "spec.template.taints", &mut errors);
        let startup_taints = taints_from(
            &template.startup_taints,
            "spec.template.startupTaints",
            &mut errors,
        );
        for (k, _) in template.labels.iter() {
            if k.is_empty() || k.contains(char::is_whitespace) {
                errors.add("spec.template.labels", format!("{k:?} is not a label key"));
            }
        }
        let mut labels = template.labels.clone();
        labels.insert(labels::POOL.to_string(), pool.name.clone());

        let limits = spec.limits.clone().unwrap_or_default();
        if limits.max_nodes < 1 || limits.max_nodes as i64 > MAX_NODES as i64 {
            errors.add(
                "spec.limits.maxNodes",
                format!("{} is not between 1 and {MAX_NODES}", limits.max_nodes),
            );
        }
        if limits.min_nodes < 0 || limits.min_nodes as i64 > MAX_NODES as i64 {
            errors.add(
                "spec.limits.minNodes",
                format!("{} is not between 0 and {MAX_NODES}", limits.min_nodes),
            );
        }
        if limits.min_nodes > limits.max_nodes && limits.max_nodes >= 1 {
            errors.add(
                "spec.limits.minNodes",
                format!(
                    "{} is above maxNodes ({})",
                    limits.min_nodes, limits.max_nodes
                ),
            );
        }
        let max_resources = limits.max_resources.clone().unwrap_or_default();
        let node_cost = capacity.saturating_add(&overhead);
        let max_cpu_millis = (max_resources.cpu_millis > 0).then_some(max_resources.cpu_millis);
        let max_memory_bytes =
            (max_resources.memory_bytes > 0).then_some(max_resources.memory_bytes);
        if max_resources.cpu_millis < 0 || max_resources.memory_bytes < 0 {
            errors.add("spec.limits", "cpu and memory limits must not be negative");
        }
        if let Some(cpu) = max_cpu_millis
            && capacity.cpu_millis > 0
            && cpu < node_cost.cpu_millis
        {
            errors.add(
                "spec.limits.cpu",
                format!(
                    "{cpu}m is below one node ({}m capacity + overhead): the pool could never have a node",
                    node_cost.cpu_millis
                ),
            );
        }
        if let Some(memory) = max_memory_bytes
            && capacity.memory_bytes > 0
            && memory < node_cost.memory_bytes
        {
            errors.add(
                "spec.limits.memory",
                format!(
                    "{memory} bytes is below one node ({} bytes capacity + overhead): the pool could never have a node",
                    node_cost.memory_bytes
                ),
            );
        }
        if spec.permanent_nodes.len() > MAX_NODES as usize {
            errors.add(
                "spec.permanentNodes",
                format!(
                    "lists {} nodes; at most {MAX_NODES}",
                    spec.permanent_nodes.len()
                ),
            );
        }
        let mut permanent_nodes = BTreeSet::new();
        for (i, name) in spec.permanent_nodes.iter().enumerate() {
            if name.is_empty() || name.len() > 253 {
                errors.add(format!("spec.permanentNodes[{i}]"), "is not a node name");
            }
            if !permanent_nodes.insert(name.clone()) {
                errors.add(
                    format!("spec.permanentNodes[{i}]"),
                    format!("{name} is listed twice"),
                );
            }
        }

        let up = spec.scale_up.unwrap_or_default();
        let or = |v: i32, default: u32| if v == 0 { default } else { v.max(0) as u32 };
        for (field, value, max) in [
            ("batchSize", up.batch_size, MAX_NODES),
            ("maxConcurrent", up.max_concurrent, MAX_CONCURRENT),
            ("pendingPods", up.pending_pods, 1_000_000),
        ] {
            if value < 0 || value as i64 > max as i64 {
                errors.add(
                    format!("spec.scaleUp.{field}"),
                    format!("{value} is not between 0 (default) and {max}"),
                );
            }
        }
        percent(up.cpu_above, "spec.scaleUp.cpuAbove", &mut errors);
        percent(up.memory_above, "spec.scaleUp.memoryAbove", &mut errors);
        let scale_up = ScaleUpPolicy {
            batch_size: or(up.batch_size, DEFAULT_BATCH_SIZE),
            max_concurrent: or(up.max_concurrent, DEFAULT_MAX_CONCURRENT),
            cooldown: bounded_duration(
                &up.cooldown,
                "spec.scaleUp.cooldown",
                MAX_COOLDOWN,
                &mut errors,
            ),
            stabilization_window: bounded_duration(
                &up.stabilization_window,
                "spec.scaleUp.stabilizationWindow",
                MAX_COOLDOWN,
                &mut errors,
            ),
            pending_pods: or(up.pending_pods, 1),
            cpu_above: up.cpu_above,
            memory_above: up.memory_above,
        };

        let down = spec.scale_down.clone().unwrap_or_default();
        if !(0.0..=1.0).contains(&down.utilization_below) {
            errors.add(
                "spec.scaleDown.utilizationBelow",
                format!(
                    "{} is not a fraction between 0 and 1",
                    down.utilization_below
                ),
            );
        }
        percent(down.cpu_below, "spec.scaleDown.cpuBelow", &mut errors);
        percent(down.memory_below, "spec.scaleDown.memoryBelow", &mut errors);
        if down.max_concurrent < 0 || down.max_concurrent as i64 > MAX_CONCURRENT as i64 {
            errors.add(
                "spec.scaleDown.maxConcurrent",
                format!(
                    "{} is not between 0 (default) and {MAX_CONCURRENT}",
                    down.max_concurrent
                ),
            );
        }
        let order = match pb::ScaleDownOrder::try_from(down.order) {
            Ok(pb::ScaleDownOrder::LeastUtilized) => ScaleDownOrder::LeastUtilized,
            Ok(_) => ScaleDownOrder::Lifo,
            Err(_) => {
                errors.add("spec.scaleDown.order", "is not lifo or least-utilized");
                ScaleDownOrder::Lifo
            }
        };
        let scale_down = ScaleDownPolicy {
            enabled: down.enabled,
            utilization_below: down.utilization_below,
            cpu_below: down.cpu_below,
            memory_below: down.memory_below,
            unneeded_for: bounded_duration(
                &down.unneeded_for,
                "spec.scaleDown.unneededFor",
                MAX_UNNEEDED_FOR,
                &mut errors,
            ),
            cooldown: bounded_duration(
                &down.cooldown,
                "spec.scaleDown.cooldown",
                MAX_COOLDOWN,
                &mut errors,
            ),
            max_concurrent: or(down.max_concurrent, 1),
            drain_timeout: bounded_duration(
                &down.drain_timeout,
                "spec.scaleDown.drainTimeout",
                MAX_DRAIN_TIMEOUT,
                &mut errors,
            ),
            order,
            force_after_drain_timeout: down.force_after_drain_timeout,
            disruption_budget: if down.disruption_budget.is_empty() {
                None
            } else {
                DisruptionBudget::parse(&down.disruption_budget)
                    .map_err(|why| errors.add("spec.scaleDown.disruptionBudget", why))
                    .ok()
            },
            consolidate_after: bounded_duration(
                &down.consolidate_after,
                "spec.scaleDown.consolidateAfter",
                MAX_UNNEEDED_FOR,
                &mut errors,
            ),
            disruption_windows: budget_windows(&down.disruption_budgets, &mut errors),
        };

        let mut schedule: Vec<Window> = Vec::new();
        let mut indices: Vec<usize> = Vec::new();
        let mut names = BTreeSet::new();
        for (i, w) in spec.schedule.iter().enumerate() {
            let path = format!("spec.schedule[{i}]");
            if w.name.is_empty() {
                errors.add(format!("{path}.name"), "must not be empty");
            } else if !names.insert(w.name.clone()) {
                errors.add(
                    format!("{path}.name"),
                    format!("{:?} is used twice", w.name),
                );
            }
            let bound = |v: Option<i32>, field: &str, errors: &mut ValidationErrors| {
                v.and_then(|n| {
                    if n < 0 || n as i64 > MAX_NODES as i64 {
                        errors.add(
                            format!("{path}.{field}"),
                            format!("{n} is not between 0 and {MAX_NODES}"),
                        );
                        None
                    } else {
                        Some(n as u32)
                    }
                })
            };
            let (min, max) = (
                bound(w.min_nodes, "minNodes", &mut errors),
                bound(w.max_nodes, "maxNodes", &mut errors),
            );
            let eff_min = min.unwrap_or(limits.min_nodes.max(0) as u32);
            let eff_max = max.unwrap_or(limits.max_nodes.max(0) as u32);
            // Only the window's own overrides are its problem; the pool's are reported above.
            if (min.is_some() || max.is_some()) && eff_min > eff_max {
                errors.add(
                    format!("{path}.minNodes"),
                    format!("{eff_min} is above the window's maxNodes ({eff_max})"),
                );
            }
            match Window::parse(&w.name, &w.days, &w.between, &w.timezone, min, max) {
                Ok(window) => {
                    for (j, earlier) in indices.iter().zip(&schedule) {
                        if window.overlaps(earlier) {
                            errors.add(
                                path.clone(),
                                format!(
                                    "overlaps spec.schedule[{j}] ({:?}); windows must not overlap",
                                    earlier.name
                                ),
                            );
                        }
                    }
                    schedule.push(window);
                    indices.push(i);
                }
                Err(problems) => {
                    for (field, reason) in problems {
                        errors.add(format!("{path}.{field}"), reason);
                    }
                }
            }
        }
        if spec.predictive.as_ref().is_some_and(|p| p.enabled) {
            errors.add(
                "spec.predictive.enabled",
                "predictive scaling is not available in this version of Shoal",
            );
        }
        errors.into_result(Pool {
            name: pool.name.clone(),
            backend: provider.backend,
            class: provider.class,
            labels,
            taints,
            startup_taints,
            capacity,
            overhead,
            price: template.price,
            capacity_type,
            min_nodes: limits.min_nodes.max(0) as u32,
            max_nodes: limits.max_nodes.max(0) as u32,
            max_cpu_millis,
            max_memory_bytes,
            permanent_nodes,
            weight: spec.weight,
            scale_up,
            scale_down,
            schedule,
        })
    }

    /// Parses and validates one YAML document.
    pub fn from_yaml(text: &str) -> Result<(pb::NodePool, Pool), ValidationErrors> {
        let proto = PoolDocument::from_yaml(text)?.to_proto()?;
        let pool = Pool::from_proto(&proto)?;
        Ok((proto, pool))
    }

    /// Decodes and validates a pool as stored (`pools/<name>`, protobuf).
    pub fn from_stored(bytes: &[u8]) -> Result<Pool, String> {
        use prost::Message;
        let proto = pb::NodePool::decode(bytes).map_err(|e| e.to_string())?;
        Pool::from_proto(&proto).map_err(|e| format!("pool {}: {e}", proto.name))
    }

    /// What a new node of this pool looks like to the scheduler (startup taints excluded: they
    /// go when the node is Ready).
    pub fn template_node(&self) -> NodeFacts {
        NodeFacts {
            allocatable: self.capacity.clone(),
            requested: Resources::default(),
            labels: self.labels.clone(),
            taints: self.taints.clone(),
            unschedulable: false,
        }
    }

    /// What one node costs against the pool's resource limits.
    pub fn node_cost(&self) -> Resources {
        self.capacity.saturating_add(&self.overhead)
    }

    /// Size bounds at `at`: maxNodes and min/max of the active schedule window, capped by the
    /// resource limits.
    pub fn bounds(&self, at: std::time::SystemTime) -> Bounds {
        let (min, max, window) =
            schedule::bounds_at(&self.schedule, self.min_nodes, self.max_nodes, at);
        let cost = self.node_cost();
        let by = |limit: Option<i64>, per: i64| {
            limit.map_or(u32::MAX, |l| {
                if per > 0 {
                    (l / per).max(0) as u32
                } else {
                    u32::MAX
                }
            })
        };
        let max = max
            .min(by(self.max_cpu_millis, cost.cpu_millis))
            .min(by(self.max_memory_bytes, cost.memory_bytes));
        Bounds {
            min: min.min(max),
            max,
            window: window.map(|w| w.name.clone()),
        }
    }

    /// Whether `node` may never be removed.
    pub fn is_permanent(&self, node: &str) -> bool {
        self.permanent_nodes.contains(node)
    }
}

/// A taint as users write it: `key=value:Effect`.
pub fn taint_text(t: &Taint) -> String {
    let effect = effect_name(t.effect);
    if t.value.is_empty() {
        format!("{}:{effect}", t.key)
    } else {
        format!("{}={}:{effect}", t.key, t.value)
    }
}

/// `spec.scaleDown.disruptionBudgets`, each checked with its field path. Windows may overlap:
/// the smallest budget active applies.
fn budget_windows(
    docs: &[pb::DisruptionBudgetWindow],
    errors: &mut ValidationErrors,
) -> Vec<(DisruptionBudget, Window)> {
    let mut out = Vec::new();
    for (i, b) in docs.iter().enumerate() {
        let path = format!("spec.scaleDown.disruptionBudgets[{i}]");
        let budget = DisruptionBudget::parse(&b.nodes)
            .map_err(|why| errors.add(format!("{path}.nodes"), why))
            .ok();
        let name = if b.name.is_empty() {
            format!("{} {}", b.days, b.between)
        } else {
            b.name.clone()
        };
        let window = Window::parse(&name, &b.days, &b.between, &b.timezone, None, None)
            .map_err(|problems| {
                for (field, reason) in problems {
                    errors.add(format!("{path}.{field}"), reason);
                }
            })
            .ok();
        if let (Some(budget), Some(window)) = (budget, window) {
            out.push((budget, window));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENERAL: &str = r#"
apiVersion: shoal.dev/v1alpha1
kind: NodePool
metadata: { name: general }
spec:
  provider: { backend: docker, class: k3s-worker }
  template:
    labels: { role: worker }
    startupTaints: [{ key: shoal.dev/unregistered, effect: NoExecute }]
    capacity: { cpu: "4", memory: 8Gi, pods: 110 }
    overhead: { memory: 512Mi }
    price: 0.12
  limits: { minNodes: 2, maxNodes: 10, cpu: "64", memory: 256Gi }
  permanentNodes: [k3s-worker-1, k3s-worker-2]
  weight: 10
  scaleUp: { batchSize: 5, maxConcurrent: 10, cooldown: 60s, pendingPods: 1, cpuAbove: 80, memoryAbove: 80 }
  scaleDown: { enabled: true, utilizationBelow: 0.5, unneededFor: 10m, cooldown: 120s, maxConcurrent: 1, drainTimeout: 5m, order: lifo }
  schedule:
    - { name: business-hours, days: Mon-Fri, between: "09:00-17:00", timezone: Europe/Berlin, minNodes: 5, maxNodes: 10 }
"#;

    #[test]
    fn the_design_example_parses() {
        let (proto, pool) = Pool::from_yaml(GENERAL).expect("valid");
        assert_eq!(proto.name, "general");
        assert_eq!(pool.backend, "docker");
        assert_eq!(pool.capacity.cpu_millis, 4000);
        assert_eq!(pool.capacity.memory_bytes, 8 << 30);
        assert_eq!(pool.node_cost().memory_bytes, (8 << 30) + (512 << 20));
        assert_eq!(
            pool.labels.get("shoal.dev/pool").map(String::as_str),
            Some("general")
        );
        assert!(pool.is_permanent("k3s-worker-1"));
        assert_eq!(pool.scale_up.batch_size, 5);
        assert_eq!(pool.scale_up.cooldown, Duration::from_secs(60));
        assert_eq!(pool.scale_down.unneeded_for, Duration::from_secs(600));
        assert_eq!(pool.schedule.len(), 1);
        // Capped by the memory limit: 256Gi / 8.5Gi = 30 > 10, so maxNodes rules.
        let weekday_noon = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_622_000); // 2026-03-04 11:00 UTC
        assert_eq!(
            pool.bounds(weekday_noon),
            Bounds {
                min: 5,
                max: 10,
                window: Some("business-hours".into())
            }
        );
    }

    #[test]
    fn defaults_fill_what_the_yaml_leaves_out() {
        let (_, pool) = Pool::from_yaml(
            "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: small }\nspec:\n  provider: { backend: sim }\n  template: { capacity: { cpu: 2, memory: 4Gi } }\n  limits: { maxNodes: 3 }\n",
        )
        .expect("valid");
        assert_eq!(pool.capacity.pods, 110);
        assert_eq!(pool.scale_up.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(pool.scale_up.pending_pods, 1);
        assert!(pool.scale_down.enabled);
        assert_eq!(pool.scale_down.utilization_below, 0.5);
        assert_eq!(pool.scale_down.order, ScaleDownOrder::Lifo);
        assert_eq!(pool.min_nodes, 0);
    }

    #[test]
    fn disruption_budget_windows_parse_and_report_bad_fields() {
        let with = |budgets: &str| {
            GENERAL.replace(
                "drainTimeout: 5m, order: lifo }",
                &format!("drainTimeout: 5m, order: lifo, disruptionBudget: \"20%\", disruptionBudgets: {budgets} }}"),
            )
        };
        let (proto, pool) = Pool::from_yaml(&with(
            r#"[{ name: office, nodes: "0", days: Mon-Fri, between: "09:00-17:00", timezone: Europe/Berlin }]"#,
        ))
        .expect("valid");
        let windows = &pool.scale_down.disruption_windows;
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].0, DisruptionBudget::Nodes(0));
        assert_eq!(windows[0].1.name, "office");
        assert_eq!(
            proto.spec.unwrap().scale_down.unwrap().disruption_budgets[0].nodes,
            "0"
        );
        // Monday 2026-03-02 10:00 in Berlin (09:00 UTC): the window's 0 beats 20 %; at night the
        // pool's 20 % of 10 nodes.
        let monday = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_442_000);
        assert_eq!(
            pool.scale_down.disruption_allowed(10, monday),
            Some((0, "0 (window office)".to_string()))
        );
        let night = monday + Duration::from_secs(12 * 3600);
        assert_eq!(
            pool.scale_down.disruption_allowed(10, night),
            Some((2, "20%".to_string()))
        );

        let errors = Pool::from_yaml(&with(
            r#"[{ nodes: "lots", days: Someday, between: "9-5" }]"#,
        ))
        .expect_err("bad window");
        let mut paths: Vec<&str> = errors.errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "spec.scaleDown.disruptionBudgets[0].between",
                "spec.scaleDown.disruptionBudgets[0].days",
                "spec.scaleDown.disruptionBudgets[0].nodes",
            ],
            "{errors}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = r#"
apiVersion: shoal.dev/v1alpha1
kind: NodePool
metadata: { name: Bad_Name }
spec:
  provider: { backend: openstack }
  template:
    taints: [{ key: gpu, effect: Sometimes }]
    capacity: { cpu: 4 cores, memory: 8Gb }
    capacityType: reserved
  limits: { minNodes: 5, maxNodes: 3, cpu: "2" }
  scaleUp: { cpuAbove: 180 }
  scaleDown: { utilizationBelow: 1.5, order: random }
  schedule:
    - { name: day, days: Mon-Fri, between: "08:00-18:00", timezone: Mars/Olympus }
    - { name: lunch, days: Wed, between: "12:00-13:00" }
    - { name: early, days: Mon, between: "07:00-09:00" }
    - { name: late, days: Mon, between: "08:30-09:30" }
  predictive: { enabled: true }
"#;
        let doc = PoolDocument::from_yaml(bad).expect("types are right");
        let errors = doc.to_proto().expect_err("quantities and enums are wrong");
        let mut paths: Vec<String> = errors.errors.iter().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "spec.scaleDown.order",
                "spec.template.capacity.cpu",
                "spec.template.capacity.memory",
                "spec.template.taints[0].effect",
            ],
            "{errors}"
        );
        // The semantic checks, on a proto with the same intent.
        let mut fixed = bad
            .replace("4 cores", "\"4\"")
            .replace("8Gb", "8Gi")
            .replace("Sometimes", "NoSchedule")
            .replace("order: random", "order: lifo");
        fixed.push('\n');
        let proto = PoolDocument::from_yaml(&fixed)
            .expect("types")
            .to_proto()
            .expect("proto");
        let errors = Pool::from_proto(&proto).expect_err("invalid");
        let mut paths: Vec<String> = errors.errors.iter().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "metadata.name",
                "spec.limits.cpu",
                "spec.limits.minNodes",
                "spec.predictive.enabled",
                "spec.provider.backend",
                "spec.scaleDown.utilizationBelow",
                "spec.scaleUp.cpuAbove",
                "spec.schedule[0].timezone",
                "spec.schedule[3]",
                "spec.template.capacityType",
            ],
            "{errors}"
        );
        let text = errors.to_string();
        assert!(text.contains("5 is above maxNodes (3)"), "{text}");
        assert!(
            text.contains(
                "\"openstack\" is not a backend this build has (it has: aws, docker, proxmox, sim, plugin:<name> and externalgrpc:<name>)"
            ),
            "{text}"
        );
        assert!(text.contains("overlaps spec.schedule[2]"), "{text}");
    }

    #[test]
    fn counts_and_durations_are_bounded_and_unbuilt_backends_refused() {
        let pool = |limits: &str, extra: &str, backend: &str| {
            format!(
                "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: big }}\nspec:\n  provider: {{ backend: {backend} }}\n  template: {{ capacity: {{ cpu: \"4\", memory: 8Gi }} }}\n  limits: {{ {limits} }}\n{extra}"
            )
        };
        let paths = |yaml: &str| -> Vec<(String, String)> {
            match Pool::from_yaml(yaml) {
                Ok(_) => vec![],
                Err(e) => e
                    .errors
                    .iter()
                    .map(|e| (e.path.clone(), e.reason.clone()))
                    .collect(),
            }
        };
        let found = paths(&pool(
            "maxNodes: 100000000, minNodes: 200000",
            "  scaleUp: { cooldown: 87600000h, maxConcurrent: 5000, batchSize: 20000 }\n  scaleDown: { unneededFor: 720h, drainTimeout: 48h, cooldown: 25h }\n",
            "gcp",
        ));
        let at = |path: &str| {
            found
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| panic!("{path} not reported: {found:?}"))
        };
        assert_eq!(
            at("spec.limits.maxNodes"),
            "100000000 is not between 1 and 10000"
        );
        assert!(at("spec.limits.minNodes").contains("200000"));
        assert_eq!(
            at("spec.scaleUp.cooldown"),
            "3650000d is longer than the most allowed, 1d"
        );
        assert!(at("spec.scaleUp.maxConcurrent").contains("5000"));
        assert!(at("spec.scaleUp.batchSize").contains("20000"));
        assert_eq!(
            at("spec.scaleDown.unneededFor"),
            "30d is longer than the most allowed, 7d"
        );
        assert!(at("spec.scaleDown.drainTimeout").contains("2d is longer"));
        assert!(at("spec.scaleDown.cooldown").contains("25h is longer"));
        assert_eq!(
            at("spec.provider.backend"),
            "\"gcp\" is not a backend this build has (it has: aws, docker, proxmox, sim, plugin:<name> and externalgrpc:<name>)"
        );
        assert!(
            paths(&pool("maxNodes: 10000, minNodes: 0", "", "sim")).is_empty(),
            "the largest allowed pool is fine"
        );
    }

    #[test]
    fn plugin_backends_are_named_by_a_dns_label() {
        let pool = |backend: &str| {
            Pool::from_yaml(&format!(
                "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: p }}\nspec:\n  provider: {{ backend: \"{backend}\" }}\n  template: {{ capacity: {{ cpu: \"2\", memory: 4Gi }} }}\n  limits: {{ maxNodes: 3 }}\n"
            ))
        };
        assert!(pool("plugin:procs").is_ok());
        let bad = pool("plugin:Bad_Name").expect_err("not a DNS label");
        assert_eq!(bad.errors[0].path, "spec.provider.backend");
        assert!(
            bad.errors[0]
                .reason
                .contains("lower-case letters, digits and -"),
            "{bad}"
        );
        assert!(pool("plugin:").is_err());
        assert!(pool("externalgrpc:ca-plugin").is_ok());
        assert!(pool("externalgrpc:").is_err());
    }

    #[test]
    fn type_errors_name_the_field() {
        let errors = PoolDocument::from_yaml(
            "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: x }\nspec:\n  provider: { backend: sim }\n  template: {}\n  limits: { maxNodes: lots }\n",
        )
        .expect_err("maxNodes is not a number");
        assert_eq!(errors.errors[0].path, "spec.limits.maxNodes", "{errors}");
        let errors = PoolDocument::from_yaml(
            "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: x }\nspec:\n  provider: { backend: sim }\n  template: {}\n  limits: { maxNodes: 1 }\n  scaleUp: { batchsize: 3 }\n",
        )
        .expect_err("unknown field");
        assert!(errors.to_string().contains("batchsize"), "{errors}");
    }
}
