//! Shared helpers for Sentinel's benchmark commands.
//!
//! Each benchmark prints its figures as ratios against a baseline measured in
//! the same run, because the machines we measure on are shared and noisy.
//!
//! # Layout
//! - [`HubProcess`]: a real `sentinel-hub` process on a free loopback port.
//! - [`rss_kib`], [`median`], [`time`]: measuring.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (benches run from anywhere).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built binary of this workspace, from the same profile as this benchmark.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow::anyhow!("no exe dir"))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it first (cargo build --release --workspace)",
        path.display()
    );
    Ok(path)
}

/// A running `sentinel-hub`.
#[derive(Debug)]
pub struct HubProcess {
    pub child: Child,
    pub url: String,
    pub grpc_url: Option<String>,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass,
    // which lives on this stack frame for the duration of the calls.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

impl HubProcess {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts a hub with a gRPC listener too, and extra flags.
    pub fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_niced(extra, 0)
    }

    /// Like [`HubProcess::start_with`], the hub running at nice value
    /// `nice` (through coreutils' `nice`): a benchmark of the device side
    /// can keep the hub, which runs on another machine in a fleet, from
    /// taking the device's CPU time.
    pub fn start_niced(extra: &[&str], nice: i32) -> anyhow::Result<Self> {
        Self::start_full(extra, &[], nice)
    }

    /// Like [`HubProcess::start_with`], with `env` set for the hub (the AWS
    /// variables of an S3 blob store, say).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_full(extra, env, 0)
    }

    fn start_full(extra: &[&str], env: &[(&str, &str)], nice: i32) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new("nice")
            .arg("-n")
            .arg(nice.to_string())
            .arg(workspace_bin("sentinel-hub")?)
            .args(["--data-dir", &dir.path().display().to_string(), "--listen", "127.0.0.1:0"])
            // Not the default fixed metrics port: benchmarks may run beside a real hub.
            .args(["--metrics-listen", "127.0.0.1:0"])
            // The hub checks uploads with the worker of the same build.
            .arg("--worker")
            .arg(workspace_bin("sentinel-worker")?)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut url = String::new();
        let mut grpc_url = None;
        let wants_grpc = extra.contains(&"--grpc-listen");
        loop {
            let line = lines.next().ok_or_else(|| anyhow::anyhow!("hub exited before listening"))??;
            if let Some(u) = line.strip_prefix("sentinel-hub listening on ") {
                url = u.to_owned();
            }
            if let Some(u) = line.strip_prefix("sentinel-hub grpc on ") {
                grpc_url = Some(u.to_owned());
            }
            if !url.is_empty() && (grpc_url.is_some() || !wants_grpc) {
                break;
            }
        }
        // Empty for a replica on a database another replica made the token in.
        let admin =
            std::fs::read_to_string(dir.path().join("admin.token")).map(|t| t.trim().to_owned()).unwrap_or_default();
        Ok(Self { child, url, grpc_url, admin, dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enrols device `bench-1` (with `labels`) on `hub` and writes its token
/// and an `agent.toml` into a new temp dir: pinned to the hub's key, the
/// state in `state/`, the workspace's worker, and `serving` (extra lines of
/// the `[serving]` table). Returns the dir; the config is `agent.toml` in it.
pub async fn bench_agent_dir(
    hub: &HubProcess,
    http: &reqwest::Client,
    labels: serde_json::Value,
    serving: &str,
) -> anyhow::Result<tempfile::TempDir> {
    use anyhow::Context as _;
    let enrolled: serde_json::Value = http
        .post(format!("{}/api/v1/devices", hub.url))
        .bearer_auth(&hub.admin)
        .json(&serde_json::json!({"id": "bench-1", "labels": labels}))
        .send()
        .await?
        .json()
        .await?;
    let keys: serde_json::Value = http.get(format!("{}/api/v1/keys", hub.url)).send().await?.json().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("token"), enrolled["token"].as_str().context("token")?)?;
    let config = format!(
        "device_id = \"bench-1\"\nhub_url = \"{}\"\ngrpc_url = \"{}\"\ntoken_file = \"token\"\npinned_keys = [\"{}\"]\n\
         state_dir = \"state\"\n[serving]\nworker_bin = \"{}\"\n{serving}\n",
        hub.url,
        hub.grpc_url.as_deref().context("the hub has no gRPC listener")?,
        keys["keys"][0]["public_key"].as_str().context("key")?,
        workspace_bin("sentinel-worker")?.display()
    );
    std::fs::write(dir.path().join("agent.toml"), config)?;
    Ok(dir)
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// Median of a sample.
pub fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs.get(xs.len() / 2).copied().unwrap_or_default()
}

/// Percentile (0..=100) of a sample.
pub fn percentile(mut xs: Vec<Duration>, p: f64) -> Duration {
    xs.sort();
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((xs.len() - 1) as f64 * p / 100.0).round() as usize;
    xs[idx.min(xs.len() - 1)]
}

/// Runs `f` and returns how long it took.
pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// MB/s for `bytes` moved in `d`.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}
