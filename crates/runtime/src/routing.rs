//! Leader routing as a tower layer: a call to a leader-only method that reaches a standby replica
//! (behind a Kubernetes Service any replica may answer) is forwarded to the leader's advertised
//! address from the election record, once; when no leader is known, or the leader cannot be
//! reached, the caller gets UNAVAILABLE with the leader's address in the `x-shoal-leader`
//! metadata, which Shoal's own clients follow. Handlers of leader-only methods therefore only
//! ever run on the leader.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::HeaderValue;
use shoal_state::Election;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::leader::{LeaderWatch, current_leadership};

/// Header a forwarding replica adds, so a call is forwarded at most once.
pub const FORWARDED_HEADER: &str = "x-shoal-forwarded-by";
/// Metadata carrying the leader's address on UNAVAILABLE answers.
pub const LEADER_HEADER: &str = "x-shoal-leader";

/// What the layer needs to know about leadership.
pub struct LeaderRouter {
    methods: HashSet<String>,
    leader: LeaderWatch,
    election: Election,
    instance: String,
    own_address: String,
    tls: Option<crate::tls::Tls>,
    channels: Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl LeaderRouter {
    /// Routes `methods` (full paths, `/shoal.v1.ReconcilerService/Reconcile`) to the leader.
    pub fn new(
        methods: &[&str],
        leader: LeaderWatch,
        election: Election,
        instance: &str,
        own_address: &str,
        tls: Option<crate::tls::Tls>,
    ) -> LeaderRouter {
        LeaderRouter {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            leader,
            election,
            instance: instance.to_string(),
            own_address: own_address.to_string(),
            tls,
            channels: Mutex::default(),
        }
    }

    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        // The leader is a replica of this service: over TLS its certificate is this one's
        // (same identity), whatever address it advertises.
        let identity = self.tls.as_ref().and_then(crate::tls::Tls::own_identity);
        let channel =
            crate::layers::channel_verifying(address, self.tls.as_ref(), identity.as_deref())
                .map_err(|e| format!("leader address: {e}"))?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    async fn forward(&self, mut req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        if let Some(by) = req.headers().get(FORWARDED_HEADER) {
            let by = by.to_str().unwrap_or("?").to_string();
            return unavailable(
                format!(
                    "{path} needs the leader; this replica ({}) is not it and the call was already forwarded by {by}; retry",
                    self.instance
                ),
                None,
            );
        }
        let record = match self.election.current_leader().await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return unavailable(
                    format!("{path} needs the leader and none is elected right now; retry"),
                    None,
                );
            }
            Err(e) => {
                return unavailable(
                    format!("{path} needs the leader, which cannot be looked up: {e}"),
                    None,
                );
            }
        };
        if record.address.is_empty() || record.address == self.own_address {
            return unavailable(
                format!(
                    "{path} needs the leader; {} leads but advertises no other address; retry",
                    record.holder
                ),
                Some(&record.address),
            );
        }
        let mut channel = match self.channel(&record.address) {
            Ok(channel) => channel,
            Err(e) => return unavailable(e, Some(&record.address)),
        };
        if let Ok(me) = HeaderValue::from_str(&self.instance) {
            req.headers_mut().insert(FORWARDED_HEADER, me);
        }
        // The leader sees this replica's certificate; tell it whom this replica checked.
        if let Some(caller) = req.extensions().get::<crate::auth::Caller>().cloned() {
            for (name, value) in crate::auth::forwarding_headers(&caller) {
                req.headers_mut().insert(name, value);
            }
        }
        tracing::debug!(%path, leader = %record.holder, address = %record.address, "forwarding a leader-only call");
        if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
            return unavailable(
                format!(
                    "{path}: the leader {} at {} is unreachable: {e}",
                    record.holder, record.address
                ),
                Some(&record.address),
            );
        }
        match channel.call(req).await {
            Ok(response) => response,
            Err(e) => unavailable(
                format!(
                    "{path}: forwarding to the leader {} at {} failed: {e}",
                    record.holder, record.address
                ),
                Some(&record.address),
            ),
        }
    }
}

fn unavailable(message: String, leader: Option<&str>) -> http::Response<Body> {
    let mut status = tonic::Status::unavailable(message);
    if let Some(address) = leader.filter(|a| !a.is_empty())
        && let Ok(value) = address.parse()
    {
        status.metadata_mut().insert(LEADER_HEADER, value);
    }
    status.into_http()
}

/// The layer; see the module docs.
#[derive(Clone)]
pub struct LeaderRouteLayer {
    router: Option<Arc<LeaderRouter>>,
}

impl LeaderRouteLayer {
    /// Routes per `router`; `None` passes every call through (services that do not campaign).
    pub fn new(router: Option<LeaderRouter>) -> LeaderRouteLayer {
        LeaderRouteLayer {
            router: router.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for LeaderRouteLayer {
    type Service = LeaderRoute<S>;
    fn layer(&self, inner: S) -> LeaderRoute<S> {
        LeaderRoute {
            inner,
            router: self.router.clone(),
        }
    }
}

/// See [`LeaderRouteLayer`].
#[derive(Clone)]
pub struct LeaderRoute<S> {
    inner: S,
    router: Option<Arc<LeaderRouter>>,
}

impl<S> Service<http::Request<Body>> for LeaderRoute<S>
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

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let route = self.router.as_ref().filter(|r| {
            r.methods.contains(req.uri().path()) && current_leadership(Some(&r.leader)).is_none()
        });
        match route {
            None => Box::pin(inner.call(req)),
            Some(router) => {
                let router = router.clone();
                Box::pin(async move { Ok(router.forward(req).await) })
            }
        }
    }
}
