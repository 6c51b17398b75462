//! The `aws` backend against moto's EC2 server (real HTTP, the official SDK), behind a fault
//! proxy that injects EC2's capacity and throttling errors (tests/fixtures/moto_ec2.py). moto
//! boots nothing: the fixture starts a `shoal-sim agent` per running instance, so its Node
//! registers and the whole loop runs.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use shoal_e2e::{
    ControlPlane, EtcdReader, Running, deployment_yaml, kubectl, provisioner_call, running_pods,
};
use shoal_testkit::{EtcdServer, ServiceProcess, SimServer, bin_path, free_port, wait_for};

const CREDENTIALS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIASHOALTESTKEY0000"),
    ("AWS_SECRET_ACCESS_KEY", "shoal-test-secret-do-not-log"),
];

/// moto + fault proxy + node bridge, and what it set up.
struct Ec2 {
    process: ServiceProcess,
    addr: SocketAddr,
    setup: Value,
}

impl Ec2 {
    fn start() -> Ec2 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/moto_ec2.py");
        let process = ServiceProcess::start_program(
            "moto-ec2",
            &shoal_testkit::fakepve::python(),
            &[
                script.display().to_string(),
                format!("--port={}", addr.port()),
                format!("--sim-binary={}", bin_path("shoal-sim").display()),
            ],
            &[],
        );
        let setup = wait_for(Duration::from_secs(60), || {
            process
                .logs()
                .lines()
                .find_map(|l| l.strip_prefix("ready "))
                .and_then(|j| serde_json::from_str::<Value>(j).ok())
        });
        let Some(setup) = setup else {
            panic!(
                "moto's EC2 server starts (scripts/install-deps.sh installs moto[server] into the venv): {}",
                process.logs()
            );
        };
        Ec2 {
            process,
            addr,
            setup,
        }
    }

    /// Nodes of running instances register with `sim`.
    fn bridge(&self, sim: &SimServer) {
        self.post("/_shoal/bridge", json!({ "api": sim.url() }));
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn get(&self, path: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sf", &format!("{}{path}", self.url())])
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn post(&self, path: &str, body: Value) {
        let ok = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-d",
                &body.to_string(),
                &format!("{}{path}", self.url()),
            ])
            .stdout(Stdio::null())
            .status()
            .expect("curl")
            .success();
        assert!(ok, "POST {path}");
    }

    /// Instances not terminated.
    fn live(&self) -> Vec<Value> {
        self.get("/_shoal/instances")
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["state"] != "terminated")
            .collect()
    }

    fn backend_yaml(&self, user_data: &std::path::Path) -> String {
        let s = &self.setup;
        format!(
            "    aws:
      region: us-east-1
      endpoint: {url}
      unavailableFor: 10m
      classes:
        default:
          launchTemplate: {{ id: {lt}, version: \"$Latest\" }}
          instanceTypes: [m5.large, m5a.large]
          subnets: [{s1}, {s2}]
          securityGroups: [{sg}]
          userData: {{ fromFile: {ud} }}
        spot:
          launchTemplate: {{ id: {lt} }}
          instanceTypes: [c5.large, m5.large]
          subnets: [{s1}, {s2}]
          capacityType: spot
          fallbackToOnDemand: true
",
            url = self.url(),
            lt = s["launchTemplateId"].as_str().unwrap_or_default(),
            s1 = s["subnets"][0].as_str().unwrap_or_default(),
            s2 = s["subnets"][1].as_str().unwrap_or_default(),
            sg = s["securityGroup"].as_str().unwrap_or_default(),
            ud = user_data.display(),
        )
    }
}

fn pool(name: &str, class: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {{ name: {name} }}\nspec:\n  provider: {{ backend: aws, class: {class} }}\n  template:\n    labels: {{ role: worker }}\n    capacity: {{ cpu: \"2\", memory: 4Gi }}\n  limits: {{ minNodes: 0, maxNodes: 8 }}\n  scaleUp: {{ maxConcurrent: 5 }}\n  scaleDown: {{ unneededFor: 5s, cooldown: 2s, maxConcurrent: 5, drainTimeout: 10s }}\n"
    )
}

const JOIN_TOKEN: &str = "K10shoal-join-token-never-logged";
const WEB: &str = "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb";

fn user_data_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("join.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\ncurl -sfL https://get.k3s.io | K3S_URL=https://k3s:6443 K3S_TOKEN={JOIN_TOKEN} sh -s - agent --node-name {{{{nodeName}}}} --node-label {{{{nodeLabels}}}}\n"),
    )
    .expect("user data");
    path
}

fn claims(store: &EtcdReader) -> Vec<Value> {
    store.json_under("claims/")
}

#[test]
fn pending_pods_get_ec2_instances_from_a_launch_template_and_they_go_with_the_pods() {
    let dir = tempfile::tempdir().expect("dir");
    let ec2 = Ec2::start();
    let cp = ControlPlane::start_with(
        &pool("web", "default"),
        &ec2.backend_yaml(&user_data_file(dir.path())),
        CREDENTIALS,
    );
    ec2.bridge(&cp.sim);
    // Ten pods of 900m on 2-CPU nodes: two per node, five instances.
    kubectl(
        &cp.sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 10, "900m", "256Mi", None),
    );
    let all = wait_for(Duration::from_secs(120), || {
        (running_pods(cp.sim.addr(), WEB) == 10 && cp.phases().iter().all(|p| p == "Ready"))
            .then_some(())
    });
    assert!(
        all.is_some(),
        "every pod runs on an EC2 instance: {} running; claims {:#?}\n--- ec2\n{}\n{}",
        running_pods(cp.sim.addr(), WEB),
        cp.claims(),
        ec2.process.logs(),
        cp.logs()
    );
    let live = ec2.live();
    assert_eq!(live.len(), 5, "{live:#?}");
    let cluster = cp.store.cluster_id();
    let subnets: Vec<&str> = ec2.setup["subnets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for i in &live {
        let tags = &i["tags"];
        let node = tags["shoal.dev/node"].as_str().unwrap_or_default();
        assert_eq!(tags["shoal.dev/cluster"], cluster.as_str(), "{i}");
        assert_eq!(tags["shoal.dev/pool"], "web", "{i}");
        assert_eq!(tags["role"], "worker", "{i}");
        assert_eq!(tags["Name"], node, "{i}");
        assert!(
            tags["shoal.dev/claim"]
                .as_str()
                .is_some_and(|c| c.starts_with("c-")),
            "{i}"
        );
        assert_eq!(i["type"], "m5.large", "the first type of the class: {i}");
        assert!(
            subnets.contains(&i["subnet"].as_str().unwrap_or_default()),
            "{i}"
        );
        let data = i["userData"].as_str().unwrap_or_default();
        assert!(data.contains(&format!("--node-name {node} ")), "{data}");
        assert!(data.contains("shoal.dev/pool=web"), "{data}");
        assert!(
            data.contains(JOIN_TOKEN),
            "the join token reaches the instance"
        );
    }
    assert_eq!(cp.instances("aws"), 5);

    // The pods go: the nodes are drained and the instances terminated.
    kubectl(
        &cp.sim.kubeconfig(),
        &["scale", "deployment/web", "--replicas=0"],
        "",
    );
    let gone = wait_for(Duration::from_secs(90), || {
        (ec2.live().is_empty() && cp.phases().iter().all(|p| p == "Deleted")).then_some(())
    });
    assert!(
        gone.is_some(),
        "instances terminated: {:#?} claims {:#?}\n{}",
        ec2.live(),
        cp.claims(),
        cp.logs()
    );
    // No credential and no join token in any log.
    for log in [cp.provisioner.process.logs(), cp.decider.process.logs()] {
        assert!(!log.contains("shoal-test-secret-do-not-log"));
        assert!(!log.contains(JOIN_TOKEN));
    }
}

/// etcd, a simulator, EC2, and a provisioner alone (no decider) with pools `od` (class default)
/// and `spotty` (class spot).
struct Lone {
    etcd: EtcdServer,
    sim: SimServer,
    ec2: Ec2,
    store: EtcdReader,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lone {
    fn start() -> Lone {
        let etcd = EtcdServer::start();
        let sim = SimServer::start(&["--node-grace-period=5s"]);
        let ec2 = Ec2::start();
        ec2.bridge(&sim);
        let store = EtcdReader::new(&etcd);
        store.put_pool(&pool("od", "default"));
        store.put_pool(&pool("spotty", "spot"));
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("provisioner.yaml");
        let yaml = format!(
            "election: {{ leaseTtl: 2s, recordInterval: 500ms }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  nodeTtl: 60s\n  instanceCheckInterval: 1s\n  drainPollInterval: 200ms\n  resilience: {{ callTimeout: 10s, attempts: 3, retryMinDelay: 100ms, retryMaxDelay: 500ms }}\n  backends:\n{}",
            sim.kubeconfig().display(),
            ec2.backend_yaml(&user_data_file(dir.path()))
        );
        std::fs::write(&config, yaml).expect("config");
        Lone {
            etcd,
            sim,
            ec2,
            store,
            config,
            _dir: dir,
        }
    }

    fn provisioner(&self, instance: &str, env: &[(&str, &str)]) -> Running {
        let mut all = CREDENTIALS.to_vec();
        all.extend_from_slice(env);
        let mut p = Running::start(
            "shoal-provisioner",
            instance,
            Some(&self.etcd),
            &[&format!("--config={}", self.config.display())],
            &all,
        );
        p.wait_ready();
        let leads = wait_for(Duration::from_secs(15), || {
            (p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
        });
        assert!(leads.is_some(), "{}", p.process.logs());
        p
    }

    fn runs(&self) -> Vec<Value> {
        self.ec2
            .get("/_shoal/runs")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn ready(&self, p: &Running, pool: &str, n: usize) {
        let ok = wait_for(Duration::from_secs(60), || {
            (claims(&self.store)
                .iter()
                .filter(|c| c["pool"] == pool && c["phase"] == "Ready")
                .count()
                == n)
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "{n} Ready in {pool}: {:#?}\n--- ec2\n{}\n{}",
            claims(&self.store),
            self.ec2.process.logs(),
            p.process.logs()
        );
    }
}

#[test]
fn spot_capacity_errors_and_throttling_fall_back_to_on_demand_and_skip_the_offering() {
    let w = Lone::start();
    let p = w.provisioner("aws-prov", &[]);
    // No spot capacity for any type; and EC2 throttles the first call.
    w.ec2.post(
        "/_shoal/faults",
        json!({ "capacity": [{ "market": "spot" }], "throttle": 1 }),
    );
    provisioner_call(&p, "CreateNodes", json!({ "pool": "spotty", "count": 1 }));
    w.ready(&p, "spotty", 1);
    let live = w.ec2.live();
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0]["type"], "c5.large", "{live:#?}");
    assert_eq!(live[0]["lifecycle"], "on-demand", "{live:#?}");
    let runs = w.runs();
    let answers: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["market"],
                r["type"],
                r["answer"].as_str().unwrap_or_default()
            )
        })
        .collect();
    // Throttled once (retried with backoff), then every spot offering (2 types × 2 subnets),
    // then on-demand c5.large in the first subnet.
    assert_eq!(
        answers[0], "\"spot\" \"c5.large\" RequestLimitExceeded",
        "{answers:#?}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.contains("InsufficientInstanceCapacity"))
            .count(),
        4,
        "{answers:#?}"
    );
    assert!(
        answers
            .last()
            .is_some_and(|a| a.starts_with("\"on-demand\" \"c5.large\" ok")),
        "{answers:#?}"
    );

    // The next launch skips the spot offerings that just ran out (for unavailableFor).
    let before = runs.len();
    provisioner_call(&p, "CreateNodes", json!({ "pool": "spotty", "count": 1 }));
    w.ready(&p, "spotty", 2);
    let later: Vec<Value> = w.runs().into_iter().skip(before).collect();
    assert_eq!(later.len(), 1, "straight to on-demand: {later:#?}");
    assert_eq!(later[0]["market"], "on-demand", "{later:#?}");

    // Every failure is on the record with AWS's code: a pool whose only type has no capacity.
    w.ec2.post(
        "/_shoal/faults",
        json!({ "capacity": [{ "type": "m5.large" }, { "type": "m5a.large" }], "throttle": 0 }),
    );
    provisioner_call(&p, "CreateNodes", json!({ "pool": "od", "count": 1 }));
    let failed = wait_for(Duration::from_secs(30), || {
        claims(&w.store)
            .into_iter()
            .find(|c| c["pool"] == "od" && c["phase"] == "Failed")
    });
    let failed = failed.unwrap_or_else(|| panic!("the claim fails: {:#?}", claims(&w.store)));
    let reason = failed["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no EC2 capacity")
            && reason.contains("m5a.large in us-east-1b: InsufficientInstanceCapacity"),
        "{reason}"
    );
}

#[test]
fn a_crash_after_run_instances_makes_no_second_instance_and_a_terminated_one_is_repaired() {
    let w = Lone::start();
    let mut p = w.provisioner("aws-a", &[("SHOAL_TEST_PAUSE_AT", "after-backend-create")]);
    provisioner_call(&p, "CreateNodes", json!({ "pool": "od", "count": 1 }));
    let paused = wait_for(Duration::from_secs(30), || {
        p.process
            .logs()
            .contains("crash point after-backend-create reached")
            .then_some(())
    });
    assert!(paused.is_some(), "{}", p.process.logs());
    // RunInstances succeeded; the claim does not know its instance yet. kill -9 here.
    p.process.kill();
    assert_eq!(
        claims(&w.store)[0]["phase"],
        "Pending",
        "{:#?}",
        claims(&w.store)
    );
    let p = w.provisioner("aws-b", &[]);
    w.ready(&p, "od", 1);
    let live = w.ec2.live();
    assert_eq!(live.len(), 1, "one instance, not two: {live:#?}");
    let claim = &claims(&w.store)[0];
    assert_eq!(claim["instanceId"], live[0]["id"], "{claim}");

    // Terminated behind Shoal's back: the reconciler finds and repairs it.
    w.ec2
        .post("/_shoal/terminate", json!({ "id": live[0]["id"] }));
    let mut r = Running::start(
        "shoal-reconciler",
        "aws-reconciler",
        Some(&w.etcd),
        &[
            &format!(
                "--set=service.kube.kubeconfig={}",
                w.sim.kubeconfig().display()
            ),
            &format!("--set=service.provisionerAddr=http://{}", p.grpc),
            "--set=service.orphanGrace=0s",
            "--set=service.interval=1h",
        ],
        &[],
    );
    r.wait_ready();
    let report = wait_for(Duration::from_secs(30), || {
        let out = shoal_e2e::grpcurl_ok(&[
            "-plaintext",
            "-d",
            "{}",
            &r.grpc.to_string(),
            "shoal.v1.ReconcilerService/Reconcile",
        ]);
        out.contains("DRIFT_TYPE_MISSING_INSTANCE").then_some(out)
    });
    assert!(
        report.is_some(),
        "the missing instance is reported\n{}",
        r.process.logs()
    );
    let repaired = wait_for(Duration::from_secs(30), || {
        claims(&w.store)
            .iter()
            .any(|c| {
                c["id"] == claim["id"] && matches!(c["phase"].as_str(), Some("Failed" | "Deleted"))
            })
            .then_some(())
    });
    assert!(
        repaired.is_some(),
        "the claim of the vanished instance is settled: {:#?}\n{}",
        claims(&w.store),
        r.process.logs()
    );
}
