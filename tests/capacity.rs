//! External schedulers asking for capacity: ProvisioningRequests (`autoscaling.x-k8s.io/v1`)
//! created by the official Python client as Kueue's provisioning admission check does, and the
//! same lifecycle over gRPC (`RequestCapacity`, `Get`/`List`/`WatchCapacityRequests`,
//! `CancelCapacityRequest`) with grpcurl. Every piece is its own process: etcd, the simulator
//! (nodes boot in 2–2.5 s), metrics, decider and provisioner.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use shoal_e2e::{EtcdReader, KubeCluster, grpcurl, grpcurl_ok, kubectl};
use shoal_testkit::wait_for;

/// 4-CPU nodes: 20 pods of 2 CPU need exactly 10.
const POOL: &str = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: { name: general }\nspec:\n  provider: { backend: sim }\n  template:\n    capacity: { cpu: \"4\", memory: 8Gi }\n  limits: { minNodes: 0, maxNodes: 14 }\n  scaleDown: { unneededFor: 6s, cooldown: 1s, maxConcurrent: 8, drainTimeout: 10s }\n";

/// The simulator's boot delay plus its largest jitter.
const BOOT: Duration = Duration::from_millis(2500);
/// What the issue allows on top of booting.
const SLACK: Duration = Duration::from_secs(5);
const BOOKING: &str = "8s";

/// The cluster of these tests: the ProvisioningRequest CRD, pool general in the store, and a
/// decider serving ProvisioningRequests with a short booking time.
struct Cluster(KubeCluster);

impl std::ops::Deref for Cluster {
    type Target = KubeCluster;
    fn deref(&self) -> &KubeCluster {
        &self.0
    }
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        let booking = format!("--set=service.capacity.bookingTime={BOOKING}");
        Cluster(KubeCluster::start(
            name,
            &["autoscaling.x-k8s.io_provisioningrequests.yaml"],
            "",
            &["--set=service.capacity.provisioningRequests=true", &booking],
            |etcd| EtcdReader::new(etcd).put_pool(POOL),
        ))
    }

    /// Nodes of pool general.
    fn nodes(&self) -> usize {
        kubectl(
            &self.kubeconfig(),
            &["get", "nodes", "-l", "shoal.dev/pool=general", "-o", "name"],
            "",
        )
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }

    /// A DeciderService call with a JSON body, answered as JSON.
    fn call(&self, method: &str, body: Value) -> Value {
        let out = grpcurl_ok(&[
            "-plaintext",
            "-d",
            &body.to_string(),
            &self.decider.grpc.to_string(),
            &format!("shoal.v1.DeciderService/{method}"),
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
    }

    /// Waits until request `id` has condition `kind` with `status`; returns the request.
    fn wait_condition(&self, id: &str, kind: &str, status: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        let found = wait_for(within, || {
            last = self.call("GetCapacityRequest", json!({ "id": id }));
            condition(&last, kind)
                .filter(|c| c["status"] == status)
                .map(|_| last.clone())
        });
        found.unwrap_or_else(|| panic!("{id}: no {kind}={status} within {within:?}: {last:#}"))
    }
}

fn condition<'a>(request: &'a Value, kind: &str) -> Option<&'a Value> {
    request["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn pods(count: i32, cpu_millis: i64) -> Value {
    json!([{ "count": count, "pod": { "requests": { "cpuMillis": cpu_millis.to_string(), "memoryBytes": (1i64 << 30).to_string() } } }])
}

#[test]
fn kueue_style_provisioning_requests_through_the_python_client() {
    let python = shoal_testkit::fakepve::python();
    let has_client = Command::new(&python)
        .args(["-c", "import kubernetes"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_client,
        "the Python `kubernetes` package is missing from {}: run `bash scripts/install-deps.sh`",
        python.display()
    );
    let cluster = Cluster::start("provreq");
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/provisioning_client.py"
        ))
        .arg(cluster.kubeconfig())
        .arg("general")
        .arg("8")
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("the client's steps:\n{stdout}");
    let steps: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let step = |name: &str| -> &Value {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {stdout}"))
    };

    assert_eq!(step("start")["nodes"], 0, "the pool starts empty");
    let provisioned = step("provisioned");
    let seconds = provisioned["seconds"].as_f64().expect("seconds");
    assert!(
        seconds <= (BOOT + SLACK).as_secs_f64(),
        "Provisioned after {seconds:.1}s, more than boot time + 5 s: {provisioned}"
    );
    assert_eq!(
        provisioned["reason"], "CapacityIsProvisioned",
        "{provisioned}"
    );
    assert_eq!(provisioned["accepted"], "True", "{provisioned}");
    assert_eq!(
        provisioned["nodes"], 10,
        "exactly the nodes packing needs: {provisioned}"
    );
    assert_eq!(
        provisioned["details"]["shoal.dev/new-nodes"], "general=10",
        "{provisioned}"
    );

    let check = step("check_without_room");
    assert_eq!(check["reason"], "CapacityIsNotFound", "{check}");
    assert_eq!(
        check["nodes"], 10,
        "check-capacity creates no node: {check}"
    );

    let consumed = step("consumed");
    assert_eq!(
        consumed["bound"], 20,
        "every consuming pod schedules: {consumed}"
    );
    assert_eq!(
        step("after_consume")["nodes"],
        10,
        "nothing else scales: {stdout}"
    );

    let big = step("too_big");
    assert_eq!(big["reason"], "CapacityIsNotFound", "{big}");
    assert!(
        big["message"]
            .as_str()
            .is_some_and(|m| m.contains("maxNodes 14")),
        "the reason names the limit: {big}"
    );
    assert!(
        big["seconds"].as_f64().is_some_and(|s| s < 5.0),
        "fails at once: {big}"
    );
    assert_eq!(big["nodes"], 10, "no node for a refused request: {big}");

    let room = step("check_with_room");
    assert_eq!(room["reason"], "CapacityIsFound", "{room}");

    let idle = step("idle_provisioned");
    assert!(
        idle["added"].as_array().is_some_and(|a| !a.is_empty()),
        "the idle request got new nodes: {idle}"
    );
    assert_eq!(
        step("idle_expired")["reason"],
        "CapacityReservationTimeExpired"
    );
    assert_eq!(
        step("idle_scaled_down")["left"],
        json!([]),
        "the nodes of a booking never consumed are scaled down: {stdout}"
    );
    step("done");

    // The deleted ProvisioningRequest's capacity request is gone; the others are listed.
    let gone = wait_for(Duration::from_secs(10), || {
        let list = cluster.call("ListCapacityRequests", json!({}));
        let sources: Vec<String> = list["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["source"].as_str().map(str::to_string))
            .collect();
        (!sources.iter().any(|s| s.ends_with("default/check-none"))
            && sources.iter().any(|s| s.ends_with("default/job-a")))
        .then_some(())
    });
    assert!(gone.is_some(), "ListCapacityRequests follows the resources");
}

#[test]
fn the_same_lifecycle_over_grpc() {
    let cluster = Cluster::start("grpc-cap");

    // Atomic: 20 pods of 2 CPU → 10 nodes, Provisioned within boot time + 5 s.
    let asked = Instant::now();
    let answer = cluster.call(
        "RequestCapacity",
        json!({ "requester": "ci-runner", "class": "CAPACITY_CLASS_ATOMIC_SCALE_UP", "pods": pods(20, 2000), "idempotencyKey": "build-42" }),
    );
    let id = answer["request"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id: {answer:#}"))
        .to_string();
    assert_eq!(
        condition(&answer["request"], "Accepted").map(|c| c["status"].clone()),
        Some(json!("True")),
        "{answer:#}"
    );
    let ups: Vec<&Value> = answer["decision"]["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("scaleUp"))
        .collect();
    assert_eq!(ups.len(), 1, "one scale-up: {answer:#}");
    assert_eq!(
        ups[0]["count"], 10,
        "exactly the nodes packing needs: {answer:#}"
    );
    let provisioned = cluster.wait_condition(&id, "Provisioned", "True", BOOT + SLACK);
    let took = asked.elapsed();
    assert!(took <= BOOT + SLACK, "Provisioned after {took:?}");
    assert_eq!(
        condition(&provisioned, "Provisioned").map(|c| c["reason"].clone()),
        Some(json!("CapacityIsProvisioned"))
    );
    assert!(provisioned["bookedUntil"].is_string(), "{provisioned:#}");
    assert_eq!(cluster.nodes(), 10);

    // The same requester and key: the same request, no new node.
    let again = cluster.call(
        "RequestCapacity",
        json!({ "requester": "ci-runner", "pods": pods(20, 2000), "idempotencyKey": "build-42" }),
    );
    assert_eq!(again["request"]["id"], json!(id), "{again:#}");

    // Too large for maxNodes: Failed in the answer itself, with the reason; no node.
    let big = cluster.call(
        "RequestCapacity",
        json!({ "requester": "ci-runner", "pods": pods(100, 2000) }),
    );
    let failed = condition(&big["request"], "Failed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["status"], "True", "{big:#}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("maxNodes 14")),
        "{big:#}"
    );
    assert_eq!(big["request"]["finished"], true);
    // The refusal is a decision too, with each pool's verdict.
    let verdicts = big["decision"]["outcomes"][0]["verdicts"].to_string();
    assert!(
        verdicts.contains("maxNodes 14 reached")
            && big["decision"]["reasons"].to_string().contains("refused"),
        "{big:#}"
    );
    assert!(
        big["decision"]["actions"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "a refused request's decision acts on nothing: {big:#}"
    );

    // check-capacity while the room is booked: not provisioned, nothing created.
    let check = cluster.call(
        "RequestCapacity",
        json!({ "requester": "ci-runner", "class": "CAPACITY_CLASS_CHECK_CAPACITY", "pods": pods(1, 2000) }),
    );
    let check_id = check["request"]["id"].as_str().expect("id").to_string();
    let not_found =
        cluster.wait_condition(&check_id, "Provisioned", "False", Duration::from_secs(10));
    assert_eq!(
        condition(&not_found, "Provisioned").map(|c| c["reason"].clone()),
        Some(json!("CapacityIsNotFound")),
        "{not_found:#}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cluster.nodes(),
        10,
        "no node for check-capacity or a refused request"
    );

    // WatchCapacityRequests: the current state first, then the cancellation.
    let watch = std::thread::spawn({
        let addr = cluster.decider.grpc.to_string();
        let id = id.clone();
        move || {
            grpcurl(&[
                "-plaintext",
                "-max-time",
                "6",
                "-d",
                &json!({ "id": id, "sendInitial": true }).to_string(),
                &addr,
                "shoal.v1.DeciderService/WatchCapacityRequests",
            ])
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let cancelled = cluster.call(
        "CancelCapacityRequest",
        json!({ "id": id, "reason": "the build was aborted" }),
    );
    assert_eq!(
        condition(&cancelled, "Failed").map(|c| c["reason"].clone()),
        Some(json!("Cancelled")),
        "{cancelled:#}"
    );
    let watched = watch.join().expect("watch thread");
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(
        text.contains("CapacityIsProvisioned") && text.contains("Cancelled"),
        "the watch shows the state, then the change: {text}"
    );

    // The waiting check is retried: the room the cancellation freed is found (and booked).
    let found = cluster.wait_condition(&check_id, "Provisioned", "True", Duration::from_secs(10));
    assert_eq!(
        condition(&found, "Provisioned").map(|c| c["reason"].clone()),
        Some(json!("CapacityIsFound")),
        "{found:#}"
    );
    assert_eq!(
        cluster.nodes(),
        10,
        "check-capacity creates and removes nothing"
    );

    // Once the check's booking expires, nothing holds the nodes: they go.
    cluster.wait_condition(&check_id, "BookingExpired", "True", Duration::from_secs(20));
    let down = wait_for(Duration::from_secs(40), || {
        (cluster.nodes() == 0).then_some(())
    });
    assert!(
        down.is_some(),
        "a cancelled booking's nodes are scaled down ({} left)",
        cluster.nodes()
    );

    let list = cluster.call("ListCapacityRequests", json!({ "requester": "ci-runner" }));
    assert_eq!(
        list["requests"].as_array().map(Vec::len),
        Some(3),
        "{list:#}"
    );
    let active = cluster.call("ListCapacityRequests", json!({ "activeOnly": true }));
    assert_eq!(
        active["requests"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "all finished: {active:#}"
    );

    // Bad input names the field.
    let bad = grpcurl(&[
        "-plaintext",
        "-d",
        &json!({ "requester": "ci-runner", "pods": [{ "count": 0 }] }).to_string(),
        &cluster.decider.grpc.to_string(),
        "shoal.v1.DeciderService/RequestCapacity",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("InvalidArgument") && err.contains("pods[0].count"),
        "{err}"
    );

    // Every mutating call is audited.
    let audit = grpcurl_ok(&[
        "-plaintext",
        "-d",
        "{}",
        &cluster.decider.grpc.to_string(),
        "shoal.v1.AuditService/ListAudit",
    ]);
    assert!(
        audit.contains("CancelCapacityRequest") && audit.contains("RequestCapacity"),
        "{audit}"
    );
}
