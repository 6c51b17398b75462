//! The `aws` backend: EC2 instances from a launch template (or an AMI), on the official AWS SDK.
//!
//! - **Launch**: `RunInstances` of one instance per claim, tagged with the claim's ownership and
//!   pool labels (`shoal.dev/cluster`, `shoal.dev/pool`, `shoal.dev/claim`, `shoal.dev/node`,
//!   `Name`). Options are tried in order — for each capacity type (spot, then on-demand when
//!   allowed), each instance type, each subnet — each with `ClientToken = <claim>-<option>`, so a
//!   retry after a timeout or a crash returns the instance the first call made rather than a
//!   second one. A capacity error (`InsufficientInstanceCapacity`, `Unsupported`, spot limits)
//!   marks that (capacity type, type, zone) unavailable for `unavailableFor` and moves on;
//!   throttling and server errors are transient (Shoal's retries and breaker back off); anything
//!   else fails the claim with AWS's code and message.
//! - **List**: `DescribeInstances` filtered by the owner tags, every page, live states only.
//! - **Delete**: `TerminateInstances`; an instance already gone is fine.
//!
//! SDK retries are off: the provisioner's guard does retries, backoff and the circuit breaker.

pub mod config;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::Instant,
};

use aws_sdk_ec2::{
    Client,
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
    types::{
        Filter, InstanceMarketOptionsRequest, InstanceType, LaunchTemplateSpecification,
        MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
    },
};
use base64::Engine;
use shoal_proto::v1 as pb;

use self::config::{AwsBackend, AwsClass, CapacityType};
use super::{CLAIM_LABEL, InstanceSpec, NodeProvider, POOL_LABEL, ProviderError};

/// The backend's name.
pub const BACKEND: &str = "aws";
/// Tag holding the node name an instance registers as.
pub const NODE_TAG: &str = "shoal.dev/node";

/// Codes that mean "no capacity for this (capacity type, type, zone) now": try the next.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "Unsupported",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
];

/// Codes worth the same call again later (throttling, AWS's own trouble).
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
];

/// Instance states Shoal considers alive.
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];

/// One way to launch: capacity type, instance type, subnet (None: EC2 picks).
#[derive(Debug, Clone)]
struct LaunchOption {
    capacity: CapacityType,
    instance_type: String,
    subnet: Option<String>,
}

/// EC2 in one region.
pub struct AwsProvider {
    client: Client,
    settings: AwsBackend,
    /// (capacity type, instance type, zone) → skipped until.
    unavailable: Mutex<HashMap<(CapacityType, String, String), Instant>>,
    /// Subnet → zone, learned from DescribeSubnets.
    zones: Mutex<HashMap<String, String>>,
}

/// An SDK error as a provider error: capacity codes are reported as such by the caller.
fn sdk_error<E>(what: &str, e: &SdkError<E, HttpResponse>) -> (String, ProviderError)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = e.code().unwrap_or_default().to_string();
    let message = e.message().unwrap_or_default().to_string();
    let text = if code.is_empty() {
        format!("EC2 {what}: {}", aws_sdk_ec2::error::DisplayErrorContext(e))
    } else {
        format!("EC2 {what}: {code}: {message}")
    };
    let transient = match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            TRANSIENT_CODES.contains(&code.as_str()) || s.raw().status().is_server_error()
        }
        _ => false,
    };
    let error = if transient && !CAPACITY_CODES.contains(&code.as_str()) {
        ProviderError::Transient(text)
    } else {
        ProviderError::Permanent(text)
    };
    (code, error)
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

impl AwsProvider {
    /// A provider for `settings` (credentials from the standard chain; nothing is called yet).
    pub async fn new(settings: AwsBackend) -> AwsProvider {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        AwsProvider {
            client: Client::new(&config),
            settings,
            unavailable: Mutex::default(),
            zones: Mutex::default(),
        }
    }

    fn class(&self, name: &str) -> Result<&AwsClass, ProviderError> {
        let name = if name.is_empty() { "default" } else { name };
        self.settings.classes.get(name).ok_or_else(|| {
            ProviderError::Permanent(format!(
                "aws has no class {name:?} (service.backends.aws.classes has: {})",
                self.settings
                    .classes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Every way to launch `class`, in order of preference.
    fn options(class: &AwsClass) -> Vec<LaunchOption> {
        let mut capacities = vec![class.capacity_type];
        if class.capacity_type == CapacityType::Spot && class.fallback_to_on_demand {
            capacities.push(CapacityType::OnDemand);
        }
        let subnets: Vec<Option<String>> = if class.subnets.is_empty() {
            vec![None]
        } else {
            class.subnets.iter().cloned().map(Some).collect()
        };
        let mut out = Vec::new();
        for capacity in capacities {
            for instance_type in &class.instance_types {
                for subnet in &subnets {
                    out.push(LaunchOption {
                        capacity,
                        instance_type: instance_type.clone(),
                        subnet: subnet.clone(),
                    });
                }
            }
        }
        out
    }

    /// The zone of `subnet` (its id when EC2 cannot say; "any" without a subnet).
    async fn zone(&self, subnet: Option<&str>) -> String {
        let Some(subnet) = subnet else {
            return "any".into();
        };
        if let Some(z) = self
            .zones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subnet)
        {
            return z.clone();
        }
        let zone = self
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .ok()
            .and_then(|o| {
                o.subnets()
                    .first()
                    .and_then(|s| s.availability_zone().map(String::from))
            });
        match zone {
            Some(z) => {
                self.zones
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(subnet.to_string(), z.clone());
                z
            }
            None => subnet.to_string(),
        }
    }

    fn skipped(&self, key: &(CapacityType, String, String)) -> bool {
        let mut unavailable = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match unavailable.get(key) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                unavailable.remove(key);
                false
            }
            None => false,
        }
    }

    fn mark_unavailable(&self, key: (CapacityType, String, String)) {
        tracing::warn!(capacity = %key.0, instance_type = %key.1, zone = %key.2, for_ = ?self.settings.unavailable_for, "no EC2 capacity; skipping this offering for a while");
        self.unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now() + self.settings.unavailable_for);
    }

    fn user_data(class: &AwsClass, spec: &InstanceSpec) -> Option<String> {
        let template = class.user_data.as_ref()?;
        let labels = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let filled = template
            .expose()
            .replace("{{nodeName}}", &spec.node_name)
            .replace("{{nodeLabels}}", &labels);
        Some(base64::engine::general_purpose::STANDARD.encode(filled))
    }

    fn to_instance(i: &aws_sdk_ec2::types::Instance) -> pb::Instance {
        let labels: BTreeMap<String, String> = i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
            .collect();
        let id = i.instance_id().unwrap_or_default().to_string();
        let zone = i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default();
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        pb::Instance {
            backend: BACKEND.into(),
            pool: labels.get(POOL_LABEL).cloned().unwrap_or_default(),
            claim_id: labels.get(CLAIM_LABEL).cloned().unwrap_or_default(),
            // "terminated" never shows (not listed); shutting down means it will not boot.
            state: match state.as_str() {
                "shutting-down" | "terminated" => "dead".into(),
                _ => state,
            },
            node_name: labels.get(NODE_TAG).cloned().unwrap_or_default(),
            provider_id: format!("aws:///{zone}/{id}"),
            id,
            labels,
            ..Default::default()
        }
    }

    async fn run(
        &self,
        class: &AwsClass,
        spec: &InstanceSpec,
        option: &LaunchOption,
        token: String,
    ) -> Result<pb::Instance, (String, ProviderError)> {
        let mut tags: Vec<Tag> = spec.labels.iter().map(|(k, v)| tag(k, v)).collect();
        tags.push(tag(CLAIM_LABEL, &spec.claim_id));
        tags.push(tag(NODE_TAG, &spec.node_name));
        tags.push(tag("Name", &spec.node_name));
        let mut call = self
            .client
            .run_instances()
            .client_token(token)
            .min_count(1)
            .max_count(1)
            .instance_type(InstanceType::from(option.instance_type.as_str()))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(t) = &class.launch_template {
            let mut lt = LaunchTemplateSpecification::builder();
            if !t.id.is_empty() {
                lt = lt.launch_template_id(&t.id);
            } else {
                lt = lt.launch_template_name(&t.name);
            }
            if !t.version.is_empty() {
                lt = lt.version(&t.version);
            }
            call = call.launch_template(lt.build());
        }
        if !class.image_id.is_empty() {
            call = call.image_id(&class.image_id);
        }
        if let Some(subnet) = &option.subnet {
            call = call.subnet_id(subnet);
        }
        if !class.security_groups.is_empty() {
            call = call.set_security_group_ids(Some(class.security_groups.clone()));
        }
        if let Some(data) = Self::user_data(class, spec) {
            call = call.user_data(data);
        }
        if option.capacity == CapacityType::Spot {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = call
            .send()
            .await
            .map_err(|e| sdk_error("RunInstances", &e))?;
        let instance = out.instances().first().ok_or_else(|| {
            (
                String::new(),
                ProviderError::Transient("EC2 RunInstances answered no instance".into()),
            )
        })?;
        Ok(Self::to_instance(instance))
    }
}

#[async_trait::async_trait]
impl NodeProvider for AwsProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let class = self.class(&spec.class)?;
        let mut tried: Vec<String> = Vec::new();
        for (i, option) in Self::options(class).iter().enumerate() {
            let zone = self.zone(option.subnet.as_deref()).await;
            let key = (option.capacity, option.instance_type.clone(), zone.clone());
            if self.skipped(&key) {
                tried.push(format!(
                    "{} {} in {zone}: skipped (no capacity lately)",
                    option.capacity, option.instance_type
                ));
                continue;
            }
            // One token per option: a retry of the same option returns the same instance.
            let token = format!("{}-{i}", spec.claim_id);
            match self.run(class, spec, option, token).await {
                Ok(mut instance) => {
                    if instance.labels.is_empty() {
                        instance.labels = spec.labels.clone();
                    }
                    instance.claim_id = spec.claim_id.clone();
                    instance.pool = spec.pool.clone();
                    instance.node_name = spec.node_name.clone();
                    tracing::info!(claim = %spec.claim_id, instance = %instance.id, capacity = %option.capacity, instance_type = %option.instance_type, %zone, "EC2 instance launched");
                    return Ok(instance);
                }
                Err((code, _)) if CAPACITY_CODES.contains(&code.as_str()) => {
                    self.mark_unavailable(key);
                    tried.push(format!(
                        "{} {} in {zone}: {code}",
                        option.capacity, option.instance_type
                    ));
                }
                Err((_, e)) => return Err(e),
            }
        }
        Err(ProviderError::Permanent(format!(
            "no EC2 capacity for class {:?}: {}",
            if spec.class.is_empty() {
                "default"
            } else {
                &spec.class
            },
            tried.join("; ")
        )))
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        match self
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let (code, error) = sdk_error("TerminateInstances", &e);
                if code.starts_with("InvalidInstanceID") {
                    Ok(())
                } else {
                    Err(error)
                }
            }
        }
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let mut call = self.client.describe_instances().filters(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(LIVE_STATES.iter().map(|s| s.to_string()).collect()))
                .build(),
        );
        for (k, v) in owner {
            call = call.filters(Filter::builder().name(format!("tag:{k}")).values(v).build());
        }
        let mut pages = call.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("DescribeInstances", &e).1)?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    let i = Self::to_instance(instance);
                    // Only what really carries every owner tag.
                    if owner.iter().all(|(k, v)| i.labels.get(k) == Some(v)) {
                        out.push(i);
                    }
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: BACKEND.into(),
            classes: self.settings.classes.keys().cloned().collect(),
            capabilities: vec![
                "spot".into(),
                "idempotent-by-claim".into(),
                "provider-ids".into(),
            ],
        }
    }
}
