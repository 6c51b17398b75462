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
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) as job `shoal`.
    pub fn start(targets: &[SocketAddr]) -> PrometheusServer {
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
        let mut server = PrometheusServer {
            binary,
            dir,
            port: free_port(),
            child: None,
        };
        server.launch();
        server
    }

    /// The HTTP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
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
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
        self.child = Some(child);
        let addr = self.addr();
        if wait_for(Duration::from_secs(30), || {
            matches!(http_get(addr, "/-/ready"), Ok((200, _))).then_some(())
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
