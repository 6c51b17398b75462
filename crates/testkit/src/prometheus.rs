//! A real Prometheus (Debian `prometheus`) on a free loopback port, scraping given targets every
//! second with `honor_labels: true` (the simulator labels series by node itself).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, http_get, require_tool, wait_for};

/// A running Prometheus; killed and its data removed on drop.
pub struct PrometheusServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Serving HTTPS with basic auth (see [`PrometheusServer::start_secured`]).
    secured: bool,
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) as job `shoal`.
    pub fn start(targets: &[SocketAddr]) -> PrometheusServer {
        PrometheusServer::start_inner(targets, None)
    }

    /// As [`PrometheusServer::start`], serving HTTPS with `cert` and requiring HTTP basic auth
    /// of `user` whose password's bcrypt hash is `bcrypt_hash` (its `--web.config.file`).
    pub fn start_secured(
        targets: &[SocketAddr],
        cert: &crate::CertFiles,
        user: &str,
        bcrypt_hash: &str,
    ) -> PrometheusServer {
        let web = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {user}: '{bcrypt_hash}'\n",
            cert.cert.display(),
            cert.key.display()
        );
        PrometheusServer::start_inner(targets, Some(web))
    }

    fn start_inner(targets: &[SocketAddr], web: Option<String>) -> PrometheusServer {
        let binary = require_tool("prometheus", "install Debian's prometheus package");
        let dir = tempfile::Builder::new()
            .prefix("shoal-prom-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: shoal\n  honor_labels: true\n  static_configs:\n  - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)
            .unwrap_or_else(|e| panic!("write config: {e}"));
        if let Some(web) = &web {
            std::fs::write(dir.path().join("web.yml"), web)
                .unwrap_or_else(|e| panic!("write web config: {e}"));
        }
        let mut server = PrometheusServer {
            binary,
            dir,
            port: free_port(),
            child: None,
            secured: web.is_some(),
        };
        server.launch();
        server
    }

    /// The HTTP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>` (`https://` when secured).
    pub fn url(&self) -> String {
        let scheme = if self.secured { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("prometheus.log"))
            .unwrap_or_else(|e| panic!("log: {e}"));
        let child = Command::new(&self.binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .args(self.secured.then(|| {
                format!(
                    "--web.config.file={}",
                    self.dir.path().join("web.yml").display()
                )
            }))
            // Secured, /-/ready wants TLS and a password: readiness is read from the log.
            .arg(if self.secured {
                "--log.level=info"
            } else {
                "--log.level=warn"
            })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
        self.child = Some(child);
        let addr = self.addr();
        let log_file = self.dir.path().join("prometheus.log");
        let secured = self.secured;
        if wait_for(Duration::from_secs(30), || {
            if secured {
                std::fs::read_to_string(&log_file)
                    .ok()?
                    .contains("Server is ready to receive web requests")
                    .then_some(())
            } else {
                matches!(http_get(addr, "/-/ready"), Ok((200, _))).then_some(())
            }
        })
        .is_none()
        {
            let log =
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
            panic!("prometheus did not become ready within 30s; its log:\n{log}");
        }
    }

    /// An instant query; returns the API's JSON text.
    pub fn query(&self, promql: &str) -> String {
        let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        match http_get(self.addr(), &format!("/api/v1/query?query={encoded}")) {
            Ok((_, body)) => body,
            Err(e) => format!("{{\"error\":\"{e}\"}}"),
        }
    }

    /// Kills Prometheus (an outage), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.stop();
    }
}
