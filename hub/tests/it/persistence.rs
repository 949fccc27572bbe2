//! What survives a restart, and what a crash mid-upload leaves behind.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn registry_keys_and_tokens_survive_a_restart() {
    let mut hub = TestHub::start().await;
    let dir_guard = hub.keep_dir();
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let viewer = hub.token("viewer").await;
    hub.post_json("/api/v1/models/digits/deploy", &hub.admin, json!({"version": "1.0.0", "target": "site=a"})).await;
    let keys_before: Value = hub.get("/api/v1/keys", &viewer).await.json().await.unwrap();
    let admin_file = std::fs::read_to_string(hub.dir.join("admin.token")).unwrap();
    let mode = std::fs::metadata(hub.dir.join("admin.token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    hub.stop().await;

    let dir = hub.dir.clone();
    let hub = TestHub::start_in(&dir, None).await;
    assert_eq!(std::fs::read_to_string(dir.join("admin.token")).unwrap(), admin_file, "admin token is written once");
    let v: Value = hub.get("/api/v1/models/digits/versions/1.0.0", &viewer).await.json().await.unwrap();
    assert_eq!(v["size"], 19831);
    let keys_after: Value = hub.get("/api/v1/keys", &viewer).await.json().await.unwrap();
    assert_eq!(keys_before, keys_after, "the signing key is reused");
    let d: Value = hub.get("/api/v1/deployments", &viewer).await.json().await.unwrap();
    assert_eq!(d["deployments"][0]["target"], "site=a");
    let art = hub.get("/api/v1/models/digits/versions/1.0.0/artifact", &viewer).await.bytes().await.unwrap();
    assert_eq!(art.as_ref(), model_bytes(V1).as_slice());
    drop(dir_guard);
}

/// Starts the real `sentinel-hub` binary and returns it with its base URL.
fn spawn_hub(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--worker")
        .arg(agent_binaries().1)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines.next().expect("hub exited before listening").unwrap();
        if let Some(url) = line.strip_prefix("sentinel-hub listening on ") {
            break url.to_owned();
        }
    };
    (child, url)
}

#[tokio::test]
async fn a_hub_killed_mid_upload_has_no_half_registered_version_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_hub(tmp.path());
    let admin = std::fs::read_to_string(tmp.path().join("admin.token")).unwrap().trim().to_owned();
    sentinel_hub::install_crypto_provider();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{url}/api/v1/models"))
        .bearer_auth(&admin)
        .json(&json!({"name": "slow"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Send the headers and half the body by hand, then wait until the hub
    // has created the staging file: the upload is provably under way.
    let body = model_bytes(V3);
    let addr = url.trim_start_matches("http://");
    let mut sock = TcpStream::connect(addr).unwrap();
    write!(
        sock,
        "POST /api/v1/models/slow/versions?version=1.0.0 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    sock.write_all(&body[..body.len() / 2]).unwrap();
    sock.flush().unwrap();
    let staging_dir = tmp.path().join("blobs/sha256");
    let staged = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    // Poll the file system (the hub's progress is only visible there).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while staged(&staging_dir) == 0 {
        assert!(std::time::Instant::now() < deadline, "the hub never started writing the upload");
        std::thread::yield_now();
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs.
    child.wait().unwrap();
    drop(sock);
    assert!(staged(&staging_dir) > 0, "the crash left a partial staging file behind");

    let (mut child, url) = spawn_hub(tmp.path());
    let r = client.get(format!("{url}/api/v1/models/slow/versions")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["versions"], json!([]), "no version was registered");
    assert_eq!(staged(&staging_dir), 0, "the restart swept the partial file");
    assert_eq!(std::fs::read_dir(&staging_dir).unwrap().count(), 0);
    // And the same upload now succeeds.
    let r = client
        .post(format!("{url}/api/v1/models/slow/versions?version=1.0.0"))
        .bearer_auth(&admin)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    child.kill().unwrap();
    child.wait().unwrap();
}
