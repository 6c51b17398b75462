//! Shoal as a Cluster Autoscaler cloud provider: `clusterautoscaler.cloudprovider.v1.externalgrpc.
//! CloudProvider` served by the provisioner (`service.externalGrpc: true`), over the same pools,
//! claims and backends as `ProvisionerService`:
//!
//! - node groups are pools (min/max from `limits`, the template node from `template`, options
//!   from `scaleDown`);
//! - the target size is the pool's claims not being removed; `IncreaseSize` is `CreateNodes`,
//!   `DeleteNodes` is `DeleteNodes` (drain, delete, claims), both audited like any admin call;
//! - an instance's id is the `spec.providerID` its Node reports once registered
//!   (`shoal://<cluster>/<claim>` before), so Cluster Autoscaler matches instances to Nodes.
//!
//! So a stock Cluster Autoscaler (`--cloud-provider=externalgrpc`) drives Shoal's Docker, Proxmox,
//! plugin or simulator backends. Shoal's own decider should not also run on those pools.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;
use shoal_core::{ClaimPhase, Resources, claim::NodeClaim, pool::Pool};
use shoal_proto::{
    externalgrpc::{self as ca, cloud_provider_server::CloudProvider},
    k8s,
};
use shoal_runtime::telemetry::traceparent_of;
use tonic::{Request, Response, Status};

use crate::{
    api::status,
    backend::{CLAIM_LABEL, CLUSTER_LABEL, POOL_LABEL},
    lifecycle::Provisioner,
};

/// The externalgrpc handlers.
pub struct CloudProviderApi {
    /// The core.
    pub provisioner: Arc<Provisioner>,
}

/// Claims that count towards a group's size: requested, launching or running, not being removed.
fn counted(claim: &NodeClaim) -> bool {
    matches!(
        claim.phase,
        ClaimPhase::Pending | ClaimPhase::Launched | ClaimPhase::Registered | ClaimPhase::Ready
    )
}

fn node_group(pool: &Pool) -> ca::NodeGroup {
    ca::NodeGroup {
        id: pool.name.clone(),
        min_size: i32::try_from(pool.min_nodes).unwrap_or(i32::MAX),
        max_size: i32::try_from(pool.max_nodes).unwrap_or(i32::MAX),
        debug: format!(
            "shoal pool {} on backend {} ({}..{} nodes)",
            pool.name, pool.backend, pool.min_nodes, pool.max_nodes
        ),
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!(
            "{field}: must name a node group (a Shoal pool)"
        )))
    } else {
        Ok(())
    }
}

fn quantities(r: &Resources) -> BTreeMap<String, k8s::Quantity> {
    let q = |s: String| k8s::Quantity { string: s };
    let mut out = BTreeMap::new();
    out.insert("cpu".to_string(), q(format!("{}m", r.cpu_millis)));
    out.insert("memory".to_string(), q(r.memory_bytes.to_string()));
    out.insert(
        "pods".to_string(),
        q(if r.pods > 0 { r.pods } else { 110 }.to_string()),
    );
    if r.ephemeral_storage_bytes > 0 {
        out.insert(
            "ephemeral-storage".to_string(),
            q(r.ephemeral_storage_bytes.to_string()),
        );
    }
    for (name, n) in &r.extended {
        out.insert(name.clone(), q(n.to_string()));
    }
    out
}

/// The Node a new member of `pool` registers as (Kubernetes protobuf encoding).
pub fn template_node(pool: &Pool, cluster: &str) -> k8s::Node {
    let name = format!("{}-template", pool.name);
    let mut labels = pool.labels.clone();
    labels.insert(CLUSTER_LABEL.into(), cluster.to_string());
    labels.insert(POOL_LABEL.into(), pool.name.clone());
    labels.insert("kubernetes.io/hostname".into(), name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    let capacity = quantities(&pool.capacity);
    k8s::Node {
        metadata: Some(k8s::ObjectMeta {
            name,
            labels,
            annotations: Default::default(),
        }),
        spec: Some(k8s::NodeSpec {
            provider_id: String::new(),
            unschedulable: false,
            taints: pool
                .taints
                .iter()
                .map(|t| k8s::Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: format!("{:?}", t.effect),
                })
                .collect(),
        }),
        status: Some(k8s::NodeStatus {
            allocatable: capacity.clone(),
            capacity,
            conditions: vec![k8s::NodeCondition {
                r#type: "Ready".into(),
                status: "True".into(),
                reason: "KubeletReady".into(),
                message: "template node of a Shoal pool".into(),
            }],
        }),
    }
}

fn seconds(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

impl CloudProviderApi {
    async fn pool(&self, id: &str) -> Result<Pool, Status> {
        required("id", id)?;
        self.provisioner
            .pool_from_store(id)
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("node group {id}: no such Shoal pool")))
    }

    /// The pool's claims that count towards its size, oldest first.
    fn members(&self, pool: &str) -> Vec<NodeClaim> {
        let mut claims: Vec<NodeClaim> = self
            .provisioner
            .claims()
            .into_iter()
            .filter(|c| c.pool == pool && counted(c))
            .collect();
        claims.sort_by_key(|c| c.created_at_ms);
        claims
    }

    /// What Cluster Autoscaler knows an instance by: its Node's providerID once registered.
    fn provider_id(&self, claim: &NodeClaim) -> String {
        self.provisioner
            .nodes
            .get(&claim.id)
            .map(|v| v.provider_id)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("shoal://{}/{}", self.provisioner.cluster, claim.id))
    }

    /// The claim a node (as Cluster Autoscaler names it) belongs to.
    fn claim_of(&self, node: &ca::ExternalGrpcNode) -> Option<NodeClaim> {
        let claims = self.provisioner.claims();
        let live = |c: &&NodeClaim| !c.phase.is_terminal();
        if let Some(id) = node.labels.get(CLAIM_LABEL)
            && let Some(c) = claims.iter().filter(live).find(|c| &c.id == id)
        {
            return Some(c.clone());
        }
        claims
            .iter()
            .filter(live)
            .find(|c| {
                (!node.name.is_empty() && c.node_name == node.name)
                    || (!node.provider_id.is_empty() && self.provider_id(c) == node.provider_id)
            })
            .cloned()
    }
}

#[tonic::async_trait]
impl CloudProvider for CloudProviderApi {
    async fn node_groups(
        &self,
        _: Request<ca::NodeGroupsRequest>,
    ) -> Result<Response<ca::NodeGroupsResponse>, Status> {
        let pools = self.provisioner.pools_from_store().await.map_err(status)?;
        Ok(Response::new(ca::NodeGroupsResponse {
            node_groups: pools.values().map(node_group).collect(),
        }))
    }

    async fn node_group_for_node(
        &self,
        request: Request<ca::NodeGroupForNodeRequest>,
    ) -> Result<Response<ca::NodeGroupForNodeResponse>, Status> {
        let node = request.into_inner().node.unwrap_or_default();
        let pools = self.provisioner.pools_from_store().await.map_err(status)?;
        // Ours by label (this cluster's pools), else by claim; anything else is not a group's.
        let ours = node.labels.get(CLUSTER_LABEL) == Some(&self.provisioner.cluster);
        let pool = node
            .labels
            .get(POOL_LABEL)
            .filter(|_| ours)
            .cloned()
            .or_else(|| self.claim_of(&node).map(|c| c.pool));
        let group = pool
            .and_then(|p| pools.get(&p))
            .map(node_group)
            .unwrap_or_default();
        Ok(Response::new(ca::NodeGroupForNodeResponse {
            node_group: Some(group),
        }))
    }

    async fn pricing_node_price(
        &self,
        request: Request<ca::PricingNodePriceRequest>,
    ) -> Result<Response<ca::PricingNodePriceResponse>, Status> {
        let r = request.into_inner();
        let node = r.node.unwrap_or_default();
        let pool = self
            .claim_of(&node)
            .map(|c| c.pool)
            .or_else(|| node.labels.get(POOL_LABEL).cloned())
            .ok_or_else(|| Status::not_found("node: not a member of any Shoal pool"))?;
        let pool = self.pool(&pool).await?;
        let secs = match (r.start_timestamp, r.end_timestamp) {
            (Some(a), Some(b)) => (b.seconds - a.seconds).max(0) as f64,
            _ => {
                return Err(Status::invalid_argument(
                    "startTimestamp, endTimestamp: both are required",
                ));
            }
        };
        // Shoal's pool price is per node-hour.
        Ok(Response::new(ca::PricingNodePriceResponse {
            price: pool.price * secs / 3600.0,
        }))
    }

    async fn pricing_pod_price(
        &self,
        _: Request<ca::PricingPodPriceRequest>,
    ) -> Result<Response<ca::PricingPodPriceResponse>, Status> {
        Err(Status::unimplemented(
            "Shoal prices nodes (pool spec.price), not pods",
        ))
    }

    async fn gpu_label(
        &self,
        _: Request<ca::GpuLabelRequest>,
    ) -> Result<Response<ca::GpuLabelResponse>, Status> {
        Ok(Response::new(ca::GpuLabelResponse {
            label: "shoal.dev/gpu".into(),
        }))
    }

    async fn get_available_gpu_types(
        &self,
        _: Request<ca::GetAvailableGpuTypesRequest>,
    ) -> Result<Response<ca::GetAvailableGpuTypesResponse>, Status> {
        Ok(Response::new(ca::GetAvailableGpuTypesResponse::default()))
    }

    async fn cleanup(
        &self,
        _: Request<ca::CleanupRequest>,
    ) -> Result<Response<ca::CleanupResponse>, Status> {
        Ok(Response::new(ca::CleanupResponse {}))
    }

    async fn refresh(
        &self,
        _: Request<ca::RefreshRequest>,
    ) -> Result<Response<ca::RefreshResponse>, Status> {
        // Pools and claims are watch-backed; there is nothing to refresh.
        Ok(Response::new(ca::RefreshResponse {}))
    }

    async fn node_group_target_size(
        &self,
        request: Request<ca::NodeGroupTargetSizeRequest>,
    ) -> Result<Response<ca::NodeGroupTargetSizeResponse>, Status> {
        let pool = self.pool(&request.into_inner().id).await?;
        Ok(Response::new(ca::NodeGroupTargetSizeResponse {
            target_size: self.members(&pool.name).len() as i32,
        }))
    }

    async fn node_group_increase_size(
        &self,
        request: Request<ca::NodeGroupIncreaseSizeRequest>,
    ) -> Result<Response<ca::NodeGroupIncreaseSizeResponse>, Status> {
        let r = request.into_inner();
        if r.delta <= 0 {
            return Err(Status::invalid_argument(format!(
                "delta: must be positive, not {}",
                r.delta
            )));
        }
        let pool = self.pool(&r.id).await?;
        let traceparent = traceparent_of(&tracing::Span::current());
        let before = self.members(&pool.name).len();
        let op = self
            .provisioner
            .create_nodes(
                &pool.name,
                r.delta,
                "",
                "cluster-autoscaler: NodeGroupIncreaseSize",
                traceparent,
            )
            .await
            .map_err(status)?;
        // "Returns once the target size is updated": the claims are written with the request;
        // should that have failed, wait for the leader to write them.
        let want = before + op.claim_ids.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.members(&pool.name).len() < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(op = %op.id, pool = %pool.name, delta = r.delta, "cluster autoscaler increased a node group");
        Ok(Response::new(ca::NodeGroupIncreaseSizeResponse {}))
    }

    async fn node_group_delete_nodes(
        &self,
        request: Request<ca::NodeGroupDeleteNodesRequest>,
    ) -> Result<Response<ca::NodeGroupDeleteNodesResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool(&r.id).await?;
        if r.nodes.is_empty() {
            return Err(Status::invalid_argument(
                "nodes: must name at least one node",
            ));
        }
        let mut names = Vec::with_capacity(r.nodes.len());
        for (i, node) in r.nodes.iter().enumerate() {
            let claim = self.claim_of(node).ok_or_else(|| {
                Status::not_found(format!(
                    "nodes[{i}]: {} ({}) is not a node Shoal manages",
                    node.name, node.provider_id
                ))
            })?;
            if claim.pool != pool.name {
                return Err(Status::invalid_argument(format!(
                    "nodes[{i}]: {} belongs to node group {}, not {}",
                    claim.node_name, claim.pool, pool.name
                )));
            }
            names.push(claim.node_name);
        }
        let traceparent = traceparent_of(&tracing::Span::current());
        let op = self
            .provisioner
            .delete_nodes(
                &names,
                "",
                "cluster-autoscaler: NodeGroupDeleteNodes",
                traceparent,
            )
            .await
            .map_err(status)?;
        tracing::info!(op = %op.id, pool = %pool.name, nodes = ?names, "cluster autoscaler deleted nodes");
        Ok(Response::new(ca::NodeGroupDeleteNodesResponse {}))
    }

    async fn node_group_decrease_target_size(
        &self,
        request: Request<ca::NodeGroupDecreaseTargetSizeRequest>,
    ) -> Result<Response<ca::NodeGroupDecreaseTargetSizeResponse>, Status> {
        let r = request.into_inner();
        if r.delta >= 0 {
            return Err(Status::invalid_argument(format!(
                "delta: must be negative, not {}",
                r.delta
            )));
        }
        let pool = self.pool(&r.id).await?;
        // Only nodes asked for and not yet registered may go; newest first.
        let unregistered: Vec<NodeClaim> = self
            .members(&pool.name)
            .into_iter()
            .rev()
            .filter(|c| self.provisioner.nodes.get(&c.id).is_none())
            .collect();
        let drop = r.delta.unsigned_abs() as usize;
        if unregistered.len() < drop {
            return Err(Status::failed_precondition(format!(
                "delta: node group {} has {} node(s) not yet registered; cannot drop {drop} (delete registered nodes with NodeGroupDeleteNodes)",
                pool.name,
                unregistered.len()
            )));
        }
        let names: Vec<String> = unregistered
            .into_iter()
            .take(drop)
            .map(|c| c.node_name)
            .collect();
        let traceparent = traceparent_of(&tracing::Span::current());
        self.provisioner
            .delete_nodes(
                &names,
                "",
                "cluster-autoscaler: NodeGroupDecreaseTargetSize",
                traceparent,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(ca::NodeGroupDecreaseTargetSizeResponse {}))
    }

    async fn node_group_nodes(
        &self,
        request: Request<ca::NodeGroupNodesRequest>,
    ) -> Result<Response<ca::NodeGroupNodesResponse>, Status> {
        let pool = self.pool(&request.into_inner().id).await?;
        use ca::instance_status::InstanceState;
        let instances = self
            .provisioner
            .claims()
            .into_iter()
            .filter(|c| c.pool == pool.name && c.phase != ClaimPhase::Deleted)
            .map(|c| {
                let (state, error) = match c.phase {
                    ClaimPhase::Ready => (InstanceState::InstanceRunning, None),
                    ClaimPhase::Draining | ClaimPhase::Terminating => {
                        (InstanceState::InstanceDeleting, None)
                    }
                    ClaimPhase::Failed => (
                        InstanceState::InstanceCreating,
                        Some(ca::InstanceErrorInfo {
                            error_code: "shoal-claim-failed".into(),
                            error_message: c.failure_reason.clone(),
                            // cloudprovider.OtherErrorClass
                            instance_error_class: 99,
                        }),
                    ),
                    _ => (InstanceState::InstanceCreating, None),
                };
                ca::Instance {
                    id: self.provider_id(&c),
                    status: Some(ca::InstanceStatus {
                        instance_state: state as i32,
                        error_info: error,
                    }),
                }
            })
            .collect();
        Ok(Response::new(ca::NodeGroupNodesResponse { instances }))
    }

    async fn node_group_template_node_info(
        &self,
        request: Request<ca::NodeGroupTemplateNodeInfoRequest>,
    ) -> Result<Response<ca::NodeGroupTemplateNodeInfoResponse>, Status> {
        let pool = self.pool(&request.into_inner().id).await?;
        let node = template_node(&pool, &self.provisioner.cluster);
        Ok(Response::new(ca::NodeGroupTemplateNodeInfoResponse {
            node_bytes: node.encode_to_vec(),
            resource_slice_bytes: Vec::new(),
        }))
    }

    async fn node_group_get_options(
        &self,
        request: Request<ca::NodeGroupAutoscalingOptionsRequest>,
    ) -> Result<Response<ca::NodeGroupAutoscalingOptionsResponse>, Status> {
        let r = request.into_inner();
        let pool = self.pool(&r.id).await?;
        let mut options = r.defaults.unwrap_or_default();
        let down = &pool.scale_down;
        options.scale_down_utilization_threshold = down.utilization_below;
        options.scale_down_unneeded_duration = Some(seconds(down.unneeded_for));
        options.max_node_provision_duration = Some(seconds(self.provisioner.settings.node_ttl));
        Ok(Response::new(ca::NodeGroupAutoscalingOptionsResponse {
            node_group_autoscaling_options: Some(options),
        }))
    }
}
