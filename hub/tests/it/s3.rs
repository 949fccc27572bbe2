//! Model bytes in an S3-compatible server (s3s-fs, which checks SigV4): what
//! happens when the bucket is missing, the credentials are refused, or the
//! server goes away, and downloads by presigned URL.
//!
//! Needs the S3 rig (`SENTINEL_TEST_S3*`, `SENTINEL_TEST_S3FS_BIN`), which
//! `.ci/test` starts for its PostgreSQL and S3 half; without it each test
//! says it skipped.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::{Command, Stdio};

use common::*;
use sentinel_hub::config::BlobsUrl;
use sentinel_testkit::backend;
use sentinel_testkit::wait::{WAIT, eventually};
use serde_json::Value;

fn skipped(test: &str) {
    eprintln!("SKIPPED s3::{test}: needs the S3 rig (SENTINEL_TEST_S3 and friends; .ci/test sets them)");
}

/// `sentinel-hub` on `--blobs s3://{bucket}/x` with the rig's endpoint and
/// `secret`: its exit code and stderr.
fn hub_on_bucket(rig: &backend::S3Rig, bucket: &str, secret: &str) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", tmp.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--blobs", &format!("s3://{bucket}/x")])
        .arg("--worker")
        .arg(sentinel_testkit::bins::worker())
        .env("AWS_ENDPOINT_URL", &rig.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", &rig.key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_missing_bucket_or_refused_credentials_stop_the_hub_saying_which() {
    let Some(rig) = backend::s3() else {
        return skipped("a_missing_bucket_or_refused_credentials_stop_the_hub_saying_which");
    };
    let (code, err) = hub_on_bucket(&rig, "no-such-bucket", &rig.secret);
    assert_eq!(code, Some(71), "{err}");
    assert!(err.contains("s3://no-such-bucket/") && err.contains("does the bucket exist"), "{err}");
    let (code, err) = hub_on_bucket(&rig, &rig.bucket, "not-the-secret");
    assert_eq!(code, Some(71), "{err}");
    assert!(err.contains("access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
}

/// An s3s-fs of the test's own, on `port` (0: a free one) over `root`.
struct OwnS3 {
    child: std::process::Child,
    port: u16,
}

impl OwnS3 {
    async fn start(rig: &backend::S3Rig, root: &std::path::Path, port: u16) -> Self {
        let port = if port == 0 { sentinel_testkit::free_loopback_port() } else { port };
        let bin = std::env::var("SENTINEL_TEST_S3FS_BIN").expect("SENTINEL_TEST_S3FS_BIN comes with the rig");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", &rig.key])
            .args(["--secret-key", &rig.secret])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually("s3s-fs listening", WAIT, async || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).await;
        Self { child, port }
    }

    fn stop(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_that_goes_away_refuses_the_push_and_records_nothing() {
    let Some(rig) = backend::s3() else {
        return skipped("an_object_store_that_goes_away_refuses_the_push_and_records_nothing");
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    std::fs::create_dir_all(root.join("models")).unwrap();
    let mut s3 = OwnS3::start(&rig, &root, 0).await;
    let port = s3.port;
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| {
        c.blobs = Some(BlobsUrl::S3 { bucket: "models".into(), prefix: "hub/".into() });
        c.s3 = backend::S3Rig { endpoint: format!("http://127.0.0.1:{port}"), ..rig.clone() }.settings();
    })
    .await;
    hub.push("digits", "1.0.0", V1, "").await;

    s3.stop();
    let r = hub.upload("digits", "2.0.0", model_bytes(V2), "").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap_or_default().to_owned() + &body.to_string();
    assert!(msg.contains("s3://models/hub/sha256/") && msg.contains("nothing was stored"), "{body}");
    let versions = hub.admin_get("/api/v1/models/digits/versions").await;
    assert_eq!(versions["versions"].as_array().unwrap().len(), 1, "no version recorded: {versions}");

    // Back: the same push succeeds, and both versions download whole.
    let _s3 = OwnS3::start(&rig, &root, port).await;
    let r = hub.upload("digits", "2.0.0", model_bytes(V2), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for (v, file) in [("1.0.0", V1), ("2.0.0", V2)] {
        let r = hub.get(&format!("/api/v1/models/digits/versions/{v}/artifact"), &hub.admin).await;
        assert_eq!(r.bytes().await.unwrap().as_ref(), model_bytes(file).as_slice(), "{v}");
    }
    assert!(hub.stored_blobs().await.iter().all(|b| !b.starts_with(".upload-")), "no staging file is left");
}

#[tokio::test]
async fn downloads_can_go_straight_to_the_bucket_by_presigned_url() {
    let Some(rig) = backend::s3() else { return skipped("downloads_can_go_straight_to_the_bucket_by_presigned_url") };
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| c.artifact_redirect = true).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let path = format!("{}/api/v1/models/digits/versions/1.0.0/artifact", hub.url);
    let r = no_redirects.get(&path).bearer_auth(&hub.admin).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&rig.endpoint) && location.contains("X-Amz-Signature="), "{location}");
    // The URL alone (no token) gets the bytes, and ranges, from the bucket.
    let whole = reqwest::get(&location).await.unwrap();
    assert_eq!(whole.bytes().await.unwrap().as_ref(), model_bytes(V1).as_slice());
    let part = no_redirects.get(&location).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().as_ref(), &model_bytes(V1)[10..20]);
    // Without the hub's permission there is no URL: an unknown token gets 401.
    let r = no_redirects.get(&path).bearer_auth("nope").send().await.unwrap();
    assert_eq!(r.status(), 401);
}
