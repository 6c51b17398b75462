//! Invalid configuration stops a service before it starts, listing every bad field.

use std::time::Duration;

use shoal_testkit::{ServiceProcess, bin_path};

#[test]
fn bad_config_file_exits_nonzero_listing_every_bad_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("decider.yaml");
    std::fs::write(
        &file,
        "grpc: { addr: 'localhost-ish' }\n\
         election: { leaseTtl: 1s }\n\
         telemetry: { logFormat: xml }\n\
         store: { endpoints: ['127.0.0.1:2379'] }\n\
         service: { metricsAddr: 'metrics:50051', dryRun: maybe, colour: blue }\n",
    )
    .expect("write config");
    let output = std::process::Command::new(bin_path("shoal-decider"))
        .arg("--config")
        .arg(&file)
        .arg("--set=shutdown.grace=forever")
        .env("SHOAL_CLUSTER", "Not A Label")
        .output()
        .expect("run shoal-decider");
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit code for invalid config"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for path in [
        "grpc.addr",
        "election.leaseTtl",
        "election.recordInterval",
        "telemetry.logFormat",
        "store.endpoints[0]",
        "service.metricsAddr",
        "service.dryRun",
        "service.colour",
        "shutdown.grace",
        "cluster",
        // No TLS and no explicit plaintext: refused.
        "grpc.tls",
    ] {
        assert!(
            stderr.contains(&format!("  - {path}: ")),
            "{path} missing from:\n{stderr}"
        );
    }
    assert!(stderr.contains("11 invalid field(s)"), "{stderr}");
}

#[test]
fn unreadable_or_malformed_config_is_reported() {
    let missing = std::process::Command::new(bin_path("shoal-metrics"))
        .args(["--config", "/nonexistent/shoal.yaml"])
        .output()
        .expect("run shoal-metrics");
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read config file /nonexistent/shoal.yaml")
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "grpc: [unclosed\n").expect("write");
    let malformed = std::process::Command::new(bin_path("shoal-metrics"))
        .arg("--config")
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(malformed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("is not valid YAML"));
}

#[test]
fn print_config_shows_the_effective_layered_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("decider.yaml");
    std::fs::write(
        &file,
        "election: { leaseTtl: 7s }\nservice: { dryRun: true }\n",
    )
    .expect("write");
    let output = std::process::Command::new(bin_path("shoal-decider"))
        .arg("--config")
        .arg(&file)
        .args(["--print-config", "--grpc-addr", "0.0.0.0:6000"])
        .env("SHOAL_ELECTION__LEASE_TTL", "9s")
        .env("SHOAL_GRPC__PLAINTEXT", "true")
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = String::from_utf8_lossy(&output.stdout);
    assert!(yaml.contains("addr: 0.0.0.0:6000"), "flag wins: {yaml}");
    assert!(yaml.contains("leaseTtl: 9s"), "env beats file: {yaml}");
    assert!(yaml.contains("dryRun: true"), "file applies: {yaml}");
}

#[test]
fn a_port_in_use_names_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut process = ServiceProcess::start(
        "shoal-metrics",
        &[
            format!("--grpc-addr=127.0.0.1:{port}"),
            format!("--admin-addr=127.0.0.1:{}", shoal_testkit::free_port()),
        ],
        &[],
    );
    let status = process.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.code() == Some(1)), "{status:?}");
    assert!(
        process.logs().contains("grpc.addr: cannot listen on"),
        "{}",
        process.logs()
    );
    // Plaintext (said explicitly by the harness) is warned about at start.
    assert!(process.logs().contains("without TLS"), "{}", process.logs());
}

#[test]
fn the_shipped_example_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/config");
    for service in ["metrics", "decider", "provisioner", "reconciler"] {
        let file = dir.join(format!("{service}.yaml"));
        let output = std::process::Command::new(bin_path(&format!("shoal-{service}")))
            .arg("--config")
            .arg(&file)
            .arg("--print-config")
            .output()
            .expect("run");
        assert!(
            output.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("addr: 0.0.0.0:"),
            "{service}"
        );
    }
}
