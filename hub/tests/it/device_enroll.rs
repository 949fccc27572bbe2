//! `sentinel device enroll --agent-config FILE`: the config it writes runs
//! a real `sentinel-agent` as it is; everything it refuses, it refuses
//! before enrolling; a write that fails after enrolling says so and keeps
//! the token.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;

use crate::common::*;
use sentinel_testkit::wait::WAIT;
use serde_json::Value;

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}

/// Whether the hub has enrolled `id`.
async fn enrolled(hub: &TestHub, id: &str) -> bool {
    let status = hub.get(&format!("/api/v1/devices/{id}"), &hub.admin).await.status();
    assert!(status == 200 || status == 404, "{status}");
    status == 200
}

/// `sentinel device enroll edge-2 --agent-config CONFIG EXTRA...`.
async fn enroll(hub: &TestHub, config: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["device", "enroll", "edge-2", "--agent-config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    sentinel(hub, &hub.admin, &args).await
}

async fn agent_check(config: &Path) -> std::process::Output {
    let (agent, _) = agent_binaries();
    tokio::process::Command::new(agent).arg("check-config").arg("--config").arg(config).output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_written_config_runs_the_agent_as_it_is() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("edge-1")).unwrap();
    let config = tmp.path().join("edge-1/agent.toml");
    let r = sentinel(
        &hub,
        &hub.admin,
        &["device", "enroll", "edge-1", "--labels", "site=lab", "--agent-config", config.to_str().unwrap()]
            .into_iter()
            .chain(["--state-dir", "state"])
            .collect::<Vec<_>>(),
    )
    .await;
    ok(&r);
    assert!(!r.stdout.contains("snt_"), "the token goes into its file, not to stdout: {}", r.stdout);
    assert!(r.stdout.contains("sentinel-agent run --config"), "{}", r.stdout);

    // The token, alone in its file, readable by its owner only.
    let token_file = tmp.path().join("edge-1/agent.token");
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.starts_with("snt_") && token.ends_with('\n') && token.lines().count() == 1, "{token:?}");
    // The config names the hub as this CLI reached it (no --public-url),
    // pins its key and points at the token file.
    let text = std::fs::read_to_string(&config).unwrap();
    let toml: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(toml["device_id"].as_str(), Some("edge-1"), "{text}");
    assert_eq!(toml["hub_url"].as_str(), Some(hub.url.as_str()), "{text}");
    assert!(!toml.contains_key("grpc_url"), "the REST port serves gRPC: {text}");
    assert_eq!(toml["token_file"].as_str(), Some("agent.token"), "{text}");
    assert_eq!(toml["pinned_keys"].as_array().unwrap()[0].as_str(), Some(hub.public_key().await.as_str()));
    assert_eq!(toml["labels"]["site"].as_str(), Some("lab"), "{text}");

    let out = agent_check(&config).await;
    assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));

    // And the agent runs on it: the hub sees the device connected.
    let (agent, worker) = agent_binaries();
    let mut child = tokio::process::Command::new(agent)
        .arg("run")
        .arg("--config")
        .arg(&config)
        // Free ports instead of the defaults, which another test may hold.
        .env("SENTINEL_AGENT_LISTEN", "127.0.0.1:0")
        .env("SENTINEL_AGENT_METRICS_LISTEN", "")
        .env("SENTINEL_AGENT_WORKER_BIN", worker)
        .env_remove("RUNTIME_DIRECTORY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("agent.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let device = hub.wait_device("edge-1", |d| d["connected"] == true).await;
    assert_eq!(device["labels"]["site"], "lab", "{device}");
    assert!(tmp.path().join("edge-1/state/agent.db").is_file(), "the state dir resolves beside the config");
    // Stopped as systemd stops it.
    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(WAIT, child.wait()).await.expect("the agent did not stop on SIGTERM").unwrap();
    let log = std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    assert!(out.success(), "the agent exited {out}:\n{log}");
}

#[tokio::test]
async fn what_it_refuses_it_refuses_before_enrolling() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    let token = tmp.path().join("agent.token");
    // An existing config, or an existing token file: neither is replaced.
    std::fs::write(&config, "mine").unwrap();
    let r = enroll(&hub, &config, &[]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("agent.toml exists: pass --force to replace it"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing was enrolled"), "{}", r.stderr);
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&token, "mine").unwrap();
    let r = enroll(&hub, &config, &[]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("agent.token exists"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "mine");
    // A directory that is not there, and a URL the agent would refuse.
    let r = sentinel(
        &hub,
        &hub.admin,
        &["device", "enroll", "edge-2", "--agent-config", tmp.path().join("nope/agent.toml").to_str().unwrap()],
    )
    .await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("does not exist: create it first"), "{}", r.stderr);
    let r = enroll(&hub, &config, &["--force", "--grpc-url", "http://10.0.0.1:8081"]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("plain text off loopback"), "{}", r.stderr);
    // The config's flags need the config.
    let r = sentinel(&hub, &hub.admin, &["device", "enroll", "edge-2", "--state-dir", "s"]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(!enrolled(&hub, "edge-2").await, "every refusal came before the enrolment");
    let leftovers: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(leftovers, ["agent.token"], "no temporary file is left behind");

    // --force replaces both, with the new device's token.
    let r = enroll(&hub, &config, &["--force", "--grpc-url", &hub.grpc_url]).await;
    ok(&r);
    assert!(enrolled(&hub, "edge-2").await);
    assert!(std::fs::read_to_string(&token).unwrap().starts_with("snt_"));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("grpc_url = \"{}\"", hub.grpc_url)), "{text}");
    assert!(agent_check(&config).await.status.success());
    // A second enrolment of the id conflicts at the hub, and leaves the files as they are.
    let r = enroll(&hub, &config, &["--force"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
}

/// A hub started with `--public-url` names it in `GET /api/v1/keys`, and the
/// config takes it as `hub_url`; a plain-text one off loopback is refused.
#[tokio::test]
async fn the_hub_public_url_is_the_devices_hub_url() {
    for (public, accepted) in [("https://hub.example:8443/", true), ("http://10.1.2.3:8080", false)] {
        let data = tempfile::tempdir().unwrap();
        let mut config = sentinel_hub::HubConfig::new(data.path());
        config.public_url = Some(public.to_owned());
        let hub = TestHub::start_with(config).await;
        let keys: Value =
            hub.client.get(format!("{}/api/v1/keys", hub.url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(keys["public_url"], public.trim_end_matches('/'));
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("edge.toml");
        let r =
            sentinel(&hub, &hub.admin, &["device", "enroll", "edge-3", "--agent-config", file.to_str().unwrap()]).await;
        if accepted {
            ok(&r);
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.contains("hub_url = \"https://hub.example:8443\""), "{text}");
            assert!(tmp.path().join("edge.token").is_file());
            let out = agent_check(&file).await;
            assert!(out.status.success(), "check-config: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            assert_eq!(r.code, 64, "{}", r.stderr);
            assert!(
                r.stderr.contains("\"http://10.1.2.3:8080\" is plain text off loopback, which sentinel-agent refuses"),
                "{}",
                r.stderr
            );
            assert!(!enrolled(&hub, "edge-3").await);
        }
    }
}

/// The token file lands on a full disk (a 64 KiB tmpfs in a private user
/// and mount namespace, as in `disk_full`): the device is enrolled by then,
/// so the message says so, and the token is printed rather than lost.
#[tokio::test]
async fn a_write_that_fails_after_enrolling_says_so_and_prints_the_token() {
    let hub = TestHub::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("full");
    std::fs::create_dir(&dir).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=64k sentinel-test {dir} && {{ head -c 1048576 /dev/zero > {dir}/fill || true; }} \
         && exec {bin} device enroll edge-4 --agent-config {dir}/agent.toml",
        dir = dir.display(),
        bin = env!("CARGO_BIN_EXE_sentinel"),
    );
    let out = tokio::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env("SENTINEL_HUB", &hub.url)
        .env("SENTINEL_TOKEN", &hub.admin)
        .output()
        .await
        .expect("unshare (util-linux) is needed for this test");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(73), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("device edge-4 is enrolled, but writing its token to")
            && stderr.contains("sentinel device remove edge-4")
            && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(enrolled(&hub, "edge-4").await);
    // What was printed is the device's token: the hub knows it as a device's
    // (403 on an operator endpoint, where an unknown token gets 401).
    let token = stdout.trim();
    assert!(token.starts_with("snt_"), "{stdout}");
    let status = hub.get("/api/v1/whoami", token).await.status();
    assert_eq!(status, 403, "the printed token is edge-4's");
}
