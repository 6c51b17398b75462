//! deploy/k8s: the kustomization renders with the real kubectl, and what it renders is what an
//! operator needs — leader-elected services with two replicas, probes on the health endpoints,
//! non-root read-only containers, least-privilege RBAC, PDBs, a three-member etcd — and the
//! Prometheus rules pass the real promtool. Every Shoal metric the rules and the Grafana
//! dashboard use exists in the code.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use serde_json::Value;
use shoal_testkit::require_tool;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rendered() -> Vec<Value> {
    render("deploy/k8s")
}

fn render(dir: &str) -> Vec<Value> {
    let kubectl = require_tool(
        "kubectl",
        "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
    );
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .expect("kubectl kustomize runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml_ng::Value =
                serde::Deserialize::deserialize(doc).expect("rendered YAML");
            serde_json::to_value(v).expect("as JSON")
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} is rendered"))
}

#[test]
fn the_kustomization_renders_hardened_least_privilege_manifests() {
    let objects = rendered();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for o in &objects {
        *kinds
            .entry(o["kind"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        if o["kind"] != "Namespace"
            && o["kind"] != "CustomResourceDefinition"
            && o["kind"] != "ClusterRole"
            && o["kind"] != "ClusterRoleBinding"
        {
            assert_eq!(o["metadata"]["namespace"], "shoal", "{}", o["metadata"]);
        }
    }
    println!("rendered: {kinds:?}");

    for (service, port) in [
        ("metrics", 9091),
        ("decider", 9092),
        ("provisioner", 9093),
        ("reconciler", 9094),
    ] {
        let name = format!("shoal-{service}");
        let d = find(&objects, "Deployment", &name);
        assert_eq!(d["spec"]["replicas"], 2, "{name}: two replicas");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], name.as_str());
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        let c = &pod["containers"][0];
        assert_eq!(c["args"][0], "run");
        assert_eq!(c["args"][1], service);
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{name}: requests"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{name}: limits"
        );
        let admin = c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "admin")
            .unwrap_or_else(|| panic!("{name}: admin port"));
        assert_eq!(admin["containerPort"], port);
        // The config the container reads is in the generated ConfigMap it mounts.
        let volume = &pod["volumes"][0]["configMap"]["name"];
        let config = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && &o["metadata"]["name"] == volume)
            .unwrap_or_else(|| panic!("{name}: ConfigMap {volume}"));
        assert!(
            config["data"][format!("{service}.yaml")].is_string(),
            "{name}: {service}.yaml in {volume}"
        );
        find(&objects, "Service", &name);
        find(&objects, "ServiceAccount", &name);
        assert_eq!(
            find(&objects, "PodDisruptionBudget", &name)["spec"]["minAvailable"],
            1
        );
    }

    // Least privilege: exactly the verbs each service uses, never a wildcard.
    let rules = |name: &str| -> Vec<(String, String)> {
        let role = find(&objects, "ClusterRole", name);
        let mut out = Vec::new();
        for r in role["rules"].as_array().into_iter().flatten() {
            for res in r["resources"].as_array().into_iter().flatten() {
                for verb in r["verbs"].as_array().into_iter().flatten() {
                    let (res, verb) = (res.as_str().unwrap_or(""), verb.as_str().unwrap_or(""));
                    assert!(res != "*" && verb != "*", "{name}: no wildcards");
                    out.push((res.to_string(), verb.to_string()));
                }
            }
        }
        out
    };
    let provisioner = rules("shoal-provisioner");
    assert!(provisioner.contains(&("pods/eviction".into(), "create".into())));
    assert!(provisioner.contains(&("nodes".into(), "delete".into())));
    assert!(
        !provisioner
            .iter()
            .any(|(r, v)| r == "pods" && v == "delete"),
        "pods are evicted, never deleted"
    );
    assert!(
        rules("shoal-metrics")
            .iter()
            .all(|(_, v)| matches!(v.as_str(), "get" | "list" | "watch"))
    );
    assert_eq!(
        rules("shoal-reconciler"),
        [("nodes".to_string(), "list".to_string())]
    );
    let pair = |r: &str, v: &str| (r.to_string(), v.to_string());
    assert_eq!(
        rules("shoal-decider"),
        [
            pair("nodepools", "get"),
            pair("nodepools", "list"),
            pair("nodepools", "watch"),
            pair("nodepools/status", "patch"),
            pair("pods", "list"),
            pair("events", "create"),
            pair("provisioningrequests", "get"),
            pair("provisioningrequests", "list"),
            pair("provisioningrequests", "watch"),
            pair("provisioningrequests/status", "patch"),
            pair("podtemplates", "get"),
        ],
        "the decider reads NodePools and ProvisioningRequests (with their PodTemplates), writes their status and Events, nothing else"
    );
    for crd in ["nodepools.shoal.dev", "nodeclaims.shoal.dev"] {
        find(&objects, "CustomResourceDefinition", crd);
    }

    let etcd = find(&objects, "StatefulSet", "shoal-etcd");
    assert_eq!(etcd["spec"]["replicas"], 3);
}

/// The secure deployment: cert-manager issues every certificate the services mount, each
/// certificate's identity is the one the other services' roles name, etcd takes only clients
/// with a certificate from that CA, and NetworkPolicies let only callers in.
#[test]
fn with_cert_manager_every_service_speaks_mtls_and_only_callers_get_in() {
    let objects = render("deploy/overlays/cert-manager");
    let config = |service: &str| -> serde_yaml_ng::Value {
        let text =
            std::fs::read_to_string(root().join(format!("deploy/k8s/config/{service}.yaml")))
                .expect("config");
        serde_yaml_ng::from_str(&text).expect("config YAML")
    };
    for service in ["metrics", "decider", "provisioner", "reconciler"] {
        let name = format!("shoal-{service}");
        let certificate = find(&objects, "Certificate", &name);
        assert_eq!(certificate["metadata"]["namespace"], "shoal");
        let spec = &certificate["spec"];
        assert_eq!(
            spec["dnsNames"][0],
            name.as_str(),
            "the identity comes first"
        );
        let usages: Vec<&str> = spec["usages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(usages.contains(&"server auth") && usages.contains(&"client auth"));
        let secret = spec["secretName"].as_str().expect("secretName");
        let pod = &find(&objects, "Deployment", &name)["spec"]["template"]["spec"];
        assert!(
            pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["secret"]["secretName"] == secret),
            "{name} mounts {secret}"
        );
        let advertise = pod["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "SHOAL_GRPC__ADVERTISE_ADDR")
            .expect("advertise address");
        assert!(
            advertise["value"]
                .as_str()
                .is_some_and(|v| v.starts_with("https://"))
        );
        let c = config(service);
        assert!(
            c["grpc"]["tls"]["certFile"].is_string(),
            "{service}: grpc.tls"
        );
        assert_ne!(c["grpc"]["plaintext"], serde_yaml_ng::Value::Bool(true));
        find(&objects, "NetworkPolicy", &name);
    }
    // Who may call whom, by certificate identity.
    let role = |service: &str, identity: &str| {
        config(service)["grpc"]["auth"]["identities"][identity]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(
        role("provisioner", "shoal-decider").as_deref(),
        Some("admin")
    );
    assert_eq!(
        role("provisioner", "shoal-reconciler").as_deref(),
        Some("admin")
    );
    assert_eq!(role("metrics", "shoal-decider").as_deref(), Some("viewer"));
    assert_eq!(role("metrics", "shoal-reconciler"), None);
    for service in ["decider", "provisioner", "reconciler"] {
        let store = &config(service)["store"];
        assert!(
            store["endpoints"][0]
                .as_str()
                .is_some_and(|e| e.starts_with("https://")),
            "{service} reaches etcd over TLS"
        );
        assert!(
            store["tls"]["certFile"].is_string(),
            "{service}: etcd client cert"
        );
    }
    let etcd = find(&objects, "StatefulSet", "shoal-etcd");
    let args: Vec<&str> = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for flag in ["--client-cert-auth", "--peer-client-cert-auth"] {
        assert!(args.contains(&flag), "etcd {flag}: {args:?}");
    }
    assert!(
        args.iter()
            .any(|a| a.starts_with("--listen-client-urls=https://"))
    );
    let etcd_cert = find(&objects, "Certificate", "shoal-etcd");
    assert!(
        etcd_cert["spec"]["dnsNames"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d == "shoal-etcd"),
        "the name services dial"
    );
    let deny = find(&objects, "NetworkPolicy", "shoal-default-deny");
    assert_eq!(deny["spec"]["podSelector"], serde_json::json!({}));
    // The provisioner takes calls from the decider and the reconciler, not from metrics.
    let from = find(&objects, "NetworkPolicy", "shoal-provisioner")["spec"]["ingress"][0]["from"]
        .to_string();
    assert!(from.contains("shoal-decider") && from.contains("shoal-reconciler"));
    assert!(!from.contains("shoal-metrics"));
    // No credential in a ConfigMap.
    for o in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        let text = o["data"].to_string().to_lowercase();
        assert!(
            !text.contains("password: \"") && !text.contains("-----begin"),
            "{}: no secret material in ConfigMaps",
            o["metadata"]["name"]
        );
    }
}

#[test]
fn alert_rules_pass_promtool_and_every_metric_they_and_the_dashboard_use_exists() {
    let rules = root().join("deploy/k8s/prometheus/rules.yaml");
    let promtool = require_tool(
        "promtool",
        "it ships with Prometheus: run scripts/install-deps.sh (Debian package prometheus)",
    );
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&rules).expect("rules")
        + &std::fs::read_to_string(root().join("deploy/k8s/grafana/shoal-dashboard.json"))
            .expect("dashboard");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/k8s/grafana/shoal-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
    // Every shoal_* name (minus histogram suffixes) is registered somewhere in the services.
    let mut sources = String::new();
    for dir in ["services", "crates/runtime/src"] {
        collect_rs(&root().join(dir), &mut sources);
    }
    let mut names: Vec<String> = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("shoal_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let base = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .unwrap_or(&name);
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "metric {name} used by the rules or the dashboard is not exported by any service"
        );
    }
}

fn collect_rs(dir: &std::path::Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
}

#[test]
fn the_compose_setup_is_valid_and_its_shoal_files_load() {
    let compose = root().join("deploy/compose");
    let tool = require_tool(
        "docker-compose",
        "install Debian's docker-compose (or Docker's compose plugin)",
    );
    let out = Command::new(tool)
        .arg("-f")
        .arg(compose.join("docker-compose.yaml"))
        .arg("config")
        .env("K3S_TOKEN", "test-token")
        .output()
        .expect("docker-compose runs");
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    for service in [
        "k3s-server",
        "etcd",
        "metrics",
        "decider",
        "provisioner",
        "reconciler",
    ] {
        assert!(
            rendered.contains(&format!("  {service}:")),
            "{service} in {rendered}"
        );
    }
    let pool = std::fs::read_to_string(compose.join("pools/general.yaml")).expect("pool");
    let (pool, _) = shoal_core::pool::Pool::from_yaml(&pool).expect("the compose pool is valid");
    assert_eq!(pool.name, "general");
    let out = Command::new(shoal_testkit::bin_path("shoal-provisioner"))
        .arg(format!(
            "--config={}",
            compose.join("provisioner.yaml").display()
        ))
        // The kubeconfig is the k3s server's output, which only exists inside the project.
        .arg("--set=service.kube.kubeconfig=")
        .arg("--print-config")
        // As compose passes it (from the environment, as the file says).
        .env("K3S_TOKEN", "compose-join-token-7f3a")
        .output()
        .expect("shoal-provisioner runs");
    assert!(
        out.status.success(),
        "the compose provisioner config loads: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("shoal_k3s"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("compose-join-token-7f3a"),
        "the join token is redacted"
    );
}
