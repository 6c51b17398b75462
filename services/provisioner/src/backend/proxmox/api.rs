//! A small client of the Proxmox VE HTTP API (`/api2/json`): API-token or ticket login (renewed
//! before it expires and after a 401), TLS checked against a CA or a pinned fingerprint, PVE's
//! errors turned into [`ProviderError`]s, and tasks (UPIDs) followed to their end.

use std::{sync::Arc, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_runtime::secret::Secret;
use tokio::{sync::Mutex, time::Instant};

use super::config::ProxmoxBackend;
use crate::backend::ProviderError;

/// A ticket is renewed after this long (PVE's live 2 hours).
const TICKET_RENEW: Duration = Duration::from_secs(3600);

enum Credentials {
    Token(Secret),
    Ticket {
        user: String,
        password: Secret,
        session: Mutex<Option<Session>>,
    },
}

#[derive(Clone)]
struct Session {
    ticket: String,
    csrf: String,
    at: Instant,
}

/// One PVE cluster's API.
pub struct PveApi {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
    task_timeout: Duration,
    poll: Duration,
}

/// Parses `AB:CD:…` or `abcd…` into 32 bytes.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hex).ok()?;
    bytes.try_into().ok()
}

/// Accepts exactly the server certificate whose SHA-256 is pinned (PVE's self-signed
/// certificates have no CA a client could trust).
#[derive(Debug)]
struct PinnedCertificate {
    sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} is not the pinned {}",
                hex::encode(seen),
                hex::encode(self.sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a PVE error message describes a passing condition (a lock, lost quorum, a timeout).
fn transient_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "locked",
        "quorum",
        "timeout",
        "timed out",
        "temporarily",
        "try again",
        "connection",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// The PVE node a UPID ran on (`UPID:<node>:…`).
pub fn upid_node(upid: &str) -> Option<&str> {
    upid.strip_prefix("UPID:")?.split(':').next()
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl PveApi {
    /// A client for `settings` (no request is made yet).
    pub fn new(settings: &ProxmoxBackend) -> Result<PveApi, ProviderError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(16);
        let tls = &settings.tls;
        if let Some(pin) = parse_fingerprint(&tls.fingerprint) {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| ProviderError::Permanent(format!("proxmox TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                    sha256: pin,
                    provider,
                }))
                .with_no_client_auth();
            builder = builder.use_preconfigured_tls(config);
        } else if let Some(ca) = &tls.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                ProviderError::Permanent(format!("proxmox tls.caFile {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ProviderError::Permanent(format!("proxmox tls.caFile {}: {e}", ca.display()))
            })?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        } else if tls.insecure_skip_verify {
            tracing::warn!(url = %settings.url, "proxmox: TLS certificate NOT verified (tls.insecureSkipVerify)");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::Permanent(format!("proxmox HTTP client: {e}")))?;
        let credentials = match &settings.token {
            Some(token) if !token.is_empty() => Credentials::Token(token.clone()),
            _ => Credentials::Ticket {
                user: settings.user.clone(),
                password: settings.password.clone().unwrap_or_default(),
                session: Mutex::new(None),
            },
        };
        Ok(PveApi {
            http,
            base: format!("{}/api2/json", settings.url.trim_end_matches('/')),
            credentials,
            task_timeout: settings.task_timeout,
            poll: settings.task_poll_interval,
        })
    }

    async fn login(&self, user: &str, password: &Secret) -> Result<Session, ProviderError> {
        let response = self
            .http
            .post(format!("{}/access/ticket", self.base))
            .form(&[("username", user), ("password", password.expose())])
            .send()
            .await
            .map_err(|e| transport_error("login", &e))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(ProviderError::Permanent(format!(
                "proxmox login as {user} refused: HTTP {status}"
            )));
        }
        let data = &body["data"];
        match (
            data["ticket"].as_str(),
            data["CSRFPreventionToken"].as_str(),
        ) {
            (Some(ticket), Some(csrf)) => Ok(Session {
                ticket: ticket.to_string(),
                csrf: csrf.to_string(),
                at: Instant::now(),
            }),
            _ => Err(ProviderError::Permanent(format!(
                "proxmox login as {user}: no ticket in the answer"
            ))),
        }
    }

    /// The current session, logging in when there is none or it is old (`renew`: in any case).
    async fn session(&self, renew: bool) -> Result<Option<Session>, ProviderError> {
        let Credentials::Ticket {
            user,
            password,
            session,
        } = &self.credentials
        else {
            return Ok(None);
        };
        let mut held = session.lock().await;
        let stale = held
            .as_ref()
            .is_none_or(|s| renew || s.at.elapsed() > TICKET_RENEW);
        if stale {
            *held = Some(self.login(user, password).await?);
        }
        Ok(held.clone())
    }

    /// One call; `params` go in the query (GET, DELETE) or the form body (POST, PUT). Returns
    /// the answer's `data`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Value, ProviderError> {
        let what = format!("{method} {path}");
        let mut renewed = false;
        loop {
            let session = self.session(false).await?;
            let url = format!("{}{path}", self.base);
            let mut request = self.http.request(method.clone(), &url);
            request = if matches!(method, Method::GET | Method::DELETE) {
                request.query(params)
            } else {
                request.form(params)
            };
            match (&self.credentials, &session) {
                (Credentials::Token(token), _) => {
                    request = request.header(
                        reqwest::header::AUTHORIZATION,
                        format!("PVEAPIToken={}", token.expose()),
                    );
                }
                (_, Some(s)) => {
                    request = request.header(
                        reqwest::header::COOKIE,
                        format!("PVEAuthCookie={}", s.ticket),
                    );
                    if method != Method::GET {
                        request = request.header("CSRFPreventionToken", &s.csrf);
                    }
                }
                _ => {}
            }
            let response = request
                .send()
                .await
                .map_err(|e| transport_error(&what, &e))?;
            let status = response.status();
            let reason = status.canonical_reason().unwrap_or_default().to_string();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return Ok(body.get("data").cloned().unwrap_or(Value::Null));
            }
            if status == StatusCode::UNAUTHORIZED
                && !renewed
                && matches!(self.credentials, Credentials::Ticket { .. })
            {
                renewed = true;
                self.session(true).await?;
                continue;
            }
            return Err(api_error(&what, status, &reason, &body));
        }
    }

    /// Waits for task `upid` to end; its `TASK ERROR` is the error.
    pub async fn wait_task(&self, upid: &str, what: &str) -> Result<(), ProviderError> {
        self.wait_task_for(upid, what, self.task_timeout).await
    }

    /// [`PveApi::wait_task`] with its own timeout.
    pub async fn wait_task_for(
        &self,
        upid: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let node = upid_node(upid).ok_or_else(|| {
            ProviderError::Permanent(format!("proxmox {what}: {upid:?} is not a UPID"))
        })?;
        let path = format!("/nodes/{}/tasks/{}/status", encode(node), encode(upid));
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.call(Method::GET, &path, &[]).await?;
            if status["status"] == "stopped" {
                let exit = status["exitstatus"].as_str().unwrap_or("unknown");
                if exit == "OK" {
                    return Ok(());
                }
                let message = format!("proxmox {what}: task failed: {exit}");
                return Err(if transient_message(exit) {
                    ProviderError::Transient(message)
                } else {
                    ProviderError::Permanent(message)
                });
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "proxmox {what}: task {upid} still running after {}",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Runs a call that starts a task and waits for it (a call answering without a UPID ran
    /// synchronously).
    pub async fn run_task(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        what: &str,
    ) -> Result<(), ProviderError> {
        let data = self.call(method, path, params).await?;
        match data.as_str() {
            Some(upid) if upid.starts_with("UPID:") => self.wait_task(upid, what).await,
            _ => Ok(()),
        }
    }
}

fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    // The error's source chain says why (refused, reset, certificate) without the URL's query.
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    let message = format!("proxmox {what}: {why}");
    if e.is_builder() {
        ProviderError::Permanent(message)
    } else {
        ProviderError::Transient(message)
    }
}

fn api_error(what: &str, status: StatusCode, reason: &str, body: &Value) -> ProviderError {
    let mut message = body["message"]
        .as_str()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| reason.to_string());
    if let Some(fields) = body["errors"].as_object() {
        let detail: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or_default().trim()))
            .collect();
        message = format!("{message} ({})", detail.join("; "));
    }
    let text = format!("proxmox {what}: HTTP {}: {message}", status.as_u16());
    match status.as_u16() {
        401 | 403 | 400 | 404 | 501 => ProviderError::Permanent(text),
        500 if !transient_message(&message) => ProviderError::Permanent(text),
        _ => ProviderError::Transient(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_and_upids_parse() {
        let colons = "AB:".repeat(31) + "AB";
        assert_eq!(parse_fingerprint(&colons), Some([0xab; 32]));
        assert_eq!(parse_fingerprint(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_fingerprint("abcd"), None);
        assert_eq!(
            upid_node("UPID:pve2:000003E8:00001B58:6752A000:qmclone:9000:root@pam:"),
            Some("pve2")
        );
        assert_eq!(upid_node("nope"), None);
    }

    #[test]
    fn pve_errors_are_classified_by_what_retrying_would_do() {
        let body = serde_json::json!({"message": "VM 9001 is locked (clone)\n"});
        let e = api_error("POST /x", StatusCode::INTERNAL_SERVER_ERROR, "", &body);
        assert!(e.is_transient(), "{e}");
        let body = serde_json::json!({
            "message": "Parameter verification failed.",
            "errors": {"memory": "value must have a minimum value of 16"}
        });
        let e = api_error("POST /x", StatusCode::BAD_REQUEST, "", &body);
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .contains("memory: value must have a minimum value of 16"),
            "{e}"
        );
        let e = api_error(
            "POST /x",
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            &Value::Null,
        );
        assert!(e.is_transient());
    }
}
