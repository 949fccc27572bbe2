//! The small findings of the hardening pass (issue 11), each as the request
//! or the start-up that showed it: names, echoes, build metadata, file
//! modes, deploy targets, policy bounds, credentials, role checks, removed
//! devices' streams, and a clean SIGTERM.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use reqwest::Method;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentReport, Hello};
use serde_json::{Value, json};

use crate::common;
use common::*;

/// Bound on waits for something that should happen at once: generous, so
/// only a real hang trips it.
const WAIT: Duration = Duration::from_secs(30);

/// The body of an error response, asserting its status.
async fn error_body(r: reqwest::Response, status: u16) -> String {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{}", &text[..text.len().min(500)]);
    text
}

#[tokio::test]
async fn names_need_a_letter_or_digit_and_errors_quote_at_most_200_bytes() {
    let hub = TestHub::start().await;
    for bad in [".", "..", "-", "_.-", "a..b"] {
        let msg = expect_error(hub.post_json("/api/v1/models", &hub.admin, json!({"name": bad})).await, 400).await;
        assert!(msg.contains("model name"), "{bad:?}: {msg}");
    }
    for good in ["a", ".a", "x-1", "v1.2"] {
        let r = hub.post_json("/api/v1/models", &hub.admin, json!({"name": good})).await;
        assert_eq!(r.status(), 201, "{good:?}");
    }
    // A megabyte of bad value comes back as 200 bytes and an ellipsis.
    let huge = "é".repeat(500_000);
    for (path, body) in [
        ("/api/v1/models", json!({"name": huge})),
        ("/api/v1/models", json!({"name": "m", "tags": [format!(",{huge}")]})),
        ("/api/v1/devices", json!({"id": huge})),
        ("/api/v1/tokens", json!({"role": huge})),
    ] {
        let r = hub.req(Method::POST, path, Some(&hub.admin)).json(&body).send().await.unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
        let text = r.text().await.unwrap();
        assert!(text.len() < 1000, "{path}: the error quotes {} bytes", text.len());
        assert!(text.contains('…'), "{path}: the cut is marked: {text}");
    }
    hub.register("m2").await;
    hub.push_v1("m2", "1.0.0").await;
    let target = format!("a={}", "x".repeat(100_000));
    let r = hub.post_json("/api/v1/models/m2/deploy", &hub.admin, json!({"version": "1.0.0", "target": target})).await;
    let text = error_body(r, 400).await;
    assert!(text.len() < 1000 && text.contains('…'), "{} bytes", text.len());
}

#[tokio::test]
async fn versions_equal_but_for_build_metadata_conflict() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    for v in ["1.0.0%2Bbuild.5", "1.0.0%2Bbuild.6"] {
        let msg = expect_error(hub.upload("m", v, model_bytes(V1), "").await, 409).await;
        assert!(msg.contains("build metadata"), "{msg}");
    }
    // A pre-release is a different version.
    let r = hub.upload("m", "1.0.0-rc.1", model_bytes(V1), "").await;
    assert_eq!(r.status(), 201);
    let list: Value = hub.get("/api/v1/models/m/versions", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 2, "{list}");
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file and dir under `dir`, with its mode.
fn modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    let mut out = vec![(".".to_owned(), mode(dir))];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let kind = std::fs::symlink_metadata(&p).unwrap().file_type();
            if kind.is_dir() {
                pending.push(p.clone());
            }
            if kind.is_dir() || kind.is_file() {
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), mode(&p)));
            }
        }
    }
    out
}

fn assert_private(dir: &std::path::Path) {
    for (path, m) in modes(dir) {
        let kind_dir = dir.join(&path).is_dir();
        let want = if kind_dir { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{path} is {m:o}, not {want:o}");
    }
}

#[tokio::test]
async fn data_files_are_private_and_tightened_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut hub = TestHub::start_in(&dir, None).await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    if sentinel_testkit::backend::name() == "sqlite" {
        assert!(dir.join("hub.db-wal").exists(), "the WAL is there to check");
    }
    assert_private(&dir);
    hub.stop().await;

    // A data dir an older release wrote: 0644 files in 0755 dirs.
    for (path, _) in modes(&dir) {
        let p = dir.join(&path);
        let m = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    // Except the keys, which the hub refuses when others can read them: the
    // signing keys in the data dir, or the key-encryption key that seals them
    // in a database.
    for (path, _) in modes(&dir) {
        let p = dir.join(&path);
        if p.extension().is_some_and(|x| x == "pk8") || path == sentinel_testkit::backend::KEK_FILE {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let hub = TestHub::start_in(&dir, None).await;
    assert_private(&dir);
    assert_eq!(hub.get("/api/v1/models/m/versions/1.0.0", &hub.admin).await.status(), 200);
}

#[tokio::test]
async fn a_deploy_needs_an_explicit_target() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    for body in [
        json!({"version": "1.0.0"}),
        json!({"version": "1.0.0", "target": ""}),
        json!({"version": "1.0.0", "target": " , ,"}),
    ] {
        let msg = expect_error(hub.post_json("/api/v1/models/m/deploy", &hub.admin, body.clone()).await, 422).await;
        assert!(msg.contains("`*` for every device"), "{body}: {msg}");
    }
    let list: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 0, "nothing was deployed");
    // `*` is every device, listed as the empty selector.
    let r = hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "*"})).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["target"], "");

    // The CLI says so before asking, and passes an empty one on to be refused.
    let run = sentinel(&hub, &hub.admin, &["model", "deploy", "m", "1.0.0"]).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("--target '*'"), "{}", run.stderr);
    let run = sentinel(&hub, &hub.admin, &["model", "deploy", "m", "1.0.0", "--target", ""]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("`*` for every device"), "{}", run.stderr);
}

#[tokio::test]
async fn policy_durations_and_counts_are_bounded() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    for (policy, field) in [
        (json!({"bake_seconds": u64::MAX}), "policy.bake_seconds"),
        (json!({"bake_seconds": 604_801}), "policy.bake_seconds"),
        (json!({"min_samples": 0}), "policy.min_samples"),
        (json!({"standby_bake_seconds": u64::MAX}), "policy.standby_bake_seconds"),
        (json!({"min_accuracy_samples": 0}), "policy.min_accuracy_samples"),
        (json!({"max_restarts": u32::MAX}), "policy.max_restarts"),
        (json!({"latency_slo_ms": 1e300}), "policy.latency_slo_ms"),
    ] {
        let body = json!({"version": "1.0.0", "target": "*", "policy": policy});
        let msg = expect_error(hub.post_json("/api/v1/models/m/deploy", &hub.admin, body).await, 422).await;
        assert!(msg.starts_with(field), "{policy}: {msg}");
    }
    let body = json!({"version": "1.0.0", "target": "*", "halt_count": u32::MAX});
    let msg = expect_error(hub.post_json("/api/v1/models/m/deploy", &hub.admin, body).await, 422).await;
    assert!(msg.starts_with("halt_count"), "{msg}");
    let body = json!({"version": "1.0.0", "target": "*", "policy": {"bake_seconds": 604_800, "min_samples": 1}});
    assert_eq!(hub.post_json("/api/v1/models/m/deploy", &hub.admin, body).await.status(), 201);
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let hub = TestHub::start().await;
    let viewer = hub.token("viewer").await;
    let r = hub
        .client
        .get(format!("{}/api/v1/whoami", hub.url))
        .header("authorization", format!("Bearer {viewer}"))
        .header("authorization", format!("Bearer {}", hub.admin))
        .send()
        .await
        .unwrap();
    let msg = expect_error(r, 400).await;
    assert!(msg.contains("2 Authorization headers"), "{msg}");
}

#[tokio::test]
async fn the_role_check_comes_before_the_body_is_read() {
    let hub = TestHub::start().await;
    let viewer = hub.token("viewer").await;
    for (path, body, content_type) in [
        ("/api/v1/models", "{not json", "application/json"),
        ("/api/v1/models", "{\"name\": 7}", "application/json"),
        ("/api/v1/models", "name=m", "text/plain"),
        ("/api/v1/models/m/deploy", "[", "application/json"),
        ("/api/v1/tokens", "{}", "application/json"),
        ("/api/v1/devices", "", "application/json"),
    ] {
        let r = hub
            .req(Method::POST, path, Some(&viewer))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        expect_error(r, 403).await;
    }
    let r = hub.req(Method::PUT, "/api/v1/models/m", Some(&viewer)).body("[null, null]").send().await.unwrap();
    expect_error(r, 403).await;
    // Query strings too.
    let r = hub.req(Method::POST, "/api/v1/models/m/versions?colour=red", Some(&viewer)).send().await.unwrap();
    expect_error(r, 403).await;
    expect_error(hub.get("/api/v1/audit?limit=x", &viewer).await, 403).await;
    expect_error(hub.req(Method::DELETE, "/api/v1/models/m?force=maybe", Some(&viewer)).send().await.unwrap(), 403)
        .await;
}

#[tokio::test]
async fn deleting_a_device_closes_its_stream_at_once() {
    // Heartbeats an hour apart: a stream that outlives its device would
    // stay open past every deadline below.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = sentinel_hub::HubConfig::new(tmp.path());
    config.heartbeat = Duration::from_secs(3600);
    let hub = TestHub::start_with(config).await;
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "edge-1"})).await;
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let channel = tonic::transport::Endpoint::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
    let mut client = AgentSyncClient::new(channel);
    let mut req = tonic::Request::new(Hello { device_id: "edge-1".into(), ..Hello::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap();
    assert!(first.is_some(), "the current state comes first");

    let r = hub.req(Method::DELETE, "/api/v1/devices/edge-1", Some(&hub.admin)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let next = tokio::time::timeout(WAIT, stream.message()).await.expect("the stream was not closed");
    let status = next.expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    // And the token no longer reports.
    let mut req = tonic::Request::new(AgentReport { device_id: "edge-1".into(), ..AgentReport::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert!(client.report(req).await.is_err());
}

/// Starts the real `sentinel-hub` binary; returns it and its REST URL.
async fn spawn_hub(dir: &std::path::Path) -> (tokio::process::Child, String, String) {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut rest, mut grpc) = (None, None);
    while rest.is_none() || grpc.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("the hub exited");
        if let Some(u) = line.strip_prefix("sentinel-hub listening on ") {
            rest = Some(u.split_whitespace().next().unwrap().to_owned());
        }
        if let Some(u) = line.strip_prefix("sentinel-hub grpc on ") {
            grpc = Some(u.split_whitespace().next().unwrap().to_owned());
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, rest.unwrap(), grpc.unwrap())
}

#[tokio::test]
async fn a_clean_sigterm_logs_no_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, url, grpc) = spawn_hub(tmp.path()).await;
    let admin = std::fs::read_to_string(tmp.path().join("admin.token")).unwrap().trim().to_owned();
    sentinel_hub::install_crypto_provider();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/api/v1/devices"))
        .bearer_auth(&admin)
        .json(&json!({"id": "edge-1"}))
        .send()
        .await
        .unwrap();
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    // A device connected at shutdown: its stream ends with the hub.
    let channel = tonic::transport::Endpoint::from_shared(grpc).unwrap().connect().await.unwrap();
    let mut client = AgentSyncClient::new(channel);
    let mut req = tonic::Request::new(Hello { device_id: "edge-1".into(), ..Hello::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap();

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let mut stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log).await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("INFO"), "the log was captured: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "a clean shutdown logged errors:\n{}", errors.join("\n"));
}

/// The parameters of `method path` in the OpenAPI document, by name: where
/// each is (`in`) and its schema.
fn params(spec: &Value, path: &str, method: &str) -> std::collections::BTreeMap<String, (String, Value)> {
    spec["paths"][path][method]["parameters"]
        .as_array()
        .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), (p["in"].as_str().unwrap().to_owned(), p["schema"].clone())))
        .collect()
}

#[tokio::test]
async fn the_openapi_document_says_what_the_api_does() {
    let hub = TestHub::start().await;
    let spec: Value = hub.get("/api/v1/openapi.json", &hub.admin).await.json().await.unwrap();

    // Query parameters are query parameters, with their bounds.
    let upload = params(&spec, "/api/v1/models/{name}/versions", "post");
    for q in ["version", "stage", "accuracy", "metric", "dataset", "hardware", "tags"] {
        assert_eq!(upload[q].0, "query", "upload's {q}");
    }
    assert_eq!(upload["name"].0, "path");
    assert_eq!(upload["accuracy"].1["maximum"], 1.0);
    assert_eq!(params(&spec, "/api/v1/models/{name}", "delete")["force"].0, "query");
    for (path, method) in [
        ("/api/v1/models", "get"),
        ("/api/v1/models/{name}/versions", "get"),
        ("/api/v1/deployments", "get"),
        ("/api/v1/devices", "get"),
        ("/api/v1/tokens", "get"),
        ("/api/v1/audit", "get"),
    ] {
        let p = params(&spec, path, method);
        assert_eq!(p["limit"].0, "query", "{path}");
        assert_eq!(
            (p["limit"].1["minimum"].as_u64(), p["limit"].1["maximum"].as_u64()),
            (Some(1), Some(500)),
            "{path}"
        );
        assert_eq!(p["offset"].1["maximum"].as_u64(), Some(2_147_483_647), "{path}");
    }
    // What a handler can answer is documented.
    let deploy = &spec["paths"]["/api/v1/models/{name}/deploy"]["post"]["responses"];
    for status in ["400", "401", "403", "404", "415", "422"] {
        assert!(deploy[status].is_object(), "deploy's {status}");
    }
    assert!(spec["paths"]["/api/v1/models/{name}/versions"]["post"]["responses"]["413"].is_object());
    assert_eq!(spec["components"]["schemas"]["DeviceOut"]["properties"]["models"]["type"], "array");

    // The bounds hold: above the declared maximum is refused.
    for path in
        ["/api/v1/models?offset=2147483648", "/api/v1/deployments?offset=2147483648", "/api/v1/models?limit=501"]
    {
        expect_error(hub.get(path, &hub.admin).await, 400).await;
    }
    // A body must be an object, not a sequence serde would read as one.
    hub.register("m").await;
    let r = hub
        .req(Method::PUT, "/api/v1/models/m", Some(&hub.admin))
        .header("content-type", "application/json")
        .body("[null, null]")
        .send()
        .await
        .unwrap();
    expect_error(r, 422).await;

    // Every list that grows pages, the versions list too.
    hub.push_v1("m", "1.0.0").await;
    hub.push_v1("m", "1.1.0").await;
    let page: Value = hub.get("/api/v1/models/m/versions?limit=1&offset=1", &hub.admin).await.json().await.unwrap();
    assert_eq!((page["total"].as_u64(), page["limit"].as_u64(), page["offset"].as_u64()), (Some(2), Some(1), Some(1)));
    assert_eq!(page["versions"][0]["version"], "1.0.0", "newest first, so the second is 1.0.0");
    hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "d1"})).await;
    let devices: Value = hub.get("/api/v1/devices?limit=1", &hub.admin).await.json().await.unwrap();
    assert_eq!(devices["total"], 1);
    assert_eq!(devices["devices"][0]["models"], json!([]), "an array before the first report, as declared");
}

/// Issue 17: the audit log filters by actor, action and outcome; failed rows
/// say why; a change-feed ticket (every page load asks for one) is not logged.
#[tokio::test]
async fn the_audit_log_filters_and_failed_rows_carry_their_reason() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    let publisher = hub.token("publisher").await;
    // A refusal by the role check, and one by the hub's own rules.
    let r = hub.post_json("/api/v1/devices", &publisher, json!({"id": "d"})).await;
    assert_eq!(r.status(), 403);
    let r = hub.post_json("/api/v1/models", &hub.admin, json!({"name": "m"})).await;
    assert_eq!(r.status(), 409);
    for _ in 0..3 {
        let r = hub.req(Method::POST, "/api/v1/events/ticket", Some(&hub.admin)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    let entries = |q: &'static str| {
        let hub = &hub;
        async move { hub.admin_get(&format!("/api/v1/audit{q}")).await["entries"].as_array().unwrap().clone() }
    };
    let all = entries("").await;
    assert!(all.iter().all(|e| e["action"] != "POST /api/v1/events/ticket"), "{all:?}");
    let failed = entries("?outcome=failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["detail"], "conflict: model m already exists");
    let denied = entries("?outcome=denied").await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["actor"], "test-publisher");
    assert!(denied[0]["detail"].as_str().unwrap().starts_with("forbidden: "), "{denied:?}");
    let by_actor = entries("?actor=test-publisher").await;
    assert_eq!(by_actor.len(), 1);
    let by_action = entries("?action=POST%20/api/v1/models&outcome=ok").await;
    assert_eq!(by_action.len(), 1, "{by_action:?}");
    assert_eq!(by_action[0]["detail"], "registered model m");
    let r = hub.get("/api/v1/audit?outcome=maybe", &hub.admin).await;
    assert_eq!(r.status(), 400);
}
