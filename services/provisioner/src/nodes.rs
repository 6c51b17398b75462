//! A watch-backed index of the Nodes Shoal created (those labelled `shoal.dev/claim`), by claim
//! id: whether each has registered and is Ready. Claims waiting for their node wake on changes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, runtime::watcher};
use shoal_kube::{convert::node_ready, watch::WatchSink};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::CLAIM_LABEL;

/// What the provisioner needs of one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Ready condition is True.
    pub ready: bool,
    /// Taint keys.
    pub taints: Vec<String>,
    /// `spec.providerID` (empty when the node reports none).
    pub provider_id: String,
}

/// Nodes by claim id.
#[derive(Clone)]
pub struct NodeIndex {
    inner: Arc<RwLock<HashMap<String, NodeView>>>,
    changes: watch::Sender<u64>,
    synced: watch::Sender<bool>,
    /// Per-claim subscriptions: a claim waiting for its node wakes only when that node changes
    /// (thousands of claims in flight must not all wake on every node event).
    subscribers: Arc<Mutex<HashMap<String, watch::Sender<Option<NodeView>>>>>,
}

impl Default for NodeIndex {
    fn default() -> Self {
        NodeIndex {
            inner: Arc::default(),
            changes: watch::channel(0).0,
            synced: watch::channel(false).0,
            subscribers: Arc::default(),
        }
    }
}

fn view(node: &Node) -> Option<(String, NodeView)> {
    let claim = node.metadata.labels.as_ref()?.get(CLAIM_LABEL)?.clone();
    Some((
        claim,
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            ready: node_ready(node),
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .map(|t| t.iter().map(|t| t.key.clone()).collect())
                .unwrap_or_default(),
            provider_id: node
                .spec
                .as_ref()
                .and_then(|s| s.provider_id.clone())
                .unwrap_or_default(),
        },
    ))
}

struct Sink {
    index: NodeIndex,
    listing: Option<HashMap<String, NodeView>>,
}

impl Sink {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, NodeView>> {
        self.index.inner.write().unwrap_or_else(|p| p.into_inner())
    }
    fn bump(&self) {
        self.index.changes.send_modify(|n| *n += 1);
    }
    /// Tells the subscriber of `claim` (if any) its node's new view.
    fn notify(&self, claim: &str, view: Option<&NodeView>) {
        let subscribers = self
            .index
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = subscribers.get(claim) {
            tx.send_if_modified(|old| {
                let changed = old.as_ref() != view;
                if changed {
                    *old = view.cloned();
                }
                changed
            });
        }
    }
}

impl WatchSink<Node> for Sink {
    fn restarted(&mut self) {
        self.listing = Some(HashMap::new());
    }
    fn listed(&mut self, node: Node) {
        if let (Some(listing), Some((claim, v))) = (self.listing.as_mut(), view(&node)) {
            listing.insert(claim, v);
        }
    }
    fn list_done(&mut self) {
        if let Some(listing) = self.listing.take() {
            *self.write() = listing;
        }
        let claims: Vec<String> = self
            .index
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for claim in claims {
            let view = self.index.get(&claim);
            self.notify(&claim, view.as_ref());
        }
        self.index.synced.send_replace(true);
        self.bump();
    }
    fn applied(&mut self, node: Node) {
        if let Some((claim, v)) = view(&node) {
            self.notify(&claim, Some(&v));
            self.write().insert(claim, v);
            self.bump();
        }
    }
    fn deleted(&mut self, node: Node) {
        if let Some((claim, _)) = view(&node) {
            self.write().remove(&claim);
            self.notify(&claim, None);
            self.bump();
        }
    }
}

impl NodeIndex {
    /// Starts following Nodes labelled with a claim.
    pub fn start(client: kube::Client, shutdown: CancellationToken) -> NodeIndex {
        let index = NodeIndex::default();
        let sink = Sink {
            index: index.clone(),
            listing: None,
        };
        let api: Api<Node> = Api::all(client);
        tokio::spawn(shoal_kube::watch::follow(
            api,
            watcher::Config::default().labels(CLAIM_LABEL),
            sink,
            |err| tracing::warn!(error = %err, "node watch failed; retrying"),
            shutdown,
        ));
        index
    }

    /// The node of `claim`, if registered.
    pub fn get(&self, claim: &str) -> Option<NodeView> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(claim)
            .cloned()
    }

    /// Every indexed node, by claim.
    pub fn all(&self) -> HashMap<String, NodeView> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The node of `claim` as it changes (`None` while it has not registered).
    pub fn subscribe(&self, claim: &str) -> watch::Receiver<Option<NodeView>> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        // Now and then, forget claims nobody waits for any more.
        if subscribers.len() % 1024 == 1023 {
            subscribers.retain(|_, tx| tx.receiver_count() > 0);
        }
        subscribers
            .entry(claim.to_string())
            .or_insert_with(|| watch::channel(self.get(claim)).0)
            .subscribe()
    }

    /// Ticks on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True once the first list completed.
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }
}
