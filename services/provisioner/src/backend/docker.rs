//! The `docker` backend (bollard): one container per node, from a provider class (image,
//! command, env such as `K3S_URL`/`K3S_TOKEN`, network, privileged, tmpfs, volumes, CPU/memory
//! limits, restart policy). Containers are named after their node (`<pool>-<n>`) and carry the
//! ownership labels, so `list` finds ours after any crash. Defaults suit the rancher/k3s agent
//! image; `{name}`, `{cpu}`, `{memory}`, `{labels}` and `{taints}` in the command and env are
//! replaced per node, so an agent can register with the right identity.

use std::collections::{BTreeMap, HashMap};

use bollard::{
    Docker,
    models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum},
    query_parameters::{
        CreateContainerOptions, ListContainersOptions, RemoveContainerOptions,
        StartContainerOptions,
    },
};
use serde::{Deserialize, Serialize};
use shoal_core::ValidationErrors;
use shoal_proto::v1 as pb;

use super::{InstanceSpec, NodeProvider, ProviderError, with_ownership};

/// One provider class: how a node's container is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerClass {
    /// Image (must exist locally or be pullable by the engine).
    #[serde(default = "default_image")]
    pub image: String,
    /// Command (arguments after the image's entrypoint).
    #[serde(default = "default_command")]
    pub command: Vec<String>,
    /// Entrypoint override; empty keeps the image's.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Environment, e.g. `K3S_URL`, `K3S_TOKEN`. Values are secrets: inline, `{ fromFile: … }`
    /// or `{ fromEnv: … }`, and never printed (`--print-config` shows `<redacted>`).
    #[serde(default)]
    pub env: BTreeMap<String, shoal_runtime::secret::Secret>,
    /// Docker network to attach to.
    #[serde(default)]
    pub network: String,
    /// Run privileged (k3s agents need it).
    #[serde(default = "yes")]
    pub privileged: bool,
    /// tmpfs mounts: path → options.
    #[serde(default = "default_tmpfs")]
    pub tmpfs: BTreeMap<String, String>,
    /// Volumes, `host:container[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// CPU limit in cores (0: none).
    #[serde(default)]
    pub cpus: f64,
    /// Memory limit in bytes (0: none).
    #[serde(default)]
    pub memory_bytes: i64,
    /// `no`, `always`, `unless-stopped`, `on-failure`.
    #[serde(default = "default_restart")]
    pub restart_policy: String,
}

fn default_image() -> String {
    "rancher/k3s:latest".into()
}
fn default_command() -> Vec<String> {
    vec!["agent".into(), "--node-name".into(), "{name}".into()]
}
fn yes() -> bool {
    true
}
fn default_tmpfs() -> BTreeMap<String, String> {
    [
        ("/run".to_string(), String::new()),
        ("/var/run".to_string(), String::new()),
    ]
    .into_iter()
    .collect()
}
fn default_restart() -> String {
    "unless-stopped".into()
}

impl Default for DockerClass {
    fn default() -> Self {
        DockerClass {
            image: default_image(),
            command: default_command(),
            entrypoint: Vec::new(),
            env: BTreeMap::new(),
            network: String::new(),
            privileged: true,
            tmpfs: default_tmpfs(),
            volumes: Vec::new(),
            cpus: 0.0,
            memory_bytes: 0,
            restart_policy: default_restart(),
        }
    }
}

impl DockerClass {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        if self.image.trim().is_empty() {
            errors.add(format!("{path}.image"), "must not be empty");
        }
        if self.cpus < 0.0 {
            errors.add(format!("{path}.cpus"), "must not be negative");
        }
        if self.memory_bytes < 0 {
            errors.add(format!("{path}.memoryBytes"), "must not be negative");
        }
        if restart_policy(&self.restart_policy).is_none() {
            errors.add(
                format!("{path}.restartPolicy"),
                format!(
                    "{:?} is not one of no, always, unless-stopped, on-failure",
                    self.restart_policy
                ),
            );
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.contains(':') {
                errors.add(
                    format!("{path}.volumes[{i}]"),
                    format!("{v:?} is not host:container[:options]"),
                );
            }
        }
    }
}

fn restart_policy(name: &str) -> Option<RestartPolicyNameEnum> {
    Some(match name {
        "no" => RestartPolicyNameEnum::NO,
        "always" => RestartPolicyNameEnum::ALWAYS,
        "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
        "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
        _ => return None,
    })
}

/// The Docker engine behind one socket.
pub struct DockerProvider {
    docker: Docker,
    classes: BTreeMap<String, DockerClass>,
}

fn docker_error(what: &str, e: bollard::errors::Error) -> ProviderError {
    use bollard::errors::Error as E;
    let text = format!("docker {what}: {e}");
    match &e {
        E::DockerResponseServerError { status_code, .. } => match status_code {
            409 => ProviderError::Conflict(text),
            404 | 400 => ProviderError::Permanent(text),
            _ => ProviderError::Transient(text),
        },
        _ => ProviderError::Transient(text),
    }
}

impl DockerProvider {
    /// Connects to the engine the Docker CLI would (`DOCKER_HOST`, else the local socket; TLS
    /// with `DOCKER_TLS_VERIFY` and the certificates in `DOCKER_CERT_PATH`) with these classes.
    pub fn connect(
        classes: BTreeMap<String, DockerClass>,
    ) -> Result<DockerProvider, ProviderError> {
        let docker = Docker::connect_with_defaults()
            .map_err(|e| ProviderError::Permanent(format!("docker engine: {e}")))?;
        Ok(DockerProvider { docker, classes })
    }

    fn class(&self, name: &str) -> Result<&DockerClass, ProviderError> {
        let key = if name.is_empty() { "default" } else { name };
        self.classes.get(key).ok_or_else(|| {
            ProviderError::Permanent(format!(
                "docker backend has no provider class {key:?} (known: {})",
                self.classes.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

fn fill(template: &str, spec: &InstanceSpec) -> String {
    let labels = spec
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let taints = spec
        .taints
        .iter()
        .map(|t| {
            let effect = match pb::TaintEffect::try_from(t.effect) {
                Ok(pb::TaintEffect::NoExecute) => "NoExecute",
                Ok(pb::TaintEffect::PreferNoSchedule) => "PreferNoSchedule",
                _ => "NoSchedule",
            };
            if t.value.is_empty() {
                format!("{}:{effect}", t.key)
            } else {
                format!("{}={}:{effect}", t.key, t.value)
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    template
        .replace("{name}", &spec.node_name)
        .replace("{cpu}", &format!("{}m", spec.capacity.cpu_millis))
        .replace("{memory}", &spec.capacity.memory_bytes.to_string())
        .replace("{labels}", &labels)
        .replace("{taints}", &taints)
}

fn summary_to_instance(c: bollard::models::ContainerSummary) -> pb::Instance {
    let labels: BTreeMap<String, String> = c.labels.unwrap_or_default().into_iter().collect();
    let name = c
        .names
        .unwrap_or_default()
        .first()
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default();
    with_ownership(
        pb::Instance {
            id: c.id.unwrap_or_default(),
            state: c.state.map(|s| s.to_string()).unwrap_or_default(),
            labels,
            created_at: c.created.map(|s| prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            }),
            node_name: name,
            ..Default::default()
        },
        "docker",
    )
}

#[async_trait::async_trait]
impl NodeProvider for DockerProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let class = self.class(&spec.class)?;
        let env: Vec<String> = class
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", fill(v.expose(), spec)))
            .collect();
        let cmd: Vec<String> = class.command.iter().map(|c| fill(c, spec)).collect();
        let labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        let host_config = HostConfig {
            privileged: Some(class.privileged),
            tmpfs: (!class.tmpfs.is_empty()).then(|| class.tmpfs.clone().into_iter().collect()),
            binds: (!class.volumes.is_empty()).then(|| class.volumes.clone()),
            nano_cpus: (class.cpus > 0.0).then_some((class.cpus * 1e9) as i64),
            memory: (class.memory_bytes > 0).then_some(class.memory_bytes),
            restart_policy: Some(RestartPolicy {
                name: restart_policy(&class.restart_policy),
                maximum_retry_count: None,
            }),
            network_mode: (!class.network.is_empty()).then(|| class.network.clone()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(class.image.clone()),
            cmd: Some(cmd),
            entrypoint: (!class.entrypoint.is_empty()).then(|| class.entrypoint.clone()),
            env: Some(env),
            hostname: Some(spec.node_name.clone()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(spec.node_name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| docker_error("create", e))?;
        if let Err(e) = self
            .docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            // Do not leave a created-but-stopped container behind.
            let _ = self
                .docker
                .remove_container(
                    &created.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            return Err(docker_error("start", e));
        }
        Ok(with_ownership(
            pb::Instance {
                id: created.id,
                state: "running".into(),
                labels: spec.labels.clone(),
                node_name: spec.node_name.clone(),
                ..Default::default()
            },
            "docker",
        ))
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        match self
            .docker
            .remove_container(
                instance_id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(docker_error("remove", e)),
        }
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let filters: HashMap<String, Vec<String>> = [(
            "label".to_string(),
            owner.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        )]
        .into_iter()
        .collect();
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| docker_error("list", e))?;
        Ok(list.into_iter().map(summary_to_instance).collect())
    }

    fn describe(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: "docker".into(),
            classes: self.classes.keys().cloned().collect(),
            capabilities: vec![],
        }
    }
}
