//! Shoal as a Cluster Autoscaler cloud provider: a provisioner with `service.externalGrpc: true`
//! serves `clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider` over its pools. A Python
//! client generated from proto/externalgrpc (tests/fixtures/ca_client.py) drives it as Cluster
//! Autoscaler does — NodeGroups, template node, options, IncreaseSize, NodeGroupNodes until
//! running, NodeGroupForNode, DeleteNodes — and the nodes appear and go in the simulator.
//! The other way round: a fake externalgrpc plugin (tests/fixtures/fake_ca_plugin.py, from the
//! same proto) is a Shoal backend (`externalgrpc:fake`) for the whole control plane.

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;
use shoal_e2e::{
    ControlPlane, EtcdReader, Running, deployment_yaml, grpcurl_ok, kubectl, running_pods, sim_get,
    sim_provisioner_config,
};
use shoal_testkit::{EtcdServer, ServiceProcess, SimServer, bin_path, free_port, wait_for};

const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: batch }\nspec:\n  provider: { backend: sim }\n  template:\n    labels: { role: batch }\n    taints: [{ key: dedicated, value: batch, effect: NoSchedule }]\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 4 }\n  scaleUp: { maxConcurrent: 4 }\n  scaleDown: { utilizationBelow: 0.4, unneededFor: 5m, drainTimeout: 10s }\n";

#[test]
fn a_cluster_autoscaler_client_drives_shoal_pools_over_externalgrpc() {
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&["--boot-delay=1s"]);
    let store = EtcdReader::new(&etcd);
    store.put_pool(POOL);
    let dir = tempfile::tempdir().expect("dir");
    let config = sim_provisioner_config(
        dir.path(),
        &sim,
        "election: { leaseTtl: 2s, recordInterval: 500ms }\n",
        "  externalGrpc: true\n  drainPollInterval: 200ms\n  instanceCheckInterval: 1s\n",
    );
    let mut p = Running::start(
        "shoal-provisioner",
        "ca-prov",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[],
    );
    p.wait_ready();
    let leads = wait_for(Duration::from_secs(15), || {
        (p.metric("shoal_leader{service=\"provisioner\"}") == Some(1.0)).then_some(())
    });
    assert!(leads.is_some(), "{}", p.process.logs());

    // grpcurl-friendly: reflection lists the service next to Shoal's own.
    let services = grpcurl_ok(&["-plaintext", &p.grpc.to_string(), "list"]);
    assert!(
        services.contains("clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider"),
        "{services}"
    );

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ca_client.py");
    let out = Command::new(shoal_testkit::fakepve::python())
        .arg(&script)
        .args([
            &format!("--addr={}", p.grpc),
            "--group=batch",
            &format!("--api={}", sim.url()),
        ])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the Cluster Autoscaler client ran through:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.process.logs()
    );
    assert!(stdout.contains("ok: done"), "{stdout}");

    // In the cluster: one node of the pool left, the two deleted ones gone for good.
    let nodes = sim_get(
        sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dbatch",
    );
    assert_eq!(nodes["items"].as_array().map(Vec::len), Some(1), "{nodes}");
    let phases: Vec<String> = store
        .json_under("claims/")
        .iter()
        .map(|c| c["phase"].as_str().unwrap_or_default().to_string())
        .collect();
    let deleted = phases.iter().filter(|p| *p == "Deleted").count();
    let ready = phases.iter().filter(|p| *p == "Ready").count();
    assert_eq!((ready, deleted), (1, 2), "{phases:?}");

    // Audited like every call that changes nodes.
    let audit: Value = serde_json::from_str(&grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{}",
        &p.grpc.to_string(),
        "shoal.v1.AuditService/ListAudit",
    ]))
    .expect("audit JSON");
    let methods: Vec<&str> = audit["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["method"].as_str())
        .collect();
    for m in ["NodeGroupIncreaseSize", "NodeGroupDeleteNodes"] {
        assert!(
            methods.iter().any(|x| x.ends_with(m)),
            "{m} audited: {audit}"
        );
    }
}

const WORKERS: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: workers }\nspec:\n  provider: { backend: \"externalgrpc:fake\", class: workers }\n  template:\n    labels: { role: worker }\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 5 }\n  scaleUp: { maxConcurrent: 5 }\n  scaleDown: { unneededFor: 5s, cooldown: 2s, maxConcurrent: 5, drainTimeout: 10s }\n";

const WEB: &str = "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb";

#[test]
fn a_cluster_autoscaler_plugin_is_a_shoal_backend_end_to_end() {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cp = ControlPlane::start(
        WORKERS,
        &format!("    externalGrpc:\n      fake: {{ address: \"http://{addr}\" }}\n"),
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_ca_plugin.py");
    let plugin = ServiceProcess::start_program(
        "fake-ca-plugin",
        &shoal_testkit::fakepve::python(),
        &[
            script.display().to_string(),
            format!("--listen={addr}"),
            format!("--api={}", cp.sim.url()),
            format!("--sim-binary={}", bin_path("shoal-sim").display()),
            "--group=workers".into(),
        ],
        &[],
    );
    let up = wait_for(Duration::from_secs(30), || {
        plugin.logs().contains("listening on").then_some(())
    });
    assert!(up.is_some(), "the fake plugin starts: {}", plugin.logs());

    // Four pods of 900m on 2-CPU nodes: two nodes from the plugin's node group.
    kubectl(
        &cp.sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 4, "900m", "256Mi", None),
    );
    let all = wait_for(Duration::from_secs(90), || cp.serving(WEB, 4).then_some(()));
    assert!(
        all.is_some(),
        "every pod runs: {} running; claims {:#?}\n--- plugin\n{}\n{}",
        running_pods(cp.sim.addr(), WEB),
        cp.claims(),
        plugin.logs(),
        cp.logs()
    );
    assert_eq!(cp.phases(), ["Ready", "Ready"], "{:#?}", cp.claims());
    // The plugin named the nodes and their providerIDs; Shoal found them by providerID and gave
    // them the claim's labels, and the claims carry the names the nodes really have.
    let nodes = sim_get(
        cp.sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dworkers",
    );
    let items = nodes["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{nodes}");
    let claims = cp.claims();
    for node in &items {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        let labels = &node["metadata"]["labels"];
        assert!(name.starts_with("fake-"), "{name}");
        assert_eq!(labels["fake.cloud/group"], "workers", "{labels}");
        assert_eq!(labels["role"], "worker", "{labels}");
        let claim = labels["shoal.dev/claim"].as_str().unwrap_or_default();
        let held = claims.iter().find(|c| c["id"] == claim).expect("a claim");
        assert_eq!(held["nodeName"], name, "{held}");
        assert_eq!(held["instanceId"], node["spec"]["providerID"], "{held}");
    }
    assert_eq!(cp.instances("externalgrpc:fake"), 2);

    // The pods go: Shoal drains and deletes the nodes through NodeGroupDeleteNodes.
    kubectl(
        &cp.sim.kubeconfig(),
        &["scale", "deployment/web", "--replicas=0"],
        "",
    );
    let gone = wait_for(Duration::from_secs(90), || {
        cp.scaled_down("workers", "externalgrpc:fake").then_some(())
    });
    assert!(
        gone.is_some(),
        "scaled down: claims {:#?}\n--- plugin\n{}\n{}",
        cp.claims(),
        plugin.logs(),
        cp.logs()
    );
    assert_eq!(
        plugin.logs().matches("deleted: fake:///").count(),
        2,
        "{}",
        plugin.logs()
    );
    assert!(
        cp.store.keys_under("backends/").is_empty(),
        "no record left: {:?}",
        cp.store.keys_under("backends/")
    );
}
