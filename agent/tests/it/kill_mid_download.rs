//! The agent process killed mid-download: after the restart, the partial
//! file is not used; the model is fetched again whole and verified.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::{Command, Stdio};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_file_from_a_killed_agent_is_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = model_bytes(V3);
    let size = bytes.len() as u64;
    let sha = sha256_hex(&bytes);
    let (tell, upstream) = tokio::sync::oneshot::channel();
    // The first download stalls half-way, holding the connection open.
    let proxy = CuttingProxy::bind_mode(size / 2, true, upstream).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| c.public_url = Some(proxy_url)).await;
    tell.send(hub.rest_addr).unwrap();
    hub.push("slow", "1.0.0", V3, "").await;
    hub.deploy("slow", "1.0.0", "*").await;
    let token = hub.enroll("edge-1", &[]).await;
    let key = hub.public_key().await;
    let dir = tmp.path().join("a");
    let config = agent_config(&dir, &hub, "edge-1", &token, &key, "");

    let mut child = Command::new(env!("CARGO_BIN_EXE_sentinel-agent"))
        .args(["run", "--config", dir.join("agent.toml").to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = dir.join("state/models").join(format!(".partial-{sha}"));
    // Wait until the stalled download has written (almost) half the model.
    eventually("the download under way", WAIT, async || {
        (std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) >= size * 45 / 100).then_some(())
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(partial.exists(), "the kill left a partial file");
    assert!(!dir.join("state/models").join(&sha).exists(), "no model file from a partial download");

    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| active(v, "slow").as_deref() == Some("1.0.0")).await.unwrap();
    assert!(v.downloads_resumed_from.is_empty(), "the partial file was not resumed from: {v:?}");
    assert_eq!(std::fs::read(dir.join("state/models").join(&sha)).unwrap(), bytes);
    assert!(!partial.exists());
    agent.shutdown().await;
}
