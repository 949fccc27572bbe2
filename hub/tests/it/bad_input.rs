//! Each kind of bad input gets a clear 4xx JSON error, and nothing is stored.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

async fn versions(hub: &TestHub, name: &str) -> Vec<String> {
    let v: Value = hub.get(&format!("/api/v1/models/{name}/versions"), &hub.admin).await.json().await.unwrap();
    v["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let blobs_before = hub.stored_blobs().await;
    let v1 = model_bytes(V1);

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("not ONNX", "2.0.0", b"this is a text file, not a model\n".to_vec(), 422, "ONNX"),
        ("truncated", "2.0.1", v1[..v1.len() / 2].to_vec(), 422, "nothing was stored"),
        ("truncated at 90%", "2.0.2", v1[..v1.len() * 9 / 10].to_vec(), 422, "nothing was stored"),
        ("empty body", "2.0.3", Vec::new(), 400, "empty"),
        ("duplicate version", "1.0.0", v1.clone(), 409, "already has version 1.0.0"),
        ("not semver", "1.0", v1.clone(), 400, "semver"),
        ("not semver either", "latest", v1.clone(), 400, "semver"),
    ];
    for (what, version, body, status, needle) in cases {
        let msg = expect_error(hub.upload("m", version, body, "").await, status).await;
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    // No version without --version: no silent default.
    let r = hub.req(Method::POST, "/api/v1/models/m/versions", Some(&hub.admin)).body(v1.clone()).send().await.unwrap();
    let msg = expect_error(r, 400).await;
    assert!(msg.contains("no default"), "{msg}");
    // Unknown query parameters and bad metadata.
    for (query, needle) in [
        ("&colour=red", "colour"),
        ("&stage=prodution", "unknown stage"),
        ("&hardware=arm%20v7", "hardware tag"),
        ("&accuracy=1.5", "between 0 and 1"),
    ] {
        let msg = expect_error(hub.upload("m", "3.0.0", v1.clone(), query).await, 400).await;
        assert!(msg.contains(needle), "{query}: {msg}");
    }
    // Well formed, but a metric without an accuracy describes nothing.
    let msg = expect_error(hub.upload("m", "3.0.0", v1.clone(), "&metric=top1").await, 422).await;
    assert!(msg.contains("pass accuracy too"), "{msg}");
    // Upload to a model that is not registered.
    let msg = expect_error(hub.upload("ghost", "1.0.0", v1.clone(), "").await, 404).await;
    assert!(msg.contains("not registered"), "{msg}");

    assert_eq!(versions(&hub, "m").await, ["1.0.0"]);
    assert_eq!(hub.stored_blobs().await, blobs_before, "no blob and no staging file was left");
}

#[tokio::test]
async fn an_upload_over_the_limit_is_cut_off_while_streaming() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_in(tmp.path(), Some(100_000)).await;
    hub.register("m").await;
    let big = model_bytes(V3);
    // With Content-Length, refused before reading.
    let msg = expect_error(hub.upload("m", "1.0.0", big.clone(), "").await, 413).await;
    assert!(msg.contains("100000 bytes"), "{msg}");
    // Chunked, without Content-Length: refused once the cap is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = hub.req(Method::POST, "/api/v1/models/m/versions?version=1.0.0", Some(&hub.admin)).body(body).send().await;
    // The hub stops storing at the cap and reads on (up to its drain limit),
    // so the client, still sending, receives the 413 rather than a reset.
    expect_error(r.unwrap(), 413).await;
    assert!(versions(&hub, "m").await.is_empty());
    assert!(hub.stored_blobs().await.is_empty(), "the partial upload was removed");
    // A model under the limit still goes through.
    assert_eq!(hub.upload("m", "1.0.0", model_bytes(V1), "").await.status(), 201);
}

#[tokio::test]
async fn bad_names_json_and_deploys_are_refused() {
    let hub = TestHub::start().await;
    let long = "x".repeat(129);
    for name in ["a/b", "..", "up..dir", "has space", long.as_str(), ""] {
        let msg = expect_error(hub.post_json("/api/v1/models", &hub.admin, json!({"name": name})).await, 400).await;
        assert!(msg.contains("model name"), "{name:?}: {msg}");
    }
    // A path segment that is not a valid name, percent-encoded past the
    // router: no model can have it, so it is not found.
    let msg = expect_error(hub.get("/api/v1/models/has%20space", &hub.admin).await, 404).await;
    assert!(msg.contains("model name"), "{msg}");

    // Unknown JSON fields, wrong types, not JSON at all.
    let msg =
        expect_error(hub.post_json("/api/v1/models", &hub.admin, json!({"name": "ok", "colour": 1})).await, 422).await;
    assert!(msg.contains("colour"), "{msg}");
    expect_error(hub.post_json("/api/v1/models", &hub.admin, json!({"name": 5})).await, 422).await;
    let r = hub
        .req(Method::POST, "/api/v1/models", Some(&hub.admin))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    let r = hub.req(Method::POST, "/api/v1/models", Some(&hub.admin)).body("name=x").send().await.unwrap();
    expect_error(r, 415).await;
    let models: Value = hub.get("/api/v1/models", &hub.admin).await.json().await.unwrap();
    assert_eq!(models["total"], 0, "nothing was registered");

    // A deploy whose target demands hardware the version does not declare.
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await; // declares x86_64, aarch64
    let msg = expect_error(
        hub.post_json(
            "/api/v1/models/m/deploy",
            &hub.admin,
            json!({"version": "1.0.0", "target": "ring=prod,hardware=cuda"}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains("cuda"), "{msg}");
    let r = hub
        .post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "hardware=aarch64"}))
        .await;
    assert_eq!(r.status(), 201);
    // Deploying a version that does not exist, or cannot (not semver): the
    // model in the path exists, so the body is what is wrong (422).
    let msg = expect_error(
        hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "9.9.9", "target": "*"})).await,
        422,
    )
    .await;
    assert!(msg.contains("no version \"9.9.9\""), "{msg}");
    let msg = expect_error(
        hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "latest", "target": "*"})).await,
        422,
    )
    .await;
    assert!(msg.contains("not semver"), "{msg}");
    // A model that does not exist is the path's resource: 404.
    expect_error(
        hub.post_json("/api/v1/models/nope/deploy", &hub.admin, json!({"version": "1.0.0", "target": "*"})).await,
        404,
    )
    .await;
    let msg =
        expect_error(hub.post_json("/api/v1/models/m/rollback", &hub.admin, json!({"version": "7.0.0"})).await, 422)
            .await;
    assert!(msg.contains("no version"), "{msg}");
    expect_error(
        hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "a=b=c"})).await,
        400,
    )
    .await;
    // Rolling back with nothing earlier to go back to.
    let msg = expect_error(hub.post_json("/api/v1/models/m/rollback", &hub.admin, json!({})).await, 409).await;
    assert!(msg.contains("no earlier version"), "{msg}");
    let deployments: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(deployments["total"], 1, "only the valid deploy was recorded");

    // Bad pagination and unknown endpoints answer JSON too.
    expect_error(hub.get("/api/v1/models?limit=0", &hub.admin).await, 400).await;
    expect_error(hub.get("/api/v1/models?limit=100000", &hub.admin).await, 400).await;
    expect_error(hub.get("/api/v1/nothing-here", &hub.admin).await, 404).await;
    expect_error(hub.get("/api/v1/deployments/abc", &hub.admin).await, 400).await;
}
