//! `shoal demo`, the README's first command: it must come up on a machine with nothing else
//! running, scale the simulated cluster up and down — never with more nodes than the load
//! needs — and stop cleanly on Ctrl-C.

use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_testkit::{ServiceProcess, free_port, wait_for};

/// A base port whose next three are free too (all four bound at once, then released), outside
/// `avoid`: the demo takes four consecutive ports from each base.
fn four_free_ports(avoid: std::ops::Range<u16>) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base > u16::MAX - 4 || (base..base + 4).any(|p| avoid.contains(&p)) {
            continue;
        }
        let held: Vec<_> = (base..base + 4)
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == 4 {
            return base;
        }
    }
    panic!("no four consecutive free loopback ports");
}

#[test]
fn the_demo_scales_the_simulated_cluster_and_stops_cleanly_on_sigint() {
    let grpc = four_free_ports(0..0);
    let admin = four_free_ports(grpc..grpc + 4);
    let args = vec![
        "demo".to_string(),
        format!("--grpc-base-port={grpc}"),
        format!("--admin-base-port={admin}"),
    ];
    let mut demo = ServiceProcess::start("shoal", &args, &[]);
    // The live view prints each decision; within its first minute the ramp scenario makes the
    // cluster grow past minNodes and shrink back.
    let scaled = wait_for(Duration::from_secs(90), || {
        let logs = demo.logs();
        (logs.contains("kubectl --kubeconfig")
            && logs.contains("pending pod(s) (default/web")
            && logs.contains("decision: scale down general"))
        .then_some(())
    });
    assert!(
        scaled.is_some(),
        "the demo scales up and down:\n{}",
        demo.logs()
    );
    let logs = demo.logs();
    assert!(
        logs.contains("(Shoal's: Ready "),
        "the live view shows nodes by phase:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("| unschedulable ") && !l.ends_with("| unschedulable 0")),
        "the live view shows pending pods:\n{logs}"
    );
    // No double scale-up across two ramp cycles: the ramp peaks at 12 pods of 500m on 2-CPU
    // nodes, so 3 nodes; each ramp-up asks for the 2 nodes its 8 pending pods need, once.
    let second = wait_for(Duration::from_secs(120), || {
        (demo.logs().matches("pending pod(s) (default/web").count() >= 2).then_some(())
    });
    assert!(second.is_some(), "a second ramp-up:\n{}", demo.logs());
    let logs = demo.logs();
    let most = logs
        .lines()
        .filter_map(|l| {
            l.split("] nodes ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .max();
    assert_eq!(
        most,
        Some(3),
        "never more nodes than the peak needs:\n{logs}"
    );
    for up in logs
        .lines()
        .filter(|l| l.contains("decision: scale up") && l.contains("pending pod(s)"))
    {
        assert!(up.contains("scale up general +2:"), "{up}\n{logs}");
    }
    demo.signal(Signal::SIGINT);
    let status = demo.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 on SIGINT, got {status:?}\n{}",
        demo.logs()
    );
}
