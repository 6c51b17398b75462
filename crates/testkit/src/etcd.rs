//! A real single-member etcd (Debian `etcd-server`) on free loopback ports.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, http_get, require_tool, wait_for};

/// A running etcd; killed and its data removed on drop.
pub struct EtcdServer {
    binary: PathBuf,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// Serving TLS with client-certificate auth (see [`EtcdServer::start_tls`]).
    tls: Option<crate::CertFiles>,
    metrics_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports healthy.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(&[])
    }

    /// As [`EtcdServer::start`], with more flags (e.g. `--auto-compaction-retention=30s`).
    pub fn start_with(extra: &[&str]) -> EtcdServer {
        EtcdServer::start_inner(extra, None)
    }

    /// etcd over TLS with its server certificate `server` (signed by `server.ca`) that accepts
    /// only clients presenting a certificate from that CA (`--client-cert-auth`).
    pub fn start_tls(server: &crate::CertFiles) -> EtcdServer {
        EtcdServer::start_inner(&[], Some(server.clone()))
    }

    fn start_inner(extra: &[&str], tls: Option<crate::CertFiles>) -> EtcdServer {
        let binary = require_tool("etcd", "install Debian's etcd-server package");
        let data = tempfile::Builder::new()
            .prefix("shoal-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for etcd: {e}"));
        let mut server = EtcdServer {
            binary,
            data,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
            metrics_port: free_port(),
        };
        server.launch();
        server
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The data directory's size on disk (the bbolt file and the WAL).
    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    /// Where `/health` answers in plain HTTP (the client port, or with TLS the metrics port).
    fn addr(&self) -> SocketAddr {
        let port = if self.tls.is_some() {
            self.metrics_port
        } else {
            self.client_port
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn launch(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.data.path().join("etcd.log"))
            .unwrap_or_else(|e| panic!("cannot create etcd log: {e}"));
        let child = Command::new(&self.binary)
            .arg("--name=shoal-test")
            .arg(format!(
                "--data-dir={}",
                self.data.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=shoal-test={peer}"))
            .arg("--log-level=warn")
            .args(self.tls.iter().flat_map(|tls| {
                [
                    format!("--cert-file={}", tls.cert.display()),
                    format!("--key-file={}", tls.key.display()),
                    format!("--trusted-ca-file={}", tls.ca.display()),
                    "--client-cert-auth".to_string(),
                    format!(
                        "--listen-metrics-urls=http://127.0.0.1:{}",
                        self.metrics_port
                    ),
                ]
            }))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.child = Some(child);
        let addr = self.addr();
        let healthy = wait_for(Duration::from_secs(20), || {
            matches!(http_get(addr, "/health"), Ok((200, body)) if body.contains("true"))
                .then_some(())
        });
        if healthy.is_none() {
            let log =
                std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default();
            panic!("etcd did not become healthy within 20s; its log:\n{log}");
        }
    }

    /// Kills etcd (SIGKILL), keeping its data, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
