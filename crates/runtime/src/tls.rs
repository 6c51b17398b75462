//! TLS and mTLS for every gRPC server and every channel between services (rustls).
//!
//! Certificates, keys and the CA bundle are PEM files that are read again when they change
//! (cert-manager rotates them in place): every new connection, accepted or made, uses the files
//! as they are now; connections already open keep the certificate they were made with. A file
//! caught half-written is not used: the last good material stays until the files parse again.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// `grpc.tls`: this service's certificate and the CA its peers' certificates are checked against.
/// Unset (all three files empty): no TLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). Used as the server certificate and, towards other
    /// services, as this service's client certificate (issue it for both server and client auth).
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
    /// PEM bundle of the CAs that sign the certificates of callers and of the services called.
    pub ca_file: PathBuf,
    /// Whether callers must present a certificate: `required` (mTLS), or `optional` (callers
    /// without one must then bring a bearer token, see `grpc.auth`).
    pub client_auth: ClientAuth,
}

/// Whether a caller must present a client certificate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuth {
    /// Callers must present a certificate signed by the CA (mTLS): no handshake without one.
    #[default]
    Required,
    /// Certificate checked when presented; callers without one need a bearer token.
    Optional,
}

impl TlsConfig {
    /// Whether TLS is configured (any file named).
    pub fn is_set(&self) -> bool {
        [&self.cert_file, &self.key_file, &self.ca_file]
            .iter()
            .any(|f| !f.as_os_str().is_empty())
    }

    /// Adds problems to `errors` under `path`: the three files go together. (Their contents
    /// are read at start, where a missing or bad file stops the service naming it, so that
    /// `--print-config` works where the files are not mounted.)
    pub fn validate(&self, path: &str, errors: &mut shoal_core::ValidationErrors) {
        for (field, file) in [
            ("certFile", &self.cert_file),
            ("keyFile", &self.key_file),
            ("caFile", &self.ca_file),
        ] {
            if file.as_os_str().is_empty() {
                errors.add(
                    format!("{path}.{field}"),
                    "is required with the other grpc.tls files",
                );
            }
        }
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{file}: {reason}")]
    File {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("{0}")]
    Config(String),
}

fn file_error(file: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider every config here uses (explicit: more than one may be compiled in),
/// preferring AES-128-GCM: ample for this traffic and cheaper per byte than AES-256 on the large
/// snapshots the services exchange.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Parsed material and the configs built from it.
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Material {
    fn load(config: &TlsConfig) -> Result<Material, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
            .map_err(|e| file_error(&config.cert_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&config.cert_file, e))?;
        if chain.is_empty() {
            return Err(file_error(&config.cert_file, "no PEM certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_file(&config.key_file)
            .map_err(|e| file_error(&config.key_file, e))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.ca_file)
            .map_err(|e| file_error(&config.ca_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&config.ca_file, e))?;
        for ca in cas {
            roots.add(ca).map_err(|e| file_error(&config.ca_file, e))?;
        }
        if roots.is_empty() {
            return Err(file_error(&config.ca_file, "no PEM certificate in it"));
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let verifier = match config.client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        server.ignore_client_order = true;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// How often the files are looked at for changes (at most; only when a connection is made).
const RELOAD_CHECK: Duration = Duration::from_secs(1);

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(config: &TlsConfig) -> Stamp {
    [&config.cert_file, &config.key_file, &config.ca_file]
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

struct Current {
    material: Material,
    stamp: Stamp,
    checked: Instant,
}

/// TLS material that follows its files. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    config: TlsConfig,
    current: Arc<Mutex<Current>>,
}

impl Tls {
    /// Loads the files once (an error here stops the service at start).
    pub fn load(config: &TlsConfig) -> Result<Tls, TlsError> {
        let material = Material::load(config)?;
        Ok(Tls {
            config: config.clone(),
            current: Arc::new(Mutex::new(Current {
                material,
                stamp: stamp(config),
                checked: Instant::now(),
            })),
        })
    }

    fn refreshed(&self) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let now = stamp(&self.config);
            if now != current.stamp {
                match Material::load(&self.config) {
                    Ok(material) => {
                        tracing::info!(cert = %self.config.cert_file.display(), "TLS files changed: new connections use them");
                        current.material = material;
                        current.stamp = now;
                    }
                    // Mid-rotation (one file written, not the other): keep the last good
                    // material and look again on the next connection.
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but cannot be used yet; keeping the previous ones")
                    }
                }
            }
        }
        (
            current.material.server.clone(),
            current.material.client.clone(),
        )
    }

    /// This service's own identity (its certificate's, as [`certificate_identity`] reads it).
    pub fn own_identity(&self) -> Option<String> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&self.config.cert_file)
                .ok()?
                .filter_map(Result::ok)
                .collect();
        chain.first().and_then(certificate_identity)
    }

    /// The server config as the files are now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refreshed().0
    }

    /// The client config (this service's certificate as client identity) as the files are now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refreshed().1
    }

    /// Accepted connections on `listener`, each after its TLS handshake (handshakes run
    /// concurrently, bounded by a 10 s deadline; a failed one is logged and dropped).
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
        let (send, receive) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = send.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.server_config());
                let send = send.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = send.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => refused(peer, &e.to_string()),
                        Err(_) => refused(peer, "no TLS handshake within 10s"),
                    }
                });
            }
        });
        ReceiverStream::new(receive)
    }

    /// A connector for tonic channels: TCP (no delay) then TLS to the URI's host, presenting
    /// this service's certificate.
    pub fn connector(&self) -> TlsConnectorService {
        TlsConnectorService {
            tls: self.clone(),
            server_name: None,
        }
    }

    /// As [`Tls::connector`], but the peer's certificate is checked against `name` instead of
    /// the address's host: replicas of one service reach each other at pod IPs, which their
    /// shared certificate does not name, while it does name the service's identity.
    pub fn connector_for(&self, name: &str) -> TlsConnectorService {
        TlsConnectorService {
            tls: self.clone(),
            server_name: Some(name.to_string()),
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn refused(peer: SocketAddr, why: &str) {
    tracing::info!(%peer, reason = why, "TLS handshake refused");
}

/// See [`Tls::connector`].
#[derive(Clone)]
pub struct TlsConnectorService {
    tls: Tls,
    server_name: Option<String>,
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    io::Error,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for TlsConnectorService {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.client_config();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in address"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server_name.unwrap_or_else(|| host.clone()))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// The caller's identity from its certificate: the first DNS name, URI or e-mail among the
/// leaf's subject alternative names, else its subject common name.
pub fn certificate_identity(leaf: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n)
                | x509_parser::extensions::GeneralName::URI(n)
                | x509_parser::extensions::GeneralName::RFC822Name(n) => {
                    return Some((*n).to_string());
                }
                _ => {}
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    /// A CA's server and client certificates as configs.
    pub(super) fn material(dir: &Path) -> (TlsConfig, TlsConfig) {
        let ca = shoal_testkit::TestCa::new(dir, "unit");
        let server = ca.issue("shoal-server", "server");
        let client = ca.issue("shoal-client", "client");
        let config = |c: &shoal_testkit::CertFiles| TlsConfig {
            cert_file: c.cert.clone(),
            key_file: c.key.clone(),
            ca_file: c.ca.clone(),
            client_auth: ClientAuth::Required,
        };
        (config(&server), config(&client))
    }

    #[tokio::test]
    async fn a_tonic_server_and_channel_speak_mtls_through_these_configs() {
        let dir = tempfile::tempdir().expect("dir");
        let (server, client) = material(dir.path());
        let server = Tls::load(&server).expect("server material");
        let client = Tls::load(&client).expect("client material");
        assert_eq!(client.own_identity().as_deref(), Some("shoal-client"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(server.incoming(listener)),
        );
        let channel =
            crate::layers::channel(&format!("https://{addr}"), Some(&client)).expect("channel");
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            HealthClient::new(channel).check(HealthCheckRequest::default()),
        )
        .await
        .expect("answers within 10 s")
        .expect("health check over mTLS");
        assert_eq!(answer.into_inner().status, 1);
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bidirectional_stream_answers_over_mtls() {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let dir = tempfile::tempdir().expect("dir");
        let (server, client) = super::tests::material(dir.path());
        let server = Tls::load(&server).expect("server");
        let client = Tls::load(&client).expect("client");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("reflection");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(reflection)
                .serve_with_incoming(server.incoming(listener)),
        );
        let channel =
            crate::layers::channel(&format!("https://{addr}"), Some(&client)).expect("channel");
        let (send, receive) = tokio::sync::mpsc::channel(4);
        send.send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .expect("queue");
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(receive)),
        )
        .await
        .expect("headers within 5 s")
        .expect("stream")
        .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("an answer within 5 s while the request stream stays open")
            .expect("message");
        assert!(first.is_some());
        drop(send);
    }
}
