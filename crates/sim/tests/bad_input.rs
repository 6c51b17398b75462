//! Bad requests get the right `Status` error, and no input makes the simulator panic: a property
//! test throws arbitrary paths, query strings, content types and bodies at the real router.

use std::sync::Arc;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::Value;
use shoal_sim::{api, metrics::Exporter, store::Store};
use tower::ServiceExt;

fn router() -> axum::Router {
    api::router(Arc::new(api::ApiState {
        store: Store::new(1000),
        exporter: Exporter::default(),
        bookmark_interval: std::time::Duration::from_secs(5),
    }))
}

async fn call(
    router: axum::Router,
    method: &str,
    uri: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let request = match Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(Body::from(body))
    {
        Ok(r) => r,
        Err(_) => return (0, Vec::new()), // not even a valid HTTP request; nothing to send
    };
    let response = router
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    (status, bytes)
}

fn status_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn bad_requests_get_the_right_status() {
    let pods = "/api/v1/namespaces/default/pods";
    // (method, uri, content type, body, expected code, expected reason)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [u8], u16, &'a str);
    let cases: [Case; 9] = [
        (
            "POST",
            pods,
            "application/json",
            b"{not json",
            400,
            "BadRequest",
        ),
        (
            "POST",
            pods,
            "application/json",
            br#"{"kind":"Pod","metadata":{"name":"UPPER"}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            pods,
            "application/json",
            br#"{"kind":"Node","metadata":{"name":"x"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            pods,
            "application/json",
            br#"{"metadata":{}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            pods,
            "application/json",
            br#"{"metadata":{"name":"a","labels":{"x":1}}}"#,
            422,
            "Invalid",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods?labelSelector=a%20in%20(b",
            "",
            b"",
            400,
            "BadRequest",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/pods/missing",
            "",
            b"",
            404,
            "NotFound",
        ),
        (
            "PATCH",
            "/api/v1/nodes/x",
            "application/json-patch+json",
            b"[]",
            415,
            "UnsupportedMediaType",
        ),
        ("GET", "/api/v1/widgets", "", b"", 404, "NotFound"),
    ];
    for (method, uri, content_type, body, code, reason) in cases {
        let (status, bytes) = call(router(), method, uri, content_type, body.to_vec()).await;
        let status_obj = status_of(&bytes);
        assert_eq!(status, code, "{method} {uri}: {status_obj}");
        assert_eq!(status_obj["kind"], "Status", "{method} {uri}");
        assert_eq!(status_obj["reason"], reason, "{method} {uri}: {status_obj}");
        assert_eq!(status_obj["code"], code);
    }

    // A stale resourceVersion conflicts.
    let store_router = router();
    let (created, body) = call(
        store_router.clone(),
        "POST",
        pods,
        "application/json",
        br#"{"metadata":{"name":"p"}}"#.to_vec(),
    )
    .await;
    assert_eq!(created, 201);
    let mut pod = status_of(&body);
    pod["metadata"]["resourceVersion"] = Value::String("1".into());
    let (status, body) = call(
        store_router,
        "PUT",
        "/api/v1/namespaces/default/pods/p",
        "application/json",
        pod.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 409, "{}", status_of(&body));
    assert_eq!(status_of(&body)["reason"], "Conflict");
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("metadata".to_string()),
                    Just("name".to_string()),
                    Just("spec".to_string()),
                    Just("status".to_string()),
                    Just("labels".to_string()),
                    Just("kind".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_request_makes_it_panic(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("PATCH"), Just("DELETE")],
        path in prop_oneof![
            Just("/api/v1/namespaces/default/pods".to_string()),
            Just("/api/v1/namespaces/default/pods/p".to_string()),
            Just("/api/v1/nodes/n".to_string()),
            Just("/apis/apps/v1/namespaces/default/deployments/d/scale".to_string()),
            Just("/api/v1/namespaces/default/pods/p/eviction".to_string()),
            Just("/api/v1/namespaces/default/pods/p/binding".to_string()),
            "/api(/[a-z0-9%.-]{0,8}){0,6}",
        ],
        query in prop_oneof![Just(String::new()), "[a-zA-Z=&%,!() ]{0,30}".prop_map(|q| format!("?{q}"))],
        content_type in prop_oneof![Just("application/json"), Just("application/merge-patch+json"), Just("application/strategic-merge-patch+json"), Just("text/plain")],
        body in prop_oneof![arbitrary_json().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..64)],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let uri = format!("{path}{query}");
        let (status, bytes) = runtime.block_on(async {
            let router = router();
            // Something to act on, so object paths reach the handlers' logic.
            call(router.clone(), "POST", "/api/v1/namespaces/default/pods", "application/json", br#"{"metadata":{"name":"p"}}"#.to_vec()).await;
            call(router.clone(), "POST", "/api/v1/nodes", "application/json", br#"{"metadata":{"name":"n"}}"#.to_vec()).await;
            tokio::time::timeout(std::time::Duration::from_secs(2), call(router, method, &uri, content_type, body)).await.unwrap_or((1, Vec::new()))
        });
        prop_assert!(status != 500, "internal error for {method} {uri}");
        if status >= 400 {
            let s = status_of(&bytes);
            prop_assert_eq!(&s["kind"], "Status", "{} {} -> {}", method, uri, status);
        }
    }
}

#[tokio::test]
async fn unknown_fields_strict_warn_and_ignore() {
    let router = router();
    let uri = "/apis/apps/v1/namespaces/default/deployments";
    let body = |name: &str| {
        format!(r#"{{"metadata":{{"name":"{name}"}},"spec":{{"replica":3,"selector":{{"matchLabels":{{"a":"b"}}}},"template":{{"metadata":{{"labels":{{"a":"b"}}}},"spec":{{"containers":[{{"name":"c","image":"x","colour":"red"}}]}}}}}}}}"#)
            .into_bytes()
    };
    let (status, bytes) = call(
        router.clone(),
        "POST",
        &format!("{uri}?fieldValidation=Strict"),
        "application/json",
        body("strict"),
    )
    .await;
    assert_eq!(status, 400);
    let message = status_of(&bytes)["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("strict decoding error")
            && message.contains("unknown field \"spec.replica\""),
        "{message}"
    );
    assert!(
        message.contains("spec.template.spec.containers.0.colour"),
        "{message}"
    );

    // Default (Warn): accepted, warned, and the unknown fields are not stored.
    let request = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body("warned")))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("router");
    assert_eq!(response.status(), 201);
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let stored = status_of(
        &response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes(),
    );
    assert!(stored["spec"].get("replica").is_none(), "{stored}");

    let (status, _) = call(
        router.clone(),
        "POST",
        &format!("{uri}?fieldValidation=Ignore"),
        "application/json",
        body("ignored"),
    )
    .await;
    assert_eq!(status, 201);
    let (status, bytes) = call(
        router,
        "POST",
        &format!("{uri}?fieldValidation=strict"),
        "application/json",
        body("x"),
    )
    .await;
    assert_eq!(status, 400, "{}", status_of(&bytes));
}
