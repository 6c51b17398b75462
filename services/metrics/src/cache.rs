//! The watches that keep [`ClusterState`] current: Nodes, Pods and PodDisruptionBudgets, each
//! followed with a kube-runtime watcher (list, then watch; re-list on 410). Objects are reduced
//! to their facts the moment they arrive.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::{
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{Api, runtime::watcher};
use shoal_kube::watch::{WatchSink, follow};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    facts::{NodeFacts, PdbFacts, PodFacts},
    state::ClusterState,
    stats::Stats,
};

/// A kind the cache follows.
trait Cached: Sized {
    type Facts: Send;
    const KIND: &'static str;
    fn facts(&self) -> Self::Facts;
    fn apply(state: &mut ClusterState, facts: Self::Facts);
    fn delete(state: &mut ClusterState, object: &Self);
    fn replace(state: &mut ClusterState, all: Vec<Self::Facts>);
}

impl Cached for Node {
    type Facts = NodeFacts;
    const KIND: &'static str = "nodes";
    fn facts(&self) -> NodeFacts {
        NodeFacts::from_node(self)
    }
    fn apply(state: &mut ClusterState, facts: NodeFacts) {
        state.apply_node(facts);
    }
    fn delete(state: &mut ClusterState, object: &Self) {
        state.delete_node(object.metadata.name.as_deref().unwrap_or_default());
    }
    fn replace(state: &mut ClusterState, all: Vec<NodeFacts>) {
        state.replace_nodes(all);
    }
}

impl Cached for Pod {
    type Facts = PodFacts;
    const KIND: &'static str = "pods";
    fn facts(&self) -> PodFacts {
        PodFacts::from_pod(self)
    }
    fn apply(state: &mut ClusterState, facts: PodFacts) {
        state.apply_pod(facts);
    }
    fn delete(state: &mut ClusterState, object: &Self) {
        state.delete_pod(&(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        ));
    }
    fn replace(state: &mut ClusterState, all: Vec<PodFacts>) {
        state.replace_pods(all);
    }
}

impl Cached for PodDisruptionBudget {
    type Facts = PdbFacts;
    const KIND: &'static str = "pdbs";
    fn facts(&self) -> PdbFacts {
        PdbFacts::from_pdb(self)
    }
    fn apply(state: &mut ClusterState, facts: PdbFacts) {
        state.apply_pdb(facts);
    }
    fn delete(state: &mut ClusterState, object: &Self) {
        state.delete_pdb(&(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        ));
    }
    fn replace(state: &mut ClusterState, all: Vec<PdbFacts>) {
        state.replace_pdbs(all);
    }
}

/// Feeds one kind's watch into the shared state; wakes the publisher on relevant changes.
struct Sink<K: Cached> {
    state: Arc<Mutex<ClusterState>>,
    changes: Arc<Notify>,
    stats: Stats,
    /// Objects of a list in progress (None outside a list).
    listing: Option<Vec<K::Facts>>,
}

impl<K: Cached> Sink<K> {
    fn with_state(&self, f: impl FnOnce(&mut ClusterState)) {
        let relevant = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut state);
            // Only look: the publisher takes the flag when it wakes.
            state.has_relevant()
        };
        if relevant {
            self.changes.notify_one();
        }
    }
}

impl<K: Cached + Send> WatchSink<K> for Sink<K> {
    fn restarted(&mut self) {
        self.listing = Some(Vec::new());
    }
    fn listed(&mut self, object: K) {
        let facts = object.facts();
        match &mut self.listing {
            Some(buffer) => buffer.push(facts),
            None => self.with_state(|s| K::apply(s, facts)),
        }
    }
    fn list_done(&mut self) {
        let all = self.listing.take().unwrap_or_default();
        self.stats.relists.with_label_values(&[K::KIND]).inc();
        tracing::debug!(kind = K::KIND, objects = all.len(), "listed");
        self.with_state(|s| K::replace(s, all));
    }
    fn applied(&mut self, object: K) {
        let facts = object.facts();
        self.with_state(|s| K::apply(s, facts));
    }
    fn deleted(&mut self, object: K) {
        self.with_state(|s| K::delete(s, &object));
    }
}

/// Starts the three watches; they run until `shutdown`.
pub fn start(
    client: kube::Client,
    state: Arc<Mutex<ClusterState>>,
    changes: Arc<Notify>,
    stats: Stats,
    shutdown: CancellationToken,
) {
    spawn::<Node>(
        Api::all(client.clone()),
        state.clone(),
        changes.clone(),
        stats.clone(),
        shutdown.clone(),
    );
    spawn::<Pod>(
        Api::all(client.clone()),
        state.clone(),
        changes.clone(),
        stats.clone(),
        shutdown.clone(),
    );
    spawn::<PodDisruptionBudget>(Api::all(client), state, changes, stats, shutdown);
}

fn spawn<K>(
    api: Api<K>,
    state: Arc<Mutex<ClusterState>>,
    changes: Arc<Notify>,
    stats: Stats,
    shutdown: CancellationToken,
) where
    K: Cached
        + kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::Facts: Sync,
{
    let restarts = stats.watch_restarts.with_label_values(&[K::KIND]);
    let sink = Sink::<K> {
        state,
        changes,
        stats,
        listing: None,
    };
    tokio::spawn(follow(
        api,
        watcher::Config::default(),
        sink,
        move |err| {
            restarts.inc();
            tracing::warn!(kind = K::KIND, error = %err, "watch failed; restarting with backoff");
        },
        shutdown,
    ));
}
