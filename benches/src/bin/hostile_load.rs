//! Hostile-load benchmark (issue 11's attack pass, measured): memory and
//! outcome of a real `sentinel-agent` process and a real `sentinel-hub`
//! process under the loads that used to take them down.
//!
//! - **Burst**: 32 concurrent ~5.8 MB JSON bodies (21,500 digits each) to the
//!   agent at its defaults. Figures: requests served / refused (503), the
//!   agent's peak RSS (VmHWM) against its RSS before plus the bodies the
//!   in-flight budget admits at once (the issue's bound: ~3x), and its RSS
//!   once the burst is over against its RSS before.
//! - **Long ids**: 200 requests with a 4 MB `id`; the agent's RSS after
//!   against before.
//! - **Silent connections**: 20,000 held against the hub's REST and gRPC
//!   listeners by `python3` children; `/healthz` answered or not, and the
//!   hub's RSS with them held against its RSS before.
//!
//! `cargo build --release --workspace && target/release/hostile_load`

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sentinel_benches::{HubProcess, bench_agent_dir, raise_fd_limit, rss_kib, workspace_bin, workspace_root};
use sentinel_testkit::digits::TEST_X;
use sentinel_testkit::models::read_f32;
use serde_json::json;

const BURST: usize = 32;
const ROWS: usize = 21_500;

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Agent {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_agent(hub: &HubProcess, http: &reqwest::Client) -> anyhow::Result<Agent> {
    let port = free_port()?;
    let serving = format!("listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"\"\nrequest_timeout_ms = 120000");
    let dir = bench_agent_dir(hub, http, json!({"site": "bench"}), &serving).await?;
    let child = Command::new(workspace_bin("sentinel-agent")?)
        .args(["run", "--config"])
        .arg(dir.path().join("agent.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Agent { child, base: format!("http://127.0.0.1:{port}"), _dir: dir })
}

fn digits_body(rows: usize) -> anyhow::Result<Vec<u8>> {
    let x = read_f32(TEST_X);
    let data: Vec<f32> = x.iter().copied().cycle().take(rows * 64).collect();
    Ok(json!({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": data}]})
        .to_string()
        .into_bytes())
}

async fn burst_and_ids(hub: &HubProcess, http: &reqwest::Client) -> anyhow::Result<()> {
    let model = std::fs::read(workspace_root().join("models/digits/digits_mlp_v1.onnx"))?;
    http.post(format!("{}/api/v1/models", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"name": "digits"}))
        .send()
        .await?;
    let r = http
        .post(format!("{}/api/v1/models/digits/versions?version=1.0.0", hub.url))
        .bearer_auth(&hub.admin)
        .body(model)
        .send()
        .await?;
    ensure!(r.status() == 201, "push: {}", r.text().await?);
    let agent = start_agent(hub, http).await?;
    let r = http
        .post(format!("{}/api/v1/models/digits/deploy", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"version": "1.0.0", "target": "site=bench"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "deploy: {}", r.text().await?);
    let ready = Instant::now();
    loop {
        let r = http.get(format!("{}/v2/models/digits/ready", agent.base)).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        ensure!(ready.elapsed() < Duration::from_secs(60), "the agent never served digits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = agent.child.id();
    let small = digits_body(1)?;
    http.post(format!("{}/v2/models/digits/infer", agent.base)).body(small.clone()).send().await?;
    let idle = rss_kib(pid)?;
    let hwm_before = status_kib(pid, "VmHWM:")?;

    let body = digits_body(ROWS)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let (http, url, body) = (http.clone(), format!("{}/v2/models/digits/infer", agent.base), body.clone());
        tasks.spawn(async move { http.post(url).body(body).send().await.map(|r| r.status().as_u16()) });
    }
    let (mut served, mut refused, mut other) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(200) => served += 1,
            Ok(503) => refused += 1,
            _ => other += 1,
        }
    }
    let burst_time = started.elapsed();
    let peak = status_kib(pid, "VmHWM:")?;
    // The heap is trimmed on a blocking thread once the budget drains.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    // Admitted at once at the defaults: 4 x 16 MiB of bodies.
    let budget = 4 * (16u64 << 20);
    let admitted = (budget / body.len() as u64).min(BURST as u64);
    let in_flight_kib = admitted * body.len() as u64 / 1024;
    println!("burst: {BURST} x {:.1} MB JSON bodies in {:.1} s", body.len() as f64 / 1e6, burst_time.as_secs_f64());
    println!("  served {served}, refused 503 {refused}, other {other}");
    println!(
        "  agent RSS: idle {:.1} MiB (peak so far {:.1}); peak in burst {:.1} MiB = {:.2}x (idle + {admitted} bodies in flight, {:.1} MiB)",
        mib(idle),
        mib(hwm_before),
        mib(peak),
        peak as f64 / (idle + in_flight_kib) as f64,
        mib(in_flight_kib)
    );
    println!("  after the burst {:.1} MiB = {:.2}x idle", mib(after), after as f64 / idle as f64);

    let before_ids = rss_kib(pid)?;
    let long_id = "i".repeat(4 << 20);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let body = json!({"id": long_id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
        let r = http.post(format!("{}/v2/models/digits/infer", agent.base)).json(&body).send().await?;
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_ids = rss_kib(pid)?;
    println!(
        "long ids: 200 requests with a 4 MB id -> {statuses:?}; agent RSS {:.1} -> {:.1} MiB = {:.2}x",
        mib(before_ids),
        mib(after_ids),
        after_ids as f64 / before_ids as f64
    );
    let huge = br#"{"inputs":[{"name":"input","shape":[1000000000,64],"datatype":"FP32","data":[1]}]}"#;
    let r = http.post(format!("{}/v2/models/digits/infer", agent.base)).body(huge.to_vec()).send().await?;
    println!("huge shape [1e9, 64]: {} (agent alive: {})", r.status(), rss_kib(pid).is_ok());
    Ok(())
}

const HOLDER: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port)) for _ in range(n)]
print("held", len(held), flush=True)
sys.stdin.read()
"#;

fn hold(url: &str, n: usize) -> anyhow::Result<Child> {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    let mut child = Command::new("python3")
        .args(["-c", HOLDER, &addr.ip().to_string(), &addr.port().to_string(), &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    ensure!(line.trim() == format!("held {n}"), "holder: {line:?}");
    Ok(child)
}

async fn silent_connections(hub: &HubProcess) -> anyhow::Result<()> {
    let pid = hub.pid();
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let mut holders = vec![hold(&hub.url, 10_000)?];
    holders.push(hold(hub.grpc_url.as_deref().context("grpc")?, 10_000)?);
    let held_in = started.elapsed();
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let t = Instant::now();
    let health = fresh.get(format!("{}/healthz", hub.url)).send().await.map(|r| r.status().as_u16());
    let health_time = t.elapsed();
    let during = rss_kib(pid)?;
    println!("silent connections: 20,000 held (10,000 REST + 10,000 gRPC) in {:.1} s", held_in.as_secs_f64());
    println!("  /healthz during the flood: {health:?} in {:.1} ms", health_time.as_secs_f64() * 1e3);
    println!("  hub RSS {:.1} -> {:.1} MiB = {:.2}x", mib(before), mib(during), during as f64 / before as f64);
    for mut h in holders {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    sentinel_hub::install_crypto_provider();
    raise_fd_limit();
    let hub = HubProcess::start_with(&["--grpc-listen", "127.0.0.1:0"])?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    burst_and_ids(&hub, &http).await?;
    silent_connections(&hub).await?;
    Ok(())
}
