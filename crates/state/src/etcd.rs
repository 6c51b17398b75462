//! [`StateStore`] on etcd v3 (etcd-client). Every call has a deadline; transport failures map to
//! [`StoreError::Unavailable`] so callers can retry them.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp as EtcdTxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Range, Revision, StateStore, StoreError, StoreSize, Txn,
    TxnOp, TxnOutcome, WatchEvent, WatchStream,
};

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    /// `http://host:port` (or `https://`, with `tls`) endpoints.
    pub endpoints: Vec<String>,
    /// Prefix of every key (e.g. `/shoal/v1/`).
    pub namespace: String,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// etcd user and password (etcd's own auth), if enabled.
    pub user: Option<(String, String)>,
}

/// TLS material for etcd, as PEM bytes.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// CA bundle that signs etcd's server certificate.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Connect options every client of ours uses: deadlines, TLS, user.
fn connect_options(config: &EtcdConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.request_timeout)
        .with_timeout(config.request_timeout);
    if let Some(tls) = &config.tls {
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(t);
    }
    if let Some((name, password)) = &config.user {
        options = options.with_user(name.clone(), password.clone());
    }
    options
}

/// Keys per page of a prefix read.
pub const RANGE_PAGE: i64 = 500;

/// The end of the key range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff incremented, `\0` for "to the end").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A namespaced etcd client; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
    timeout: Duration,
    endpoints: Vec<String>,
    config: EtcdConfig,
}

impl EtcdStore {
    /// Connects and checks that etcd answers.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let options = connect_options(config)
            .with_keep_alive(Duration::from_secs(5), config.request_timeout)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(
            config.request_timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "connecting to etcd at {} timed out after {:?}",
                config.endpoints.join(","),
                config.request_timeout
            ))
        })?
        .map_err(map_err)?;
        let store = EtcdStore {
            client,
            namespace: config.namespace.clone(),
            timeout: config.request_timeout,
            endpoints: config.endpoints.clone(),
            config: config.clone(),
        };
        // A cheap read proves the endpoint really is etcd and answers.
        store.get("").await?;
        Ok(store)
    }

    /// A client of one member (maintenance calls act on the member they reach).
    async fn member(&self, endpoint: &str) -> Result<Client, StoreError> {
        let options = connect_options(&self.config);
        self.deadline(
            "connect",
            Client::connect([endpoint.to_string()], Some(options)),
        )
        .await
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn relative(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.namespace)
            .unwrap_or(&key)
            .to_string()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: self.relative(kv.key()),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        }
    }

    async fn deadline<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(map_err),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what} timed out after {:?}",
                self.timeout
            ))),
        }
    }

    /// Reads a prefix in pages of [`RANGE_PAGE`] keys, every page at the revision of the first,
    /// so a large prefix never exceeds a message size limit and still reads as one snapshot.
    async fn range_pages(&self, prefix: &str) -> Result<Range, StoreError> {
        self.pages(prefix, false).await
    }

    async fn pages(&self, prefix: &str, keys_only: bool) -> Result<Range, StoreError> {
        let full = self.full(prefix).into_bytes();
        let end = prefix_end(&full);
        let mut start = full;
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE);
            if keys_only {
                options = options.with_keys_only();
            }
            if revision != 0 {
                options = options.with_revision(revision);
            }
            let mut client = self.client.clone();
            let resp = self
                .deadline("range", client.get(start.clone(), Some(options)))
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            kvs.extend(resp.kvs().iter().map(|kv| self.kv(kv)));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The smallest key after the last one read.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(Range { kvs, revision })
    }

    fn txn_op(&self, op: &TxnOp) -> EtcdTxnOp {
        match op {
            TxnOp::Put { key, value, lease } => EtcdTxnOp::put(
                self.full(key),
                value.clone(),
                lease.map(|l| PutOptions::new().with_lease(l.0)),
            ),
            TxnOp::Delete { key } => EtcdTxnOp::delete(self.full(key), None),
        }
    }
}

/// Maps etcd-client errors onto the store's error kinds.
fn map_err(err: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match err {
        E::GRpcStatus(status) => {
            let msg = status.message().to_string();
            match status.code() {
                Code::NotFound if msg.contains("lease not found") => {
                    StoreError::LeaseNotFound(LeaseId(0))
                }
                Code::OutOfRange if msg.contains("compacted") => StoreError::Compacted {
                    requested: 0,
                    compact_revision: 0,
                },
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Aborted
                | Code::Cancelled
                | Code::ResourceExhausted
                | Code::Internal => StoreError::Unavailable(format!("{:?}: {msg}", status.code())),
                code => StoreError::Rejected(format!("{code:?}: {msg}")),
            }
        }
        E::TransportError(e) => StoreError::Unavailable(format!("transport: {e}")),
        E::IoError(e) => StoreError::Unavailable(format!("io: {e}")),
        E::WatchError(e) => StoreError::Unavailable(format!("watch: {e}")),
        E::LeaseKeepAliveError(e) if e.contains("not found") => {
            StoreError::LeaseNotFound(LeaseId(0))
        }
        E::LeaseKeepAliveError(e) => StoreError::Unavailable(format!("lease keep-alive: {e}")),
        other => StoreError::Rejected(other.to_string()),
    }
}

#[async_trait::async_trait]
impl StateStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut client = self.client.clone();
        let resp = self
            .deadline("get", client.get(self.full(key), None))
            .await?;
        Ok(resp.kvs().first().map(|kv| self.kv(kv)))
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        // A compaction between two pages invalidates the pinned revision: read again.
        let mut attempts = 0;
        loop {
            match self.range_pages(prefix).await {
                Err(StoreError::Compacted { .. }) if attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut attempts = 0;
        loop {
            match self.pages(prefix, true).await {
                Err(StoreError::Compacted { .. }) if attempts < 3 => attempts += 1,
                other => return Ok(other?.kvs.into_iter().map(|kv| kv.key).collect()),
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let mut client = self.client.clone();
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let resp = self
            .deadline("put", client.put(self.full(key), value, options))
            .await
            .map_err(|e| with_lease(e, lease))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let resp = self
            .deadline("delete", client.delete(self.full(key), None))
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.check_size()?;
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::CreateRevision { key, revision } => {
                    EtcdCompare::create_revision(self.full(key), CompareOp::Equal, *revision)
                }
                Compare::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(self.full(key), CompareOp::Equal, *revision)
                }
            })
            .collect();
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                TxnOp::Put { lease, .. } => *lease,
                TxnOp::Delete { .. } => None,
            });
        let request = EtcdTxn::new()
            .when(compares)
            .and_then(
                txn.success
                    .iter()
                    .map(|op| self.txn_op(op))
                    .collect::<Vec<_>>(),
            )
            .or_else(
                txn.failure
                    .iter()
                    .map(|op| self.txn_op(op))
                    .collect::<Vec<_>>(),
            );
        let mut client = self.client.clone();
        let resp = self
            .deadline("txn", client.txn(request))
            .await
            .map_err(|e| with_lease(e, lease))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<WatchStream, StoreError> {
        let mut options = WatchOptions::new().with_prefix();
        if let Some(from) = from {
            options = options.with_start_revision(from);
        }
        let mut client = self.client.clone();
        let stream = self
            .deadline("watch", client.watch(self.full(prefix), Some(options)))
            .await?;
        let store = self.clone();
        let requested = from.unwrap_or(0);
        // The etcd stream owns its request sender: dropping ours cancels the watch server-side.
        let events = stream
            .map(move |item| -> Vec<Result<WatchEvent, StoreError>> {
                match item {
                    Err(e) => vec![Err(map_err(e))],
                    Ok(resp) if resp.compact_revision() != 0 => vec![Err(StoreError::Compacted {
                        requested,
                        compact_revision: resp.compact_revision(),
                    })],
                    Ok(resp) if resp.canceled() => vec![Err(StoreError::Unavailable(format!(
                        "watch canceled by etcd: {}",
                        resp.cancel_reason()
                    )))],
                    Ok(resp) => resp
                        .events()
                        .iter()
                        .filter_map(|event| {
                            let kv = event.kv()?;
                            let kind = match event.event_type() {
                                EventType::Put => EventKind::Put,
                                EventType::Delete => EventKind::Delete,
                            };
                            Some(Ok(WatchEvent {
                                kind,
                                kv: store.kv(kv),
                            }))
                        })
                        .collect(),
                }
            })
            .flat_map(futures::stream::iter)
            .chain(futures::stream::once(async {
                Err(StoreError::Unavailable(
                    "etcd closed the watch stream".to_string(),
                ))
            }));
        // Stop after the first error so consumers see exactly one terminal error.
        let mut failed = false;
        let events = events.take_while(move |item| {
            let keep = !failed;
            failed |= item.is_err();
            futures::future::ready(keep)
        });
        Ok(Box::pin(events))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        match self
            .deadline("compact", client.compact(revision, None))
            .await
        {
            Ok(_) => Ok(()),
            // Already compacted at or past it: nothing to do.
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(StoreError::Rejected(why)) if why.contains("compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn size(&self) -> Result<Option<StoreSize>, StoreError> {
        let mut largest: Option<StoreSize> = None;
        for endpoint in &self.endpoints {
            let mut member = self.member(endpoint).await?;
            let status = self.deadline("status", member.status()).await?;
            let size = StoreSize {
                file_bytes: status.db_size(),
                in_use_bytes: status.raft_used_db_size(),
            };
            if largest.is_none_or(|l| l.file_bytes < size.file_bytes) {
                largest = Some(size);
            }
        }
        Ok(largest)
    }

    async fn defragment(&self) -> Result<(), StoreError> {
        // One member at a time, as etcd's operators are told to: each pauses while it runs.
        for endpoint in &self.endpoints {
            let mut member = self.member(endpoint).await?;
            match tokio::time::timeout(Duration::from_secs(60), member.defragment()).await {
                Ok(result) => {
                    result.map_err(map_err)?;
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "defragmenting {endpoint} took over 60s"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs_f64().ceil() as i64;
        let mut client = self.client.clone();
        let resp = self
            .deadline("lease grant", client.lease_grant(secs.max(1), None))
            .await?;
        Ok(LeaseId(resp.id()))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut client = self.client.clone();
        let ttl = self
            .deadline("lease keep-alive", async move {
                let (mut keeper, mut responses) = client.lease_keep_alive(lease.0).await?;
                keeper.keep_alive().await?;
                Ok(responses.message().await?.map_or(0, |r| r.ttl()))
            })
            .await
            .map_err(|e| with_lease(e, Some(lease)))?;
        // etcd answers TTL 0 for a lease that no longer exists.
        if ttl <= 0 {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(Duration::from_secs(ttl as u64))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.deadline("lease revoke", client.lease_revoke(lease.0))
            .await
            .map_err(|e| with_lease(e, Some(lease)))?;
        Ok(())
    }
}

/// Fills in the lease id that etcd's error message does not carry.
fn with_lease(err: StoreError, lease: Option<LeaseId>) -> StoreError {
    match (err, lease) {
        (StoreError::LeaseNotFound(_), Some(lease)) => StoreError::LeaseNotFound(lease),
        (err, _) => err,
    }
}
