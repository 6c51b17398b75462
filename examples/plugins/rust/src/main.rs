//! A Shoal backend plugin in Rust: a "node pool" of processes.
//!
//! Serves `shoal.v1.NodeProvider` (proto/shoal/v1/provider.proto) with tonic. Each instance is a
//! `shoal-sim agent` process (a simulated kubelet that registers its Node with the simulator at
//! `--api`), started with the node's name, capacity, labels and taints. It keeps the contract in
//! docs/plugins.md:
//!
//! - Create is idempotent per claim id: a claim that has an instance gets the same one back.
//! - Every instance carries its ownership labels; List returns those carrying every label asked.
//! - Deleting an instance that is not there succeeds.
//! - A spec without a claim id or node name is INVALID_ARGUMENT; a process that cannot start is
//!   UNAVAILABLE (Shoal retries); a class this plugin does not have is FAILED_PRECONDITION.
//!
//! ```text
//! process-pool-plugin --listen 127.0.0.1:50071 --api http://127.0.0.1:6443 \
//!     --sim-binary target/debug/shoal-sim
//! ```

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::Duration,
};

use clap::Parser;
use shoal_proto::v1::{
    self as pb,
    node_provider_server::{NodeProvider, NodeProviderServer},
};
use tokio::{process::Child, sync::Mutex};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "A Shoal backend plugin: a node pool of shoal-sim agent processes")]
struct Args {
    /// Address to serve NodeProvider on.
    #[arg(long, default_value = "127.0.0.1:50071")]
    listen: SocketAddr,
    /// The simulator's API the nodes register with, http://host:port.
    #[arg(long)]
    api: String,
    /// The shoal-sim binary.
    #[arg(long, default_value = "shoal-sim")]
    sim_binary: PathBuf,
    /// Wait this long before starting each new node process (a slow cloud API).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    create_delay: Duration,
}

/// One node process.
struct Instance {
    id: String,
    claim: String,
    pool: String,
    node_name: String,
    labels: BTreeMap<String, String>,
    child: Child,
}

impl Instance {
    fn snapshot(&mut self) -> pb::Instance {
        let state = match self.child.try_wait() {
            Ok(None) => "running",
            Ok(Some(_)) | Err(_) => "exited",
        };
        pb::Instance {
            id: self.id.clone(),
            pool: self.pool.clone(),
            claim_id: self.claim.clone(),
            state: state.into(),
            labels: self.labels.clone(),
            node_name: self.node_name.clone(),
            ..Default::default()
        }
    }
}

/// The pool: instances by claim id. One lock, so concurrent creates of one claim make one node.
struct ProcessPool {
    args: Args,
    by_claim: Mutex<BTreeMap<String, Instance>>,
}

fn taint_flag(taint: &pb::Taint) -> String {
    let effect = match pb::TaintEffect::try_from(taint.effect) {
        Ok(pb::TaintEffect::PreferNoSchedule) => "PreferNoSchedule",
        Ok(pb::TaintEffect::NoExecute) => "NoExecute",
        _ => "NoSchedule",
    };
    if taint.value.is_empty() {
        format!("{}:{effect}", taint.key)
    } else {
        format!("{}={}:{effect}", taint.key, taint.value)
    }
}

impl ProcessPool {
    async fn start(&self, pool: &str, spec: &pb::InstanceSpec) -> Result<Instance, Status> {
        let capacity = spec.capacity.clone().unwrap_or_default();
        let cpu = match capacity.cpu_millis {
            0 => "1".to_string(),
            millis => format!("{millis}m"),
        };
        let memory = match capacity.memory_bytes {
            0 => "1Gi".to_string(),
            bytes => bytes.to_string(),
        };
        let mut command = tokio::process::Command::new(&self.args.sim_binary);
        command
            .args(["agent", "--api", &self.args.api, "--name", &spec.node_name])
            .args(["--cpu", &cpu, "--memory", &memory])
            .args(["--heartbeat-interval", "2s", "--exit-with-parent"]);
        for (key, value) in &spec.labels {
            command.arg("--label").arg(format!("{key}={value}"));
        }
        for taint in &spec.startup_taints {
            command.arg("--taint").arg(taint_flag(taint));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Status::unavailable(format!("cannot start the node process: {e}")))?;
        Ok(Instance {
            id: format!("proc-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            claim: spec.claim_id.clone(),
            pool: pool.to_string(),
            node_name: spec.node_name.clone(),
            labels: spec.labels.clone(),
            child,
        })
    }
}

#[tonic::async_trait]
impl NodeProvider for ProcessPool {
    async fn create(
        &self,
        request: Request<pb::CreateInstancesRequest>,
    ) -> Result<Response<pb::CreateInstancesResponse>, Status> {
        let request = request.into_inner();
        if !matches!(request.class.as_str(), "" | "default") {
            return Err(Status::failed_precondition(format!(
                "this plugin has no class {:?}",
                request.class
            )));
        }
        if request
            .instances
            .iter()
            .any(|s| s.claim_id.is_empty() || s.node_name.is_empty())
        {
            return Err(Status::invalid_argument(
                "instances[].claim_id and node_name are required",
            ));
        }
        let mut by_claim = self.by_claim.lock().await;
        let mut out = pb::CreateInstancesResponse::default();
        for spec in &request.instances {
            if !by_claim.contains_key(&spec.claim_id) {
                println!("creating {} for claim {}", spec.node_name, spec.claim_id);
                tokio::time::sleep(self.args.create_delay).await;
                let instance = self.start(&request.pool, spec).await?;
                by_claim.insert(spec.claim_id.clone(), instance);
            }
            if let Some(instance) = by_claim.get_mut(&spec.claim_id) {
                out.instances.push(instance.snapshot());
            }
        }
        Ok(Response::new(out))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteInstancesRequest>,
    ) -> Result<Response<pb::DeleteInstancesResponse>, Status> {
        let ids = request.into_inner().instance_ids;
        let mut by_claim = self.by_claim.lock().await;
        let claims: Vec<String> = by_claim
            .iter()
            .filter(|(_, i)| ids.contains(&i.id))
            .map(|(claim, _)| claim.clone())
            .collect();
        for claim in claims {
            if let Some(mut instance) = by_claim.remove(&claim) {
                let _ = instance.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), instance.child.wait()).await;
                println!("deleted {} ({})", instance.id, instance.node_name);
            }
        }
        // Ids this pool does not have are already gone: not an error.
        Ok(Response::new(pb::DeleteInstancesResponse::default()))
    }

    async fn list(
        &self,
        request: Request<pb::ListOwnedInstancesRequest>,
    ) -> Result<Response<pb::ListOwnedInstancesResponse>, Status> {
        let want = request.into_inner().owner_labels;
        let mut by_claim = self.by_claim.lock().await;
        let instances = by_claim
            .values_mut()
            .filter(|i| want.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .map(Instance::snapshot)
            .collect();
        Ok(Response::new(pb::ListOwnedInstancesResponse { instances }))
    }

    async fn describe(
        &self,
        _: Request<pb::DescribeProviderRequest>,
    ) -> Result<Response<pb::ProviderInfo>, Status> {
        Ok(Response::new(pb::ProviderInfo {
            name: format!("process-pool-rs/{VERSION}"),
            classes: vec!["default".into()],
            capabilities: vec!["node-names".into(), "idempotent-by-claim".into()],
        }))
    }
}

/// SIGTERM or Ctrl-C.
async fn stopped() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listen = args.listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("process-pool-plugin: cannot listen on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let pool = ProcessPool {
        args,
        by_claim: Mutex::new(BTreeMap::new()),
    };
    println!("process-pool plugin (rust) listening on {listen}");
    let served = tonic::transport::Server::builder()
        .add_service(NodeProviderServer::new(pool))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped())
        .await;
    // Dropping the pool kills every node process (kill_on_drop).
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("process-pool-plugin: {err}");
            ExitCode::FAILURE
        }
    }
}
