//! [`TcpProxy`]: a loopback TCP proxy in front of one or more upstreams (round robin per
//! connection), whose behaviour a test switches at run time to make the network fail the ways
//! real ones do: a server that accepts connections and never answers, and connections that go
//! silent without being closed (a half-open connection, as after a NAT or node loss).

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

struct Shared {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
    /// New connections are accepted and then ignored (never forwarded, never answered).
    black_hole: AtomicBool,
    /// Connections born before this generation forward nothing any more (data is dropped).
    frozen_before: AtomicU64,
    generation: AtomicU64,
    stop: AtomicBool,
    accepted: AtomicU64,
}

/// A switchable TCP proxy on a free loopback port; stops on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TcpProxy {
    /// Forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        TcpProxy::round_robin(&[upstream])
    }

    /// Forwards each new connection to the next of `upstreams` in turn (one address in front
    /// of several replicas, as a Kubernetes Service).
    pub fn round_robin(upstreams: &[SocketAddr]) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("proxy: cannot bind a loopback port: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        let shared = Arc::new(Shared {
            upstreams: upstreams.to_vec(),
            next: AtomicUsize::new(0),
            black_hole: AtomicBool::new(false),
            frozen_before: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        let accept = shared.clone();
        thread::spawn(move || accept_loop(listener, accept));
        TcpProxy { addr, shared }
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, new connections are accepted and never answered, and existing ones go
    /// silent: the upstream "hangs".
    pub fn black_hole(&self) {
        self.shared.black_hole.store(true, Ordering::SeqCst);
        self.freeze_existing();
    }

    /// Back to forwarding new connections (connections frozen before stay frozen).
    pub fn forward(&self) {
        self.shared.black_hole.store(false, Ordering::SeqCst);
    }

    /// Every connection open now goes silent — bytes in either direction are dropped, nothing
    /// is closed — while new connections are forwarded normally.
    pub fn freeze_existing(&self) {
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared
            .frozen_before
            .store(generation, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                thread::spawn(move || serve(client, shared));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve(client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    let generation = shared.generation.load(Ordering::SeqCst);
    if shared.black_hole.load(Ordering::SeqCst) {
        swallow(client, &shared);
        return;
    }
    let i = shared.next.fetch_add(1, Ordering::SeqCst) % shared.upstreams.len().max(1);
    let Some(upstream) = shared.upstreams.get(i).copied() else {
        return;
    };
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = shared.clone();
    thread::spawn(move || pump(client, server, up, generation));
    pump(server2, client2, shared, generation);
}

/// Reads and drops everything until the peer goes or the proxy stops.
fn swallow(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, generation: u64) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 64 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let frozen = generation < shared.frozen_before.load(Ordering::SeqCst);
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if frozen {
                    continue; // silently dropped
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let frozen = generation < shared.frozen_before.load(Ordering::SeqCst);
    if !frozen {
        let _ = to.shutdown(Shutdown::Write);
    }
}
