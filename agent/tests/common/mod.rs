//! A real hub (REST + gRPC on 127.0.0.1:0) and real agents, in one process.
#![allow(dead_code, clippy::unwrap_used)]

pub use sentinel_testkit::dtype_cases;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Client;
use sentinel_agent::{AgentConfig, AgentHandle, AgentView};
use sentinel_hub::{Hub, HubConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on every wait: generous, so only a real hang trips it.
pub const WAIT: Duration = Duration::from_secs(60);

/// Asks `check` again and again until it returns `Some`, for at most
/// `deadline`, then panics naming `what`. The one poll loop of the agent's
/// tests, for what has no event or `watch` to wait on (counters, files, the
/// hub's API); prefer [`AgentHandle::wait_for`] where there is one.
pub async fn eventually<T>(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "{what}: not within {deadline:?}");
        // The polling period: how often to look, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn model_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(rel)
}

pub fn model_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(model_path(rel)).unwrap()
}

/// A raw little-endian f32 data file under `models/`.
pub fn read_f32(rel: &str) -> Vec<f32> {
    model_bytes(rel).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A raw little-endian i64 data file under `models/`.
pub fn read_i64(rel: &str) -> Vec<i64> {
    model_bytes(rel).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The 64 pixels of test digit `i` as a [1, 64] request input.
pub fn digit(x: &[f32], i: usize) -> sentinel_worker_protocol::frame::Tensor {
    sentinel_worker_protocol::frame::Tensor::from_f32(vec![1, 64], &x[i * 64..(i + 1) * 64])
}

/// The `sentinel-worker` binary of this build (another package: built on
/// demand by [`sentinel_testkit::bins`]), with its test probes.
pub fn worker_bin() -> PathBuf {
    sentinel_testkit::bins::worker()
}

pub const V1: &str = "digits/digits_mlp_v1.onnx";
pub const V2: &str = "digits/digits_mlp_v2_degraded.onnx";
pub const V3: &str = "digits/digits_mlp_v3_slow.onnx";

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub struct TestHub {
    pub url: String,
    pub grpc_url: String,
    pub admin: String,
    pub dir: PathBuf,
    pub client: Client,
    pub rest_addr: std::net::SocketAddr,
    pub grpc_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestHub {
    /// A hub on free ports (or the given ones, for a restart).
    pub async fn start(dir: &Path, tweak: impl FnOnce(&mut HubConfig)) -> Self {
        sentinel_hub::install_crypto_provider();
        let mut config = HubConfig::new(dir);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
        config.heartbeat = Duration::from_secs(2);
        // The hub checks every upload with the worker devices use.
        config.inspect.worker = Some(worker_bin());
        tweak(&mut config);
        let hub = Hub::open(config).unwrap();
        let listeners = hub.bind().await.unwrap();
        let rest_addr = listeners.rest_addr().unwrap();
        let grpc_addr = listeners.grpc_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            hub.serve(listeners, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let admin = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_owned();
        Self {
            url: format!("http://{rest_addr}"),
            grpc_url: format!("http://{grpc_addr}"),
            admin,
            dir: dir.to_path_buf(),
            client: Client::new(),
            rest_addr,
            grpc_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the hub and waits until its listeners are closed.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            // Streams end when the server shuts down; bound the wait anyway.
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let r =
            self.client.post(format!("{}{path}", self.url)).bearer_auth(&self.admin).json(&body).send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {path}: {status} {v}");
        v
    }

    pub async fn get(&self, path: &str) -> Value {
        let r = self.client.get(format!("{}{path}", self.url)).bearer_auth(&self.admin).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn push(&self, name: &str, version: &str, rel: &str, query: &str) {
        let _ = self
            .client
            .post(format!("{}/api/v1/models", self.url))
            .bearer_auth(&self.admin)
            .json(&json!({"name": name}))
            .send()
            .await;
        let r = self
            .client
            .post(format!("{}/api/v1/models/{name}/versions?version={version}{query}", self.url))
            .bearer_auth(&self.admin)
            .body(model_bytes(rel))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    pub async fn deploy(&self, name: &str, version: &str, target: &str) -> Value {
        self.post(&format!("/api/v1/models/{name}/deploy"), json!({"version": version, "target": target})).await
    }

    /// Enrols a device and returns its token.
    pub async fn enroll(&self, id: &str, labels: &[(&str, &str)]) -> String {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let v = self.post("/api/v1/devices", json!({"id": id, "labels": labels})).await;
        v["token"].as_str().unwrap().to_owned()
    }

    pub async fn public_key(&self) -> String {
        let v: Value = self.client.get(format!("{}/api/v1/keys", self.url)).send().await.unwrap().json().await.unwrap();
        v["keys"][0]["public_key"].as_str().unwrap().to_owned()
    }

    /// Path of a blob in the hub's store.
    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(sha)
    }

    /// Polls the hub's device API until `pred` holds (the hub only shows
    /// what devices report, so there is nothing to subscribe to).
    pub async fn wait_device(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let what = format!("device {id} reaching the expected state");
        eventually(&what, WAIT, async || Some(self.get(&format!("/api/v1/devices/{id}")).await).filter(|v| pred(v)))
            .await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Environment overrides every test agent gets: the worker binary cargo
/// built, and the inference API and metrics on ephemeral loopback ports.
pub fn test_env() -> BTreeMap<String, String> {
    [
        ("SENTINEL_AGENT_WORKER_BIN".to_owned(), worker_bin().display().to_string()),
        ("SENTINEL_AGENT_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("SENTINEL_AGENT_METRICS_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]
    .into()
}

/// Writes an agent config for `device` into `dir` and parses it.
pub fn agent_config(dir: &Path, hub: &TestHub, device: &str, token: &str, key: &str, extra: &str) -> AgentConfig {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("device.token"), token).unwrap();
    let text = format!(
        "device_id = \"{device}\"\nhub_url = \"{}\"\ngrpc_url = \"{}\"\ntoken_file = \"device.token\"\n\
         pinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n{extra}\n[sync]\nbackoff_initial_ms = 50\nbackoff_cap_secs = 1\nheartbeat_secs = 2\n",
        hub.url, hub.grpc_url
    );
    std::fs::write(dir.join("agent.toml"), &text).unwrap();
    AgentConfig::load(&dir.join("agent.toml"), &test_env()).unwrap()
}

/// Starts an agent for a freshly enrolled device.
pub async fn start_agent(dir: &Path, hub: &TestHub, device: &str, labels: &[(&str, &str)]) -> AgentHandle {
    start_agent_with(dir, hub, device, labels, "").await
}

/// Starts an agent with `extra` TOML (top-level keys or whole tables).
pub async fn start_agent_with(
    dir: &Path,
    hub: &TestHub,
    device: &str,
    labels: &[(&str, &str)],
    extra: &str,
) -> AgentHandle {
    let token = hub.enroll(device, labels).await;
    let key = hub.public_key().await;
    sentinel_agent::start(agent_config(dir, hub, device, &token, &key, extra)).await.unwrap()
}

/// A hub with digits 1.0.0 deployed to `site=a`, and an agent on `edge-1`
/// (site=a) serving it, with no rollout policy set.
pub async fn serving_v1(tmp: &Path) -> (TestHub, AgentHandle) {
    let hub = TestHub::start(&tmp.join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let agent = start_agent(&tmp.join("agent"), &hub, "edge-1", &[("site", "a")]).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    (hub, agent)
}

/// Deploys digits 1.0.0, then 2.0.0 (both pushed already) to `site=a`, and
/// waits until the agent serves 2.0.0 with 1.0.0 warm as its standby.
pub async fn serve_2_over_warm_1(hub: &TestHub, agent: &AgentHandle) {
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    hub.deploy("digits", "2.0.0", "site=a").await;
    agent
        .wait_for(WAIT, |v| {
            v.models
                .iter()
                .any(|m| m.active_version.as_deref() == Some("2.0.0") && m.standby_version.as_deref() == Some("1.0.0"))
        })
        .await
        .unwrap();
}

/// The pid of the worker behind `model`'s active slot.
pub fn active_pid(agent: &AgentHandle, model: &str) -> u32 {
    let active = agent.shared.serving.model(model).unwrap().route().active.clone().unwrap();
    match active.worker.state() {
        sentinel_agent::supervisor::SlotState::Running { pid, .. } => pid,
        other => panic!("{other:?}"),
    }
}

/// The active version of `model` in a view.
pub fn active(v: &AgentView, model: &str) -> Option<String> {
    v.models.iter().find(|m| m.name == model).and_then(|m| m.active_version.clone())
}

pub fn status(v: &AgentView, model: &str) -> Option<(String, String, String)> {
    v.models.iter().find(|m| m.name == model).map(|m| (m.status.clone(), m.status_version.clone(), m.detail.clone()))
}

/// A TCP proxy in front of the hub's REST port that can cut the first
/// artifact download after a number of response bytes, and counts what it
/// forwards. It stands for a flaky link: a boundary we do not own.
pub struct CuttingProxy {
    pub addr: std::net::SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<ProxiedRequest>>>,
}

#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub head: String,
    pub bytes_down: u64,
    pub cut: bool,
}

impl CuttingProxy {
    /// Binds now; forwards to `upstream` once it is known.
    pub async fn bind(cut_after: u64, upstream: tokio::sync::oneshot::Receiver<std::net::SocketAddr>) -> Self {
        Self::bind_mode(cut_after, false, upstream).await
    }

    /// Like [`CuttingProxy::bind`]; with `stall`, the first artifact response
    /// stops after `cut_after` bytes but the connection stays open.
    pub async fn bind_mode(
        cut_after: u64,
        stall: bool,
        upstream: tokio::sync::oneshot::Receiver<std::net::SocketAddr>,
    ) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        tokio::spawn(async move {
            let upstream = upstream.await.unwrap();
            let cut_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                let (log, cut_once) = (log2.clone(), cut_once.clone());
                tokio::spawn(async move {
                    // Read the request head, decide, forward.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let is_artifact = text.contains("/artifact");
                    let cut = is_artifact && !cut_once.swap(true, std::sync::atomic::Ordering::SeqCst);
                    // Logged up front and updated as bytes pass, so a test
                    // can read it while the connection is kept alive.
                    let idx = {
                        let mut l = log.lock().unwrap();
                        l.push(ProxiedRequest { head: text.clone(), bytes_down: 0, cut });
                        l.len() - 1
                    };
                    let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    server.write_all(&head).await.unwrap();
                    let (mut sr, mut sw) = server.into_split();
                    let (mut cr, mut cw) = client.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut down = 0u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = if cut { n.min(usize::try_from(cut_after - down).unwrap()) } else { n };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        down += n as u64;
                        log.lock().unwrap()[idx].bytes_down = down;
                        if cut && down >= cut_after {
                            if stall {
                                std::future::pending::<()>().await;
                            }
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Self { addr, log }
    }
}
