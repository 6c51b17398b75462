//! Service configuration: typed structs with defaults, loaded from a YAML file, then `SHOAL_*`
//! environment variables, then command-line flags — later sources win.
//!
//! Loading never stops at the first problem: every invalid field is reported with its path and
//! reason, and a service with any invalid field does not start.
//!
//! Environment variables map onto paths with `__` between levels and snake case for camel case:
//! `SHOAL_ELECTION__LEASE_TTL=3s` sets `election.leaseTtl`. Variables whose first level is not a
//! config section (such as `SHOAL_REQUIRE_DOCKER`) are not config and are ignored; an unknown key
//! inside a known section is an error, so typos do not pass silently.

use std::{
    fmt::Debug,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use shoal_core::ValidationErrors;

/// Settings specific to one service, under the `service:` section of its config file.
pub trait ServiceSettings:
    Serialize + DeserializeOwned + Clone + Debug + Default + Send + Sync + 'static
{
    /// Short service name: `metrics`, `decider`, `provisioner`, `reconciler`.
    const SERVICE: &'static str;
    /// Default gRPC port.
    const GRPC_PORT: u16;
    /// Default admin HTTP port.
    const ADMIN_PORT: u16;
    /// Whether the service needs the state store.
    const USES_STORE: bool;
    /// Whether the service runs leader-only loops and so campaigns.
    const CAMPAIGNS: bool;
    /// Adds every problem in these settings to `errors`, with paths under `service.`.
    fn validate(&self, errors: &mut ValidationErrors);
}

/// Where the gRPC API listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address (default `127.0.0.1:<service port>`; use `0.0.0.0:<port>` in a pod).
    pub addr: SocketAddr,
    /// The address other replicas reach this one at, `http://host:port`, published in the
    /// leader record so standbys can forward leader-only calls (in a pod:
    /// `http://$(POD_IP):<port>`). Empty: the listen address, or the host name when listening on
    /// all interfaces.
    #[serde(default)]
    pub advertise_addr: String,
    /// TLS for this server and for calls to other services at `https://` addresses (this
    /// service's certificate is its client identity: mTLS).
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    /// Serve, and call `http://` addresses, without TLS. Never the default: say it explicitly
    /// (the demo on loopback does); a warning is logged at start.
    #[serde(default)]
    pub plaintext: bool,
    /// Identities, roles and per-identity limits.
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
}

impl GrpcConfig {
    /// Whether identities and roles are enforced: `auth.enabled`, else whenever TLS is on.
    pub fn auth_enabled(&self) -> bool {
        self.auth.enabled.unwrap_or(self.tls.is_set())
    }
}

/// Where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address.
    pub addr: SocketAddr,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Logs and traces.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,shoal_state=debug`.
    pub log_level: String,
    /// `service.name` of exported spans (default `shoal-<service>`). Spans are exported over
    /// OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub service_name: String,
}

/// Which state store implementation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// etcd v3 (production).
    Etcd,
    /// In this process only (`shoal demo`, single replica trials).
    Memory,
}

/// The state store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreConfig {
    /// `etcd` or `memory`.
    pub backend: StoreBackend,
    /// etcd endpoints, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Prefix of every key.
    pub namespace: String,
    /// Deadline of each store request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints): the CA that signs etcd's certificate and, for
    /// etcd's `--client-cert-auth`, a client certificate and key.
    #[serde(default)]
    pub tls: EtcdTlsConfig,
    /// etcd user (etcd's own auth), with `password`.
    #[serde(default)]
    pub username: String,
    /// Password of `username` (inline, `{ fromFile: … }` or `{ fromEnv: … }`).
    #[serde(default)]
    pub password: crate::secret::Secret,
}

/// `store.tls`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EtcdTlsConfig {
    /// PEM CA bundle.
    pub ca_file: PathBuf,
    /// PEM client certificate (optional).
    pub cert_file: PathBuf,
    /// PEM key of the client certificate.
    pub key_file: PathBuf,
}

impl StoreConfig {
    /// The etcd client settings, reading the TLS files.
    pub fn etcd(&self) -> Result<shoal_state::EtcdConfig, String> {
        let read = |field: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("store.tls.{field}: {}: {e}", path.display()))
        };
        let tls = if self.tls.ca_file.as_os_str().is_empty() {
            None
        } else {
            let identity = if self.tls.cert_file.as_os_str().is_empty() {
                None
            } else {
                Some((
                    read("certFile", &self.tls.cert_file)?,
                    read("keyFile", &self.tls.key_file)?,
                ))
            };
            Some(shoal_state::EtcdTls {
                ca_pem: read("caFile", &self.tls.ca_file)?,
                identity,
            })
        };
        Ok(shoal_state::EtcdConfig {
            endpoints: self.endpoints.clone(),
            namespace: self.namespace.clone(),
            request_timeout: self.request_timeout,
            tls,
            user: (!self.username.is_empty())
                .then(|| (self.username.clone(), self.password.expose().to_string())),
        })
    }
}

/// Leader election (decider, provisioner, reconciler).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ElectionSettings {
    /// How long a dead leader keeps leadership.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the leader refreshes its status record (`leaders/<service>`), a fenced write.
    #[serde(with = "humantime_serde")]
    pub record_interval: Duration,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight RPCs may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// A service's whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    bound = "S: ServiceSettings"
)]
pub struct Config<S> {
    /// This replica's identity in elections and logs (default `<hostname>-<pid>`).
    pub instance_id: String,
    /// Cluster id, written on every instance and Node as `shoal.dev/cluster`; Shoal touches
    /// only instances and Nodes that carry it. Empty (default): the id kept in the store,
    /// generated once by the first service to start. A configured id must match the store's.
    pub cluster: String,
    /// gRPC listener.
    pub grpc: GrpcConfig,
    /// Admin HTTP listener.
    pub admin: AdminConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// State store.
    pub store: StoreConfig,
    /// Leader election.
    pub election: ElectionSettings,
    /// Shutdown.
    pub shutdown: ShutdownConfig,
    /// Audit log retention (services with a store).
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// Service-specific settings.
    pub service: S,
}

impl<S: ServiceSettings> Default for Config<S> {
    fn default() -> Self {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "shoal".into());
        Config {
            instance_id: format!("{host}-{}", std::process::id()),
            cluster: String::new(),
            grpc: GrpcConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], S::GRPC_PORT)),
                advertise_addr: String::new(),
                tls: crate::tls::TlsConfig::default(),
                plaintext: false,
                auth: crate::auth::AuthConfig::default(),
            },
            admin: AdminConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], S::ADMIN_PORT)),
            },
            telemetry: TelemetryConfig {
                log_format: LogFormat::Human,
                log_level: "info".into(),
                service_name: format!("shoal-{}", S::SERVICE),
            },
            store: StoreConfig {
                backend: StoreBackend::Etcd,
                endpoints: vec!["http://127.0.0.1:2379".into()],
                namespace: shoal_state::keys::DEFAULT_NAMESPACE.into(),
                request_timeout: Duration::from_secs(3),
                tls: EtcdTlsConfig::default(),
                username: String::new(),
                password: crate::secret::Secret::default(),
            },
            election: ElectionSettings {
                lease_ttl: Duration::from_secs(5),
                record_interval: Duration::from_secs(1),
            },
            shutdown: ShutdownConfig {
                grace: Duration::from_secs(10),
            },
            audit: crate::audit::AuditConfig::default(),
            service: S::default(),
        }
    }
}

impl<S: ServiceSettings> Config<S> {
    /// Every semantic problem (after types have parsed), with field paths.
    pub fn validate(&self, errors: &mut ValidationErrors) {
        if self.instance_id.is_empty() || self.instance_id.contains('/') {
            errors.add("instanceId", "must be non-empty and must not contain '/'");
        }
        if !self.cluster.is_empty() && !is_dns_label(&self.cluster) {
            errors.add(
                "cluster",
                format!(
                    "{:?} is not a DNS label (lowercase letters, digits, '-', at most 63)",
                    self.cluster
                ),
            );
        }
        if !self.grpc.advertise_addr.is_empty() {
            crate::upstream::validate_address(
                "grpc.advertiseAddr",
                &self.grpc.advertise_addr,
                errors,
            );
        }
        if self.grpc.tls.is_set() {
            self.grpc.tls.validate("grpc.tls", errors);
        } else if !self.grpc.plaintext {
            errors.add(
                "grpc.tls",
                "is required: set grpc.tls (certFile, keyFile, caFile; scripts/dev-certs.sh makes a local set), or grpc.plaintext: true to serve without TLS (loopback and development only)",
            );
        }
        self.grpc.auth.validate("grpc.auth", errors);
        self.audit.validate("audit", errors);
        if self.grpc.addr == self.admin.addr && self.grpc.addr.port() != 0 {
            errors.add(
                "admin.addr",
                format!("must differ from grpc.addr ({})", self.grpc.addr),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.telemetry.log_level) {
            errors.add(
                "telemetry.logLevel",
                format!(
                    "{:?} is not a tracing filter: {e}",
                    self.telemetry.log_level
                ),
            );
        }
        if self.telemetry.service_name.trim().is_empty() {
            errors.add("telemetry.serviceName", "must not be empty");
        }
        if S::USES_STORE && self.store.backend == StoreBackend::Etcd {
            if self.store.endpoints.is_empty() {
                errors.add(
                    "store.endpoints",
                    "at least one etcd endpoint is required when store.backend is etcd",
                );
            }
            let tls = !self.store.tls.ca_file.as_os_str().is_empty();
            if self.store.tls.cert_file.as_os_str().is_empty()
                != self.store.tls.key_file.as_os_str().is_empty()
            {
                errors.add("store.tls", "certFile and keyFile go together");
            }
            if !tls && !self.store.tls.cert_file.as_os_str().is_empty() {
                errors.add("store.tls.caFile", "is required with a client certificate");
            }
            if !self.store.username.is_empty() && self.store.password.is_empty() {
                errors.add("store.password", "is required with store.username");
            }
            for (i, endpoint) in self.store.endpoints.iter().enumerate() {
                if tls != endpoint.starts_with("https://") {
                    errors.add(
                        format!("store.endpoints[{i}]"),
                        if tls {
                            format!("{endpoint:?} must be https:// when store.tls is set")
                        } else {
                            format!("{endpoint:?} is https:// but store.tls.caFile is not set")
                        },
                    );
                }
                let ok = endpoint
                    .strip_prefix("http://")
                    .or_else(|| endpoint.strip_prefix("https://"))
                    .is_some_and(|rest| rest.contains(':') && !rest.contains('/'));
                if !ok {
                    errors.add(
                        format!("store.endpoints[{i}]"),
                        format!("{endpoint:?} is not of the form http://host:port"),
                    );
                }
            }
        }
        if !(self.store.namespace.starts_with('/') && self.store.namespace.ends_with('/')) {
            errors.add(
                "store.namespace",
                format!("{:?} must start and end with '/'", self.store.namespace),
            );
        }
        if self.store.request_timeout < Duration::from_millis(100) {
            errors.add("store.requestTimeout", "must be at least 100ms");
        }
        if self.election.lease_ttl < Duration::from_secs(2)
            || self.election.lease_ttl > Duration::from_secs(60)
        {
            errors.add(
                "election.leaseTtl",
                "must be between 2s and 60s (etcd rounds shorter leases up)",
            );
        }
        if self.election.record_interval.is_zero()
            || self.election.record_interval >= self.election.lease_ttl
        {
            errors.add(
                "election.recordInterval",
                "must be above zero and below election.leaseTtl",
            );
        }
        if self.shutdown.grace > Duration::from_secs(300) {
            errors.add("shutdown.grace", "must be at most 5m");
        }
        self.service.validate(errors);
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Where configuration comes from, lowest precedence first.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// YAML file.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; only `SHOAL_*` are read).
    pub env: Vec<(String, String)>,
    /// `path=value` overrides from flags, e.g. `("grpc.addr", "0.0.0.0:50052")`.
    pub overrides: Vec<(String, String)>,
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML, or its top level is not a mapping.
    #[error("config file {path} is not valid YAML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One or more fields are invalid.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// A loaded, validated configuration and anything worth a warning.
#[derive(Debug)]
pub struct Loaded<S> {
    /// The configuration.
    pub config: Config<S>,
    /// Non-fatal notes, logged once telemetry is up.
    pub warnings: Vec<String>,
}

/// Loads and validates a service's configuration from `sources`.
pub fn load<S: ServiceSettings>(sources: &Sources) -> Result<Loaded<S>, ConfigError> {
    let defaults = serde_json::to_value(Config::<S>::default()).unwrap_or(Value::Null);
    let mut tree = defaults.clone();
    let mut errors = ValidationErrors::default();
    let mut warnings = Vec::new();

    if let Some(path) = &sources.file {
        let file = read_yaml(path)?;
        merge(&mut tree, file);
    }
    for (name, raw) in &sources.env {
        let Some(rest) = name.strip_prefix("SHOAL_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(snake_to_camel).collect();
        if rest.is_empty() || defaults.get(&path[0]).is_none() {
            continue; // not a config variable (e.g. SHOAL_CONFIG, SHOAL_REQUIRE_DOCKER)
        }
        if let Err(reason) = set_path(&mut tree, &defaults, &path, raw) {
            errors.add(
                path.join("."),
                format!("{reason} (from environment variable {name})"),
            );
        }
    }
    for (dotted, raw) in &sources.overrides {
        let path: Vec<String> = dotted.split('.').map(str::to_string).collect();
        if let Err(reason) = set_path(&mut tree, &defaults, &path, raw) {
            errors.add(dotted.clone(), format!("{reason} (from flag)"));
        }
    }

    // Deserialize, and for every field serde rejects, record it and fall back to the default so
    // the next problem can be found too.
    let mut config = None;
    for _ in 0..256 {
        match serde_path_to_error::deserialize::<_, Config<S>>(&tree) {
            Ok(parsed) => {
                config = Some(parsed);
                break;
            }
            Err(err) => {
                let mut path: Vec<String> = err.path().iter().filter_map(segment_name).collect();
                let message = err.inner().to_string();
                if let Some(field) = unknown_field(&message) {
                    // The path may or may not already end with the unknown key.
                    if path.last() != Some(&field) {
                        path.push(field.clone());
                    }
                    let parent = &path[..path.len() - 1];
                    if !remove_path(&mut tree, parent, &field) {
                        errors.add(display_path(&path), message);
                        break;
                    }
                    errors.add(display_path(&path), message);
                } else {
                    let got = get_path(&tree, &path)
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    errors.add(display_path(&path), format!("{message} (got {got})"));
                    // A bad list element cannot be defaulted alone: restore the whole list.
                    let restore_at: Vec<String> = path
                        .iter()
                        .take_while(|s| index(s).is_none())
                        .cloned()
                        .collect();
                    let repaired = get_path(&defaults, &restore_at)
                        .cloned()
                        .is_some_and(|default| replace_path(&mut tree, &restore_at, default));
                    if !repaired {
                        // Cannot repair this spot; report what we have.
                        break;
                    }
                }
            }
        }
    }
    let Some(config) = config else {
        return Err(ConfigError::Invalid(errors));
    };
    config.validate(&mut errors);
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    if S::USES_STORE && config.store.backend == StoreBackend::Memory {
        warnings.push(format!(
            "store.backend is memory: state lives in this process only and replicas of {} do not coordinate",
            S::SERVICE
        ));
    }
    Ok(Loaded { config, warnings })
}

fn read_yaml(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        message: e.to_string(),
    })?;
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Map::new())),
        other => Err(ConfigError::Syntax {
            path: path.into(),
            message: format!("the top level must be a mapping, found {}", kind(&other)),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Deep merge: mappings merge key by key; anything else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (slot, over) => *slot = over,
    }
}

fn snake_to_camel(segment: &str) -> String {
    let mut out = String::new();
    for (i, part) in segment
        .to_ascii_lowercase()
        .split('_')
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        if i == 0 {
            out.push_str(part);
        } else {
            let mut chars = part.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars);
            }
        }
    }
    out
}

/// Sets a string from env or flags at `path`, typed like the default there.
fn set_path(tree: &mut Value, defaults: &Value, path: &[String], raw: &str) -> Result<(), String> {
    let mut default = defaults;
    let empty = Value::String(String::new());
    for (i, segment) in path.iter().enumerate() {
        default = match default.get(segment) {
            Some(d) => d,
            // A map whose entries are the user's (e.g. `grpc.auth.identities.<name>`).
            None if i + 1 == path.len() && default.as_object().is_some_and(Map::is_empty) => &empty,
            None => return Err("unknown setting".to_string()),
        };
    }
    if default.is_object() {
        return Err("is a section; set one of its fields".into());
    }
    let value = match default {
        Value::Number(_) => raw
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| raw.parse::<f64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(raw.into())),
        Value::Bool(_) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" => Value::Bool(false),
            _ => Value::String(raw.into()),
        },
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        _ => Value::String(raw.into()),
    };
    let mut slot = tree;
    for segment in path {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let map = slot.as_object_mut().ok_or("not a section")?;
        slot = map.entry(segment.clone()).or_insert(Value::Null);
    }
    *slot = value;
    Ok(())
}

fn segment_name(segment: &serde_path_to_error::Segment) -> Option<String> {
    use serde_path_to_error::Segment;
    match segment {
        Segment::Map { key } => Some(key.clone()),
        Segment::Seq { index } => Some(format!("[{index}]")),
        Segment::Enum { variant } => Some(variant.clone()),
        Segment::Unknown => None,
    }
}

fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if !out.is_empty() && !segment.starts_with('[') {
            out.push('.');
        }
        out.push_str(segment);
    }
    if out.is_empty() {
        "(top level)".into()
    } else {
        out
    }
}

fn index(segment: &str) -> Option<usize> {
    segment.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

fn get_path<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(tree, |node, segment| match index(segment) {
            Some(i) => node.get(i),
            None => node.get(segment.as_str()),
        })
}

fn get_path_mut<'a>(tree: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(tree, |node, segment| match index(segment) {
            Some(i) => node.get_mut(i),
            None => node.get_mut(segment.as_str()),
        })
}

fn replace_path(tree: &mut Value, path: &[String], value: Value) -> bool {
    match get_path_mut(tree, path) {
        Some(slot) if *slot != value => {
            *slot = value;
            true
        }
        _ => false,
    }
}

fn remove_path(tree: &mut Value, parent: &[String], field: &str) -> bool {
    match get_path_mut(tree, parent) {
        Some(Value::Object(map)) => map.remove(field).is_some(),
        _ => false,
    }
}

/// The field name in serde's "unknown field `x`, expected …" message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct TestSettings {
        upstream_addr: String,
        dry_run: bool,
        batch: u32,
    }

    impl Default for TestSettings {
        fn default() -> Self {
            TestSettings {
                upstream_addr: "http://127.0.0.1:1".into(),
                dry_run: false,
                batch: 5,
            }
        }
    }

    impl ServiceSettings for TestSettings {
        const SERVICE: &'static str = "test";
        const GRPC_PORT: u16 = 50999;
        const ADMIN_PORT: u16 = 9999;
        const USES_STORE: bool = true;
        const CAMPAIGNS: bool = true;
        fn validate(&self, errors: &mut ValidationErrors) {
            if self.batch == 0 {
                errors.add("service.batch", "must be at least 1");
            }
        }
    }

    fn file(yaml: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), yaml).expect("write");
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn errors_of(result: Result<Loaded<TestSettings>, ConfigError>) -> Vec<String> {
        match result {
            Err(ConfigError::Invalid(errs)) => errs.errors.iter().map(|e| e.path.clone()).collect(),
            Err(other) => panic!("expected field errors, got {other}"),
            Ok(_) => panic!("expected field errors, got a config"),
        }
    }

    #[test]
    fn defaults_need_tls_or_an_explicit_plaintext() {
        let paths = errors_of(load::<TestSettings>(&Sources::default()));
        assert_eq!(paths, ["grpc.tls"]);
        let loaded = load::<TestSettings>(&Sources {
            overrides: vec![("grpc.plaintext".into(), "true".into())],
            ..Default::default()
        })
        .expect("defaults load");
        assert!(
            !loaded.config.grpc.auth_enabled(),
            "no TLS: auth off by default"
        );
        assert_eq!(loaded.config.grpc.addr.port(), 50999);
        assert_eq!(loaded.config.election.lease_ttl, Duration::from_secs(5));
        assert_eq!(loaded.config.telemetry.service_name, "shoal-test");
    }

    #[test]
    fn file_then_env_then_flags() {
        let f = file(
            "grpc: { addr: 127.0.0.1:7000, plaintext: true }\nelection: { leaseTtl: 7s }\nservice: { batch: 2 }\n",
        );
        let sources = Sources {
            file: Some(f.path().into()),
            env: env(&[
                ("SHOAL_ELECTION__LEASE_TTL", "9s"),
                ("SHOAL_SERVICE__DRY_RUN", "true"),
                ("SHOAL_SERVICE__BATCH", "3"),
                ("SHOAL_STORE__ENDPOINTS", "http://a:2379, http://b:2379"),
                ("SHOAL_REQUIRE_DOCKER", "1"),
                ("PATH", "/bin"),
            ]),
            overrides: vec![("service.batch".into(), "4".into())],
        };
        let c = load::<TestSettings>(&sources).expect("valid").config;
        assert_eq!(c.grpc.addr.port(), 7000, "file");
        assert_eq!(
            c.election.lease_ttl,
            Duration::from_secs(9),
            "env beats file"
        );
        assert!(c.service.dry_run, "env bool");
        assert_eq!(c.service.batch, 4, "flag beats env");
        assert_eq!(
            c.store.endpoints,
            ["http://a:2379", "http://b:2379"],
            "env list"
        );
    }

    #[test]
    fn every_bad_field_is_listed_with_its_path() {
        let f = file(
            "grpc: { addr: not-an-address }\n\
             election: { leaseTtl: forever, recordInterval: 1s }\n\
             telemetry: { logFormat: xml }\n\
             store: { endpoints: ['127.0.0.1:2379'], namespace: shoal }\n\
             service: { batch: 0, colour: blue }\n\
             surprise: 1\n",
        );
        let sources = Sources {
            file: Some(f.path().into()),
            env: env(&[("SHOAL_GRPC__ADR", "x")]),
            overrides: vec![],
        };
        let mut paths = errors_of(load::<TestSettings>(&sources));
        paths.sort();
        assert_eq!(
            paths,
            [
                "election.leaseTtl",
                "grpc.addr",
                "grpc.adr",
                "grpc.tls",
                "service.batch",
                "service.colour",
                "store.endpoints[0]",
                "store.namespace",
                "surprise",
                "telemetry.logFormat",
            ]
        );
    }

    #[test]
    fn messages_say_what_was_given() {
        let f = file("grpc: { addr: nowhere }\n");
        let err = load::<TestSettings>(&Sources {
            file: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("grpc.addr"), "{text}");
        assert!(text.contains("\"nowhere\""), "{text}");
    }

    #[test]
    fn syntax_errors_and_missing_files_are_reported() {
        let f = file("grpc: [unclosed\n");
        let err = load::<TestSettings>(&Sources {
            file: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let err = load::<TestSettings>(&Sources {
            file: Some("/nonexistent/shoal.yaml".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        let f = file("- just\n- a list\n");
        let err = load::<TestSettings>(&Sources {
            file: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("top level must be a mapping"),
            "{err}"
        );
    }

    #[test]
    fn semantic_rules() {
        let sources = Sources {
            overrides: vec![
                ("admin.addr".into(), "127.0.0.1:50999".into()),
                ("election.recordInterval".into(), "10s".into()),
                ("cluster".into(), "Prod_1".into()),
                ("telemetry.logLevel".into(), "info,[[".into()),
            ],
            ..Default::default()
        };
        let mut paths = errors_of(load::<TestSettings>(&sources));
        paths.sort();
        assert_eq!(
            paths,
            [
                "admin.addr",
                "cluster",
                "election.recordInterval",
                "grpc.tls",
                "telemetry.logLevel"
            ]
        );
    }

    #[test]
    fn unknown_flag_path_is_an_error() {
        let sources = Sources {
            overrides: vec![
                ("grpc.port".into(), "1".into()),
                ("grpc.plaintext".into(), "true".into()),
            ],
            ..Default::default()
        };
        assert_eq!(errors_of(load::<TestSettings>(&sources)), ["grpc.port"]);
    }
}
