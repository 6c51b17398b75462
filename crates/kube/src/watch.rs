//! Following a kind of object with a kube-runtime watcher — list, then watch, re-listing on
//! 410 Gone or when the API server forgot our version — into a [`WatchSink`] that keeps only what
//! it needs. Never list-polling.
//!
//! A re-list is delivered as `restarted`, `listed`... , `list_done`: a sink replaces its contents
//! atomically at `list_done`, so objects that disappeared while the watch was down vanish (no
//! ghosts) and objects listed again are not counted twice (no duplicates).

use std::fmt::Debug;

use futures::StreamExt;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Receives the objects of one watch.
pub trait WatchSink<K>: Send {
    /// A (re-)list begins: start buffering.
    fn restarted(&mut self);
    /// One object of the list.
    fn listed(&mut self, object: K);
    /// The list is complete: replace everything with what was listed.
    fn list_done(&mut self);
    /// An object was added or changed.
    fn applied(&mut self, object: K);
    /// An object was deleted.
    fn deleted(&mut self, object: K);
}

/// Follows `api` into `sink` until `shutdown`. Errors (API server down, watch expired) are
/// reported to `on_error` and retried with kube-runtime's default backoff.
pub async fn follow<K, S>(
    api: Api<K>,
    config: watcher::Config,
    mut sink: S,
    mut on_error: impl FnMut(&watcher::Error) + Send,
    shutdown: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    S: WatchSink<K>,
{
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Init)) => sink.restarted(),
            Some(Ok(watcher::Event::InitApply(object))) => sink.listed(object),
            Some(Ok(watcher::Event::InitDone)) => sink.list_done(),
            Some(Ok(watcher::Event::Apply(object))) => sink.applied(object),
            Some(Ok(watcher::Event::Delete(object))) => sink.deleted(object),
            Some(Err(err)) => on_error(&err),
        }
    }
}
