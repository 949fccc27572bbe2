//! A real hub (REST + gRPC on 127.0.0.1:0) and real agents, in one process.
#![allow(dead_code, clippy::unwrap_used)]

pub use sentinel_testkit::digits::{LoadSpec, Seen, digit_request, failures};
pub use sentinel_testkit::dtype_cases;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sentinel_agent::{AgentConfig, AgentHandle, AgentView};

pub use sentinel_testkit::hub::TestHub;
pub use sentinel_testkit::models::{V1, V2, V3, digit, model_bytes, model_path, read_f32, read_i64};
pub use sentinel_testkit::wait::{WAIT, eventually, within};

/// The `sentinel-worker` binary of this build (another package: built on
/// demand by [`sentinel_testkit::bins`]), with its test probes.
pub fn worker_bin() -> PathBuf {
    sentinel_testkit::bins::worker()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
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
    let hub = TestHub::start_at(&tmp.join("hub"), |_| {}).await;
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

/// The pid of the worker behind a loaded slot, while it runs.
pub fn worker_pid(l: &sentinel_agent::serving::Loaded) -> Option<u32> {
    match l.worker.state() {
        sentinel_agent::supervisor::SlotState::Running { pid, .. } => Some(pid),
        _ => None,
    }
}

/// The pid of each worker of a loaded slot's pool (`None` while one restarts).
pub async fn pool_pids(l: &sentinel_agent::serving::Loaded) -> Vec<Option<u32>> {
    l.worker
        .workers()
        .await
        .into_iter()
        .map(|w| match w.state {
            sentinel_agent::supervisor::SlotState::Running { pid, .. } => Some(pid),
            _ => None,
        })
        .collect()
}

/// The pid of the worker behind `model`'s active slot, while it runs.
pub fn active_pid(agent: &AgentHandle, model: &str) -> Option<u32> {
    worker_pid(agent.route(model)?.active.as_ref()?)
}

/// The active version of `model` in a view.
pub fn active(v: &AgentView, model: &str) -> Option<String> {
    v.models.iter().find(|m| m.name == model).and_then(|m| m.active_version.clone())
}

pub fn status(v: &AgentView, model: &str) -> Option<(String, String, String)> {
    v.models
        .iter()
        .find(|m| m.name == model)
        .map(|m| (m.status.as_str().to_owned(), m.status_version.clone(), m.detail.clone()))
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
