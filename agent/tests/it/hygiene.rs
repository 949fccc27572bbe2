//! The agent's state at rest and at stop: private files (0600 in 0700
//! dirs, tightened at start), no worker dirs left from a crash, and a
//! SIGTERM that logs no error.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every regular file and dir under `dir` (the control socket aside) with its mode.
fn modes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = vec![(dir.to_path_buf(), mode(dir))];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let kind = std::fs::symlink_metadata(&p).unwrap().file_type();
            if kind.is_dir() {
                pending.push(p.clone());
            }
            if kind.is_dir() || kind.is_file() {
                out.push((p.clone(), mode(&p)));
            }
        }
    }
    out
}

fn assert_private(dir: &std::path::Path) {
    for (p, m) in modes(dir) {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{} is {m:o}, not {want:o}", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_private_and_crash_leftovers_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let dir = tmp.path().join("a");
    let token = hub.enroll("edge-1", &[]).await;
    let key = hub.public_key().await;
    let agent = sentinel_agent::start(agent_config(&dir, &hub, "edge-1", &token, &key, "")).await.unwrap();
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let state = dir.join("state");
    assert!(state.join("agent.db-wal").exists() && state.join("models").read_dir().unwrap().next().is_some());
    assert_private(&state);
    agent.shutdown().await;

    // What an older release and a crash leave: readable files, a worker
    // dir of a process that is gone.
    for (p, _) in modes(&state) {
        let m = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let stale = state.join("workers/worker-999999999-3");
    std::fs::create_dir_all(stale.join("tmp")).unwrap();
    std::fs::write(stale.join("tmp/scratch"), b"left by a crash").unwrap();

    let agent = sentinel_agent::start(agent_config(&dir, &hub, "edge-1", &token, &key, "")).await.unwrap();
    assert!(!stale.exists(), "the stale worker dir was removed at start");
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    assert_private(&state);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_stops_the_agent_without_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let token = hub.enroll("edge-1", &[]).await;
    let key = hub.public_key().await;
    let dir = tmp.path().join("a");
    agent_config(&dir, &hub, "edge-1", &token, &key, "");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel-agent"))
        .args(["run", "--config", dir.join("agent.toml").to_str().unwrap()])
        .envs(test_env())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Serving, connected, and reporting: every task the stop must end.
    hub.wait_device("edge-1", |v| v["connected"] == true && v["models"][0]["state"] == "serving").await;

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log).await.unwrap();
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("INFO"), "the log was captured: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "a clean stop logged errors:\n{}", errors.join("\n"));
}
