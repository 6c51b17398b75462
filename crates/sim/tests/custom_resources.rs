//! CustomResourceDefinitions, PodTemplates, namespace deletion, Events and `/version/` in the
//! simulator, through the clients users have: kubectl and the kube crate.

mod common;

use common::{Kubectl, add_node, eventually, start};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, PodTemplate},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, CustomResourceExt, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;
use shoal_core::crd::{NodePool, NodePoolStatus};

fn nodepool(name: &str, max: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata:\n  name: {name}\n  labels: {{team: infra}}\nspec:\n  provider: {{backend: sim}}\n  template:\n    capacity: {{cpu: \"4\", memory: 8Gi}}\n  limits:\n    minNodes: 1\n    maxNodes: {max}\n"
    )
}

/// The cell of `column` in the first data row of kubectl's table output (kubectl prints a
/// missing custom-column value as blank).
fn cell(table: &str, column: &str) -> String {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let start = header
        .find(column)
        .unwrap_or_else(|| panic!("no column {column} in {table}"));
    let end = header[start..]
        .find(char::is_whitespace)
        .map(|n| start + n)
        .and_then(|n| {
            header[n..]
                .find(|c: char| !c.is_whitespace())
                .map(|m| n + m)
        })
        .unwrap_or(row.len());
    row.get(start..end.min(row.len()))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodepool_crd_is_served_validated_and_printed_by_kubectl() {
    let (sim, client, _shutdown) = start().await;
    let kubectl = Kubectl::new(&sim);
    kubectl.apply(&shoal_core::crd::definitions_yaml()).await;

    // Discovery names the new resources; an empty list reads as one.
    let resources = kubectl
        .ok(&["api-resources", "--api-group=shoal.dev"])
        .await;
    assert!(
        resources.contains("nodepools") && resources.contains("nodeclaims"),
        "{resources}"
    );
    let crd = kubectl
        .ok(&[
            "get",
            "crd",
            "nodepools.shoal.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ])
        .await;
    assert_eq!(crd, "True");

    // kubectl apply, then the printer columns.
    kubectl.apply(&nodepool("general", "5")).await;
    let table = kubectl.ok(&["get", "nodepools"]).await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "NODES", "MIN", "MAX", "READY", "AGE"],
        "{table}"
    );
    let cells: Vec<String> = ["NAME", "NODES", "MIN", "MAX", "READY"]
        .iter()
        .map(|c| cell(&table, c))
        .collect();
    assert_eq!(cells, ["general", "", "1", "5", ""], "{table}");
    let wide = kubectl.ok(&["get", "np", "-o", "wide"]).await;
    assert!(wide.contains("BACKEND") && wide.contains("sim"), "{wide}");

    // The schema refuses a bad field with its path; nothing is stored.
    let (ok, _, stderr) = kubectl
        .run(&["apply", "-f", "-"], Some(&nodepool("broken", "ten")))
        .await;
    assert!(!ok, "an invalid NodePool must be refused");
    assert!(
        stderr.contains("spec.limits.maxNodes") && stderr.contains("integer"),
        "{stderr}"
    );
    let missing = "apiVersion: shoal.dev/v1alpha1\nkind: NodePool\nmetadata: {name: nolimits}\nspec:\n  provider: {backend: sim}\n  template: {}\n";
    let (ok, _, stderr) = kubectl.run(&["apply", "-f", "-"], Some(missing)).await;
    assert!(
        !ok && stderr.contains("spec.limits: Required value"),
        "{stderr}"
    );
    let names = kubectl.ok(&["get", "nodepools", "-o", "name"]).await;
    assert_eq!(names.trim(), "nodepool.shoal.dev/general");

    // The kube crate: typed list with a label selector, status subresource, watch.
    let pools: Api<NodePool> = Api::all(client.clone());
    let listed = pools
        .list(&ListParams::default().labels("team=infra"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let pool = &listed.items[0];
    assert_eq!(pool.spec.limits.max_nodes, 5);
    // Defaults from the schema were applied on create, as the API server does.
    assert!(pool.spec.scale_down.enabled);
    let status = NodePoolStatus {
        nodes: 3,
        ready_nodes: 2,
        ..Default::default()
    };
    pools
        .patch_status(
            "general",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
    // A write of the main resource leaves status alone.
    pools
        .patch(
            "general",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "spec": { "limits": { "maxNodes": 7 } }, "status": { "nodes": 99 } }),
            ),
        )
        .await
        .unwrap();
    let got = pools.get("general").await.unwrap();
    assert_eq!(got.spec.limits.max_nodes, 7);
    assert_eq!(got.status.as_ref().map(|s| s.nodes), Some(3));
    let table = kubectl.ok(&["get", "nodepools"]).await;
    let cells: Vec<String> = ["NAME", "NODES", "MIN", "MAX", "READY"]
        .iter()
        .map(|c| cell(&table, c))
        .collect();
    assert_eq!(cells, ["general", "3", "1", "7", "2"], "{table}");

    let mut watch = pools
        .watch(&WatchParams::default(), &got.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    kubectl.apply(&nodepool("burst", "9")).await;
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
        .await
        .expect("a watch event")
        .expect("stream open")
        .expect("event decodes");
    match event {
        WatchEvent::Added(pool) => assert_eq!(pool.name_any(), "burst"),
        other => panic!("expected ADDED, got {other:?}"),
    }

    // Deleting the CRD deletes its objects and stops serving the resource.
    kubectl.ok(&["delete", "crd", "nodepools.shoal.dev"]).await;
    let (ok, _, stderr) = kubectl.run(&["get", "nodepools"], None).await;
    assert!(!ok, "nodepools must be gone with their CRD: {stderr}");
    kubectl.apply(&shoal_core::crd::definitions_yaml()).await;
    assert!(
        pools
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_crd_validates_types_enums_bounds_and_prunes() {
    let (sim, client, _shutdown) = start().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let crd = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.example.com" },
        "spec": { "group": "example.com", "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget" },
            "versions": [{ "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "properties": {
                    "spec": { "type": "object", "required": ["size"], "properties": {
                        "size": { "type": "integer", "minimum": 1, "maximum": 10 },
                        "colour": { "type": "string", "enum": ["red", "blue"] }
                    } } } } } }] }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let widgets: Api<kube::core::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::core::ApiResource {
            group: "example.com".into(),
            version: "v1".into(),
            api_version: "example.com/v1".into(),
            kind: "Widget".into(),
            plural: "widgets".into(),
        },
    );
    let widget = |spec: serde_json::Value| -> kube::core::DynamicObject {
        serde_json::from_value(json!({ "apiVersion": "example.com/v1", "kind": "Widget", "metadata": { "name": "w" }, "spec": spec })).unwrap()
    };
    let refused = |spec| async {
        match widgets.create(&PostParams::default(), &widget(spec)).await {
            Err(kube::Error::Api(status)) => (status.code, status.message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let (code, message) = refused(json!({ "size": 11 })).await;
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.size") && message.contains("less than or equal to 10"),
        "{message}"
    );
    let (_, message) = refused(json!({ "size": 2, "colour": "green" })).await;
    assert!(
        message.contains("spec.colour") && message.contains("supported values"),
        "{message}"
    );
    let (_, message) = refused(json!({ "colour": "red" })).await;
    assert!(message.contains("spec.size: Required value"), "{message}");

    // Unknown fields are pruned (the default), or refused with fieldValidation=Strict.
    let created = widgets
        .create(
            &PostParams::default(),
            &widget(json!({ "size": 3, "shape": "round" })),
        )
        .await
        .unwrap();
    assert_eq!(created.data["spec"], json!({ "size": 3 }));
    let strict = reqwest::Client::new()
        .post(format!(
            "{}/apis/example.com/v1/namespaces/default/widgets?fieldValidation=Strict",
            sim.url()
        ))
        .json(&json!({ "apiVersion": "example.com/v1", "kind": "Widget", "metadata": { "name": "w2" }, "spec": { "size": 3, "shape": "round" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(strict.status(), 400);
    let message = strict.text().await.unwrap();
    assert!(message.contains("spec.shape"), "{message}");
    // A CRD whose name does not match its names is refused with the field.
    let mut bad = crd.clone();
    bad.metadata.name = Some("gadgets.example.com".into());
    match crds.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("metadata.name"),
            "{}",
            status.message
        ),
        other => panic!("expected 422, got {other:?}"),
    }
    // The generated NodePool CRD is accepted as kube's derive produced it.
    crds.create(&PostParams::default(), &NodePool::crd())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_deletes_what_is_in_it_first() {
    let (sim, client, _shutdown) = start().await;
    add_node(&sim, "node-a", "4", json!({}), json!([])).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": "team-a" } })).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "team-a");
    let pdb = serde_json::from_value(json!({ "metadata": { "name": "web" }, "spec": { "minAvailable": 1, "selector": { "matchLabels": { "app": "web" } } } })).unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    let templates: Api<PodTemplate> = Api::namespaced(client.clone(), "team-a");
    let template = serde_json::from_value(json!({ "metadata": { "name": "batch" }, "template": { "spec": { "containers": [{ "name": "c", "image": "x" }] } } })).unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    assert_eq!(
        templates
            .get("batch")
            .await
            .unwrap()
            .template
            .unwrap()
            .spec
            .unwrap()
            .containers[0]
            .name,
        "c"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let pod = serde_json::from_value(json!({ "metadata": { "name": "p", "labels": { "app": "web" } }, "spec": { "containers": [{ "name": "c", "image": "x", "resources": { "requests": { "cpu": "100m" } } }] } })).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the pod runs", async || {
        pods.get("p")
            .await
            .is_ok_and(|p| p.status.and_then(|s| s.phase).as_deref() == Some("Running"))
    })
    .await;

    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    // Terminating at once: new content is refused.
    let phase = namespaces
        .get_opt("team-a")
        .await
        .unwrap()
        .and_then(|n| n.status?.phase);
    if let Some(phase) = phase {
        assert_eq!(phase, "Terminating");
        let mut another = template.clone();
        another.metadata.name = Some("late".into());
        match templates.create(&PostParams::default(), &another).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{}", status.message),
            Ok(_) if namespaces.get_opt("team-a").await.unwrap().is_none() => {}
            other => panic!("a Terminating namespace must refuse new objects, got {other:?}"),
        }
    }
    eventually("the namespace and its contents are gone", async || {
        namespaces.get_opt("team-a").await.unwrap().is_none()
    })
    .await;
    // A namespace of the same name starts empty.
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert!(
        pdbs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        templates
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // The system namespaces cannot be deleted.
    match namespaces.delete("default", &DeleteParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403),
        other => panic!("default must not be deletable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_with_a_trailing_slash_and_failed_scheduling_events() {
    let (sim, client, _shutdown) = start().await;
    for path in ["/version", "/version/"] {
        let body: serde_json::Value = reqwest::get(format!("{}{path}", sim.url()))
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["major"], "1", "{path}");
    }
    // No node can take it: the scheduler says so in an Event kubectl describe shows.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = serde_json::from_value(json!({ "metadata": { "name": "big" }, "spec": { "containers": [{ "name": "c", "image": "x", "resources": { "requests": { "cpu": "64" } } }] } })).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    add_node(&sim, "node-a", "4", json!({}), json!([])).await;
    let kubectl = Kubectl::new(&sim);
    eventually("FailedScheduling in kubectl describe", async || {
        let described = kubectl.ok(&["describe", "pod", "big"]).await;
        described.contains("FailedScheduling") && described.contains("Insufficient cpu")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_generated_ca_in_the_kubeconfig() {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sim = shoal_sim::Sim::start(
        shoal_sim::SimConfig {
            tls: true,
            ..common::fast_config()
        },
        shutdown.clone(),
    )
    .await
    .expect("the simulator starts with TLS");
    assert!(sim.url().starts_with("https://"), "{}", sim.url());
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    // kubectl verifies the server with the CA from the kubeconfig.
    let kubectl = Kubectl::from_file(&kubeconfig);
    add_node(&sim, "node-a", "4", json!({}), json!([])).await;
    eventually("kubectl lists the node over HTTPS", async || {
        kubectl.ok(&["get", "nodes", "-o", "name"]).await.trim() == "node/node-a"
    })
    .await;
    // So does the kube crate, from the same file.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let version = client.apiserver_version().await.expect("version over TLS");
    assert_eq!(version.major, "1");
    // A client that does not trust the CA is refused.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .build()
        .expect("client");
    assert!(
        untrusting
            .get(format!("{}/version", sim.url()))
            .send()
            .await
            .is_err()
    );
    shutdown.cancel();
}
