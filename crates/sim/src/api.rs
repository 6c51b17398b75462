//! The HTTP face of the simulator: the Kubernetes REST paths for the served kinds, discovery,
//! list/watch, CRUD, patch and the status/scale/binding subresources. Handlers parse and
//! validate the request, call the [`Store`], and encode; errors are `Status` objects.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::{
    error::ApiError,
    patch::{self, PatchType},
    resources::{self, ResourceKind},
    selector::{FieldSelector, LabelSelector},
    store::{Change, EventType, ListPage, Store, Stored},
    validation::FieldValidation,
};

/// Shared state of the HTTP handlers.
pub struct ApiState {
    /// The objects.
    pub store: Arc<Store>,
    /// The `/metrics` exporter.
    pub exporter: crate::metrics::Exporter,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

/// The API server's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/version/", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/api", get(core_versions))
        .route("/sim/v1/compact", axum::routing::post(compact))
        .route("/metrics", get(metrics))
        .route(
            "/openapi/v3",
            get(|State(state): State<Arc<ApiState>>| async move {
                json_response(
                    StatusCode::OK,
                    crate::openapi::index(&state.store.kinds()).to_string(),
                )
            }),
        )
        .route(
            "/openapi/v3/{*path}",
            get(
                |State(state): State<Arc<ApiState>>,
                 axum::extract::Path(path): axum::extract::Path<String>| async move {
                    match crate::openapi::group_version(&state.store.kinds(), &path) {
                        Some(doc) => json_response(StatusCode::OK, doc.to_string()),
                        None => ApiError::NoSuchPath(format!("/openapi/v3/{path}")).into_response(),
                    }
                },
            ),
        )
        .route("/apis", get(groups))
        .route("/api/{*rest}", any(dispatch))
        .route("/apis/{*rest}", any(dispatch))
        .fallback(
            |uri: Uri| async move { ApiError::NoSuchPath(uri.path().to_string()).into_response() },
        )
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::MethodNotAllowed(format!("{method} is not supported on {}", uri.path()))
                .into_response()
        })
        .with_state(state)
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-shoal-sim", "gitCommit": "shoal-sim",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a",
            "compiler": "rustc", "platform": "linux/amd64"
        })
        .to_string(),
    )
}

/// `GET /metrics`: the cluster in node-exporter, kube-state-metrics and cAdvisor form.
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let body = state.exporter.render(&state.store);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

/// `POST /sim/v1/compact`: drop watch history and end open watches (forces clients to re-list).
async fn compact(State(state): State<Arc<ApiState>>) -> Response {
    state.store.compact();
    json_response(
        StatusCode::OK,
        json!({ "compactedTo": state.store.rv() }).to_string(),
    )
}

async fn core_versions() -> Response {
    json_response(
        StatusCode::OK,
        json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] })
            .to_string(),
    )
}

async fn groups(State(state): State<Arc<ApiState>>) -> Response {
    let mut names: Vec<(&str, &str)> = Vec::new();
    for k in state.store.kinds() {
        if !k.group.is_empty() && !names.contains(&(k.group, k.version)) {
            names.push((k.group, k.version));
        }
    }
    let groups: Vec<Value> = names
        .iter()
        .map(|(g, v)| {
            let gv = json!({ "groupVersion": format!("{g}/{v}"), "version": v });
            json!({ "name": g, "versions": [gv.clone()], "preferredVersion": gv })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }).to_string(),
    )
}

fn resource_list(kinds: &[&'static ResourceKind], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        resources.push(json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": resources::verbs(), "shortNames": k.short_names,
        }));
        for sub in k.subresources {
            let (kind, verbs) = match *sub {
                "scale" => ("Scale", vec!["get", "patch", "update"]),
                "eviction" => ("Eviction", vec!["create"]),
                "binding" => ("Binding", vec!["create"]),
                _ => (k.kind, vec!["get", "patch", "update"]),
            };
            let mut r = json!({ "name": format!("{}/{sub}", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": kind, "verbs": verbs });
            if *sub == "scale" {
                r["group"] = json!("autoscaling");
                r["version"] = json!("v1");
            }
            // kubectl drain uses the Eviction API only when discovery names its group/version.
            if *sub == "eviction" {
                r["group"] = json!("policy");
                r["version"] = json!("v1");
            }
            resources.push(r);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources }),
    )
}

/// What a REST path addresses.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// `/api/v1`, `/apis/apps/v1`.
    Resources { group: String, version: String },
    /// `/apis/apps`.
    Group { group: String },
    /// A collection, optionally in one namespace.
    Collection {
        kind: &'static ResourceKind,
        namespace: Option<String>,
    },
    /// One object, or one of its subresources.
    Object {
        kind: &'static ResourceKind,
        namespace: String,
        name: String,
        sub: Option<String>,
    },
}

fn parse_target(store: &Store, path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || ApiError::NoSuchPath(path.to_string());
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            return Ok(Target::Group {
                group: group.to_string(),
            });
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let kind = |plural: &str| {
        store
            .find_kind(group, version, plural)
            .ok_or_else(not_found)
    };
    Ok(match rest {
        [] => Target::Resources {
            group: group.into(),
            version: version.into(),
        },
        ["namespaces", ns, plural, more @ ..] if kind(plural).is_ok_and(|k| k.namespaced) => {
            let kind = kind(plural)?;
            match more {
                [] => Target::Collection {
                    kind,
                    namespace: Some(ns.to_string()),
                },
                [name] => Target::Object {
                    kind,
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    sub: None,
                },
                [name, sub] if kind.subresources.contains(sub) => Target::Object {
                    kind,
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    sub: Some(sub.to_string()),
                },
                _ => return Err(not_found()),
            }
        }
        [plural] => Target::Collection {
            kind: kind(plural)?,
            namespace: None,
        },
        [plural, name] if !kind(plural)?.namespaced => Target::Object {
            kind: kind(plural)?,
            namespace: String::new(),
            name: name.to_string(),
            sub: None,
        },
        [plural, name, sub]
            if !kind(plural)?.namespaced && kind(plural)?.subresources.contains(sub) =>
        {
            Target::Object {
                kind: kind(plural)?,
                namespace: String::new(),
                name: name.to_string(),
                sub: Some(sub.to_string()),
            }
        }
        _ => return Err(not_found()),
    })
}

/// Query parameters that matter to the simulator.
#[derive(Debug, Default)]
struct Query {
    label_selector: String,
    field_selector: String,
    limit: usize,
    continue_token: Option<String>,
    watch: bool,
    resource_version: Option<String>,
    allow_bookmarks: bool,
    timeout: Option<Duration>,
    field_validation: Option<String>,
    include_object: bool,
    /// kubectl asked for a server-side printed Table (set from the Accept header).
    table: bool,
}

fn parse_query(uri: &Uri) -> Result<Query, ApiError> {
    let mut q = Query::default();
    let pairs: Vec<(String, String)> = query_pairs(uri.query().unwrap_or_default());
    for (key, value) in pairs {
        match key.as_str() {
            "labelSelector" => q.label_selector = value,
            "fieldSelector" => q.field_selector = value,
            "limit" => {
                q.limit = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("limit: {value:?} is not a number"))
                })?
            }
            "continue" if !value.is_empty() => q.continue_token = Some(value),
            "watch" => q.watch = parse_bool(&value),
            "resourceVersion" => q.resource_version = Some(value),
            "allowWatchBookmarks" => q.allow_bookmarks = parse_bool(&value),
            "fieldValidation" => q.field_validation = Some(value),
            "includeObject" => q.include_object = value == "Object",
            "timeoutSeconds" => {
                let secs: u64 = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("timeoutSeconds: {value:?} is not a number"))
                })?;
                q.timeout = Some(Duration::from_secs(secs));
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A boolean query parameter as the API server reads it (Go's `strconv.ParseBool`: the Python
/// client sends `watch=True`).
fn parse_bool(value: &str) -> bool {
    matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// Decodes `a=b&c=d` (percent-decoding, `+` as space).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn encode_continue(after: &(String, String)) -> String {
    format!("{}\u{0}{}", after.0, after.1)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::BadRequest(format!("continue token {token:?} is not valid"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect();
    let text = String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())?;
    let (ns, name) = text.split_once('\u{0}').ok_or_else(bad)?;
    Ok((ns.to_string(), name.to_string()))
}

async fn dispatch(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match handle(&state, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

/// Applies server-side field validation to `object`: Strict refuses unknown fields, Warn and
/// Ignore drop them (the API server never stores them); returns the warnings to send.
fn check_fields(
    kind: &ResourceKind,
    object: &mut Value,
    mode: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let unknown = match kind.custom {
        Some(custom) => {
            let checked = crate::crd::check(custom, object);
            if !checked.invalid.is_empty() {
                return Err(ApiError::Invalid {
                    kind: kind.kind.into(),
                    name: object
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    causes: checked.invalid,
                });
            }
            checked.unknown
        }
        None => crate::validation::unknown_fields(kind, object),
    };
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    if mode == FieldValidation::Strict {
        let fields: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        return Err(ApiError::BadRequest(format!(
            "strict decoding error: {}",
            fields.join(", ")
        )));
    }
    for path in &unknown {
        remove_path(object, path);
    }
    Ok(if mode == FieldValidation::Warn {
        unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect()
    } else {
        Vec::new()
    })
}

fn remove_path(object: &mut Value, path: &str) {
    let segments: Vec<&str> = path.split('.').collect();
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut node = object;
    for segment in parents {
        node = match segment.parse::<usize>() {
            Ok(i) if node.is_array() => match node.get_mut(i) {
                Some(n) => n,
                None => return,
            },
            _ => match node.get_mut(*segment) {
                Some(n) => n,
                None => return,
            },
        };
    }
    if let Some(map) = node.as_object_mut() {
        map.remove(*last);
    }
}

/// Adds one `Warning` header per message, as the API server does.
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "'"));
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().append("warning", value);
        }
    }
    response
}

/// `gracePeriodSeconds` from the query or the DeleteOptions body, if given.
fn grace_period(uri: &Uri, body: &Bytes) -> Result<Option<i64>, ApiError> {
    if let Some((_, v)) = query_pairs(uri.query().unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == "gracePeriodSeconds")
    {
        return v.parse().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("gracePeriodSeconds: {v:?} is not a number"))
        });
    }
    if body.is_empty() {
        return Ok(None);
    }
    Ok(parse_body(body)?
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64))
}

/// A pod on a node is not deleted at once: it gets `deletionTimestamp` and shows Terminating
/// until its kubelet has stopped it (then the kubelet deletes it). Returns `None` when the pod
/// is to be deleted now: not bound, grace 0, or already terminating and deleted again with
/// grace 0 (force).
fn begin_graceful_delete(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: &str,
    name: &str,
    grace: Option<i64>,
) -> Result<Option<Arc<Stored>>, ApiError> {
    let pod = store.get(kind, namespace, name)?.value();
    // A pod on a node that does not exist has no kubelet to finish it (the pod GC would force
    // its deletion), so it goes at once.
    let node_exists = |n: &str| {
        crate::resources::by_kind("Node").is_some_and(|nodes| store.get(nodes, "", n).is_ok())
    };
    let bound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty() && node_exists(n));
    let default_grace = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    let grace = grace.unwrap_or(default_grace).max(0);
    if !bound || grace == 0 {
        return Ok(None);
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return store.get(kind, namespace, name).map(Some);
    }
    let at = std::time::SystemTime::now() + Duration::from_secs(grace as u64);
    let stamp = humantime::format_rfc3339_seconds(at).to_string();
    store
        .mark_terminating(kind, namespace, name, &stamp, grace)
        .map(Some)
}

/// The patch type from the request's Content-Type (415 for unsupported ones).
fn patch_type(headers: &HeaderMap) -> Result<PatchType, ApiError> {
    PatchType::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    )
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::table::wanted)
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
}

fn object_response(status: StatusCode, object: Arc<Stored>) -> Response {
    json_response(status, object.json.clone())
}

async fn handle(
    state: &ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let store = &state.store;
    let mode = FieldValidation::parse(parse_query(uri)?.field_validation.as_deref())
        .map_err(ApiError::BadRequest)?;
    match parse_target(store, uri.path())? {
        Target::Resources { group, version } => {
            let list = resource_list(&store.kinds(), &group, &version)
                .ok_or_else(|| ApiError::NoSuchPath(uri.path().into()))?;
            Ok(json_response(StatusCode::OK, list.to_string()))
        }
        Target::Group { group } => {
            let versions: Vec<Value> = store
                .kinds()
                .into_iter()
                .filter(|k| k.group == group)
                .take(1)
                .map(|k| json!({ "groupVersion": format!("{}/{}", k.group, k.version), "version": k.version }))
                .collect();
            if versions.is_empty() {
                return Err(ApiError::NoSuchPath(uri.path().into()));
            }
            Ok(json_response(
                StatusCode::OK,
                json!({ "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions, "preferredVersion": versions[0] }).to_string(),
            ))
        }
        Target::Collection { kind, namespace } => {
            let mut query = parse_query(uri)?;
            query.table = wants_table(headers);
            match *method {
                Method::GET if query.watch => {
                    state.store.watches_open().await;
                    watch(state, kind, namespace, query)
                }
                Method::GET => list(store, kind, namespace, query),
                Method::POST => {
                    let Some(namespace) =
                        namespace.or_else(|| (!kind.namespaced).then(String::new))
                    else {
                        return Err(ApiError::MethodNotAllowed(format!(
                            "create {} needs a namespace in the path",
                            kind.plural
                        )));
                    };
                    let mut object = parse_body(&body)?;
                    let warnings = check_fields(kind, &mut object, mode)?;
                    let created = store.create(kind, &namespace, object)?;
                    Ok(with_warnings(
                        object_response(StatusCode::CREATED, created),
                        &warnings,
                    ))
                }
                _ => Err(ApiError::MethodNotAllowed(format!(
                    "{method} is not supported on a collection"
                ))),
            }
        }
        Target::Object {
            kind,
            namespace,
            name,
            sub: None,
        } => match *method {
            Method::GET => {
                let object = store.get(kind, &namespace, &name)?;
                if wants_table(headers) {
                    let include = parse_query(uri)?.include_object;
                    let table =
                        crate::table::render(kind, &[object.as_ref()], object.rv, include, true);
                    return Ok(json_response(StatusCode::OK, table.to_string()));
                }
                Ok(object_response(StatusCode::OK, object))
            }
            Method::PUT => {
                let mut object = parse_body(&body)?;
                let warnings = check_fields(kind, &mut object, mode)?;
                let updated = store.update(kind, &namespace, &name, object, false)?;
                Ok(with_warnings(
                    object_response(StatusCode::OK, updated),
                    &warnings,
                ))
            }
            Method::PATCH => {
                let patch_type = patch_type(headers)?;
                let (patched, warnings) = patch_object(
                    store,
                    kind,
                    &namespace,
                    &name,
                    PatchSpec {
                        body: &parse_body(&body)?,
                        patch_type,
                        status_only: false,
                        mode,
                    },
                )?;
                Ok(with_warnings(
                    object_response(StatusCode::OK, patched),
                    &warnings,
                ))
            }
            Method::DELETE => {
                if kind.kind == "Namespace" {
                    if crate::namespaces::PROTECTED.contains(&name.as_str()) {
                        return Err(ApiError::Forbidden(format!(
                            "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                        )));
                    }
                    let stamp =
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                    return Ok(object_response(
                        StatusCode::OK,
                        store.mark_terminating(kind, "", &name, &stamp, 0)?,
                    ));
                }
                if kind.kind == "Pod" {
                    let grace = grace_period(uri, &body)?;
                    if let Some(terminating) =
                        begin_graceful_delete(store, kind, &namespace, &name, grace)?
                    {
                        return Ok(object_response(StatusCode::OK, terminating));
                    }
                }
                Ok(object_response(
                    StatusCode::OK,
                    store.delete(kind, &namespace, &name)?,
                ))
            }
            _ => Err(ApiError::MethodNotAllowed(format!(
                "{method} is not supported on an object"
            ))),
        },
        Target::Object {
            kind,
            namespace,
            name,
            sub: Some(sub),
        } => match (sub.as_str(), method.clone()) {
            ("status", Method::GET) => Ok(object_response(
                StatusCode::OK,
                store.get(kind, &namespace, &name)?,
            )),
            ("status", Method::PUT) => {
                let mut object = parse_body(&body)?;
                let warnings = check_fields(kind, &mut object, mode)?;
                Ok(with_warnings(
                    object_response(
                        StatusCode::OK,
                        store.update(kind, &namespace, &name, object, true)?,
                    ),
                    &warnings,
                ))
            }
            ("status", Method::PATCH) => {
                let patch_type = patch_type(headers)?;
                let (patched, warnings) = patch_object(
                    store,
                    kind,
                    &namespace,
                    &name,
                    PatchSpec {
                        body: &parse_body(&body)?,
                        patch_type,
                        status_only: true,
                        mode,
                    },
                )?;
                Ok(with_warnings(
                    object_response(StatusCode::OK, patched),
                    &warnings,
                ))
            }
            ("scale", m) => scale(store, kind, &namespace, &name, m, headers, body),
            ("binding", Method::POST) => bind(store, kind, &namespace, &name, &parse_body(&body)?),
            ("eviction", Method::POST) => {
                parse_body(&body)?;
                crate::disruption::evict(store, &namespace, &name)?;
                Ok(json_response(
                    StatusCode::CREATED,
                    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 }).to_string(),
                ))
            }
            (sub, m) => Err(ApiError::MethodNotAllowed(format!(
                "{m} is not supported on {}/{sub} in this simulator",
                kind.plural
            ))),
        },
    }
}

/// What a PATCH brings.
struct PatchSpec<'a> {
    /// The patch document.
    body: &'a Value,
    /// How to apply it.
    patch_type: PatchType,
    /// Only `.status` may change (the status subresource).
    status_only: bool,
    /// Server-side field validation.
    mode: FieldValidation,
}

/// Applies a patch, retrying on a concurrent write as the API server does.
fn patch_object(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: &str,
    name: &str,
    patch: PatchSpec<'_>,
) -> Result<(Arc<Stored>, Vec<String>), ApiError> {
    if !patch.body.is_object() {
        return Err(ApiError::BadRequest(
            "a patch body must be a JSON object".into(),
        ));
    }
    let mut last = None;
    for _ in 0..5 {
        let current = store.get(kind, namespace, name)?;
        let mut value = current.value();
        let precondition = patch
            .body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        patch::apply(&mut value, patch.body, patch.patch_type);
        if !value.get("metadata").is_some_and(Value::is_object) {
            return Err(ApiError::Invalid {
                kind: kind.kind.into(),
                name: name.into(),
                causes: vec![("metadata".into(), "Invalid value: must be an object".into())],
            });
        }
        let warnings = check_fields(kind, &mut value, patch.mode)?;
        if precondition.is_none() {
            value["metadata"]["resourceVersion"] = json!(current.rv.to_string());
        }
        match store.update(kind, namespace, name, value, patch.status_only) {
            Err(ApiError::Conflict { .. }) if precondition.is_none() => {
                last = Some(ApiError::Conflict {
                    resource: kind.plural.into(),
                    name: name.into(),
                })
            }
            other => return other.map(|stored| (stored, warnings)),
        }
    }
    Err(last.unwrap_or_else(|| ApiError::Internal("patch retries exhausted".into())))
}

fn scale(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: &str,
    name: &str,
    method: Method,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let replicas = match method {
        Method::GET => None,
        Method::PUT => Some(
            parse_body(&body)?
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        ),
        Method::PATCH => {
            let _ = patch_type(headers)?;
            parse_body(&body)?
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
        }
        m => {
            return Err(ApiError::MethodNotAllowed(format!(
                "{m} is not supported on scale"
            )));
        }
    };
    if let Some(replicas) = replicas {
        if replicas < 0 {
            return Err(ApiError::Invalid {
                kind: "Scale".into(),
                name: name.into(),
                causes: vec![(
                    "spec.replicas".into(),
                    "must be greater than or equal to 0".into(),
                )],
            });
        }
        patch_object(
            store,
            kind,
            namespace,
            name,
            PatchSpec {
                body: &json!({ "spec": { "replicas": replicas } }),
                patch_type: PatchType::Merge,
                status_only: false,
                mode: FieldValidation::Ignore,
            },
        )?;
    }
    let object = store.get(kind, namespace, name)?.value();
    let scale = json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": { "name": name, "namespace": namespace, "resourceVersion": object["metadata"]["resourceVersion"], "uid": object["metadata"]["uid"] },
        "spec": { "replicas": object.pointer("/spec/replicas").cloned().unwrap_or(json!(1)) },
        "status": { "replicas": object.pointer("/status/replicas").cloned().unwrap_or(json!(0)) },
    });
    Ok(json_response(StatusCode::OK, scale.to_string()))
}

fn bind(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: &str,
    name: &str,
    binding: &Value,
) -> Result<Response, ApiError> {
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::Invalid {
            kind: "Binding".into(),
            name: name.into(),
            causes: vec![("target.name".into(), "Required value".into())],
        });
    }
    let pod = store.get(kind, namespace, name)?;
    if pod.field("spec.nodeName").is_some_and(|n| !n.is_empty()) {
        return Err(ApiError::Conflict {
            resource: kind.plural.into(),
            name: name.into(),
        });
    }
    patch_object(
        store,
        kind,
        namespace,
        name,
        PatchSpec {
            body: &json!({ "spec": { "nodeName": node } }),
            patch_type: PatchType::Merge,
            status_only: false,
            mode: FieldValidation::Ignore,
        },
    )?;
    Ok(json_response(
        StatusCode::CREATED,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201 })
            .to_string(),
    ))
}

fn selectors(
    kind: &ResourceKind,
    query: &Query,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(&query.label_selector)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let fields = FieldSelector::parse(&query.field_selector, kind.fields)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok((labels, fields))
}

fn matcher(
    namespace: Option<String>,
    kind: &ResourceKind,
    labels: LabelSelector,
    fields: FieldSelector,
) -> impl Fn(&Stored) -> bool + Send + Sync {
    let namespaced = kind.namespaced;
    move |o: &Stored| {
        (!namespaced || namespace.as_ref().is_none_or(|ns| &o.namespace == ns))
            && labels.matches(&o.labels)
            && fields.matches(&|f| o.field(f))
    }
}

fn list(
    store: &Store,
    kind: &'static ResourceKind,
    namespace: Option<String>,
    query: Query,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(kind, &query)?;
    let after = query
        .continue_token
        .as_deref()
        .map(decode_continue)
        .transpose()?;
    let page = ListPage {
        namespace: namespace.clone(),
        limit: query.limit,
        after,
    };
    let filter = matcher(namespace, kind, labels, fields);
    let listed = store.list(kind, &page, &filter);
    let mut metadata = json!({ "resourceVersion": listed.rv.to_string() });
    if let Some(next) = &listed.next {
        metadata["continue"] = json!(encode_continue(next));
    }
    if query.table {
        let objects: Vec<&Stored> = listed.items.iter().map(|o| o.as_ref()).collect();
        let mut table = crate::table::render(kind, &objects, listed.rv, query.include_object, true);
        table["metadata"] = metadata;
        return Ok(json_response(StatusCode::OK, table.to_string()));
    }
    let head = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        kind.kind,
        kind.api_version(),
        metadata
    );
    let mut body = Vec::with_capacity(
        head.len() + listed.items.iter().map(|o| o.json.len() + 1).sum::<usize>() + 2,
    );
    body.extend_from_slice(head.as_bytes());
    for (i, item) in listed.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.json);
    }
    body.extend_from_slice(b"]}");
    Ok(json_response(StatusCode::OK, body))
}

fn watch_line(kind: EventType, object: &Bytes) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_str().as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn watch(
    state: &ApiState,
    kind: &'static ResourceKind,
    namespace: Option<String>,
    query: Query,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(kind, &query)?;
    let from =
        match query.resource_version.as_deref() {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("resourceVersion {rv:?} is not valid"))
            })?),
        };
    let start = match state.store.watch(kind, from) {
        Ok(start) => start,
        // Real API servers report a too-old version inside a 200 watch stream as an ERROR event;
        // clients (client-go, kube-runtime) expect exactly that.
        Err(err @ ApiError::Gone { .. }) => {
            let line = format!("{{\"type\":\"ERROR\",\"object\":{}}}\n", err.status());
            return Ok(json_response(StatusCode::OK, line));
        }
        Err(err) => return Err(err),
    };
    let matches = matcher(namespace, kind, labels, fields);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let bookmarks = query.allow_bookmarks.then_some(state.bookmark_interval);
    let deadline = query.timeout.map(|t| tokio::time::Instant::now() + t);
    let bookmark_head = format!(
        "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"",
        kind.kind,
        kind.api_version()
    );
    let table_mode = query.table.then_some(query.include_object);
    let encode = move |event: EventType, object: &Stored| -> Bytes {
        match table_mode {
            None => watch_line(event, &object.json),
            Some(include) => {
                let table = crate::table::render(kind, &[object], object.rv, include, true);
                watch_line(event, &Bytes::from(table.to_string()))
            }
        }
    };
    tokio::spawn(async move {
        let mut last_rv = from.unwrap_or(0);
        let mut live = start.live;
        let mut compacted = start.compacted;
        // What a change means to a filtered watcher.
        let translate = |change: &Change| -> Option<Bytes> {
            if change.plural != kind.plural {
                return None;
            }
            let now = change.kind != EventType::Deleted && matches(&change.object);
            let before = change.prev.as_ref().is_some_and(|p| matches(p));
            let event = match (change.kind, before, now) {
                (EventType::Deleted, true, _) => EventType::Deleted,
                (EventType::Deleted, false, _) => return None,
                (_, false, true) => EventType::Added,
                (_, true, true) => change.kind,
                (_, true, false) => EventType::Deleted,
                (_, false, false) => return None,
            };
            Some(encode(event, &change.object))
        };
        for change in &start.backlog {
            let synthetic = from.is_none();
            let line = if synthetic {
                matches(&change.object).then(|| encode(EventType::Added, &change.object))
            } else {
                translate(change)
            };
            last_rv = last_rv.max(change.object.rv);
            if let Some(line) = line
                && tx.send(Ok(line)).await.is_err()
            {
                return;
            }
        }
        last_rv = last_rv.max(start.rv);
        let mut ticker = tokio::time::interval(bookmarks.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        loop {
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = timeout => return,
                _ = tx.closed() => return,
                _ = compacted.changed() => return,
                _ = ticker.tick(), if bookmarks.is_some() => {
                    let line = format!("{bookmark_head}{last_rv}\"}}}}}}\n");
                    if tx.send(Ok(Bytes::from(line))).await.is_err() { return; }
                }
                change = live.recv() => match change {
                    Ok(change) => {
                        if change.object.rv <= last_rv { continue; }
                        last_rv = change.object.rv;
                        if let Some(line) = translate(&change)
                            && tx.send(Ok(line)).await.is_err() { return; }
                    }
                    // Too slow to keep up: end the watch; the client resumes from its last
                    // version (or re-lists on 410), exactly as with a real API server.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(json_response(StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_targets() {
        let store = Store::new(16);
        let parse_target = |path: &str| super::parse_target(&store, path);
        let pods = resources::by_kind("Pod").unwrap();
        let nodes = resources::by_kind("Node").unwrap();
        let namespaces = resources::by_kind("Namespace").unwrap();
        assert_eq!(
            parse_target("/api/v1/pods").unwrap(),
            Target::Collection {
                kind: pods,
                namespace: None
            }
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/default/pods").unwrap(),
            Target::Collection {
                kind: pods,
                namespace: Some("default".into())
            }
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/default/pods/p/status").unwrap(),
            Target::Object {
                kind: pods,
                namespace: "default".into(),
                name: "p".into(),
                sub: Some("status".into())
            }
        );
        assert_eq!(
            parse_target("/api/v1/nodes/n1").unwrap(),
            Target::Object {
                kind: nodes,
                namespace: String::new(),
                name: "n1".into(),
                sub: None
            }
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/kube-system").unwrap(),
            Target::Object {
                kind: namespaces,
                namespace: String::new(),
                name: "kube-system".into(),
                sub: None
            }
        );
        assert_eq!(
            parse_target("/api/v1/namespaces").unwrap(),
            Target::Collection {
                kind: namespaces,
                namespace: None
            }
        );
        assert!(parse_target("/api/v1/widgets").is_err());
        assert!(parse_target("/api/v1/namespaces/default/pods/p/exec").is_err());
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let key = ("default".to_string(), "pod-1".to_string());
        assert_eq!(decode_continue(&encode_continue(&key)).unwrap(), key);
        assert!(decode_continue("zz").is_err());
        assert!(decode_continue("abc").is_err());
    }

    #[test]
    fn query_strings_decode() {
        let pairs = query_pairs("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1");
        assert_eq!(
            pairs[0],
            ("labelSelector".into(), "app=web,tier in (a)".into())
        );
    }
}
