//! The resource kinds the simulator serves, with what discovery says about them.

/// One served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// Version within the group.
    pub version: &'static str,
    /// Plural resource name as in URLs (`pods`).
    pub plural: &'static str,
    /// Singular name (`pod`).
    pub singular: &'static str,
    /// Kind (`Pod`).
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Subresources served (`status`, `scale`, `eviction`, `binding`).
    pub subresources: &'static [&'static str],
    /// Field selectors supported beyond `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
    /// Schema and printer columns of a kind a CustomResourceDefinition serves.
    pub custom: Option<&'static crate::crd::CustomInfo>,
}

impl ResourceKind {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether `status` is a subresource (main-resource writes then leave status alone).
    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Verbs discovery advertises for every resource.
pub fn verbs() -> &'static [&'static str] {
    ALL_VERBS
}

/// Every served kind.
pub const KINDS: &[ResourceKind] = &[
    ResourceKind {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        subresources: &["status"],
        fields: &["status.phase"],
        custom: None,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        subresources: &["status"],
        fields: &["spec.unschedulable"],
        custom: None,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        subresources: &["status", "eviction", "binding"],
        fields: &["spec.nodeName", "status.phase"],
        custom: None,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        subresources: &[],
        fields: &[
            "involvedObject.name",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "type",
            "reportingComponent",
        ],
        custom: None,
    },
    ResourceKind {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        subresources: &["status", "scale"],
        fields: &[],
        custom: None,
    },
    ResourceKind {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        subresources: &["status", "scale"],
        fields: &[],
        custom: None,
    },
    ResourceKind {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        singular: "poddisruptionbudget",
        kind: "PodDisruptionBudget",
        namespaced: true,
        short_names: &["pdb"],
        subresources: &["status"],
        fields: &[],
        custom: None,
    },
    ResourceKind {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        fields: &[],
        custom: None,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "podtemplates",
        singular: "podtemplate",
        kind: "PodTemplate",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        fields: &[],
        custom: None,
    },
    ResourceKind {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        subresources: &["status"],
        fields: &[],
        custom: None,
    },
];

/// The kind served at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The kind named `kind`.
pub fn by_kind(kind: &str) -> Option<&'static ResourceKind> {
    KINDS.iter().find(|k| k.kind == kind)
}
