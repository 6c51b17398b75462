//! The sim cloud: an HTTP API (`/cloud/v1/…`) that creates and deletes "instances" which boot
//! after a delay (with jitter) and register as Nodes, with failure injection (error rate, boot
//! failures, slow calls) for reliability tests. The `sim` provisioner backend talks to it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{resources::by_kind, selector::LabelSelector, store::Store};

/// What an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Booting.
    Pending,
    /// Booted; its Node is registered.
    Running,
    /// Failed to boot (injected).
    Failed,
}

/// Resources of an instance, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// e.g. "4".
    pub cpu: String,
    /// e.g. "8Gi".
    pub memory: String,
    /// e.g. "110".
    #[serde(default = "default_pods")]
    pub pods: String,
}

fn default_pods() -> String {
    "110".into()
}

/// A request to create an instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateInstance {
    /// Node name; generated when empty.
    #[serde(default)]
    pub name: String,
    /// Labels of the instance, also put on its Node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Taints of the Node (Kubernetes JSON form).
    #[serde(default)]
    pub taints: Vec<serde_json::Value>,
    /// Size.
    pub capacity: Capacity,
}

/// An instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// `i-…`.
    pub id: String,
    /// Node name it registers as.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// State.
    pub state: InstanceState,
    /// Size.
    pub capacity: Capacity,
    /// Unix ms.
    pub created_at_ms: u64,
}

/// Injected failures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Fraction (0..1) of API calls that fail with 503.
    #[serde(default)]
    pub error_rate: f64,
    /// Fraction (0..1) of instances that never boot.
    #[serde(default)]
    pub boot_failure_rate: f64,
    /// Extra latency of every call, in ms.
    #[serde(default)]
    pub slow_call_ms: u64,
}

/// Boot timing.
#[derive(Debug, Clone, Copy)]
pub struct BootTiming {
    /// Create → Node registered.
    pub delay: Duration,
    /// Up to this much is added at random.
    pub jitter: Duration,
}

impl Default for BootTiming {
    fn default() -> Self {
        BootTiming {
            delay: Duration::from_secs(2),
            jitter: Duration::from_millis(500),
        }
    }
}

/// The sim cloud's state.
pub struct Cloud {
    store: Arc<Store>,
    instances: Mutex<BTreeMap<String, Instance>>,
    faults: Mutex<Faults>,
    timing: BootTiming,
    shutdown: CancellationToken,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

impl Cloud {
    /// A cloud whose instances register in `store`.
    pub fn new(store: Arc<Store>, timing: BootTiming, shutdown: CancellationToken) -> Arc<Cloud> {
        Arc::new(Cloud {
            store,
            instances: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults::default()),
            timing,
            shutdown,
        })
    }

    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies injected latency and errors; `Some` is the error response to return.
    async fn inject(&self) -> Option<Response> {
        let faults = self.faults();
        if faults.slow_call_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.slow_call_ms)).await;
        }
        (rand::random::<f64>() < faults.error_rate)
            .then(|| error(StatusCode::SERVICE_UNAVAILABLE, "injected failure"))
    }

    fn register_node(&self, instance: &Instance, taints: &[serde_json::Value]) {
        let Some(nodes) = by_kind("Node") else { return };
        let capacity = json!({ "cpu": instance.capacity.cpu, "memory": instance.capacity.memory, "pods": instance.capacity.pods, "ephemeral-storage": "100Gi" });
        let mut labels = instance.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), instance.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), "amd64".into());
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": instance.name, "labels": labels, "annotations": { "sim.shoal.dev/instance-id": instance.id } },
            "spec": { "providerID": format!("shoal-sim://{}", instance.id), "taints": taints },
            "status": { "capacity": capacity, "allocatable": capacity, "conditions": [] },
        });
        if let Err(err) = self.store.create(nodes, "", node) {
            tracing::warn!(instance = %instance.id, error = %err, "sim cloud: node registration failed");
        }
    }
}

/// The cloud's routes, under `/cloud/v1`.
pub fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/cloud/v1/instances", get(list).post(create))
        .route("/cloud/v1/instances/{id}", get(get_one).delete(delete))
        .route("/cloud/v1/faults", get(get_faults).put(set_faults))
        .with_state(cloud)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default, rename = "labelSelector")]
    label_selector: String,
}

async fn list(State(cloud): State<Arc<Cloud>>, Query(query): Query<ListQuery>) -> Response {
    if let Some(err) = cloud.inject().await {
        return err;
    }
    let selector = match LabelSelector::parse(&query.label_selector) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let instances: Vec<Instance> = cloud
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|i| selector.matches(&i.labels))
        .cloned()
        .collect();
    Json(json!({ "instances": instances })).into_response()
}

async fn get_one(State(cloud): State<Arc<Cloud>>, Path(id): Path<String>) -> Response {
    if let Some(err) = cloud.inject().await {
        return err;
    }
    match cloud
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
    {
        Some(instance) => Json(instance.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("instance {id} not found")),
    }
}

async fn create(State(cloud): State<Arc<Cloud>>, body: axum::body::Bytes) -> Response {
    if let Some(err) = cloud.inject().await {
        return err;
    }
    let request: CreateInstance = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid instance request: {e}"),
            );
        }
    };
    for (field, value) in [
        ("capacity.cpu", &request.capacity.cpu),
        ("capacity.memory", &request.capacity.memory),
    ] {
        let ok = if field == "capacity.cpu" {
            shoal_core::parse_cpu_millis(value).is_ok()
        } else {
            shoal_core::parse_memory_bytes(value).is_ok()
        };
        if !ok {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{field}: {value:?} is not a quantity"),
            );
        }
    }
    let id = format!("i-{:016x}", rand::random::<u64>());
    let name = if request.name.is_empty() {
        format!("sim-{}", &id[2..10])
    } else {
        request.name.clone()
    };
    if !crate::store::is_dns_subdomain(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("name {name:?} is not a valid node name"),
        );
    }
    let instance = Instance {
        id: id.clone(),
        name,
        labels: request.labels.clone(),
        state: InstanceState::Pending,
        capacity: request.capacity.clone(),
        created_at_ms: unix_ms(),
    };
    {
        let mut instances = cloud.instances.lock().unwrap_or_else(|p| p.into_inner());
        if instances.values().any(|i| i.name == instance.name) {
            return error(
                StatusCode::CONFLICT,
                format!("an instance named {} exists", instance.name),
            );
        }
        instances.insert(id.clone(), instance.clone());
    }
    let boot_fails = rand::random::<f64>() < cloud.faults().boot_failure_rate;
    let jitter = cloud.timing.jitter.mul_f64(rand::random::<f64>());
    let delay = cloud.timing.delay + jitter;
    let booting = cloud.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = booting.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let booted = {
            let mut instances = booting.instances.lock().unwrap_or_else(|p| p.into_inner());
            match instances.get_mut(&id) {
                Some(i) if i.state == InstanceState::Pending => {
                    i.state = if boot_fails {
                        InstanceState::Failed
                    } else {
                        InstanceState::Running
                    };
                    (!boot_fails).then(|| i.clone())
                }
                _ => None,
            }
        };
        if let Some(instance) = booted {
            booting.register_node(&instance, &request.taints);
        }
    });
    (StatusCode::CREATED, Json(instance)).into_response()
}

async fn delete(State(cloud): State<Arc<Cloud>>, Path(id): Path<String>) -> Response {
    if let Some(err) = cloud.inject().await {
        return err;
    }
    let removed = cloud
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    match removed {
        Some(instance) => {
            if let Some(nodes) = by_kind("Node") {
                let _ = cloud.store.delete(nodes, "", &instance.name);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("instance {id} not found")),
    }
}

async fn get_faults(State(cloud): State<Arc<Cloud>>) -> Response {
    Json(cloud.faults()).into_response()
}

async fn set_faults(State(cloud): State<Arc<Cloud>>, body: axum::body::Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid faults: {e}")),
    };
    for (field, rate) in [
        ("errorRate", faults.error_rate),
        ("bootFailureRate", faults.boot_failure_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{field} must be between 0 and 1"),
            );
        }
    }
    *cloud.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults.clone();
    Json(faults).into_response()
}
