//! Test fixtures that start the real things — etcd, and Shoal's own binaries as processes — on
//! free loopback ports in temporary directories, and stop them on drop.
//!
//! A missing fixture binary fails the test with a message saying how to install it; nothing here
//! falls back to a fake.

pub mod certs;
pub mod etcd;
pub mod fakepve;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod sim;

pub use certs::{CertFiles, TestCa};
pub use etcd::EtcdServer;
pub use fakepve::{AgentBridge, PveServer};
pub use process::{ServiceProcess, bin_path};
pub use prometheus::PrometheusServer;
pub use proxy::TcpProxy;
pub use sim::SimServer;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    // Binding to port 0 lets the kernel pick; the tiny window before the caller binds it again is
    // acceptable for tests. The kernel may hand the same free port out twice in a row (e.g. a
    // grpc and an admin port for one service): never give a port twice in one test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free loopback port: {e}"));
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when something accepts TCP connections at `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Finds an executable on PATH, or panics with how to install it.
pub fn require_tool(name: &str, install_hint: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed or not on PATH; {install_hint} (scripts/install-deps.sh installs every test dependency)"
    );
}

/// Minimal blocking HTTP/1.0 GET on loopback: returns (status, body). For probing fixtures
/// without pulling an HTTP client into every test.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None)
}

/// Minimal blocking HTTP/1.0 request with an optional JSON body (`content-type` is
/// `application/merge-patch+json` for PATCH, `application/json` otherwise).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    match json {
        Some(body) => {
            let content_type = if method == "PATCH" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            write!(
                stream,
                "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
        None => write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?,
    }
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:.80}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
