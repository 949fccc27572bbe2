//! The web interface end to end: a real hub, a real agent process, and
//! headless Chromium driven by `tests/web/e2e.mjs` (playwright-core).
//!
//! Before the browser starts, the agent serves `digits-live` 1.0.0 to real
//! clients sending the true label back for every answer; 2.0.0 (the
//! degraded model) is deployed as a 50% canary beside it, and the operator
//! rolls it back on the device once both versions have reported a few
//! buckets. So the deployment and device pages plot real series of two
//! versions, and the device's events carry a real rollback's evidence.
//!
//! Needs Debian's `chromium` and `npm ci` in `tests/web`; `.ci/web-test-deps`
//! installs both. Without them the test fails and says so: a browser test
//! that quietly skips proves nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use sentinel_testkit::digits::{LoadSpec, failures};
use sentinel_testkit::wait::{WAIT, eventually};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const DEVICE: &str = "web-e2e-1";
/// An enrolled device with no agent: its page has no telemetry to show.
const IDLE: &str = "web-e2e-idle";
/// The model with real traffic, whose telemetry the pages plot (the browser
/// uploads and deploys `digits` itself).
const LIVE: &str = "digits-live";
/// Fine telemetry buckets of this hub: a point every 5 s, so a short test
/// has several per version (the agent reports every 2 s).
const FINE_BUCKET: Duration = Duration::from_secs(5);
/// Longest wait for the canary to be installed and both versions to report
/// enough buckets: an install, validation and a few buckets, with margin.
const SERIES_WAIT: Duration = Duration::from_secs(180);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("web")
}

/// An agent process, killed when dropped, and where its inference API listens.
struct AgentProcess {
    child: Child,
    config: PathBuf,
    inference: SocketAddr,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The inference address in the agent's start line ("... running; inference
/// API on http://ADDR; ...").
fn inference_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("inference API on http://").nth(1)?;
    rest.split(';').next()?.trim().parse().ok()
}

async fn start_agent(hub: &TestHub, dir: &Path) -> AgentProcess {
    let (agent, worker) = agent_binaries();
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": DEVICE, "labels": {"site": "web"}})).await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let key = hub.public_key().await;
    std::fs::write(dir.join("device.token"), token).unwrap();
    let config = format!(
        "device_id = \"{DEVICE}\"\nhub_url = \"{}\"\ngrpc_url = \"{}\"\ntoken_file = \"device.token\"\n\
         pinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n\
         [sync]\nbackoff_initial_ms = 50\nbackoff_cap_secs = 1\nheartbeat_secs = 2\n",
        hub.url, hub.grpc_url
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(agent)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("SENTINEL_AGENT_WORKER_BIN", worker)
        .env("SENTINEL_AGENT_LISTEN", "127.0.0.1:0")
        .env("SENTINEL_AGENT_METRICS_LISTEN", "127.0.0.1:0")
        // The control socket in the state dir, where `rollback` below finds it.
        .env_remove("RUNTIME_DIRECTORY")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The start line says where the inference API listens; the thread keeps
    // reading so the agent never blocks on a full pipe.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = inference_addr(&line) {
                let _ = tx.send(addr);
            }
        }
    });
    let inference = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the agent never printed its inference address");
    AgentProcess { child, config: config_path, inference }
}

async fn wait_connected(hub: &TestHub) {
    hub.wait_device(DEVICE, |v| v["connected"] == true).await;
}

/// Points of `LIVE` `version` in a telemetry answer that counted requests and feedback.
fn busy_points<'a>(t: &'a Value, version: &str) -> Vec<&'a Value> {
    t["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["model"] == LIVE && s["version"] == version)
        .flat_map(|s| s["points"].as_array().unwrap())
        .filter(|p| p["requests"].as_u64() > Some(0) && p["feedback"]["total"].as_u64() > Some(0))
        .collect()
}

/// A telemetry answer once `enough` holds for it.
async fn telemetry_when(hub: &TestHub, path: &str, what: &str, enough: impl Fn(&Value) -> bool) -> Value {
    eventually(what, SERIES_WAIT, async || Some(hub.admin_get(path).await).filter(|t| enough(t))).await
}

/// Serves `LIVE` 1.0.0 to clients with feedback for a bucket, runs 2.0.0 as
/// a canary beside it until both have reported at least three buckets, then rolls
/// 2.0.0 back on the device as its operator would, and lets 1.0.0 report
/// a bucket after that. Returns the canary's deployment id.
async fn two_versions_of_real_traffic(hub: &TestHub, agent: &AgentProcess) -> i64 {
    hub.push(LIVE, "1.0.0", V1, "").await;
    hub.deploy(LIVE, "1.0.0", "*").await;
    hub.wait_device(DEVICE, |v| {
        v["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == LIVE && m["version"] == "1.0.0" && m["state"] == "serving"))
    })
    .await;
    let load = LoadSpec { model: LIVE.into(), ..LoadSpec::digits(agent.inference, 2) }.with_feedback().start();
    // The old version alone for a bucket at least: a second one has begun.
    let device = format!("/api/v1/devices/{DEVICE}/telemetry");
    telemetry_when(hub, &device, "1.0.0 reporting two buckets of requests and feedback", |t| {
        busy_points(t, "1.0.0").len() >= 2
    })
    .await;

    // No declared accuracy and a latency ratio the canary cannot reach:
    // the canary bakes for an hour unless someone stops it.
    hub.push(LIVE, "2.0.0", V2, "").await;
    let policy = json!({"phases": ["canary:50", "full"], "bake_seconds": 3600, "max_latency_ratio": 1000.0});
    let canary = hub
        .admin_post(
            &format!("/api/v1/models/{LIVE}/deploy"),
            json!({"version": "2.0.0", "target": "*", "policy": policy}),
        )
        .await;
    let id = canary["id"].as_i64().unwrap();
    let path = format!("/api/v1/deployments/{id}/telemetry");
    telemetry_when(hub, &path, "both versions reporting three buckets of requests and feedback", |t| {
        busy_points(t, "1.0.0").len() >= 3 && busy_points(t, "2.0.0").len() >= 3
    })
    .await;

    let (agent_bin, _) = agent_binaries();
    let config = agent.config.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(agent_bin)
            .args(["rollback", LIVE, "--config"])
            .arg(config)
            .env_remove("RUNTIME_DIRECTORY")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sentinel-agent rollback: {said}{}", String::from_utf8_lossy(&out.stderr));
    let rolled_back = |v: &Value| {
        v["events"].as_array().unwrap().iter().find(|e| e["kind"] == "rolled_back" && e["version"] == "2.0.0").cloned()
    };
    let dev = hub.wait_device(DEVICE, |v| rolled_back(v).is_some_and(|e| e["evidence"].is_object())).await;
    let event = rolled_back(&dev).unwrap();
    assert_eq!(event["evidence"]["kind"], "operator", "{event}");
    let since = event["at_ms"].as_i64().unwrap();
    telemetry_when(hub, &path, "1.0.0 reporting a bucket after the rollback", |t| {
        busy_points(t, "1.0.0").iter().any(|p| p["t_ms"].as_i64() > Some(since))
    })
    .await;
    let seen = load.stop().await;
    assert!(failures(&seen).is_empty(), "requests failed: {:?}", failures(&seen));
    assert!(seen.iter().any(|s| s.served_by("2.0.0")), "the canary answered clients");
    id
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
    config.telemetry.fine_bucket = FINE_BUCKET;
    let hub = TestHub::start_with(config).await;
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&hub, agent_dir.path()).await;
    wait_connected(&hub).await;
    let canary = two_versions_of_real_traffic(&hub, &agent).await;
    hub.enroll(IDLE, &[("site", "idle")]).await;
    let viewer = hub.token("viewer").await;

    let shots = profile_dir().parent().unwrap().join("web-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("deployment.png");
    let _ = std::fs::remove_file(&shot);
    let (url, admin) = (hub.url.clone(), hub.admin.clone());
    let dir = web_dir();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(dir)
            .arg("e2e.mjs")
            .args([&url, &admin, &viewer])
            .arg(&shot)
            .args([&canary.to_string(), DEVICE, LIVE, IDLE])
            .output()
    })
    .await
    .unwrap()
    .expect("running node (is Node.js installed?)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "the browser test failed ({}):\n{stdout}\n{stderr}", out.status);
    for name in ["deployment.png", "deployment-telemetry.png", "device-telemetry.png"] {
        assert!(shots.join(name).is_file(), "no screenshot {name} in {}", shots.display());
    }

    // What the browser saw is what the hub has.
    let deployments: Value = hub.get("/api/v1/deployments?model=digits", &hub.admin).await.json().await.unwrap();
    let d = &deployments["deployments"][0];
    assert_eq!((d["model"].as_str(), d["created_by"].as_str()), (Some("digits"), Some("admin")));
    let shown: Value = hub.get(&format!("/api/v1/deployments/{}", d["id"]), &hub.admin).await.json().await.unwrap();
    assert_eq!(shown["status"]["counts"]["serving"], 1, "{shown}");
    assert_eq!(deployments["total"], 1, "the viewer's attempt deployed nothing");
}
