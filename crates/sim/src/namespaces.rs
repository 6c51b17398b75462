//! The namespace controller: a deleted namespace turns Terminating (new objects in it are
//! refused), its contents are deleted — pods on nodes gracefully, through their kubelets — and the
//! namespace goes once it is empty, as the real namespace lifecycle controller does.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    resources::by_kind,
    store::{ListPage, Store},
};

/// Namespaces that may not be deleted.
pub const PROTECTED: [&str; 3] = ["default", "kube-system", "kube-node-lease"];

/// How often Terminating namespaces are looked at.
const TICK: Duration = Duration::from_millis(100);

/// Runs until `shutdown`.
pub async fn run(store: Arc<Store>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sweep(&store),
        }
    }
}

/// One pass: empties every Terminating namespace a step further.
pub fn sweep(store: &Store) {
    let (Some(namespaces), Some(pods)) = (by_kind("Namespace"), by_kind("Pod")) else {
        return;
    };
    let terminating = store.list(namespaces, &ListPage::default(), &|ns| {
        ns.field("status.phase").as_deref() == Some("Terminating")
    });
    for ns in terminating.items {
        let contents = store.in_namespace(&ns.name);
        if contents.is_empty() {
            let _ = store.delete(namespaces, "", &ns.name);
            continue;
        }
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        for (kind, object) in contents {
            let on_node = kind.kind == "Pod"
                && object.field("spec.nodeName").is_some_and(|n| {
                    !n.is_empty()
                        && by_kind("Node").is_some_and(|nodes| store.get(nodes, "", &n).is_ok())
                });
            if on_node {
                // The kubelet stops it and deletes it.
                let _ = store.mark_terminating(pods, &object.namespace, &object.name, &stamp, 0);
            } else {
                let _ = store.delete(kind, &object.namespace, &object.name);
            }
        }
    }
}
