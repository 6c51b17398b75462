//! Out-of-tree backends: the example plugins (examples/plugins/python with grpcio,
//! examples/plugins/rust with tonic), each its own process, checked by `shoal plugin check` (and a
//! deliberately broken one failed point by point), then used as `plugin:procs` by the whole
//! control plane: pending pods → the decider plans → the provisioner calls the plugin → Nodes
//! register via `shoal-sim agent` → pods Running → the pods go → nodes drained and deleted. The
//! Python plugin is killed with SIGKILL in the middle of a create: the breaker opens, the claims
//! wait, and complete once it is back.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use shoal_e2e::{ControlPlane, deployment_yaml, kubectl, running_pods, sim_get};
use shoal_testkit::{ServiceProcess, SimServer, bin_path, free_port, wait_for};

#[derive(Clone, Copy, Debug)]
enum Example {
    Python,
    Rust,
}

/// Starts an example plugin serving on `addr` for the simulator `sim` (`extra` flags added).
fn plugin(sim: &SimServer, addr: SocketAddr, example: Example, extra: &[&str]) -> ServiceProcess {
    let mut args = vec![
        format!("--listen={addr}"),
        format!("--api={}", sim.url()),
        format!("--sim-binary={}", bin_path("shoal-sim").display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = match example {
        Example::Python => {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/plugins/python/process_pool.py");
            args.insert(0, script.display().to_string());
            ServiceProcess::start_program(
                "process-pool-py",
                &shoal_testkit::fakepve::python(),
                &args,
                &[],
            )
        }
        Example::Rust => ServiceProcess::start_program(
            "process-pool-rs",
            &bin_path("process-pool-plugin"),
            &args,
            &[],
        ),
    };
    let up = wait_for(Duration::from_secs(30), || {
        p.logs().contains("listening on").then_some(())
    });
    assert!(up.is_some(), "the {example:?} plugin starts: {}", p.logs());
    p
}

fn check(addr: SocketAddr) -> (bool, String) {
    let out = Command::new(bin_path("shoal"))
        .args(["plugin", "check", &format!("http://{addr}"), "--timeout=5s"])
        .output()
        .expect("shoal plugin check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn point(out: &str, verdict: &str, point: &str) -> bool {
    out.lines()
        .any(|l| l.starts_with(verdict) && l.split_whitespace().nth(1) == Some(point))
}

#[test]
fn the_kit_passes_both_examples_and_fails_a_broken_plugin_point_by_point() {
    let sim = SimServer::start(&[]);
    for example in [Example::Python, Example::Rust] {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let good = plugin(&sim, addr, example, &[]);
        let (ok, out) = check(addr);
        assert!(ok, "{example:?}: {out}\n{}", good.logs());
        for p in [
            "describe",
            "create",
            "create-is-idempotent",
            "list-by-labels",
            "invalid-argument",
            "delete",
            "delete-missing-is-ok",
            "deadlines",
        ] {
            assert!(point(&out, "PASS", p), "{example:?}: {p} passes:\n{out}");
        }
    }

    let bad = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _bad = plugin(&sim, bad, Example::Python, &["--misbehave"]);
    let (ok, out) = check(bad);
    assert!(!ok, "a broken plugin is not conformant:\n{out}");
    for p in [
        "create-is-idempotent",
        "invalid-argument",
        "delete-missing-is-ok",
    ] {
        assert!(point(&out, "FAIL", p), "{p} fails:\n{out}");
    }
    assert!(out.contains("NOT conformant: 3 point(s) failed"), "{out}");
}

const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: procs }\nspec:\n  provider: { backend: \"plugin:procs\" }\n  template:\n    labels: { role: worker }\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 0, maxNodes: 5 }\n  scaleUp: { maxConcurrent: 5 }\n  scaleDown: { unneededFor: 5s, cooldown: 2s, maxConcurrent: 5, drainTimeout: 10s }\n";

const WEB: &str = "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb";

/// Pending pods → nodes from the plugin → pods Running → the pods go → nodes gone. With
/// `kill_mid_create`, the plugin is killed with SIGKILL while it creates the first node and
/// started again once the breaker is open.
fn scale_up_and_down_through(example: Example, kill_mid_create: bool) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cp = ControlPlane::start(
        POOL,
        &format!("    plugins:\n      procs: {{ address: \"http://{addr}\" }}\n"),
    );
    let delay: &[&str] = if kill_mid_create {
        &["--create-delay=2s"]
    } else {
        &[]
    };
    let mut first = plugin(&cp.sim, addr, example, delay);
    // Six pods of 900m on 2-CPU nodes: two per node, three nodes.
    kubectl(
        &cp.sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 6, "900m", "256Mi", None),
    );
    let _second = if kill_mid_create {
        let creating = wait_for(Duration::from_secs(60), || {
            first.logs().contains("creating ").then_some(())
        });
        assert!(
            creating.is_some(),
            "the decider asks for nodes\n{}\n{}",
            first.logs(),
            cp.logs()
        );
        first.kill();
        let open = wait_for(Duration::from_secs(30), || {
            cp.breaker_open("plugin:procs").then_some(())
        });
        assert!(open.is_some(), "the breaker opens\n{}", cp.logs());
        let phases = cp.phases();
        assert!(
            !phases.is_empty() && phases.iter().all(|p| p == "Pending"),
            "the claims wait: {phases:?}"
        );
        Some(plugin(&cp.sim, addr, example, &[]))
    } else {
        None
    };
    let plugin_logs = || {
        format!(
            "--- plugin\n{}\n{}",
            _second.as_ref().unwrap_or(&first).logs(),
            cp.logs()
        )
    };

    let all = wait_for(Duration::from_secs(90), || cp.serving(WEB, 6).then_some(()));
    assert!(
        all.is_some(),
        "{example:?}: every pod runs: {} running; claims {:#?}\n{}",
        running_pods(cp.sim.addr(), WEB),
        cp.claims(),
        plugin_logs()
    );
    let phases = cp.phases();
    assert_eq!(phases, ["Ready", "Ready", "Ready"], "{:#?}", cp.claims());
    assert_eq!(cp.instances("plugin:procs"), 3, "three plugin instances");
    let nodes = sim_get(
        cp.sim.addr(),
        "/api/v1/nodes?labelSelector=shoal.dev%2Fpool%3Dprocs%2Crole%3Dworker",
    );
    assert_eq!(nodes["items"].as_array().map(Vec::len), Some(3), "{nodes}");

    // The pods go: the nodes are drained and deleted, the plugin's processes with them.
    kubectl(
        &cp.sim.kubeconfig(),
        &["scale", "deployment/web", "--replicas=0"],
        "",
    );
    let gone = wait_for(Duration::from_secs(90), || {
        cp.scaled_down("procs", "plugin:procs").then_some(())
    });
    assert!(
        gone.is_some(),
        "{example:?}: scaled down: claims {:#?}\n{}",
        cp.claims(),
        plugin_logs()
    );
}

#[test]
fn the_python_plugin_killed_mid_create_is_waited_for_then_scales_up_and_down() {
    scale_up_and_down_through(Example::Python, true);
}

#[test]
fn the_rust_plugin_scales_up_and_down() {
    scale_up_and_down_through(Example::Rust, false);
}
