//! The quick start's promises: a hub started with nothing but a data dir
//! and a listen address connects devices on its one URL.

use std::time::Duration;

use sentinel_proto::pb::Hello;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

/// Bound on waits for something that should happen at once: generous, so
/// only a real hang trips it.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_hub_with_default_flags_serves_grpc_on_its_rest_url_and_logs_each_listener() {
    let tmp = tempfile::tempdir().unwrap();
    // No --grpc-listen: what a user types from the README.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", tmp.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(WAIT, stdout.next_line()).await.unwrap().unwrap().expect("the hub exited");
        assert!(!line.starts_with("sentinel-hub grpc on "), "no separate gRPC listener by default: {line}");
        if let Some(u) = line.strip_prefix("sentinel-hub listening on ") {
            break u.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    // The log names the listener and that it serves gRPC.
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, stderr.next_line()).await.unwrap().unwrap().expect("the hub exited");
        if line.contains("listener") && line.contains(&addr) {
            assert!(line.contains("gRPC"), "{line}");
            assert!(line.contains("REST"), "{line}");
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    sentinel_hub::install_crypto_provider();
    let admin = std::fs::read_to_string(tmp.path().join("admin.token")).unwrap().trim().to_owned();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/api/v1/devices"))
        .bearer_auth(&admin)
        .json(&json!({"id": "edge-1", "labels": {"site": "lab"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();

    // The same URL speaks gRPC: the device's stream opens and the current
    // state comes first.
    let channel = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut client = AgentSyncClient::new(channel);
    let mut req = tonic::Request::new(Hello { device_id: "edge-1".into(), ..Hello::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = tokio::time::timeout(WAIT, client.subscribe(req)).await.unwrap().unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap();
    assert!(first.is_some(), "the current state comes first");
    // REST still answers on the same port.
    let r = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    child.kill().await.unwrap();
}
