//! The cluster simulator (`shoal-sim serve`) as a real process on a free port, with a kubeconfig
//! for it; restartable on the same port (a restarted simulator starts empty, as an API server
//! whose etcd was wiped would).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{ServiceProcess, free_port, http_get, wait_for};

/// A running simulator; killed on drop.
pub struct SimServer {
    process: Option<ServiceProcess>,
    bind: IpAddr,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl SimServer {
    /// Starts `shoal-sim serve` on 127.0.0.1 with `extra` flags (e.g. `--node-grace-period=2s`).
    pub fn start(extra: &[&str]) -> SimServer {
        SimServer::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), extra)
    }

    /// Starts it listening on `bind` (e.g. 0.0.0.0 so that containers can reach it).
    pub fn start_on(bind: IpAddr, extra: &[&str]) -> SimServer {
        let dir = tempfile::Builder::new()
            .prefix("shoal-sim-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut sim = SimServer {
            process: None,
            bind,
            port: free_port(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        sim.launch();
        sim
    }

    fn launch(&mut self) {
        let mut args = vec![
            "serve".to_string(),
            format!("--addr={}", SocketAddr::new(self.bind, self.port)),
            format!("--kubeconfig={}", self.kubeconfig().display()),
        ];
        args.extend(self.extra.iter().cloned());
        let process = ServiceProcess::start("shoal-sim", &args, &[]);
        let addr = self.addr();
        let up = wait_for(Duration::from_secs(20), || {
            matches!(http_get(addr, "/version"), Ok((200, _))).then_some(())
        });
        if up.is_none() {
            panic!(
                "shoal-sim did not answer on {addr} within 20s; its log:\n{}",
                process.logs()
            );
        }
        self.process = Some(process);
    }

    /// The loopback address clients on this machine use.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The kubeconfig the simulator wrote for itself.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Everything the simulator logged.
    pub fn logs(&self) -> String {
        self.process.as_ref().map(|p| p.logs()).unwrap_or_default()
    }

    /// Kills it (SIGKILL): the API server goes away.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Kills it and starts a fresh one on the same port (with no objects).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}
