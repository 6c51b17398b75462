//! Scenarios: YAML files of timed steps the simulator plays (create, scale and delete
//! Deployments with requests and usage, cordon, kill and revive nodes), for demos, end-to-end
//! tests and benchmarks. See `deploy/scenarios/`.
//!
//! ```yaml
//! name: ramp
//! steps:
//!   - at: 0s
//!     createDeployment: { name: web, replicas: 2, cpu: 500m, memory: 256Mi, usage: { cpu: 400m, memory: 200Mi } }
//!   - at: 30s
//!     scale: { deployment: web, replicas: 12 }
//!   - at: 2m
//!     deleteDeployment: { name: web }
//! ```

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{lifecycle::KilledNodes, resources::by_kind, store::Store};

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, for logs.
    pub name: String,
    /// Steps; played in order of `at`.
    pub steps: Vec<Step>,
    /// Start over after the last step.
    #[serde(default)]
    pub repeat: bool,
}

/// One timed step: `at` plus exactly one action key.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Offset from the start of the scenario.
    pub at: Duration,
    /// What happens.
    pub action: Action,
}

const ACTIONS: &str =
    "createDeployment, scale, setUsage, deleteDeployment, cordon, killNode, reviveNode";

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Step, D::Error> {
        use serde::de::Error;
        let mut map = serde_yaml_ng::Mapping::deserialize(deserializer)?;
        let at = map
            .remove("at")
            .ok_or_else(|| D::Error::custom("missing `at` (e.g. `at: 30s`)"))?;
        let at = at
            .as_str()
            .map(str::to_string)
            .or_else(|| at.as_u64().map(|n| format!("{n}s")))
            .unwrap_or_default();
        let at = humantime::parse_duration(&at)
            .map_err(|e| D::Error::custom(format!("at: {at:?} is not a duration: {e}")))?;
        if map.len() != 1 {
            let keys: Vec<String> = map
                .keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            return Err(D::Error::custom(format!(
                "expected exactly one action ({ACTIONS}), found {keys:?}"
            )));
        }
        // serde_json reads `{variant: {...}}` as an externally tagged enum; YAML values would
        // want `!Variant` tags instead.
        let json =
            serde_json::to_value(serde_yaml_ng::Value::Mapping(map)).map_err(D::Error::custom)?;
        let action: Action = serde_json::from_value(json).map_err(D::Error::custom)?;
        Ok(Step { at, action })
    }
}

/// Per-pod usage reported on /metrics.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// CPU quantity.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Memory quantity.
    #[serde(default)]
    pub memory: Option<String>,
}

/// A Deployment to create.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// Name (namespace `default` unless given).
    pub name: String,
    /// Namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Replicas.
    pub replicas: u32,
    /// CPU request per pod.
    pub cpu: String,
    /// Memory request per pod.
    pub memory: String,
    /// Usage per pod.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// `spec.nodeSelector`.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerate taints with these keys (operator Exists).
    #[serde(default)]
    pub tolerate: Vec<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Create a Deployment.
    CreateDeployment(DeploymentSpec),
    /// Set a Deployment's replicas.
    Scale {
        /// Deployment name.
        deployment: String,
        /// Namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
        /// New replica count.
        replicas: u32,
    },
    /// Change the usage of a Deployment's pods (existing and future).
    SetUsage {
        /// Deployment name.
        deployment: String,
        /// Namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
        /// New usage.
        usage: Usage,
    },
    /// Delete a Deployment and its pods.
    DeleteDeployment {
        /// Name.
        name: String,
        /// Namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
    /// Cordon a node.
    Cordon {
        /// Node name.
        node: String,
    },
    /// Stop a node's in-process kubelet (it goes NotReady after the grace period).
    KillNode {
        /// Node name.
        node: String,
    },
    /// Start it again.
    ReviveNode {
        /// Node name.
        node: String,
    },
}

/// Why a scenario cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or does not describe a scenario.
    #[error("scenario {path} is invalid: {message}")]
    Invalid {
        /// File.
        path: String,
        /// Parser message with location.
        message: String,
    },
}

impl Scenario {
    /// Parses a scenario from YAML text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            path: origin.to_string(),
            message,
        };
        let scenario: Scenario =
            serde_yaml_ng::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (i, step) in scenario.steps.iter().enumerate() {
            if let Action::CreateDeployment(d) = &step.action {
                if shoal_core::parse_cpu_millis(&d.cpu).is_err() {
                    return Err(invalid(format!(
                        "steps[{i}].createDeployment.cpu: {:?} is not a quantity",
                        d.cpu
                    )));
                }
                if shoal_core::parse_memory_bytes(&d.memory).is_err() {
                    return Err(invalid(format!(
                        "steps[{i}].createDeployment.memory: {:?} is not a quantity",
                        d.memory
                    )));
                }
            }
        }
        Ok(scenario)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::parse(&path.display().to_string(), &text)
    }
}

fn usage_annotations(usage: &Option<Usage>) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if let Some(u) = usage {
        if let Some(cpu) = &u.cpu {
            annotations.insert(crate::metrics::CPU_USAGE.into(), json!(cpu));
        }
        if let Some(memory) = &u.memory {
            annotations.insert(crate::metrics::MEMORY_USAGE.into(), json!(memory));
        }
    }
    serde_json::Value::Object(annotations)
}

/// Applies one action to the cluster.
pub fn apply(
    store: &Store,
    killed: &KilledNodes,
    action: &Action,
) -> Result<(), crate::error::ApiError> {
    let (Some(deployments), Some(nodes), Some(pods)) =
        (by_kind("Deployment"), by_kind("Node"), by_kind("Pod"))
    else {
        return Ok(());
    };
    match action {
        Action::CreateDeployment(d) => {
            let tolerations: Vec<_> = d
                .tolerate
                .iter()
                .map(|k| json!({ "key": k, "operator": "Exists" }))
                .collect();
            let deployment = json!({
                "metadata": { "name": d.name, "namespace": d.namespace },
                "spec": { "replicas": d.replicas, "selector": { "matchLabels": { "app": d.name } },
                    "template": { "metadata": { "labels": { "app": d.name }, "annotations": usage_annotations(&d.usage) },
                        "spec": { "nodeSelector": d.node_selector, "tolerations": tolerations,
                            "containers": [ { "name": "app", "image": "shoal/sim-workload",
                                "resources": { "requests": { "cpu": d.cpu, "memory": d.memory } } } ] } } }
            });
            store
                .create(deployments, &d.namespace, deployment)
                .map(|_| ())
        }
        Action::Scale {
            deployment,
            namespace,
            replicas,
        } => store
            .modify(deployments, namespace, deployment, false, |d| {
                d["spec"]["replicas"] = json!(replicas);
                true
            })
            .map(|_| ()),
        Action::SetUsage {
            deployment,
            namespace,
            usage,
        } => {
            let annotations = usage_annotations(&Some(usage.clone()));
            store.modify(deployments, namespace, deployment, false, |d| {
                d["spec"]["template"]["metadata"]["annotations"] = annotations.clone();
                true
            })?;
            let selector = format!("app={deployment}");
            let label = crate::selector::LabelSelector::parse(&selector).unwrap_or_default();
            let page = crate::store::ListPage {
                namespace: Some(namespace.clone()),
                ..Default::default()
            };
            for pod in store.list(pods, &page, &|p| label.matches(&p.labels)).items {
                let _ = store.modify(pods, namespace, &pod.name, false, |p| {
                    for (k, v) in annotations.as_object().into_iter().flatten() {
                        p["metadata"]["annotations"][k] = v.clone();
                    }
                    true
                });
            }
            Ok(())
        }
        Action::DeleteDeployment { name, namespace } => {
            store.delete(deployments, namespace, name).map(|_| ())
        }
        Action::Cordon { node } => store
            .modify(nodes, "", node, false, |n| {
                n["spec"]["unschedulable"] = json!(true);
                true
            })
            .map(|_| ()),
        Action::KillNode { node } => {
            killed.kill(node);
            Ok(())
        }
        Action::ReviveNode { node } => {
            killed.revive(node);
            Ok(())
        }
    }
}

/// Plays `scenario` until it ends (or forever with `repeat`) or `shutdown`. A step that fails
/// (e.g. scaling a Deployment that was deleted by hand) is logged and the scenario goes on.
pub async fn play(
    store: Arc<Store>,
    killed: KilledNodes,
    scenario: Scenario,
    shutdown: CancellationToken,
) {
    let mut steps = scenario.steps.clone();
    steps.sort_by_key(|s| s.at);
    loop {
        let started = tokio::time::Instant::now();
        for step in &steps {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(started + step.at) => {}
            }
            match apply(&store, &killed, &step.action) {
                Ok(()) => {
                    tracing::info!(scenario = %scenario.name, at = ?step.at, action = ?step.action, "scenario step")
                }
                Err(err) => {
                    tracing::warn!(scenario = %scenario.name, at = ?step.at, error = %err, "scenario step failed")
                }
            }
        }
        if !scenario.repeat {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_action() {
        let s = Scenario::parse(
            "test",
            "name: t\nrepeat: true\nsteps:\n\
             - { at: 0s, createDeployment: { name: web, replicas: 2, cpu: 500m, memory: 256Mi, usage: { cpu: 400m } } }\n\
             - { at: 1m, scale: { deployment: web, replicas: 5 } }\n\
             - { at: 90s, setUsage: { deployment: web, usage: { cpu: 100m } } }\n\
             - { at: 2m, cordon: { node: n1 } }\n\
             - { at: 3m, killNode: { node: n2 } }\n\
             - { at: 4m, reviveNode: { node: n2 } }\n\
             - { at: 5m, deleteDeployment: { name: web } }\n",
        )
        .expect("valid");
        assert_eq!(s.steps.len(), 7);
        assert_eq!(s.steps[1].at, Duration::from_secs(60));
        assert!(
            matches!(&s.steps[1].action, Action::Scale { replicas: 5, namespace, .. } if namespace == "default")
        );
    }

    #[test]
    fn errors_say_where() {
        let err = Scenario::parse("f.yaml", "name: t\nsteps:\n- { at: 0s, explode: {} }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.yaml") && err.contains("explode"), "{err}");
        let err = Scenario::parse("f.yaml", "name: t\nsteps:\n- { at: 0s, createDeployment: { name: w, replicas: 1, cpu: lots, memory: 1Gi } }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("steps[0].createDeployment.cpu"), "{err}");
        let err = Scenario::parse(
            "f.yaml",
            "name: t\nsteps:\n- { at: soon, cordon: { node: a } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("at"), "{err}");
    }
}
