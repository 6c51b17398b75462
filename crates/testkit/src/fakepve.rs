//! A fake Proxmox VE (PyPI `fakepve`, run by `tests/fixtures/fakepve_serve.py`) as its own
//! process over HTTPS, and an [`AgentBridge`] that plays the guests: fakepve boots nothing, so
//! for every VM it reports running the bridge starts a `shoal-sim agent` named after the VM,
//! registering with the labels and taints the VM's SMBIOS serial carries — what the k3s agent in
//! a real guest reads from `/sys/class/dmi/id/product_serial` — and stops it when the VM stops.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use serde_json::{Value, json};

use crate::{ServiceProcess, free_port, http_get, http_request, wait_for};

/// The Python that has fakepve and grpcio: `$SHOAL_VENV/bin/python`, default
/// `~/.cache/shoal/venv`.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("SHOAL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shoal/venv")
        });
    let python = venv.join("bin/python");
    let has_fakepve = std::process::Command::new(&python)
        .args(["-c", "import fakepve, cryptography, grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_fakepve,
        "{} lacks fakepve or grpcio: run scripts/install-deps.sh (it makes that venv with fakepve, cryptography, grpcio and grpcio-tools)",
        python.display()
    );
    python
}

/// A running fakepve; killed on drop.
pub struct PveServer {
    process: ServiceProcess,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The plain-HTTP control port.
    pub control: SocketAddr,
    /// The server's self-signed certificate (PEM).
    pub certfile: PathBuf,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
    /// The API token, `root@pam!shoal=<secret>`.
    pub token: String,
}

impl PveServer {
    /// Starts fakepve with PVE nodes `nodes` and the template VM 9000 (`k3s-template`).
    /// `time_scale`: real seconds per PVE second; `task_latency`: PVE seconds every task takes.
    pub fn start(nodes: &[&str], time_scale: f64, task_latency: f64) -> PveServer {
        let port = free_port();
        let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let token = format!("root@pam!shoal={:016x}", port as u64 * 7919 + 12345);
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fakepve_serve.py");
        let args = vec![
            script.display().to_string(),
            "--host=127.0.0.1".into(),
            format!("--port={port}"),
            format!("--control-port={}", control.port()),
            format!("--nodes={}", nodes.join(",")),
            format!("--token={token}"),
            format!("--time-scale={time_scale}"),
            format!("--task-latency={task_latency}"),
        ];
        let process = ServiceProcess::start_program("fakepve", &python(), &args, &[]);
        let ready = wait_for(Duration::from_secs(20), || {
            process
                .logs()
                .lines()
                .find(|l| l.starts_with("{\"url\""))
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
        });
        let Some(ready) = ready else {
            panic!("fakepve did not start; its log:\n{}", process.logs());
        };
        PveServer {
            url: ready["url"].as_str().unwrap_or_default().to_string(),
            control,
            certfile: PathBuf::from(ready["certfile"].as_str().unwrap_or_default()),
            fingerprint: ready["fingerprint"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            token,
            process,
        }
    }

    /// fakepve's log.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    fn get(&self, path: &str) -> Value {
        match http_get(self.control, path) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            other => panic!("fakepve control {path}: {other:?}\n{}", self.logs()),
        }
    }

    fn post(&self, path: &str, body: Value) {
        match http_request(self.control, "POST", path, Some(&body.to_string())) {
            Ok((200, _)) => {}
            other => panic!("fakepve control {path}: {other:?}\n{}", self.logs()),
        }
    }

    /// Every VM but the template: vmid, name, node, status, lock, config.
    pub fn vms(&self) -> Vec<Value> {
        self.get("/vms")
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["template"] != true)
            .cloned()
            .collect()
    }

    /// Every API request fakepve saw: `[method, path, body]`.
    pub fn requests(&self) -> Vec<Value> {
        self.get("/requests")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Answers requests `method … suffix` with HTTP `status` and `message` (`times` of them,
    /// or all).
    pub fn fail(&self, method: &str, suffix: &str, status: u16, message: &str, times: Option<u32>) {
        self.post(
            "/fail",
            json!({ "method": method, "suffix": suffix, "status": status, "message": message, "times": times }),
        );
    }

    /// Forgets injected failures.
    pub fn clear(&self) {
        self.post("/clear", json!({}));
    }

    /// Every task takes at least `seconds` PVE seconds from now on.
    pub fn set_task_latency(&self, seconds: f64) {
        self.post("/task-latency", json!({ "seconds": seconds }));
    }

    /// Every task of `task_type` (`qmclone`, `qmconfig`, `qmstart`, …) ends with
    /// `TASK ERROR: <message>`.
    pub fn fail_tasks(&self, task_type: &str, message: &str) {
        self.post(
            "/task-error",
            json!({ "type": task_type, "message": message }),
        );
    }

    /// A VM made outside Shoal.
    pub fn add_vm(&self, vmid: u32, name: &str) {
        self.post("/add-vm", json!({ "vmid": vmid, "name": name }));
    }
}

/// The k3s flags a VM's `smbios1` serial carries (base64, as PVE stores it).
pub fn registration_flags(config: &Value) -> Option<String> {
    let smbios = config["smbios1"].as_str()?;
    let serial = smbios.split(',').find_map(|p| p.strip_prefix("serial="))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(serial)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Plays the guests of a [`PveServer`] against a simulator (see the module docs).
pub struct AgentBridge {
    stop: Arc<AtomicBool>,
    agents: Arc<Mutex<BTreeMap<u32, ServiceProcess>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentBridge {
    /// Follows `pve` (polling its VMs) and runs agents against the simulator API `sim_api`
    /// (`http://host:port`).
    pub fn start(pve: &PveServer, sim_api: &str) -> AgentBridge {
        let stop = Arc::new(AtomicBool::new(false));
        let agents: Arc<Mutex<BTreeMap<u32, ServiceProcess>>> = Arc::default();
        let control = pve.control;
        let sim_api = sim_api.to_string();
        let thread = {
            let stop = stop.clone();
            let agents = agents.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let vms: Vec<Value> = match http_get(control, "/vms") {
                        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    let mut agents = agents.lock().unwrap_or_else(|p| p.into_inner());
                    let running: BTreeMap<u32, &Value> = vms
                        .iter()
                        .filter(|v| v["status"] == "running" && v["template"] != true)
                        .filter_map(|v| Some((v["vmid"].as_u64()? as u32, v)))
                        .collect();
                    agents.retain(|vmid, _| running.contains_key(vmid));
                    for (vmid, vm) in running {
                        if agents.contains_key(&vmid) {
                            continue;
                        }
                        let config = &vm["config"];
                        let Some(flags) = registration_flags(config) else {
                            continue; // not one of Shoal's, or not configured yet
                        };
                        let mut args = vec![
                            "agent".to_string(),
                            format!("--api={sim_api}"),
                            format!("--name={}", vm["name"].as_str().unwrap_or_default()),
                            format!("--cpu={}", config["cores"].as_str().unwrap_or("1")),
                            format!("--memory={}Mi", config["memory"].as_str().unwrap_or("1024")),
                            "--heartbeat-interval=2s".into(),
                        ];
                        let words: Vec<&str> = flags.split_whitespace().collect();
                        for pair in words.chunks(2) {
                            match pair {
                                ["--node-label", l] => args.push(format!("--label={l}")),
                                ["--node-taint", t] => args.push(format!("--taint={t}")),
                                _ => {}
                            }
                        }
                        agents.insert(vmid, ServiceProcess::start("shoal-sim", &args, &[]));
                    }
                    drop(agents);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        AgentBridge {
            stop,
            agents,
            thread: Some(thread),
        }
    }

    /// How many agents (running VMs with a registration) are up.
    pub fn agents(&self) -> usize {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for AgentBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
