//! The web interface end to end: a real hub, a real agent process, and
//! headless Chromium driven by `tests/web/e2e.mjs` (playwright-core).
//!
//! Needs Debian's `chromium` and `npm ci` in `tests/web`; `.ci/web-test-deps`
//! installs both. Without them the test fails and says so: a browser test
//! that quietly skips proves nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const DEVICE: &str = "web-e2e-1";

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("web")
}

/// An agent process, killed when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_agent(hub: &TestHub, dir: &Path) -> AgentProcess {
    let (agent, worker) = agent_binaries();
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": DEVICE, "labels": {"site": "web"}})).await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let keys: Value = hub.client.get(format!("{}/api/v1/keys", hub.url)).send().await.unwrap().json().await.unwrap();
    let key = keys["keys"][0]["public_key"].as_str().unwrap();
    std::fs::write(dir.join("device.token"), token).unwrap();
    let config = format!(
        "device_id = \"{DEVICE}\"\nhub_url = \"{}\"\ngrpc_url = \"{}\"\ntoken_file = \"device.token\"\n\
         pinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n\
         [sync]\nbackoff_initial_ms = 50\nbackoff_cap_secs = 1\nheartbeat_secs = 2\n",
        hub.url, hub.grpc_url
    );
    std::fs::write(dir.join("agent.toml"), config).unwrap();
    let child = Command::new(agent)
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .env("SENTINEL_AGENT_WORKER_BIN", worker)
        .env("SENTINEL_AGENT_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    AgentProcess(child)
}

async fn wait_connected(hub: &TestHub) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = hub.get(&format!("/api/v1/devices/{DEVICE}"), &hub.admin).await;
        let v: Value = r.json().await.unwrap();
        if v["connected"] == true {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the agent never connected to the hub: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_upload_deploy_and_watch_it_serve_in_chromium() {
    let deps = ".ci/web-test-deps installs them";
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing; run .ci/web-test-deps ({deps})");
    assert!(
        web_dir().join("node_modules/playwright-core").is_dir(),
        "hub/tests/web/node_modules/playwright-core is missing; run .ci/web-test-deps"
    );

    let data = tempfile::tempdir().unwrap();
    let mut config = sentinel_hub::HubConfig::new(data.path());
    // As in the agent's own tests: both sides notice a lost stream within seconds.
    config.heartbeat = Duration::from_secs(2);
    let hub = TestHub::start_with(config).await;
    let agent_dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&hub, agent_dir.path()).await;
    wait_connected(&hub).await;
    let viewer = hub.token("viewer").await;

    let shots = profile_dir().parent().unwrap().join("web-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("deployment.png");
    let _ = std::fs::remove_file(&shot);
    let (url, admin) = (hub.url.clone(), hub.admin.clone());
    let dir = web_dir();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node").current_dir(dir).arg("e2e.mjs").args([&url, &admin, &viewer]).arg(&shot).output()
    })
    .await
    .unwrap()
    .expect("running node (is Node.js installed?)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "the browser test failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(shots.join("deployment.png").is_file(), "no screenshot at {}", shots.display());

    // What the browser saw is what the hub has.
    let deployments: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    let d = &deployments["deployments"][0];
    assert_eq!((d["model"].as_str(), d["created_by"].as_str()), (Some("digits"), Some("admin")));
    let shown: Value = hub.get(&format!("/api/v1/deployments/{}", d["id"]), &hub.admin).await.json().await.unwrap();
    assert_eq!(shown["status"]["counts"]["serving"], 1, "{shown}");
    assert_eq!(deployments["total"], 1, "the viewer's attempt deployed nothing");
}
