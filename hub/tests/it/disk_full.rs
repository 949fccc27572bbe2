//! A full disk during an upload: a clear 507, nothing half-stored, and the
//! space is given back so the next upload that fits succeeds.
//!
//! The hub's blob directory is a 4 MiB tmpfs mounted in a private user and
//! mount namespace (`unshare`), so no root is needed and the host is untouched.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn an_upload_that_fills_the_disk_is_refused_with_507_and_frees_the_space() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let blobs = data.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=4m sentinel-test {} && exec {} --data-dir {} --listen 127.0.0.1:0",
        blobs.display(),
        env!("CARGO_BIN_EXE_sentinel-hub"),
        data.display()
    );
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) is needed for this test");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the hub did not start inside the namespace").unwrap();
        if let Some(url) = line.strip_prefix("sentinel-hub listening on ") {
            break url.to_owned();
        }
    };
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_owned();
    sentinel_hub::install_crypto_provider();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{url}/api/v1/models"))
        .bearer_auth(&admin)
        .json(&json!({"name": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let upload = |version: &str, body: Vec<u8>| {
        client.post(format!("{url}/api/v1/models/m/versions?version={version}")).bearer_auth(&admin).body(body).send()
    };
    let r = upload("1.0.0", model_bytes(V3)).await.unwrap();
    assert_eq!(r.status(), 507);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("storage is full"), "{body}");

    // The 4 MiB the failed upload had filled were released: a small model fits.
    let r = upload("1.0.0", model_bytes(V1)).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = client
        .get(format!("{url}/api/v1/models/m/versions"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}
