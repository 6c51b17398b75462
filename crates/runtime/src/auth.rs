//! Who is calling and what they may do, as a tower layer in front of every service.
//!
//! A caller is identified by its client certificate (the identity of [`certificate_identity`])
//! or by a bearer token (`authorization: Bearer …`, stored as SHA-256 hashes in
//! `grpc.auth.tokensFile`). Each identity has one role — `viewer` < `operator` < `admin` — and
//! each method needs one (see [`required_role`]). No credentials: UNAUTHENTICATED; too small a
//! role: PERMISSION_DENIED naming the role needed. Health and reflection stay open
//! (`grpc.auth.open`). Per identity, calls are rate limited and bounded in concurrency:
//! RESOURCE_EXHAUSTED with a retry hint. The caller is put in the request's extensions
//! ([`Caller`]) for handlers (e.g. `RequestCapacity`'s requester) and the audit log.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use futures::future::BoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::tls::certificate_identity;

/// A role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: Get, List, Watch, Evaluate, status.
    Viewer,
    /// Operates: Pause/Resume, Apply/DeletePool, RequestCapacity/CancelCapacityRequest, Reconcile,
    /// reading the audit log.
    Operator,
    /// Changes nodes directly: CreateNodes, DeleteNodes, Repair.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role (viewer, operator, admin)")),
        }
    }
}

/// The role a method needs. Methods not named here need `admin`, so a method added later is
/// closed until someone decides otherwise.
pub fn required_role(path: &str) -> Role {
    let method = path.rsplit('/').next().unwrap_or("");
    match method {
        "CreateNodes" | "DeleteNodes" | "Repair" | "Create" | "Delete" => Role::Admin,
        "Pause"
        | "Resume"
        | "ApplyPool"
        | "DeletePool"
        | "RequestCapacity"
        | "CancelCapacityRequest"
        | "Reconcile"
        | "ListAudit" => Role::Operator,
        m if m.starts_with("Get")
            || m.starts_with("List")
            || m.starts_with("Watch")
            || m == "Evaluate"
            || m == "QueryPromQL"
            || m == "Describe" =>
        {
            Role::Viewer
        }
        // Cluster Autoscaler's externalgrpc reads (its IncreaseSize, DeleteNodes and
        // DecreaseTargetSize change nodes: admin, like CreateNodes).
        "NodeGroups"
        | "NodeGroupForNode"
        | "NodeGroupTargetSize"
        | "NodeGroupNodes"
        | "NodeGroupTemplateNodeInfo"
        | "NodeGroupGetOptions"
        | "PricingNodePrice"
        | "PricingPodPrice"
        | "GPULabel"
        | "Refresh"
        | "Cleanup" => Role::Viewer,
        _ => Role::Admin,
    }
}

/// Whether a method changes something (audited): Shoal's own methods above `viewer` (all
/// unary), not health, reflection or reading the audit log.
pub fn is_mutating(path: &str) -> bool {
    (path.starts_with("/shoal.v1.")
        || path.starts_with("/clusterautoscaler.cloudprovider.v1.externalgrpc."))
        && required_role(path) > Role::Viewer
        && !path.ends_with("/ListAudit")
}

/// How a caller was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthenticatedBy {
    /// Its client certificate.
    Certificate,
    /// A bearer token.
    Token,
    /// Authorization is off: everyone is `anonymous` with every role.
    Anonymous,
}

impl AuthenticatedBy {
    /// As recorded in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthenticatedBy::Certificate => "certificate",
            AuthenticatedBy::Token => "token",
            AuthenticatedBy::Anonymous => "anonymous",
        }
    }
}

/// The authenticated caller of a request (in its extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Certificate identity, token name, or `anonymous`.
    pub identity: String,
    /// Its role.
    pub role: Role,
    /// How it was identified.
    pub by: AuthenticatedBy,
}

impl Caller {
    /// The caller of `request`, if the auth layer ran (it always does in a Shoal server).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// `grpc.auth`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Enforce identities and roles. Unset: on when `grpc.tls` is set, off in plaintext.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Certificate identity → role (e.g. `shoal-decider: admin`).
    #[serde(default)]
    pub identities: BTreeMap<String, Role>,
    /// YAML file of bearer tokens, stored hashed:
    /// `tokens: [{ name: alice, role: admin, sha256: <hex of SHA-256 of the token> }]`.
    /// Read again when it changes.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// gRPC services open to everyone (no credentials needed).
    #[serde(default = "default_open")]
    pub open: Vec<String>,
    /// Identities of replicas trusted to forward a caller's identity with a leader-only call
    /// (besides this service's own certificate identity).
    #[serde(default)]
    pub forwarders: Vec<String>,
    /// Per-identity limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: None,
            identities: BTreeMap::new(),
            tokens_file: None,
            open: default_open(),
            forwarders: Vec::new(),
            limits: LimitsConfig::default(),
        }
    }
}

fn default_open() -> Vec<String> {
    vec![
        "grpc.health.v1.Health".into(),
        "grpc.reflection.v1.ServerReflection".into(),
        "grpc.reflection.v1alpha.ServerReflection".into(),
    ]
}

/// `grpc.auth.limits`: per identity (every anonymous caller shares one identity).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained calls per second.
    pub rate_per_second: u32,
    /// Calls allowed at once above the sustained rate.
    pub burst: u32,
    /// Calls (and open streams) in progress at once.
    pub concurrent: u32,
    /// Largest request message, bytes.
    pub max_request_bytes: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rate_per_second: 200,
            burst: 400,
            concurrent: 128,
            max_request_bytes: 4 << 20,
            max_concurrent_streams: 1024,
        }
    }
}

impl AuthConfig {
    /// Adds problems under `path`.
    /// (The tokens file is read at start: see [`AuthConfig::check_tokens`].)
    pub fn validate(&self, path: &str, errors: &mut shoal_core::ValidationErrors) {
        let l = &self.limits;
        if l.rate_per_second == 0 || l.rate_per_second > 1_000_000 {
            errors.add(
                format!("{path}.limits.ratePerSecond"),
                "must be between 1 and 1000000",
            );
        }
        if l.burst == 0 || l.burst > 1_000_000 {
            errors.add(
                format!("{path}.limits.burst"),
                "must be between 1 and 1000000",
            );
        }
        if l.concurrent == 0 || l.concurrent > 100_000 {
            errors.add(
                format!("{path}.limits.concurrent"),
                "must be between 1 and 100000",
            );
        }
        if l.max_request_bytes < 1024 || l.max_request_bytes > 64 << 20 {
            errors.add(
                format!("{path}.limits.maxRequestBytes"),
                "must be between 1024 and 67108864",
            );
        }
        if l.max_concurrent_streams == 0 {
            errors.add(
                format!("{path}.limits.maxConcurrentStreams"),
                "must be at least 1",
            );
        }
    }
}

impl AuthConfig {
    /// At start: a tokens file that exists must parse (a missing one — an optional Secret not
    /// created yet — means no tokens until it appears).
    pub fn check_tokens(&self) -> Result<(), String> {
        match &self.tokens_file {
            Some(file) if file.exists() => load_tokens(file)
                .map(|_| ())
                .map_err(|e| format!("grpc.auth.tokensFile: {e}")),
            Some(file) => {
                tracing::warn!(file = %file.display(), "grpc.auth.tokensFile does not exist (yet): no bearer token is accepted until it does");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: String,
}

/// Token hash (lowercase hex) → (name, role).
type Tokens = HashMap<String, (String, Role)>;

fn load_tokens(file: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed: TokensFile =
        serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut tokens = Tokens::new();
    for (i, t) in parsed.tokens.into_iter().enumerate() {
        let hash = t.sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{}: tokens[{i}].sha256 must be 64 hex digits (the SHA-256 of the token, e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                file.display()
            ));
        }
        if t.name.is_empty() {
            return Err(format!(
                "{}: tokens[{i}].name must not be empty",
                file.display()
            ));
        }
        tokens.insert(hash, (t.name, t.role));
    }
    Ok(tokens)
}

/// SHA-256 of a token, lowercase hex (what the tokens file holds).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The tokens file, read again when it changes (checked at most once a second).
struct TokenStore {
    file: Option<PathBuf>,
    /// The tokens, the file's stamp when read, when the stamp was last looked at.
    state: Mutex<(Tokens, Option<FileStamp>, Instant)>,
}

impl TokenStore {
    fn new(file: Option<PathBuf>) -> TokenStore {
        let tokens = file
            .as_deref()
            .map(|f| load_tokens(f).unwrap_or_default())
            .unwrap_or_default();
        let stamp = file.as_deref().and_then(file_stamp);
        TokenStore {
            file,
            state: Mutex::new((tokens, stamp, Instant::now())),
        }
    }

    fn lookup(&self, token: &str) -> Option<(String, Role)> {
        let file = self.file.as_deref()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.2.elapsed() >= Duration::from_secs(1) {
            state.2 = Instant::now();
            let now = file_stamp(file);
            if now != state.1 {
                match load_tokens(file) {
                    Ok(tokens) => {
                        tracing::info!(file = %file.display(), "tokens file changed: reloaded");
                        state.0 = tokens;
                        state.1 = now;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "tokens file changed but cannot be read; keeping the previous tokens")
                    }
                }
            }
        }
        state.0.get(&token_hash(token)).cloned()
    }
}

/// A file's modification time and length: changed when either changes.
type FileStamp = (SystemTime, u64);

fn file_stamp(file: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Header a forwarding replica sets to the identity it authenticated.
pub const CALLER_HEADER: &str = "x-shoal-caller";
/// Header a forwarding replica sets to that identity's role.
pub const CALLER_ROLE_HEADER: &str = "x-shoal-caller-role";

/// The decisions behind [`AuthLayer`].
pub struct Authenticator {
    enabled: bool,
    identities: BTreeMap<String, Role>,
    tokens: TokenStore,
    open: Vec<String>,
    forwarders: Vec<String>,
    limits: LimitsConfig,
    rate: DefaultKeyedRateLimiter<String>,
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    denied: prometheus::IntCounterVec,
    audit: Option<crate::audit::AuditLog>,
}

impl Authenticator {
    /// From `grpc.auth`; `own_identity` (this service's certificate identity) may forward.
    pub fn new(
        config: &AuthConfig,
        enabled: bool,
        own_identity: Option<String>,
        denied: prometheus::IntCounterVec,
        audit: Option<crate::audit::AuditLog>,
    ) -> Authenticator {
        let quota = Quota::per_second(
            NonZeroU32::new(config.limits.rate_per_second.max(1)).unwrap_or(NonZeroU32::MIN),
        )
        .allow_burst(NonZeroU32::new(config.limits.burst.max(1)).unwrap_or(NonZeroU32::MIN));
        Authenticator {
            enabled,
            identities: config.identities.clone(),
            tokens: TokenStore::new(config.tokens_file.clone()),
            open: config.open.clone(),
            forwarders: config
                .forwarders
                .iter()
                .cloned()
                .chain(own_identity)
                .collect(),
            limits: config.limits.clone(),
            rate: DefaultKeyedRateLimiter::keyed(quota),
            in_flight: Mutex::default(),
            denied,
            audit,
        }
    }

    fn is_open(&self, path: &str) -> bool {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        self.open.iter().any(|o| o == service)
    }

    /// Who calls, or the status refusing the call.
    fn identify<B>(&self, req: &http::Request<B>) -> Result<Caller, tonic::Status> {
        if !self.enabled {
            return Ok(Caller {
                identity: "anonymous".into(),
                role: Role::Admin,
                by: AuthenticatedBy::Anonymous,
            });
        }
        if let Some(value) = req.headers().get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .ok_or_else(|| {
                    tonic::Status::unauthenticated(
                        "the authorization header must be `Bearer <token>`",
                    )
                })?;
            let (name, role) = self
                .tokens
                .lookup(token)
                .ok_or_else(|| tonic::Status::unauthenticated("unknown bearer token"))?;
            return Ok(Caller {
                identity: name,
                role,
                by: AuthenticatedBy::Token,
            });
        }
        let identity = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().and_then(certificate_identity))
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "no client certificate and no bearer token: call with a certificate signed by the service's CA, or with `authorization: Bearer <token>`",
                )
            })?;
        // A trusted replica forwarding a leader-only call speaks for the caller it checked.
        if self.forwarders.contains(&identity)
            && let Some(caller) = req
                .headers()
                .get(CALLER_HEADER)
                .and_then(|v| v.to_str().ok())
            && let Some(role) = req
                .headers()
                .get(CALLER_ROLE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.parse::<Role>().ok())
        {
            return Ok(Caller {
                identity: caller.to_string(),
                role,
                by: AuthenticatedBy::Certificate,
            });
        }
        let role = *self.identities.get(&identity).ok_or_else(|| {
            tonic::Status::permission_denied(format!(
                "certificate identity {identity:?} has no role; grant one in grpc.auth.identities"
            ))
        })?;
        Ok(Caller {
            identity,
            role,
            by: AuthenticatedBy::Certificate,
        })
    }

    fn admit<B>(&self, req: &http::Request<B>) -> Result<Option<Admitted>, Refused> {
        let path = req.uri().path();
        if self.is_open(path) {
            return Ok(None);
        }
        let caller = self.identify(req).map_err(|status| Refused {
            status,
            caller: None,
        })?;
        let needed = required_role(path);
        if caller.role < needed {
            return Err(Refused {
                status: tonic::Status::permission_denied(format!(
                    "{} needs the {needed} role; {} has {}",
                    path.trim_start_matches('/'),
                    caller.identity,
                    caller.role
                )),
                caller: Some(caller),
            });
        }
        self.limit(caller).map(Some).map_err(|status| Refused {
            status,
            caller: None,
        })
    }

    /// The caller's rate and concurrency limits.
    fn limit(&self, caller: Caller) -> Result<Admitted, tonic::Status> {
        if let Err(not_until) = self.rate.check_key(&caller.identity) {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            return Err(exhausted(
                format!(
                    "rate limit for {}: {} calls/s (burst {}); retry in {} ms",
                    caller.identity,
                    self.limits.rate_per_second,
                    self.limits.burst,
                    wait.as_millis().max(1)
                ),
                wait,
            ));
        }
        let semaphore = {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 10_000 {
                map.retain(|_, s| Arc::strong_count(s) > 1);
            }
            map.entry(caller.identity.clone())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(self.limits.concurrent as usize))
                })
                .clone()
        };
        let permit = semaphore.try_acquire_owned().map_err(|_| {
            exhausted(
                format!(
                    "{} already has {} calls in progress (grpc.auth.limits.concurrent); retry when one ends",
                    caller.identity, self.limits.concurrent
                ),
                Duration::from_millis(100),
            )
        })?;
        Ok((caller, permit))
    }
}

/// An admitted caller and its concurrency slot.
type Admitted = (Caller, tokio::sync::OwnedSemaphorePermit);

/// A refusal; `caller` when it was identified (a too small role: audited).
struct Refused {
    status: tonic::Status,
    caller: Option<Caller>,
}

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` (and the delay in the message).
fn exhausted(message: String, retry_in: Duration) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_retry_info(Some(retry_in.max(Duration::from_millis(1))));
    tonic::Status::with_error_details(tonic::Code::ResourceExhausted, message, details)
}

/// The layer; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// Checks every call with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admitted = self.auth.admit(&req);
        // Only a trusted forwarder's word counts (checked above); the claim goes no further.
        req.headers_mut().remove(CALLER_HEADER);
        req.headers_mut().remove(CALLER_ROLE_HEADER);
        match admitted {
            Ok(None) => Box::pin(inner.call(req)),
            Ok(Some((caller, permit))) => {
                req.extensions_mut().insert(caller);
                Box::pin(async move {
                    let response = inner.call(req).await;
                    drop(permit);
                    response
                })
            }
            Err(Refused { status, caller }) => {
                let code = format!("{:?}", status.code());
                self.auth.denied.with_label_values(&[&code]).inc();
                let path = req.uri().path().to_string();
                tracing::info!(%path, code = %code, reason = %status.message(), "call refused");
                // An identified caller refused a change is recorded (an unauthenticated flood
                // is not: it would let anyone write to the store).
                let audit = self
                    .auth
                    .audit
                    .clone()
                    .zip(caller)
                    .filter(|_| crate::auth::is_mutating(&path));
                let message = status.message().to_string();
                Box::pin(async move {
                    if let Some((log, caller)) = audit {
                        log.write(shoal_proto::v1::AuditRecord {
                            identity: caller.identity,
                            authenticated_by: caller.by.as_str().into(),
                            method: path,
                            result: "PERMISSION_DENIED".into(),
                            message,
                            ..Default::default()
                        })
                        .await;
                    }
                    Ok(status.into_http())
                })
            }
        }
    }
}

/// Headers a forwarding replica adds so the leader knows the original caller.
pub fn forwarding_headers(caller: &Caller) -> Vec<(&'static str, HeaderValue)> {
    let mut headers = Vec::new();
    if caller.by == AuthenticatedBy::Certificate
        && let Ok(identity) = HeaderValue::from_str(&caller.identity)
        && let Ok(role) = HeaderValue::from_str(&caller.role.to_string())
    {
        headers.push((CALLER_HEADER, identity));
        headers.push((CALLER_ROLE_HEADER, role));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_documented_table() {
        assert_eq!(
            required_role("/shoal.v1.ProvisionerService/CreateNodes"),
            Role::Admin
        );
        assert_eq!(
            required_role("/shoal.v1.ProvisionerService/Repair"),
            Role::Admin
        );
        assert_eq!(
            required_role("/shoal.v1.DeciderService/Pause"),
            Role::Operator
        );
        assert_eq!(
            required_role("/shoal.v1.PoolService/ApplyPool"),
            Role::Operator
        );
        assert_eq!(
            required_role("/shoal.v1.ReconcilerService/Reconcile"),
            Role::Operator
        );
        assert_eq!(
            required_role("/shoal.v1.DeciderService/Evaluate"),
            Role::Viewer
        );
        assert_eq!(
            required_role("/shoal.v1.MetricsService/WatchSnapshots"),
            Role::Viewer
        );
        // Something new is closed until classified.
        assert_eq!(
            required_role("/shoal.v1.DeciderService/Explode"),
            Role::Admin
        );
        assert!(is_mutating("/shoal.v1.PoolService/DeletePool"));
        // Cluster Autoscaler's protocol: reads for viewers; changing sizes is admin and audited.
        let ca = "/clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider";
        assert_eq!(required_role(&format!("{ca}/NodeGroupNodes")), Role::Viewer);
        assert_eq!(required_role(&format!("{ca}/Refresh")), Role::Viewer);
        assert_eq!(
            required_role(&format!("{ca}/NodeGroupIncreaseSize")),
            Role::Admin
        );
        assert!(is_mutating(&format!("{ca}/NodeGroupDeleteNodes")));
        assert!(!is_mutating(&format!("{ca}/NodeGroupTargetSize")));
        assert!(!is_mutating("/shoal.v1.AuditService/ListAudit"));
        assert!(!is_mutating("/shoal.v1.PoolService/ListPools"));
        // A stream is never buffered for the audit log.
        assert!(!is_mutating(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[test]
    fn tokens_file_is_checked_and_looked_up_by_hash() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("tokens.yaml");
        std::fs::write(
            &file,
            format!(
                "tokens:\n  - {{ name: alice, role: admin, sha256: {} }}\n",
                token_hash("s3cret")
            ),
        )
        .expect("write");
        let store = TokenStore::new(Some(file.clone()));
        assert_eq!(store.lookup("s3cret"), Some(("alice".into(), Role::Admin)));
        assert_eq!(store.lookup("other"), None);
        std::fs::write(
            &file,
            "tokens:\n  - { name: bob, role: viewer, sha256: abc }\n",
        )
        .expect("write");
        let err = load_tokens(&file).expect_err("short hash");
        assert!(err.contains("tokens[0].sha256"), "{err}");
    }
}
