//! The `proxmox` backend against fakepve (a stateful fake of the Proxmox VE API, its own process
//! over HTTPS): the whole loop (pending pods → clones → Nodes Ready → pods Running → scale down →
//! VMs gone), rollback on faults, VMID exhaustion with two provisioner replicas, and `kill -9`
//! mid-clone. fakepve boots nothing: an [`AgentBridge`] runs a `shoal-sim agent` per running VM.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, Running, deployment_yaml, grpcurl_ok, kubectl, sim_get};
use shoal_testkit::{AgentBridge, EtcdServer, PveServer, SimServer, wait_for};

const FIRST_VMID: u32 = 9100;

fn pool_yaml(max_nodes: u32, max_concurrent: u32, min_nodes: u32) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: vms }}\nspec:\n  provider: {{ backend: proxmox }}\n  template:\n    labels: {{ role: worker }}\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n    overhead: {{ memory: 512Mi }}\n  limits: {{ minNodes: {min_nodes}, maxNodes: {max_nodes} }}\n  scaleUp: {{ maxConcurrent: {max_concurrent} }}\n  scaleDown: {{ unneededFor: 5s, cooldown: 2s, maxConcurrent: 5, drainTimeout: 20s }}\n"
    )
}

/// How the provisioner logs in to fakepve and checks its certificate.
#[derive(Clone, Copy)]
enum Auth {
    /// API token; the certificate's SHA-256 pinned.
    TokenPinned,
    /// Ticket login with user and password; the certificate trusted as a CA file.
    TicketCa,
    /// API token; a fingerprint that is not the server's.
    WrongPin,
}

struct World {
    etcd: EtcdServer,
    sim: SimServer,
    pve: PveServer,
    store: EtcdReader,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl World {
    /// etcd, a simulator, fakepve with nodes pve1 and pve2, and a provisioner config using a
    /// VMID range of `range` ids (secrets from the environment, the certificate pinned).
    fn start(range: u32, pool: &str, task_latency: f64) -> World {
        World::start_with(range, pool, task_latency, Auth::TokenPinned)
    }

    fn start_with(range: u32, pool: &str, task_latency: f64, auth: Auth) -> World {
        let etcd = EtcdServer::start();
        let sim = SimServer::start(&["--node-grace-period=5s"]);
        let pve = PveServer::start(&["pve1", "pve2"], 1.0, task_latency);
        let store = EtcdReader::new(&etcd);
        store.put_pool(pool);
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("provisioner.yaml");
        let yaml = format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}
service:
  kube: {{ kubeconfig: {kubeconfig} }}
  backends:
    proxmox:
      url: {url}
{auth}
      vmidRange: {{ first: {FIRST_VMID}, last: {last} }}
      taskTimeout: 30s
      taskPollInterval: 100ms
      shutdownTimeout: 3s
      classes:
        default:
          template: k3s-template
          nodes: [pve1, pve2]
          disk: {{ size: 32G }}
          network: {{ bridge: vmbr0, vlan: 20 }}
          cloudInit:
            user: k3s
            sshKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIShoal shoal@test']
            ipconfig: ip=dhcp
            cicustom: 'user=local:snippets/k3s-join.yaml'
  resilience: {{ callTimeout: 120s, attempts: 2, retryMinDelay: 100ms, retryMaxDelay: 500ms, breakerFailures: 20, breakerRecovery: 2s }}
  nodeTtl: 90s
  instanceCheckInterval: 1s
  drainPollInterval: 200ms
",
            kubeconfig = sim.kubeconfig().display(),
            url = pve.url,
            auth = match auth {
                Auth::TokenPinned => format!(
                    "      token: {{ fromEnv: PVE_TOKEN }}\n      tls: {{ fingerprint: \"{}\" }}",
                    pve.fingerprint
                ),
                Auth::TicketCa => format!(
                    "      user: root@pam\n      password: {{ fromEnv: PVE_PASSWORD }}\n      tls: {{ caFile: {} }}",
                    pve.certfile.display()
                ),
                Auth::WrongPin => format!(
                    "      token: {{ fromEnv: PVE_TOKEN }}\n      tls: {{ fingerprint: \"{}\" }}",
                    "ab".repeat(32)
                ),
            },
            last = FIRST_VMID + range - 1,
        );
        std::fs::write(&config, yaml).expect("write config");
        World {
            etcd,
            sim,
            pve,
            store,
            config,
            dir,
        }
    }

    fn provisioner(&self, instance: &str, env: &[(&str, &str)]) -> Running {
        let mut all = vec![
            ("PVE_TOKEN", self.pve.token.as_str()),
            ("PVE_PASSWORD", "secret"),
        ];
        all.extend_from_slice(env);
        let mut p = Running::start(
            "shoal-provisioner",
            instance,
            Some(&self.etcd),
            &[&format!("--config={}", self.config.display())],
            &all,
        );
        p.wait_ready();
        p
    }

    fn leading(&self, instance: &str, env: &[(&str, &str)]) -> Running {
        let p = self.provisioner(instance, env);
        let leads = wait_for(Duration::from_secs(15), || {
            (p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
        });
        assert!(leads.is_some(), "{instance} leads\n{}", p.process.logs());
        p
    }

    /// The metrics service, a leading provisioner and a decider applying `pool_yaml(8, 5, 0)`
    /// from a file (`decider_flags` added), each its own process; instances named `<name>-…`.
    fn control_plane(&self, name: &str, decider_flags: &[&str]) -> (Running, Running, Running) {
        let kube = format!(
            "--set=service.kube.kubeconfig={}",
            self.sim.kubeconfig().display()
        );
        let mut metrics = Running::start(
            "shoal-metrics",
            &format!("{name}-metrics"),
            None,
            &[&kube],
            &[],
        );
        metrics.wait_ready();
        let provisioner = self.leading(&format!("{name}-provisioner"), &[]);
        let pools = self.dir.path().join("pools.yaml");
        std::fs::write(&pools, pool_yaml(8, 5, 0)).expect("pool file");
        let metrics_flag = format!("--set=service.metricsAddr=http://{}", metrics.grpc);
        let provisioner_flag = format!("--set=service.provisionerAddr=http://{}", provisioner.grpc);
        let pools_flag = format!("--set=service.poolFiles={}", pools.display());
        let mut flags = vec![
            metrics_flag.as_str(),
            provisioner_flag.as_str(),
            pools_flag.as_str(),
        ];
        flags.extend_from_slice(decider_flags);
        let mut decider = Running::start(
            "shoal-decider",
            &format!("{name}-decider"),
            Some(&self.etcd),
            &flags,
            &[],
        );
        decider.wait_ready();
        (metrics, provisioner, decider)
    }

    fn reconciler(&self, provisioner: &Running) -> Running {
        let mut r = Running::start(
            "shoal-reconciler",
            "pve-reconciler",
            Some(&self.etcd),
            &[
                &format!(
                    "--set=service.kube.kubeconfig={}",
                    self.sim.kubeconfig().display()
                ),
                &format!("--set=service.provisionerAddr=http://{}", provisioner.grpc),
                "--set=service.orphanGrace=0s",
                "--set=service.interval=1h",
            ],
            &[],
        );
        r.wait_ready();
        r
    }

    /// Reserved VMIDs in the store.
    fn reserved_vmids(&self) -> BTreeSet<u32> {
        self.store
            .keys_under("ids/proxmox/vmid:")
            .iter()
            .filter_map(|k| k.rsplit(':').next()?.parse().ok())
            .collect()
    }

    fn claims(&self) -> Vec<Value> {
        self.store.json_under("claims/")
    }
}

fn call(p: &Running, method: &str, body: Value) -> Value {
    shoal_e2e::provisioner_call(p, method, body)
}

fn wait_op(p: &Running, id: &str, timeout: Duration) -> Value {
    wait_for(timeout, || {
        let op = call(p, "GetOperation", json!({ "id": id }));
        (op["state"] != "OPERATION_STATE_RUNNING").then_some(op)
    })
    .unwrap_or_else(|| panic!("operation {id} still running\n{}", p.process.logs()))
}

fn drifts(r: &Running) -> Value {
    let out = grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{\"dryRun\": true}",
        &r.grpc.to_string(),
        "shoal.v1.ReconcilerService/Reconcile",
    ]);
    serde_json::from_str::<Value>(&out).expect("report")["drifts"].clone()
}

fn no_drift(r: &Running) {
    let d = drifts(r);
    assert!(
        d.as_array().is_none_or(|d| d.is_empty()),
        "reconciler finds nothing: {d}"
    );
}

/// Pods of `app` Running.
fn running(sim: &SimServer, app: &str) -> usize {
    shoal_e2e::running_pods(
        sim.addr(),
        &format!("/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"),
    )
}

#[test]
fn pending_pods_get_vms_that_join_and_the_vms_go_when_the_pods_do() {
    let w = World::start(40, &pool_yaml(8, 5, 0), 0.0);
    let bridge = AgentBridge::start(&w.pve, &w.sim.url());
    let (_metrics, provisioner, decider) = w.control_plane("pve", &["--set=election.leaseTtl=3s"]);
    let reconciler = w.reconciler(&provisioner);

    // Ten pods of 900m on 2-CPU nodes: two per node, five nodes.
    kubectl(
        &w.sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 10, "900m", "256Mi", None),
    );
    let started = Instant::now();
    let all = wait_for(Duration::from_secs(90), || {
        (running(&w.sim, "web") == 10).then(Instant::now)
    });
    assert!(
        all.is_some(),
        "every pod runs on a VM: {} running; VMs {:#?}\n{}\n{}",
        running(&w.sim, "web"),
        w.pve.vms(),
        decider.process.logs(),
        provisioner.process.logs()
    );
    let vms = w.pve.vms();
    assert_eq!(vms.len(), 5, "five VMs: {vms:#?}");
    assert_eq!(bridge.agents(), 5);
    let cluster = w.store.cluster_id();
    let vmids: BTreeSet<u32> = vms
        .iter()
        .filter_map(|v| v["vmid"].as_u64().map(|n| n as u32))
        .collect();
    assert_eq!(
        vmids,
        w.reserved_vmids(),
        "every VMID is reserved, none else"
    );
    assert!(
        vmids
            .iter()
            .all(|id| (FIRST_VMID..FIRST_VMID + 40).contains(id))
    );
    let mut placed = BTreeSet::new();
    for vm in &vms {
        let c = &vm["config"];
        let name = vm["name"].as_str().unwrap_or_default();
        assert_eq!(c["cores"], "2", "{name}: {c}");
        assert_eq!(c["memory"], "4608", "{name}: 4 GiB + 512 MiB overhead: {c}");
        let tags = c["tags"].as_str().unwrap_or_default();
        for want in [
            format!("shoal-cluster-{cluster}"),
            "shoal-pool-vms".to_string(),
            "shoal-claim-".to_string(),
        ] {
            assert!(tags.contains(&want), "{name}: tag {want} in {tags}");
        }
        assert_eq!(
            c["net0"]
                .as_str()
                .map(|n| n.contains("bridge=vmbr0,tag=20")),
            Some(true),
            "{c}"
        );
        assert_eq!(c["ciuser"], "k3s");
        assert_eq!(c["ipconfig0"], "ip=dhcp");
        assert_eq!(c["cicustom"], "user=local:snippets/k3s-join.yaml");
        assert!(
            c["sshkeys"]
                .as_str()
                .is_some_and(|k| k.contains("ssh-ed25519")),
            "{c}"
        );
        let flags = shoal_testkit::fakepve::registration_flags(c).unwrap_or_default();
        assert!(flags.contains("--node-label role=worker"), "{flags}");
        placed.insert(vm["node"].as_str().unwrap_or_default().to_string());
        // The disk was grown.
        let vmid = vm["vmid"].as_u64().unwrap_or_default();
        let resized = w.pve.requests().iter().any(|r| {
            r[0] == "PUT"
                && r[1]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("/qemu/{vmid}/resize")))
                && r[2].to_string().contains("32G")
        });
        assert!(resized, "{name}: disk resized to 32G");
    }
    assert_eq!(placed.len(), 2, "VMs spread over pve1 and pve2: {placed:?}");
    // Nodes carry the claim labels the serial gave them.
    let nodes = sim_get(
        w.sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dvms",
    );
    assert_eq!(nodes["items"].as_array().map(Vec::len), Some(5), "{nodes}");
    let up = all.map(|t| t.duration_since(started)).unwrap_or_default();
    no_drift(&reconciler);

    // The pods go: the VMs are drained, shut down and destroyed, their VMIDs released.
    kubectl(
        &w.sim.kubeconfig(),
        &["scale", "deployment/web", "--replicas=0"],
        "",
    );
    let deleted = || {
        w.claims()
            .iter()
            .filter(|c| c["phase"] == "Deleted")
            .count()
    };
    let gone = wait_for(Duration::from_secs(90), || {
        (w.pve.vms().is_empty() && w.reserved_vmids().is_empty() && deleted() == 5)
            .then(Instant::now)
    });
    assert!(
        gone.is_some(),
        "VMs gone, VMIDs released, claims Deleted: {:#?} reserved {:?} claims {:#?}\n{}",
        w.pve.vms(),
        w.reserved_vmids(),
        w.claims(),
        provisioner.process.logs()
    );
    no_drift(&reconciler);
    // The token never shows in a log.
    let secret = w.pve.token.rsplit('=').next().unwrap_or_default();
    for (who, log) in [
        ("provisioner", provisioner.process.logs()),
        ("decider", decider.process.logs()),
        ("reconciler", reconciler.process.logs()),
    ] {
        assert!(!log.contains(secret), "{who} logged the PVE token");
    }
    println!(
        "proxmox loop: 10 pending pods → 5 VMs cloned, started, Ready and all pods Running in {:.1} s",
        up.as_secs_f64()
    );
}

#[test]
fn a_failed_step_leaves_no_vm_and_no_reserved_vmid() {
    let w = World::start(40, &pool_yaml(8, 5, 0), 0.2);
    let p = w.leading("pve-faults", &[]);

    // The start task fails (TASK ERROR, as for a VM whose QEMU will not start): the clone is
    // purged.
    w.pve
        .fail_tasks("qmstart", "start failed: QEMU exited with code 1");
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "vms", "count": 2, "idempotencyKey": "f1" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    assert_eq!(done["state"], "OPERATION_STATE_FAILED", "{done}");
    let failed: Vec<String> = w
        .claims()
        .iter()
        .filter(|c| c["phase"] == "Failed")
        .map(|c| c["failureReason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(failed.len(), 2, "{:#?}", w.claims());
    assert!(
        failed
            .iter()
            .all(|r| r.contains("start failed: QEMU exited")),
        "the claim says why: {failed:?}"
    );
    assert!(w.pve.vms().is_empty(), "no VM left: {:#?}", w.pve.vms());
    assert!(
        w.reserved_vmids().is_empty(),
        "no VMID left: {:?}",
        w.reserved_vmids()
    );

    // The clone itself fails (storage full): nothing was made, the VMID is released.
    w.pve.clear();
    w.pve.fail(
        "POST",
        "/clone",
        500,
        "clone failed: unable to allocate image: no space left on device",
        None,
    );
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "vms", "count": 1, "idempotencyKey": "f2" }),
    );
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    assert_eq!(done["state"], "OPERATION_STATE_FAILED", "{done}");
    assert!(w.pve.vms().is_empty());
    assert!(w.reserved_vmids().is_empty(), "{:?}", w.reserved_vmids());

    // A VMID taken outside Shoal is skipped; slow tasks (200 ms each) still finish.
    w.pve.clear();
    w.pve.add_vm(FIRST_VMID, "someone-elses");
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "vms", "count": 1, "idempotencyKey": "f3" }),
    );
    let launched = wait_for(Duration::from_secs(30), || {
        let vms = w.pve.vms();
        (vms.iter()
            .any(|v| v["vmid"] == FIRST_VMID + 1 && v["status"] == "running"))
        .then_some(vms)
    });
    assert!(
        launched.is_some(),
        "{:#?}\n{}",
        w.pve.vms(),
        p.process.logs()
    );
    let theirs = w
        .pve
        .vms()
        .into_iter()
        .find(|v| v["vmid"] == FIRST_VMID)
        .expect("kept");
    assert_eq!(
        theirs["name"], "someone-elses",
        "a VM that is not Shoal's is never touched"
    );
    assert_eq!(w.reserved_vmids(), [FIRST_VMID + 1].into());
    let _ = op;
}

#[test]
fn two_replicas_never_give_one_vmid_twice_and_say_when_the_range_is_exhausted() {
    // Ticket login this time, the certificate trusted as a CA file.
    let w = World::start_with(40, &pool_yaml(60, 50, 0), 0.0, Auth::TicketCa);
    let leader = w.leading("pve-a", &[]);
    let standby = w.provisioner("pve-b", &[]);
    let ops: Vec<String> = [(&leader, "x"), (&standby, "y")]
        .iter()
        .map(|(p, key)| {
            call(
                p,
                "CreateNodes",
                json!({ "pool": "vms", "count": 25, "idempotencyKey": key }),
            )["id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    let settled = wait_for(Duration::from_secs(120), || {
        let claims = w.claims();
        let launched = claims
            .iter()
            .filter(|c| matches!(c["phase"].as_str(), Some("Launched" | "Registered")))
            .count();
        let failed = claims.iter().filter(|c| c["phase"] == "Failed").count();
        (launched + failed == 50).then_some((launched, failed))
    });
    let Some((launched, failed)) = settled else {
        panic!("{:#?}\n{}", w.claims(), leader.process.logs());
    };
    assert_eq!((launched, failed), (40, 10), "40 VMs, 10 refused");
    let vms = w.pve.vms();
    let vmids: BTreeSet<u64> = vms.iter().filter_map(|v| v["vmid"].as_u64()).collect();
    assert_eq!(vms.len(), 40, "one VM per VMID");
    assert_eq!(vmids.len(), 40, "no VMID used twice");
    assert_eq!(w.reserved_vmids().len(), 40);
    let reasons: BTreeSet<String> = w
        .claims()
        .iter()
        .filter(|c| c["phase"] == "Failed")
        .map(|c| c["failureReason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("VMID range 9100-9139 exhausted")),
        "{reasons:#?}"
    );
    // Users see it through the API too: ListNodeClaims gives each refused claim its reason.
    let exhausted = shoal_e2e::node_claims(&leader, "vms")
        .iter()
        .filter(|c| {
            c["failureReason"]
                .as_str()
                .is_some_and(|r| r.contains("VMID range 9100-9139 exhausted"))
        })
        .count();
    assert_eq!(exhausted, 10);
    let _ = ops;
    drop(standby);
}

#[test]
fn kill_9_mid_clone_then_restart_completes_the_claim_with_nothing_orphaned() {
    let w = World::start(40, &pool_yaml(8, 5, 0), 0.5);
    let _bridge = AgentBridge::start(&w.pve, &w.sim.url());
    let mut p = w.leading("pve-crash", &[("SHOAL_TEST_PAUSE_AT", "proxmox-mid-clone")]);
    let op = call(
        &p,
        "CreateNodes",
        json!({ "pool": "vms", "count": 1, "idempotencyKey": "k" }),
    );
    let paused = wait_for(Duration::from_secs(20), || {
        p.process
            .logs()
            .contains("crash point proxmox-mid-clone reached")
            .then_some(())
    });
    assert!(paused.is_some(), "{}", p.process.logs());
    p.process.kill();
    assert_eq!(
        w.reserved_vmids().len(),
        1,
        "the VMID was reserved before the clone"
    );
    let p = w.leading("pve-crash-2", &[]);
    let done = wait_op(&p, op["id"].as_str().expect("id"), Duration::from_secs(60));
    assert_eq!(
        done["state"],
        "OPERATION_STATE_SUCCEEDED",
        "{done}\n{}",
        p.process.logs()
    );
    let vms = w.pve.vms();
    assert_eq!(
        vms.len(),
        1,
        "the clone was continued, not made twice: {vms:#?}"
    );
    assert!(
        p.process
            .logs()
            .contains("continuing the VM an earlier attempt cloned"),
        "{}",
        p.process.logs()
    );
    assert_eq!(w.reserved_vmids().len(), 1);
    let r = w.reconciler(&p);
    no_drift(&r);
}

#[test]
fn a_server_whose_certificate_is_not_the_pinned_one_is_refused_and_said_so() {
    let w = World::start_with(40, &pool_yaml(8, 5, 0), 0.0, Auth::WrongPin);
    let p = w.leading("pve-pin", &[]);
    call(
        &p,
        "CreateNodes",
        json!({ "pool": "vms", "count": 1, "idempotencyKey": "pin" }),
    );
    let said = wait_for(Duration::from_secs(20), || {
        let status = call(&p, "GetBackendStatus", json!({}));
        let text = status.to_string();
        text.contains("is not the pinned").then_some(text)
    });
    assert!(said.is_some(), "{}", p.process.logs());
    assert!(w.pve.vms().is_empty(), "nothing was created");
    // Nothing was sent: fakepve saw no API request at all.
    assert!(w.pve.requests().is_empty(), "{:?}", w.pve.requests());
}

#[test]
fn a_pool_whose_clones_fail_backs_off_and_every_decision_says_why() {
    let w = World::start(40, &pool_yaml(8, 5, 0), 0.0);
    w.pve.fail(
        "POST",
        "/clone",
        500,
        "clone failed: unable to allocate image: no space left on device",
        None,
    );
    let (_metrics, _provisioner, decider) =
        w.control_plane("bo", &["--set=service.failureBackoff.initial=1m"]);
    kubectl(
        &w.sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 2, "900m", "256Mi", None),
    );
    let decisions = || {
        let out = grpcurl_ok(&[
            "-plaintext",
            "-d",
            "{\"limit\": 100}",
            &decider.grpc.to_string(),
            "shoal.v1.DeciderService/ListDecisions",
        ]);
        serde_json::from_str::<Value>(&out).expect("decisions")["decisions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let said = wait_for(Duration::from_secs(40), || {
        decisions()
            .iter()
            .any(|d| {
                let text = d.to_string();
                text.contains("backing off after 1 failed scale-up(s)")
                    && text.contains("no space left on device")
            })
            .then_some(())
    });
    assert!(
        said.is_some(),
        "a decision names the backoff: {:#?}\n{}",
        decisions(),
        decider.process.logs()
    );
    // While it holds, the pool is not asked again: one operation, whatever the decisions.
    std::thread::sleep(Duration::from_secs(8));
    let operations: BTreeSet<String> = w
        .claims()
        .iter()
        .filter_map(|c| c["operationId"].as_str().map(String::from))
        .collect();
    assert_eq!(operations.len(), 1, "{:#?}", w.claims());
    assert!(w.pve.vms().is_empty());
    assert!(w.reserved_vmids().is_empty());
}
