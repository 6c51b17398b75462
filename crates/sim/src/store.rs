//! The simulator's object store: every object of every served kind, with etcd-like semantics —
//! one global resourceVersion bumped by each write, optimistic concurrency on update, and an
//! ordered event log from which watches resume (410 Gone once a version has been compacted away).
//!
//! Objects are kept serialized (`Bytes`) next to a small index (labels, selectable fields), so a
//! list is a concatenation and a watch event is serialized once for all watchers.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::{error::ApiError, resources::ResourceKind};

/// One stored object.
#[derive(Debug)]
pub struct Stored {
    /// resourceVersion of this state.
    pub rv: u64,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// Values of the kind's selectable fields.
    pub fields: Vec<(&'static str, String)>,
    /// The object as JSON.
    pub json: Bytes,
}

impl Stored {
    /// The object parsed.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    /// Value of a selectable field.
    pub fn field(&self, name: &str) -> Option<String> {
        match name {
            "metadata.name" => Some(self.name.clone()),
            "metadata.namespace" => Some(self.namespace.clone()),
            _ => self
                .fields
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, v)| v.clone()),
        }
    }
}

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted (the object carries the deletion's resourceVersion).
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers receive it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Plural of the object's kind.
    pub plural: &'static str,
    /// What happened.
    pub kind: EventType,
    /// The object after the change.
    pub object: Arc<Stored>,
    /// The object before the change (None for creations and synthetic events).
    pub prev: Option<Arc<Stored>>,
}

type Table = BTreeMap<(String, String), Arc<Stored>>;

struct Inner {
    rv: u64,
    tables: HashMap<&'static str, Table>,
    log: VecDeque<Change>,
    log_capacity: usize,
    /// Highest resourceVersion no longer in `log`.
    compacted: u64,
    /// Kinds served by CustomResourceDefinitions.
    custom: Vec<&'static ResourceKind>,
}

/// The table key of an object: cluster-scoped kinds have no namespace.
fn object_key(kind: &ResourceKind, namespace: &str, name: &str) -> (String, String) {
    let namespace = if kind.namespaced {
        namespace.to_string()
    } else {
        String::new()
    };
    (namespace, name.to_string())
}

impl Inner {
    /// The stored object at `key`, or NotFound.
    fn current(
        &self,
        kind: &ResourceKind,
        key: &(String, String),
    ) -> Result<Arc<Stored>, ApiError> {
        self.tables
            .get(kind.plural)
            .and_then(|t| t.get(key).cloned())
            .ok_or_else(|| ApiError::NotFound {
                resource: kind.plural.into(),
                name: key.1.clone(),
            })
    }
}

/// A consistent view for a watch: the backlog to send, then the live receiver.
pub struct WatchStart {
    /// Changes when the store is compacted: the watch must end.
    pub compacted: tokio::sync::watch::Receiver<u64>,
    /// Changes to send first, in order.
    pub backlog: Vec<Change>,
    /// Live changes (may overlap the backlog; skip `rv <= last sent`).
    pub live: broadcast::Receiver<Change>,
    /// resourceVersion the backlog brings the watcher to.
    pub rv: u64,
}

/// All objects of the simulated cluster.
pub struct Store {
    inner: RwLock<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped by [`Store::compact`]; open watches end when it changes.
    epoch: tokio::sync::watch::Sender<u64>,
    /// False while the simulated API server restarts: new watches wait.
    watches_open: tokio::sync::watch::Sender<bool>,
}

/// Options of a list.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// Only this namespace (namespaced kinds); all when `None`.
    pub namespace: Option<String>,
    /// At most this many items (0 = all).
    pub limit: usize,
    /// Continue after this (namespace, name).
    pub after: Option<(String, String)>,
}

/// What a list returns.
pub struct Listed {
    /// Matching objects in key order.
    pub items: Vec<Arc<Stored>>,
    /// resourceVersion the list was served at.
    pub rv: u64,
    /// Key to continue after, when more remain.
    pub next: Option<(String, String)>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// DNS-1123 subdomain (most object names).
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// DNS-1123 label (namespace names).
pub fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

fn string_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn field_value(v: &Value, field: &str) -> String {
    let path: Vec<&str> = field.split('.').collect();
    match path.iter().try_fold(v, |v, k| v.get(k)) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

impl Store {
    /// An empty cluster with the `default`, `kube-system` and `kube-node-lease` namespaces.
    /// `log_capacity` bounds how far back a watch can resume.
    pub fn new(log_capacity: usize) -> Arc<Store> {
        let (changes, _) = broadcast::channel(65_536);
        // Versions start at the Unix time in ms, so that a restarted simulator (which forgets
        // everything) never hands out a version an earlier incarnation used: a client resuming
        // from one gets 410 Gone and re-lists, instead of keeping objects that no longer exist.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let store = Arc::new(Store {
            inner: RwLock::new(Inner {
                rv: base,
                tables: HashMap::new(),
                log: VecDeque::new(),
                log_capacity: log_capacity.max(16),
                compacted: base,
                custom: Vec::new(),
            }),
            changes,
            epoch: tokio::sync::watch::Sender::new(0),
            watches_open: tokio::sync::watch::Sender::new(true),
        });
        if let Some(ns) = crate::resources::by_kind("Namespace") {
            for name in ["default", "kube-system", "kube-node-lease"] {
                let object = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
                // Cannot fail: valid names, empty store.
                let _ = store.create(ns, "", object);
            }
        }
        store
    }

    /// The kind served at `group`/`version`/`plural`: built in, or from a CRD.
    pub fn find_kind(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<&'static ResourceKind> {
        crate::resources::find(group, version, plural).or_else(|| {
            self.read()
                .custom
                .iter()
                .find(|k| k.group == group && k.version == version && k.plural == plural)
                .copied()
        })
    }

    /// Every object in `namespace`, of every namespaced kind.
    pub fn in_namespace(&self, namespace: &str) -> Vec<(&'static ResourceKind, Arc<Stored>)> {
        let kinds = self.kinds();
        let inner = self.read();
        kinds
            .into_iter()
            .filter(|k| k.namespaced)
            .flat_map(|k| {
                inner
                    .tables
                    .get(k.plural)
                    .into_iter()
                    .flat_map(|t| t.values())
                    .filter(|o| o.namespace == namespace)
                    .map(move |o| (k, o.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every served kind: the built-in ones, then those of CRDs.
    pub fn kinds(&self) -> Vec<&'static ResourceKind> {
        let mut kinds: Vec<&'static ResourceKind> = crate::resources::KINDS.iter().collect();
        kinds.extend(self.read().custom.iter().copied());
        kinds
    }

    /// The kind a CRD object would serve, refused (422) when it is invalid or its plural is
    /// already served by something else.
    fn crd_kind(inner: &Inner, crd: &Value) -> Result<&'static ResourceKind, ApiError> {
        let name = string_at(crd, &["metadata", "name"])
            .unwrap_or_default()
            .to_string();
        let invalid = |causes| ApiError::Invalid {
            kind: "CustomResourceDefinition".into(),
            name: name.clone(),
            causes,
        };
        let kind = crate::crd::kind_from_crd(crd).map_err(invalid)?;
        let taken = crate::resources::KINDS
            .iter()
            .any(|k| k.plural == kind.plural)
            || inner
                .custom
                .iter()
                .any(|k| k.plural == kind.plural && k.custom.is_some_and(|c| c.crd_name != name));
        if taken {
            return Err(invalid(vec![(
                "spec.names.plural".into(),
                format!(
                    "Invalid value: {:?}: is already served by another resource",
                    kind.plural
                ),
            )]));
        }
        Ok(kind)
    }

    /// Serves `kind` (replacing what the same CRD served before).
    fn register(inner: &mut Inner, kind: &'static ResourceKind) {
        let name = kind.custom.map(|c| c.crd_name.clone());
        inner
            .custom
            .retain(|k| k.custom.map(|c| c.crd_name.clone()) != name);
        inner.custom.push(kind);
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.read().rv
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and normalizes an incoming object's identity against the URL.
    fn check_identity(
        &self,
        kind: &ResourceKind,
        namespace: &str,
        object: &mut Value,
    ) -> Result<String, ApiError> {
        let Some(obj) = object.as_object_mut() else {
            return Err(ApiError::BadRequest(format!(
                "the body of a {} must be a JSON object",
                kind.kind
            )));
        };
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != kind.kind
        {
            return Err(ApiError::BadRequest(format!(
                "the kind of the object ({k}) does not match the URL ({})",
                kind.kind
            )));
        }
        if let Some(v) = obj.get("apiVersion").and_then(Value::as_str)
            && v != kind.api_version()
        {
            return Err(ApiError::BadRequest(format!(
                "the apiVersion of the object ({v}) does not match the URL ({})",
                kind.api_version()
            )));
        }
        // Controllers write into these; anything but an object (or null) is invalid anyway.
        for section in ["metadata", "spec", "status"] {
            if obj
                .get(section)
                .is_some_and(|v| !v.is_object() && !v.is_null())
            {
                let name = obj
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                return Err(ApiError::Invalid {
                    kind: kind.kind.into(),
                    name: name.to_string(),
                    causes: vec![(
                        section.to_string(),
                        "Invalid value: must be an object".into(),
                    )],
                });
            }
            if obj.get(section).is_some_and(Value::is_null) {
                obj.remove(section);
            }
        }
        obj.insert("kind".into(), Value::String(kind.kind.into()));
        obj.insert("apiVersion".into(), Value::String(kind.api_version()));
        let metadata = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(metadata) = metadata.as_object_mut() else {
            return Err(ApiError::BadRequest("metadata must be an object".into()));
        };
        if kind.namespaced {
            match metadata.get("namespace").and_then(Value::as_str) {
                Some(ns) if !namespace.is_empty() && ns != namespace => {
                    return Err(ApiError::BadRequest(format!(
                        "the namespace of the object ({ns}) does not match the namespace on the request ({namespace})"
                    )));
                }
                _ => {}
            }
            metadata.insert("namespace".into(), Value::String(namespace.into()));
        } else {
            metadata.remove("namespace");
        }
        let mut name = metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty()
            && let Some(prefix) = metadata.get("generateName").and_then(Value::as_str)
        {
            let suffix: String = (0..5)
                .map(|_| (b'a' + rand::random::<u8>() % 26) as char)
                .collect();
            name = format!("{prefix}{suffix}");
            metadata.insert("name".into(), Value::String(name.clone()));
        }
        let valid = if kind.kind == "Namespace" {
            is_dns_label(&name)
        } else {
            is_dns_subdomain(&name)
        };
        if name.is_empty() {
            return Err(ApiError::Invalid {
                kind: kind.kind.into(),
                name,
                causes: vec![(
                    "metadata.name".into(),
                    "Required value: name or generateName is required".into(),
                )],
            });
        }
        if !valid {
            return Err(ApiError::Invalid {
                kind: kind.kind.into(),
                name: name.clone(),
                causes: vec![(
                    "metadata.name".into(),
                    format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.'",
                        if kind.kind == "Namespace" {
                            "label"
                        } else {
                            "subdomain"
                        }
                    ),
                )],
            });
        }
        for (field, key) in [
            ("metadata.labels", "labels"),
            ("metadata.annotations", "annotations"),
        ] {
            if let Some(map) = metadata.get(key) {
                let ok = map.is_null()
                    || map
                        .as_object()
                        .is_some_and(|m| m.values().all(Value::is_string));
                if !ok {
                    return Err(ApiError::Invalid {
                        kind: kind.kind.into(),
                        name: name.clone(),
                        causes: vec![(
                            field.into(),
                            "Invalid value: must be a map of strings".into(),
                        )],
                    });
                }
            }
        }
        Ok(name)
    }

    /// Writes one change at a new resourceVersion and tells watchers. Caller holds the lock.
    fn commit(
        &self,
        inner: &mut Inner,
        kind: &'static ResourceKind,
        change: EventType,
        mut object: Value,
    ) -> Arc<Stored> {
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let namespace = string_at(&object, &["metadata", "namespace"])
            .unwrap_or_default()
            .to_string();
        let name = string_at(&object, &["metadata", "name"])
            .unwrap_or_default()
            .to_string();
        let labels = object["metadata"]
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let fields = kind
            .fields
            .iter()
            .map(|f| (*f, field_value(&object, f)))
            .collect();
        let json = Bytes::from(serde_json::to_vec(&object).unwrap_or_default());
        let stored = Arc::new(Stored {
            rv,
            namespace: namespace.clone(),
            name: name.clone(),
            labels,
            fields,
            json,
        });
        let table = inner.tables.entry(kind.plural).or_default();
        let prev = if change == EventType::Deleted {
            table.remove(&(namespace, name))
        } else {
            table.insert((namespace, name), stored.clone())
        };
        let event = Change {
            plural: kind.plural,
            kind: change,
            object: stored.clone(),
            prev,
        };
        inner.log.push_back(event.clone());
        while inner.log.len() > inner.log_capacity {
            if let Some(old) = inner.log.pop_front() {
                inner.compacted = old.object.rv;
            }
        }
        // Sent under the write lock, so every watcher sees changes in resourceVersion order.
        let _ = self.changes.send(event);
        stored
    }

    /// Creates an object (POST).
    pub fn create(
        &self,
        kind: &'static ResourceKind,
        namespace: &str,
        mut object: Value,
    ) -> Result<Arc<Stored>, ApiError> {
        let name = self.check_identity(kind, namespace, &mut object)?;
        let mut inner = self.write();
        if kind.namespaced {
            let Some(ns) = inner
                .tables
                .get("namespaces")
                .and_then(|t| t.get(&(String::new(), namespace.to_string())))
            else {
                return Err(ApiError::NotFound {
                    resource: "namespaces".into(),
                    name: namespace.into(),
                });
            };
            if ns.field("status.phase").as_deref() == Some("Terminating") {
                return Err(ApiError::Forbidden(format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                    kind.plural
                )));
            }
        }
        if inner
            .current(kind, &object_key(kind, namespace, &name))
            .is_ok()
        {
            return Err(ApiError::AlreadyExists {
                resource: kind.plural.into(),
                name,
            });
        }
        let served = if kind.kind == "CustomResourceDefinition" {
            let served = Self::crd_kind(&inner, &object)?;
            let names = object
                .pointer("/spec/names")
                .cloned()
                .unwrap_or(Value::Null);
            object["status"] = json!({
                "acceptedNames": names,
                "storedVersions": [served.version],
                "conditions": [
                    { "type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now_rfc3339() },
                    { "type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now_rfc3339() }
                ]
            });
            Some(served)
        } else {
            None
        };
        let metadata = &mut object["metadata"];
        metadata["uid"] = Value::String(random_uid());
        metadata["creationTimestamp"] = Value::String(now_rfc3339());
        metadata["generation"] = json!(1);
        if let Some(m) = metadata.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
        }
        match kind.kind {
            "Pod" if object.pointer("/status/phase").is_none() => {
                object["status"] = json!({ "phase": "Pending" })
            }
            "Namespace" => object["status"] = json!({ "phase": "Active" }),
            _ => {}
        }
        let stored = self.commit(&mut inner, kind, EventType::Added, object);
        if let Some(served) = served {
            Self::register(&mut inner, served);
        }
        Ok(stored)
    }

    /// Reads one object.
    pub fn get(
        &self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Stored>, ApiError> {
        self.read()
            .current(kind, &object_key(kind, namespace, name))
    }

    /// Lists objects matching `filter`, paginated.
    pub fn list(
        &self,
        kind: &ResourceKind,
        page: &ListPage,
        filter: &dyn Fn(&Stored) -> bool,
    ) -> Listed {
        let inner = self.read();
        let rv = inner.rv;
        let Some(table) = inner.tables.get(kind.plural) else {
            return Listed {
                items: Vec::new(),
                rv,
                next: None,
            };
        };
        let start = match (&page.after, &page.namespace) {
            (Some(after), _) => std::ops::Bound::Excluded(after.clone()),
            (None, Some(ns)) if kind.namespaced => {
                std::ops::Bound::Included((ns.clone(), String::new()))
            }
            _ => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut next = None;
        for ((ns, _), object) in table.range((start, std::ops::Bound::Unbounded)) {
            if let Some(want) = &page.namespace
                && kind.namespaced
                && ns != want
            {
                break;
            }
            if !filter(object) {
                continue;
            }
            if page.limit > 0 && items.len() == page.limit {
                next = items
                    .last()
                    .map(|o: &Arc<Stored>| (o.namespace.clone(), o.name.clone()));
                break;
            }
            items.push(object.clone());
        }
        Listed { items, rv, next }
    }

    /// Replaces an object (PUT). With `status_only`, only `.status` changes (the status
    /// subresource); otherwise `.status` is kept for kinds that have that subresource.
    pub fn update(
        &self,
        kind: &'static ResourceKind,
        namespace: &str,
        name: &str,
        mut object: Value,
        status_only: bool,
    ) -> Result<Arc<Stored>, ApiError> {
        let body_name = self.check_identity(kind, namespace, &mut object)?;
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut inner = self.write();
        let key = object_key(kind, namespace, name);
        let current = inner.current(kind, &key)?;
        if let Some(rv) =
            string_at(&object, &["metadata", "resourceVersion"]).filter(|s| !s.is_empty())
            && rv != current.rv.to_string()
        {
            return Err(ApiError::Conflict {
                resource: kind.plural.into(),
                name: name.into(),
            });
        }
        let old = current.value();
        let mut next = if status_only {
            let mut next = old.clone();
            next["status"] = object.get("status").cloned().unwrap_or(Value::Null);
            next
        } else {
            if kind.has_status() {
                object["status"] = old.get("status").cloned().unwrap_or(Value::Null);
            }
            // Identity and bookkeeping stay the server's.
            for key in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old["metadata"].get(key) {
                    Some(v) => object["metadata"][key] = v.clone(),
                    None => {
                        if let Some(m) = object["metadata"].as_object_mut() {
                            m.remove(key);
                        }
                    }
                }
            }
            if old.get("spec") != object.get("spec") {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                object["metadata"]["generation"] = json!(generation);
            }
            object
        };
        if let Some(status) = next.as_object_mut()
            && status.get("status").is_some_and(Value::is_null)
        {
            status.remove("status");
        }
        next["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if next == old {
            // A no-op write does not bump the resourceVersion, as in Kubernetes.
            return Ok(current);
        }
        let served = if kind.kind == "CustomResourceDefinition" && !status_only {
            Some(Self::crd_kind(&inner, &next)?)
        } else {
            None
        };
        let stored = self.commit(&mut inner, kind, EventType::Modified, next);
        if let Some(served) = served {
            Self::register(&mut inner, served);
        }
        Ok(stored)
    }

    /// Marks an object as being deleted (graceful deletion): sets `deletionTimestamp` and
    /// `deletionGracePeriodSeconds` once; whoever finishes it deletes it later.
    pub fn mark_terminating(
        &self,
        kind: &'static ResourceKind,
        namespace: &str,
        name: &str,
        deletion_timestamp: &str,
        grace_seconds: i64,
    ) -> Result<Arc<Stored>, ApiError> {
        let mut inner = self.write();
        let key = object_key(kind, namespace, name);
        let current = inner.current(kind, &key)?;
        let mut object = current.value();
        if object["metadata"].get("deletionTimestamp").is_some() {
            return Ok(current);
        }
        object["metadata"]["deletionTimestamp"] = json!(deletion_timestamp);
        object["metadata"]["deletionGracePeriodSeconds"] = json!(grace_seconds);
        if kind.kind == "Namespace" {
            object["status"]["phase"] = json!("Terminating");
        }
        Ok(self.commit(&mut inner, kind, EventType::Modified, object))
    }

    /// Deletes an object; returns it as deleted.
    pub fn delete(
        &self,
        kind: &'static ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Stored>, ApiError> {
        let mut inner = self.write();
        let key = object_key(kind, namespace, name);
        let current = inner.current(kind, &key)?;
        let mut object = current.value();
        object["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339());
        if kind.kind == "CustomResourceDefinition" {
            // The CRD's objects go with it, and its resource stops being served.
            let crd_name = current.name.clone();
            let served: Vec<&'static ResourceKind> = inner
                .custom
                .iter()
                .filter(|k| k.custom.is_some_and(|c| c.crd_name == crd_name))
                .copied()
                .collect();
            for served in &served {
                let objects: Vec<Arc<Stored>> = inner
                    .tables
                    .get(served.plural)
                    .map(|t| t.values().cloned().collect())
                    .unwrap_or_default();
                for o in objects {
                    let mut gone = o.value();
                    gone["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339());
                    self.commit(&mut inner, served, EventType::Deleted, gone);
                }
            }
            inner
                .custom
                .retain(|k| k.custom.is_none_or(|c| c.crd_name != crd_name));
        }
        Ok(self.commit(&mut inner, kind, EventType::Deleted, object))
    }

    /// Starts a watch of `kind` from `from` (exclusive). `None` starts with synthetic ADDED events
    /// for everything that exists now.
    pub fn watch(
        &self,
        kind: &'static ResourceKind,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let inner = self.read();
        let live = self.changes.subscribe();
        let backlog = match from {
            Some(from) => {
                // A version from before this store began, or one it never reached (a client
                // of an earlier incarnation), cannot be resumed from.
                if from < inner.compacted || from > inner.rv {
                    return Err(ApiError::Gone {
                        requested: from,
                        oldest: inner.compacted,
                    });
                }
                inner
                    .log
                    .iter()
                    .filter(|c| c.plural == kind.plural && c.object.rv > from)
                    .cloned()
                    .collect()
            }
            None => inner
                .tables
                .get(kind.plural)
                .map(|t| {
                    t.values()
                        .map(|o| Change {
                            plural: kind.plural,
                            kind: EventType::Added,
                            object: o.clone(),
                            prev: None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        Ok(WatchStart {
            backlog,
            live,
            rv: inner.rv,
            compacted: self.epoch.subscribe(),
        })
    }

    /// Everything of `kinds` that exists now, and a receiver of every change after that, taken
    /// atomically (for in-process controllers, as an informer lists then watches).
    pub fn subscribe(
        &self,
        kinds: &[&'static ResourceKind],
    ) -> (Vec<Change>, broadcast::Receiver<Change>) {
        let inner = self.read();
        let live = self.changes.subscribe();
        let objects = kinds
            .iter()
            .flat_map(|k| {
                inner.tables.get(k.plural).into_iter().flat_map(move |t| {
                    t.values().map(move |o| Change {
                        plural: k.plural,
                        kind: EventType::Added,
                        object: o.clone(),
                        prev: None,
                    })
                })
            })
            .collect();
        (objects, live)
    }

    /// Reads, changes and writes back an object, retrying on concurrent writes. `change` returns
    /// false to leave the object alone.
    pub fn modify(
        &self,
        kind: &'static ResourceKind,
        namespace: &str,
        name: &str,
        status_only: bool,
        mut change: impl FnMut(&mut Value) -> bool,
    ) -> Result<Option<Arc<Stored>>, ApiError> {
        for _ in 0..5 {
            let current = self.get(kind, namespace, name)?;
            let mut value = current.value();
            if !change(&mut value) {
                return Ok(None);
            }
            value["metadata"]["resourceVersion"] = json!(current.rv.to_string());
            match self.update(kind, namespace, name, value, status_only) {
                Err(ApiError::Conflict { .. }) => continue,
                other => return other.map(Some),
            }
        }
        Err(ApiError::Conflict {
            resource: kind.plural.into(),
            name: name.into(),
        })
    }

    /// Forgets all history up to now, as etcd compaction does, and ends every open watch.
    /// Clients that had seen everything resume; clients that were behind get 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.write();
        inner.log.clear();
        inner.compacted = inner.rv;
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Waits while the simulated API server is restarting (see [`Store::restart_with_compaction`]).
    pub async fn watches_open(&self) {
        let mut open = self.watches_open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    /// Simulates an API server restart during which etcd compacts: every open watch ends, new
    /// watches wait while `during` runs (e.g. writes from other clients), then the history is
    /// compacted. Every client that resumes from where it was is now behind the compaction, gets
    /// 410 Gone, and must re-list.
    pub async fn restart_with_compaction(&self, during: impl std::future::Future<Output = ()>) {
        self.watches_open.send_replace(false);
        self.epoch.send_modify(|e| *e += 1);
        during.await;
        self.compact();
        self.watches_open.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_kind;

    fn pods() -> &'static ResourceKind {
        by_kind("Pod").expect("pods")
    }

    fn pod(name: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name, "labels": { "app": "web" } }, "spec": { "containers": [] } })
    }

    #[test]
    fn create_get_update_delete_with_resource_versions() {
        let store = Store::new(1000);
        let created = store.create(pods(), "default", pod("a")).unwrap();
        assert_eq!(created.value()["status"]["phase"], "Pending");
        assert!(matches!(
            store.create(pods(), "default", pod("a")),
            Err(ApiError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.create(pods(), "nope", pod("b")),
            Err(ApiError::NotFound { .. })
        ));

        let mut stale = created.value();
        stale["spec"]["nodeName"] = json!("n1");
        let updated = store
            .update(pods(), "default", "a", stale.clone(), false)
            .unwrap();
        assert!(updated.rv > created.rv);
        assert_eq!(updated.field("spec.nodeName").as_deref(), Some("n1"));
        assert!(matches!(
            store.update(pods(), "default", "a", stale, false),
            Err(ApiError::Conflict { .. })
        ));

        let deleted = store.delete(pods(), "default", "a").unwrap();
        assert!(deleted.rv > updated.rv);
        assert!(matches!(
            store.get(pods(), "default", "a"),
            Err(ApiError::NotFound { .. })
        ));
    }

    #[test]
    fn invalid_names_are_422() {
        let store = Store::new(1000);
        for bad in ["UPPER", "under_score", ""] {
            let err = store.create(pods(), "default", pod(bad)).unwrap_err();
            assert_eq!(err.code(), 422, "{bad}: {err}");
        }
    }

    #[test]
    fn watch_resumes_and_old_versions_are_gone() {
        let store = Store::new(16);
        let first = store.create(pods(), "default", pod("p0")).unwrap().rv;
        for i in 1..40 {
            store
                .create(pods(), "default", pod(&format!("p{i}")))
                .unwrap();
        }
        assert!(matches!(
            store.watch(pods(), Some(first)),
            Err(ApiError::Gone { .. })
        ));
        let recent = store.rv() - 5;
        let start = store.watch(pods(), Some(recent)).unwrap();
        assert_eq!(start.backlog.len(), 5);
        assert!(
            start
                .backlog
                .windows(2)
                .all(|w| w[0].object.rv < w[1].object.rv)
        );
    }

    #[test]
    fn pagination_walks_every_item_once() {
        let store = Store::new(1000);
        for i in 0..25 {
            store
                .create(pods(), "default", pod(&format!("p{i:02}")))
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut page = ListPage {
            namespace: Some("default".into()),
            limit: 10,
            after: None,
        };
        loop {
            let listed = store.list(pods(), &page, &|_| true);
            seen.extend(listed.items.iter().map(|o| o.name.clone()));
            match listed.next {
                Some(next) => page.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        seen.dedup();
        assert_eq!(seen.len(), 25);
    }
}
