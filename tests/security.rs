//! Security, as a user deploying Shoal sees it: mTLS between every pair of services and to etcd,
//! certificates checked (no certificate, another CA, expired: refused) and rotated without a
//! restart, identities and roles for certificates and bearer tokens, an audit record for every
//! mutating call readable with grpcurl, per-identity rate limits, and a secret that appears in no
//! log, span or API answer.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use serde_json::Value;
use shoal_e2e::{Running, deployment_yaml, grpcurl, kubectl};
use shoal_testkit::{CertFiles, EtcdServer, SimServer, TestCa, free_port, wait_for};

const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"2\", memory: 4Gi }\n  limits: { minNodes: 1, maxNodes: 4 }\n  scaleDown: { enabled: false }\n";

/// grpcurl with a client certificate (`None`: none), trusting `ca`, with more `args`.
fn grpcurl_tls(ca: &Path, cert: Option<&CertFiles>, args: &[&str]) -> (bool, String) {
    let ca = ca.display().to_string();
    // Bounded: a refused handshake must end the call, not leave it retrying.
    let mut all: Vec<String> = vec![
        "-connect-timeout".into(),
        "5".into(),
        "-max-time".into(),
        "15".into(),
        "-cacert".into(),
        ca,
    ];
    if let Some(c) = cert {
        all.extend([
            "-cert".into(),
            c.cert.display().to_string(),
            "-key".into(),
            c.key.display().to_string(),
        ]);
    }
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = grpcurl(&refs);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Lets callers without a certificate in (they must then bring a bearer token).
fn certificates_optional(config: &Path) {
    let text = std::fs::read_to_string(config).expect("config").replacen(
        "caFile:",
        "clientAuth: optional, caFile:",
        1,
    );
    std::fs::write(config, text).expect("config");
}

/// A service config with mTLS (`cert`), roles for `identities`, and optional extra YAML.
fn tls_config(
    dir: &Path,
    name: &str,
    cert: &CertFiles,
    etcd_tls: bool,
    identities: &[(&str, &str)],
    grpc_extra: &str,
    rest: &str,
) -> PathBuf {
    let identities: String = if identities.is_empty() {
        " {}\n".into()
    } else {
        identities
            .iter()
            .map(|(id, role)| format!("\n      {id}: {role}"))
            .collect::<String>()
            + "\n"
    };
    let store = if etcd_tls {
        format!(
            "store:\n  tls: {{ caFile: {}, certFile: {}, keyFile: {} }}\n",
            cert.ca.display(),
            cert.cert.display(),
            cert.key.display()
        )
    } else {
        String::new()
    };
    let text = format!(
        "grpc:\n  plaintext: false\n  tls: {{ certFile: {}, keyFile: {}, caFile: {} }}\n  auth:\n    identities:{identities}{grpc_extra}{store}{rest}",
        cert.cert.display(),
        cert.key.display(),
        cert.ca.display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("config");
    path
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<String>>>);

#[tonic::async_trait]
impl TraceService for Spans {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{:?}", request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn the_full_loop_runs_on_mtls_and_leaves_an_audit_trail_and_no_secret() {
    const SECRET: &str = "k3s-join-Zq8vX2pL7mN4";
    const TOKEN: &str = "operator-token-Hb5Tr9Wc3Yk1";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let spans = Spans::default();
    let otlp = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(spans.clone()))
            .serve(otlp),
    );
    let otlp = format!("http://{otlp}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("SHOAL_GRPC__PLAINTEXT", "false"),
    ];

    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "shoal");
    let etcd = EtcdServer::start_tls(&ca.issue("etcd", "etcd"));
    let sim = SimServer::start(&["--boot-delay=500ms"]);
    let ops = ca.issue("ops-admin", "ops");
    let cert = |name: &str| ca.issue(&format!("shoal-{name}"), name);
    let (m_cert, d_cert, p_cert, r_cert) = (
        cert("metrics"),
        cert("decider"),
        cert("provisioner"),
        cert("reconciler"),
    );
    let secret_file = dir.path().join("k3s-token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("secret file");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - {{ name: ops-token, role: operator, sha256: {} }}\n",
            shoal_runtime::auth::token_hash(TOKEN)
        ),
    )
    .expect("tokens");
    let kube = format!("kube: {{ kubeconfig: {} }}", sim.kubeconfig().display());

    let metrics_cfg = tls_config(
        dir.path(),
        "metrics",
        &m_cert,
        false,
        &[("shoal-decider", "viewer"), ("ops-admin", "admin")],
        "",
        &format!("service:\n  {kube}\n  batchIdle: 300ms\n"),
    );
    let mut metrics = Running::start(
        "shoal-metrics",
        "sec-metrics",
        None,
        &[&format!("--config={}", metrics_cfg.display())],
        &env,
    );
    metrics.wait_ready();
    let provisioner_cfg = tls_config(
        dir.path(),
        "provisioner",
        &p_cert,
        true,
        &[
            ("shoal-decider", "admin"),
            ("shoal-reconciler", "admin"),
            ("ops-admin", "admin"),
        ],
        &format!("    tokensFile: {}\n", tokens.display()),
        &format!(
            "service:\n  {kube}\n  backends:\n    sim: {{ url: {} }}\n    docker:\n      classes:\n        default:\n          env:\n            K3S_URL: https://k3s:6443\n            K3S_TOKEN: {{ fromFile: {} }}\n",
            sim.url(),
            secret_file.display()
        ),
    );
    certificates_optional(&provisioner_cfg);
    let print = std::process::Command::new(shoal_testkit::bin_path("shoal-provisioner"))
        .arg(format!("--config={}", provisioner_cfg.display()))
        .arg(format!("--etcd-endpoints={}", etcd.endpoint()))
        .arg("--print-config")
        .output()
        .expect("print-config");
    let printed = String::from_utf8_lossy(&print.stdout).into_owned();
    assert!(
        print.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&print.stderr)
    );
    assert!(
        printed.contains("K3S_TOKEN: <redacted>"),
        "the secret is shown redacted: {printed}"
    );
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "sec-provisioner",
        Some(&etcd),
        &[&format!("--config={}", provisioner_cfg.display())],
        &env,
    );
    provisioner.wait_ready();
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, POOL).expect("pool file");
    let decider_cfg = tls_config(
        dir.path(),
        "decider",
        &d_cert,
        true,
        &[("ops-admin", "admin")],
        &format!("    tokensFile: {}\n", tokens.display()),
        &format!(
            "election: {{ leaseTtl: 3s }}\nservice:\n  metricsAddr: https://{}\n  provisionerAddr: https://{}\n  poolFiles: [{}]\n",
            metrics.grpc,
            provisioner.grpc,
            pools.display()
        ),
    );
    certificates_optional(&decider_cfg);
    let mut decider = Running::start(
        "shoal-decider",
        "sec-decider",
        Some(&etcd),
        &[&format!("--config={}", decider_cfg.display())],
        &env,
    );
    decider.wait_ready();
    let reconciler_cfg = tls_config(
        dir.path(),
        "reconciler",
        &r_cert,
        true,
        &[("ops-admin", "admin")],
        "",
        &format!(
            "service:\n  {kube}\n  provisionerAddr: https://{}\n  interval: 3s\n",
            provisioner.grpc
        ),
    );
    let mut reconciler = Running::start(
        "shoal-reconciler",
        "sec-reconciler",
        Some(&etcd),
        &[&format!("--config={}", reconciler_cfg.display())],
        &env,
    );
    reconciler.wait_ready();

    // The loop: minNodes, then pods that need one more node.
    let ca_file = ca.ca_file().to_path_buf();
    let claims = |phase: &str| -> usize {
        let (ok, out) = grpcurl_tls(
            &ca_file,
            Some(&ops),
            &[
                "-d",
                r#"{"pool":"general"}"#,
                &provisioner.grpc.to_string(),
                "shoal.v1.ProvisionerService/ListNodeClaims",
            ],
        );
        assert!(ok, "{out}");
        let v: Value = serde_json::from_str(&out).expect("claims JSON");
        v["claims"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["phase"] == phase)
            .count()
    };
    let min = wait_for(Duration::from_secs(30), || {
        (claims("CLAIM_PHASE_READY") == 1).then_some(())
    });
    assert!(
        min.is_some(),
        "minNodes over mTLS\n{}\n{}",
        decider.process.logs(),
        provisioner.process.logs()
    );
    kubectl(
        &sim.kubeconfig(),
        &["apply", "-f", "-"],
        &deployment_yaml("web", 6, "500m", "128Mi", None),
    );
    let up = wait_for(Duration::from_secs(40), || {
        (claims("CLAIM_PHASE_READY") == 2).then_some(())
    });
    assert!(
        up.is_some(),
        "a scale-up over mTLS\n{}\n{}",
        decider.process.logs(),
        provisioner.process.logs()
    );
    // The reconciler reaches the provisioner too (a pass finds nothing to repair).
    let (ok, pass) = grpcurl_tls(
        &ca_file,
        Some(&ops),
        &[
            "-d",
            r#"{"dryRun":true}"#,
            &reconciler.grpc.to_string(),
            "shoal.v1.ReconcilerService/Reconcile",
        ],
    );
    assert!(ok && pass.contains("\"instances\": 2"), "{pass}");

    // The audit trail: the decider's own actions, and its CreateNodes on the provisioner under
    // its certificate identity, read with grpcurl and a bearer token (operator).
    let auth_header = format!("authorization: Bearer {TOKEN}");
    let audit = |addr: &str, filter: &str| -> Value {
        let (ok, out) = grpcurl_tls(
            &ca_file,
            None,
            &[
                "-H",
                &auth_header,
                "-d",
                filter,
                addr,
                "shoal.v1.AuditService/ListAudit",
            ],
        );
        assert!(ok, "{out}");
        serde_json::from_str(&out).expect("audit JSON")
    };
    let creates = audit(&provisioner.grpc.to_string(), r#"{"method":"CreateNodes"}"#);
    let records = creates["records"].as_array().cloned().unwrap_or_default();
    assert!(records.len() >= 2, "{creates}");
    for r in &records {
        assert_eq!(r["identity"], "shoal-decider", "{r}");
        assert_eq!(r["authenticatedBy"], "certificate", "{r}");
        assert_eq!(r["result"], "OK", "{r}");
        assert!(
            r["request"]
                .as_str()
                .is_some_and(|s| s.contains("\"pool\":\"general\"")),
            "{r}"
        );
    }
    let own = audit(
        &decider.grpc.to_string(),
        r#"{"identity":"decider/sec-decider"}"#,
    );
    assert!(
        own["records"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["request"]
                .as_str()
                .is_some_and(|s| s.contains("scale up general"))),
        "{own}"
    );

    // RequestCapacity: the requester is the caller, not whoever the request names.
    let ask = |requester: &str| {
        grpcurl_tls(
            &ca_file,
            None,
            &[
                "-H",
                &auth_header,
                "-d",
                &format!(
                    r#"{{"requester":"{requester}","dryRun":true,"pods":[{{"count":1,"pod":{{"requests":{{"cpuMillis":"500","memoryBytes":"134217728"}}}}}}]}}"#
                ),
                &decider.grpc.to_string(),
                "shoal.v1.DeciderService/RequestCapacity",
            ],
        )
    };
    let (ok, out) = ask("somebody-else");
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("is not the caller"),
        "{out}"
    );
    let (ok, out) = ask("");
    assert!(ok, "an empty requester becomes the caller: {out}");

    // No secret anywhere: logs, spans, API answers.
    let (_, status) = grpcurl_tls(
        &ca_file,
        Some(&ops),
        &[
            &provisioner.grpc.to_string(),
            "shoal.v1.ProvisionerService/GetBackendStatus",
        ],
    );
    let (_, all_audit) = grpcurl_tls(
        &ca_file,
        None,
        &[
            "-H",
            &auth_header,
            "-d",
            "{}",
            &provisioner.grpc.to_string(),
            "shoal.v1.AuditService/ListAudit",
        ],
    );
    std::thread::sleep(Duration::from_millis(600)); // the last spans are exported
    let exported = spans.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
    assert!(!exported.is_empty(), "spans were exported");
    for (what, text) in [
        ("print-config", printed),
        ("metrics log", metrics.process.logs()),
        ("provisioner log", provisioner.process.logs()),
        ("decider log", decider.process.logs()),
        ("reconciler log", reconciler.process.logs()),
        ("GetBackendStatus", status),
        ("ListAudit", all_audit),
        ("spans", exported),
    ] {
        for secret in [SECRET, TOKEN] {
            assert!(!text.contains(secret), "{what} shows a secret");
        }
    }
}

#[test]
fn certificates_are_checked_and_rotate_without_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "shoal");
    let other = TestCa::new(dir.path(), "other");
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    let server = ca.issue("shoal-provisioner", "provisioner");
    let viewer = ca.issue("someone", "viewer");
    let config = tls_config(
        dir.path(),
        "provisioner",
        &server,
        false,
        &[("someone", "viewer")],
        "",
        &format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n",
            sim.kubeconfig().display()
        ),
    );
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "certs-provisioner",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[
            ("SHOAL_GRPC__PLAINTEXT", "false"),
            (
                "SHOAL_TELEMETRY__LOG_LEVEL",
                "debug,h2=info,hyper=info,tower=info",
            ),
        ],
    );
    provisioner.wait_ready();
    let addr = provisioner.grpc.to_string();
    let list = |ca_file: &Path, cert: Option<&CertFiles>| {
        grpcurl_tls(
            ca_file,
            cert,
            &[
                "-d",
                "{}",
                &addr,
                "shoal.v1.ProvisionerService/ListNodeClaims",
            ],
        )
    };

    let (ok, out) = list(ca.ca_file(), Some(&viewer));
    assert!(
        ok,
        "a certificate from the CA with a role works: {out}\n{}",
        provisioner.process.logs()
    );
    let (ok, out) = list(ca.ca_file(), None);
    assert!(!ok, "no client certificate: refused: {out}");
    let (ok, out) = list(ca.ca_file(), Some(&other.issue("someone", "stranger")));
    assert!(!ok, "a certificate from another CA: refused: {out}");
    let (ok, out) = list(ca.ca_file(), Some(&ca.issue_expired("someone", "expired")));
    assert!(!ok, "an expired certificate: refused: {out}");
    let (ok, out) = list(ca.ca_file(), Some(&ca.issue("nobody", "nobody")));
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("no role"),
        "a valid certificate without a role: {out}"
    );
    // Plaintext is not spoken at all.
    let plain = grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &addr,
        "shoal.v1.ProvisionerService/ListNodeClaims",
    ]);
    assert!(!plain.status.success());

    // cert-manager rotates the files in place: a new CA and a server certificate from it.
    let old_ca_only = dir.path().join("old-ca-only.pem");
    std::fs::copy(ca.ca_file(), &old_ca_only).expect("copy the old CA");
    let rotated_ca = TestCa::new(dir.path(), "rotated");
    let renewed = rotated_ca.issue("shoal-provisioner", "renewed");
    let (ok, _) = list(rotated_ca.ca_file(), Some(&viewer));
    assert!(
        !ok,
        "before the rotation the new CA is not trusted by clients"
    );
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(ca.ca_file()).expect("ca"),
        std::fs::read_to_string(rotated_ca.ca_file()).expect("rotated ca")
    );
    std::fs::write(&server.key, std::fs::read(&renewed.key).expect("key")).expect("key");
    std::fs::write(&server.cert, std::fs::read(&renewed.cert).expect("cert")).expect("cert");
    std::fs::write(&server.ca, bundle).expect("bundle");
    let rotated = wait_for(Duration::from_secs(10), || {
        let (ok, _) = list(rotated_ca.ca_file(), Some(&viewer));
        ok.then_some(())
    });
    assert!(
        rotated.is_some(),
        "new connections use the renewed certificate\n{}",
        provisioner.process.logs()
    );
    let (ok, _) = list(&old_ca_only, Some(&viewer));
    assert!(!ok, "the old server certificate is no longer served");
    // Clients with certificates from the first CA are still trusted (it is in the bundle).
    let (ok, out) = list(rotated_ca.ca_file(), Some(&viewer));
    assert!(ok, "{out}");
    assert!(provisioner.process.try_status().is_none(), "no restart");
}

#[test]
fn roles_tokens_audit_and_rate_limits() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "shoal");
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    let server = ca.issue("shoal-provisioner", "provisioner");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - {{ name: vera, role: viewer, sha256: {} }}\n  - {{ name: alice, role: admin, sha256: {} }}\n",
            shoal_runtime::auth::token_hash("viewer-token"),
            shoal_runtime::auth::token_hash("admin-token"),
        ),
    )
    .expect("tokens");
    let config = tls_config(
        dir.path(),
        "provisioner",
        &server,
        false,
        &[],
        &format!(
            "    tokensFile: {}\n    limits: {{ ratePerSecond: 5, burst: 10 }}\n",
            tokens.display()
        ),
        &format!(
            "service:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n",
            sim.kubeconfig().display(),
            sim.url()
        ),
    );
    // Token callers bring no certificate: client certificates optional.
    certificates_optional(&config);
    shoal_e2e::EtcdReader::new(&etcd).put_pool(POOL);
    let mut provisioner = Running::start(
        "shoal-provisioner",
        "roles-provisioner",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &[("SHOAL_GRPC__PLAINTEXT", "false")],
    );
    provisioner.wait_ready();
    let addr = provisioner.grpc.to_string();
    let ca_file = ca.ca_file().to_path_buf();
    let call = |token: Option<&str>, method: &str, body: &str| {
        let header = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args: Vec<&str> = Vec::new();
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["-d", body, &addr, method]);
        grpcurl_tls(&ca_file, None, &args)
    };
    let create = r#"{"pool":"general","count":1,"idempotencyKey":"sec-1","reason":"test"}"#;

    let (ok, out) = call(None, "shoal.v1.ProvisionerService/CreateNodes", create);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = call(
        Some("wrong-token"),
        "shoal.v1.ProvisionerService/CreateNodes",
        create,
    );
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = call(
        Some("viewer-token"),
        "shoal.v1.ProvisionerService/CreateNodes",
        create,
    );
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("needs the admin role"),
        "{out}"
    );
    let (ok, out) = call(
        Some("viewer-token"),
        "shoal.v1.ProvisionerService/ListNodeClaims",
        "{}",
    );
    assert!(ok, "a viewer reads: {out}");
    let (ok, out) = call(
        Some("admin-token"),
        "shoal.v1.ProvisionerService/CreateNodes",
        create,
    );
    assert!(ok, "an admin creates: {out}");
    // Health and reflection stay open.
    let (ok, out) = grpcurl_tls(&ca_file, None, &[&addr, "list"]);
    assert!(ok && out.contains("shoal.v1.AuditService"), "{out}");

    // One audit record per mutating call, with the caller: the refusal and the success.
    let (ok, out) = call(
        Some("admin-token"),
        "shoal.v1.AuditService/ListAudit",
        r#"{"method":"CreateNodes"}"#,
    );
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).expect("audit JSON");
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    let by =
        |who: &str| -> Vec<&Value> { records.iter().filter(|r| r["identity"] == who).collect() };
    assert_eq!(by("alice").len(), 1, "{audit}");
    assert_eq!(by("alice")[0]["result"], "OK", "{audit}");
    assert_eq!(by("alice")[0]["authenticatedBy"], "token", "{audit}");
    assert_eq!(by("vera").len(), 1, "{audit}");
    assert_eq!(by("vera")[0]["result"], "PERMISSION_DENIED", "{audit}");
    assert!(
        !out.contains("admin-token") && !out.contains("viewer-token"),
        "tokens are not recorded: {out}"
    );
    // A viewer may not read the audit log.
    let (ok, out) = call(
        Some("viewer-token"),
        "shoal.v1.AuditService/ListAudit",
        "{}",
    );
    assert!(!ok && out.contains("operator"), "{out}");

    // A burst above 5/s (burst 10) from one identity: RESOURCE_EXHAUSTED with a retry hint; the
    // service stays healthy and answers again after the hint.
    let exhausted = runtime_burst(&provisioner, &ca_file, 40);
    assert!(
        exhausted.iter().any(|m| m.contains("rate limit")),
        "some calls are refused: {exhausted:?}"
    );
    let (ok, out) = grpcurl_tls(&ca_file, None, &[&addr, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out) = call(
        Some("viewer-token"),
        "shoal.v1.ProvisionerService/ListNodeClaims",
        "{}",
    );
    assert!(ok, "after the hint the caller is served again: {out}");
}

/// `n` ListNodeClaims as fast as one client can send them, with the viewer token; returns the
/// messages of the RESOURCE_EXHAUSTED answers.
fn runtime_burst(provisioner: &Running, ca: &Path, n: usize) -> Vec<String> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addr = provisioner.grpc;
    let ca = std::fs::read(ca).expect("ca");
    runtime.block_on(async move {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let mut client =
            shoal_proto::v1::provisioner_service_client::ProvisionerServiceClient::new(channel);
        let mut exhausted = Vec::new();
        for _ in 0..n {
            let mut request =
                tonic::Request::new(shoal_proto::v1::ListNodeClaimsRequest::default());
            request.metadata_mut().insert(
                "authorization",
                "Bearer viewer-token".parse().expect("header"),
            );
            if let Err(status) = client.list_node_claims(request).await {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                use tonic_types::StatusExt;
                assert!(
                    status.get_details_retry_info().is_some(),
                    "a retry hint: {status:?}"
                );
                exhausted.push(status.message().to_string());
            }
        }
        exhausted
    })
}

#[test]
fn a_standby_forwards_a_leader_only_call_over_mtls_keeping_the_callers_identity() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "shoal");
    let etcd = EtcdServer::start();
    let sim = SimServer::start(&[]);
    let ops = ca.issue("ops-admin", "ops");
    // Both replicas share the service's certificate, as a Deployment's pods do.
    let server = ca.issue("shoal-provisioner", "provisioner");
    let config = tls_config(
        dir.path(),
        "provisioner",
        &server,
        false,
        &[("ops-admin", "admin")],
        "",
        &format!(
            "election: {{ leaseTtl: 3s }}\nservice:\n  kube: {{ kubeconfig: {} }}\n  backends: {{ sim: {{ url: {} }} }}\n",
            sim.kubeconfig().display(),
            sim.url()
        ),
    );
    let env = [("SHOAL_GRPC__PLAINTEXT", "false")];
    let mut first = Running::start(
        "shoal-provisioner",
        "fwd-provisioner-1",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &env,
    );
    first.wait_ready();
    let mut second = Running::start(
        "shoal-provisioner",
        "fwd-provisioner-2",
        Some(&etcd),
        &[&format!("--config={}", config.display())],
        &env,
    );
    second.wait_ready();
    let reader = shoal_e2e::EtcdReader::new(&etcd);
    let leader = wait_for(Duration::from_secs(10), || reader.leader("provisioner"))
        .expect("a provisioner leads");
    assert!(
        leader.address.starts_with("https://"),
        "the leader advertises TLS: {}",
        leader.address
    );
    let standby = if leader.holder == first.instance {
        &second
    } else {
        &first
    };

    // Repair is leader-only: the standby forwards it; the leader refuses to delete what this
    // cluster does not own, which proves the call got there.
    let ca_file = ca.ca_file().to_path_buf();
    let (ok, out) = grpcurl_tls(
        &ca_file,
        Some(&ops),
        &[
            "-d",
            r#"{"passId":"t","reason":"test","deleteInstance":"sim/not-ours"}"#,
            &standby.grpc.to_string(),
            "shoal.v1.ProvisionerService/Repair",
        ],
    );
    assert!(
        !ok && out.contains("FailedPrecondition"),
        "forwarded and refused by the leader: {out}\n{}",
        standby.process.logs()
    );
    // The leader recorded it under the caller's identity, not the standby's certificate.
    let (ok, out) = grpcurl_tls(
        &ca_file,
        Some(&ops),
        &[
            "-d",
            r#"{"method":"Repair"}"#,
            &standby.grpc.to_string(),
            "shoal.v1.AuditService/ListAudit",
        ],
    );
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).expect("audit JSON");
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        records.len(),
        1,
        "one record, by the replica that ran it: {audit}"
    );
    assert_eq!(records[0]["identity"], "ops-admin", "{audit}");
    assert_eq!(records[0]["instance"], leader.holder.as_str(), "{audit}");
    assert_eq!(records[0]["result"], "FAILED_PRECONDITION", "{audit}");
}
