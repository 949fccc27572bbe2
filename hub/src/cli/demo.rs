//! `sentinel demo`: the whole system in one command, for real.
//!
//! It starts a `sentinel-hub` and a `sentinel-agent` as separate processes on
//! loopback, with their state in a temporary directory and the digits models
//! compiled into this binary; pushes and deploys a good version and sends it
//! traffic through the agent's KServe v2 API; then pushes a degraded version
//! with a canary policy and sends labelled traffic until the agent rolls it
//! back on its own. The hub sees one device of one roll back (more than the
//! 20% threshold), halts the deployment and restores the good version. The
//! decisions depend on sample counts, never on time, so the demo is
//! deterministic; the time limits below only turn a hang into an error.
//!
//! # Layout
//! - [`processes`]: finding or building the sibling binaries, starting and stopping them.
//! - [`traffic`]: the digits test set sent through the agent's v2 API, tallied by version.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::process::Command;

use super::CliError;
use super::args::DemoArgs;
use super::client::HubClient;

mod processes;
mod traffic;

use processes::{Binaries, Proc};
use traffic::{Agent, Traffic};

const V1_ONNX: &[u8] = include_bytes!("../../../models/digits/digits_mlp_v1.onnx");
const V2_ONNX: &[u8] = include_bytes!("../../../models/digits/digits_mlp_v2_degraded.onnx");

const DEVICE: &str = "demo-edge-1";
/// Requests sent to 1.0.0 before the bad release.
const WARMUP_REQUESTS: usize = 200;
/// Requests sent after the rollback, to show where traffic went.
const AFTER_REQUESTS: usize = 50;
/// Far more labelled requests than the policy needs (60 per slot at 50%).
const MAX_CANARY_REQUESTS: usize = 5_000;
/// Bound on every wait: only a hang trips it.
const WAIT: Duration = Duration::from_secs(30);

/// A failure of the demo. The children are stopped and the temporary
/// directory, with their logs, is kept.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot find {name} at {path}: build it (`cargo build --release --bins`) or pass --{flag}")]
    MissingBinary { name: &'static str, flag: &'static str, path: String },
    #[error("building the hub and agent binaries with cargo failed ({0})")]
    Build(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} did not start: {reason}")]
    Startup { name: &'static str, reason: String },
    #[error("{step}")]
    Hub {
        step: String,
        #[source]
        source: CliError,
    },
    #[error("{step}: the agent's inference API failed")]
    Agent {
        step: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

fn hub_step(step: impl Into<String>) -> impl FnOnce(CliError) -> DemoError {
    let step = step.into();
    move |source| DemoError::Hub { step, source }
}

/// Runs the demo and prints what happens; see the module docs.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let bins = Binaries::resolve(&args).await?;
    // Timed after any build, which is not the demo's.
    let started = Instant::now();
    let dir =
        tempfile::Builder::new().prefix("sentinel-demo-").tempdir().map_err(io("creating a temporary directory"))?;
    println!("sentinel demo: a real hub and agent on loopback; state and logs in {}", dir.path().display());
    let mut procs = Vec::new();
    let result = demo(&bins, dir.path(), &mut procs).await;
    // The agent first, so it does not spend its last moments reconnecting.
    let mut stopped = Vec::new();
    while let Some(p) = procs.pop() {
        stopped.push((p.name, p.stop().await));
    }
    if let Err(e) = result {
        let kept = dir.keep();
        eprintln!("sentinel demo: failed; the logs are kept in {}", kept.display());
        return Err(e);
    }
    let summary: Vec<String> = stopped
        .iter()
        .map(|(name, s)| match s {
            Ok(status) => format!("{name} {status}"),
            Err(e) => format!("{name}: {e}"),
        })
        .collect();
    println!("    {}", summary.join(", "));
    if let Some((name, _)) = stopped.iter().find(|(_, s)| !s.as_ref().is_ok_and(ExitStatus::success)) {
        return Err(DemoError::Unexpected(format!("{name} did not exit cleanly on SIGTERM")));
    }
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn demo(bins: &Binaries, dir: &Path, procs: &mut Vec<Proc>) -> Result<(), DemoError> {
    println!("==> starting sentinel-hub (REST and gRPC on 127.0.0.1, embedded SQLite)");
    let data = dir.join("hub");
    let mut cmd = Command::new(&bins.hub);
    cmd.arg("--data-dir").arg(&data).args(["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]);
    cmd.args(["--metrics-listen", "127.0.0.1:0", "--heartbeat-secs", "2"]);
    // The hub checks each upload in a confined sentinel-worker: the same one.
    cmd.arg("--worker").arg(&bins.worker);
    let (hub, lines) = Proc::spawn(
        "sentinel-hub",
        cmd,
        &dir.join("hub.log"),
        &["sentinel-hub listening on ", "sentinel-hub grpc on "],
    )
    .await?;
    procs.push(hub);
    let rest_url = lines[0].trim_start_matches("sentinel-hub listening on ").to_owned();
    let grpc_url = lines[1].trim_start_matches("sentinel-hub grpc on ").to_owned();
    // A fresh hub writes its first admin token into its data dir.
    let token_file = data.join(crate::config::ADMIN_TOKEN_FILE);
    let admin = std::fs::read_to_string(&token_file).map_err(io(format!("reading {}", token_file.display())))?;
    let client = HubClient::new(&rest_url, Some(admin.trim().to_owned())).map_err(hub_step("connecting"))?;
    println!("    REST {rest_url}, gRPC {grpc_url}; admin token from {}", token_file.display());

    println!("==> enrolling {DEVICE} and starting sentinel-agent");
    let enrolled = client
        .send_json(Method::POST, "/api/v1/devices", &json!({"id": DEVICE, "labels": {"site": "demo"}}))
        .await
        .map_err(hub_step("enrolling the device"))?;
    let keys = client.get("/api/v1/keys").await.map_err(hub_step("reading the hub's signing key"))?;
    let key = keys["keys"][0]["public_key"].as_str().unwrap_or_default();
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).map_err(io("creating the agent's directory"))?;
    std::fs::write(agent_dir.join("device.token"), enrolled["token"].as_str().unwrap_or_default())
        .map_err(io("writing the device token"))?;
    let config = agent_dir.join("agent.toml");
    std::fs::write(&config, agent_toml(&rest_url, &grpc_url, key, &bins.worker))
        .map_err(io("writing the agent's config"))?;
    let mut cmd = Command::new(&bins.agent);
    cmd.arg("run").arg("--config").arg(&config).env("SENTINEL_AGENT_WORKER_BIN", &bins.worker);
    let (agent, lines) = Proc::spawn("sentinel-agent", cmd, &dir.join("agent.log"), &["sentinel-agent "]).await?;
    procs.push(agent);
    println!("    {}", lines[0]);
    let api = lines[0]
        .split("inference API on ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .ok_or_else(|| DemoError::Unexpected(format!("the agent serves no inference API: {}", lines[0])))?;
    let agent = Agent::new(api);

    println!("==> pushing digits 1.0.0 (declared top1 accuracy 0.9694) and deploying it to site=demo");
    push(&client, dir, "1.0.0", V1_ONNX, 0.9694).await?;
    deploy(&client, json!({"version": "1.0.0", "target": "site=demo"})).await?;
    let t0 = Instant::now();
    wait_device(&client, "1.0.0", "serving").await?;
    println!("    {DEVICE} verified, loaded and serves 1.0.0 ({:.1} s)", t0.elapsed().as_secs_f64());
    let mut warmup = Traffic::default();
    for i in 0..WARMUP_REQUESTS {
        agent.request(i, false, &mut warmup).await?;
    }
    println!("    {}", warmup.line("1.0.0"));
    if warmup.failed > 0 {
        return Err(DemoError::Unexpected(format!("{} requests to 1.0.0 failed", warmup.failed)));
    }

    println!("==> pushing the degraded digits 2.0.0 and deploying it with a rollout policy:");
    println!("    canary 50% then full; after 60 labelled samples per slot, roll back if accuracy drops > 10 points");
    push(&client, dir, "2.0.0", V2_ONNX, 0.6028).await?;
    let policy = json!({"phases": ["canary:50", "full"], "min_samples": 60, "min_accuracy_samples": 60,
                        "max_accuracy_drop": 0.1, "max_latency_ratio": 50});
    let body = json!({"version": "2.0.0", "target": "site=demo", "policy": policy, "halt_fraction": 0.2});
    let deployment = deploy(&client, body).await?;
    wait_device(&client, "2.0.0", "canary").await?;
    println!("    {DEVICE} runs 2.0.0 as a canary beside 1.0.0; sending labelled traffic with feedback");
    let mut canary = Traffic::default();
    let mut reason = None;
    for i in 0..MAX_CANARY_REQUESTS {
        agent.request(WARMUP_REQUESTS + i, true, &mut canary).await?;
        if i % 20 == 19 {
            reason = rollback_reason(&client).await?;
            if reason.is_some() {
                break;
            }
        }
    }
    let reason = reason.ok_or_else(|| {
        DemoError::Unexpected(format!("the agent did not roll 2.0.0 back after {MAX_CANARY_REQUESTS} requests"))
    })?;
    println!("    the agent rolled 2.0.0 back on its own after {} requests: {reason}", canary.total());
    for version in ["2.0.0", "1.0.0"] {
        println!("    {}", canary.line(version));
    }
    println!("    failed requests during the canary and rollback: {}", canary.failed);

    let restored = wait_halted(&client, deployment).await?;
    let mut after = Traffic::default();
    for i in 0..AFTER_REQUESTS {
        agent.request(i, false, &mut after).await?;
    }
    let on_v1 = after.served("1.0.0");
    println!("    traffic is back on 1.0.0: {on_v1} of {AFTER_REQUESTS} requests answered by 1.0.0");
    if on_v1 != AFTER_REQUESTS {
        return Err(DemoError::Unexpected(format!("only {on_v1} of {AFTER_REQUESTS} requests reached 1.0.0")));
    }

    agent_status(&client, &bins.agent, &config).await?;
    println!("==> fleet status (sentinel deployments list --model digits; sentinel deployments show ID)");
    fleet_status(&client, deployment, &restored).await?;
    println!("==> what the hub kept of the device's telemetry (GET /api/v1/deployments/{deployment}/telemetry)");
    kept_telemetry(&client, deployment, canary.served("2.0.0")).await?;
    println!("==> stopping the agent and the hub (SIGTERM)");
    Ok(())
}

fn agent_toml(rest_url: &str, grpc_url: &str, key: &str, worker: &Path) -> String {
    format!(
        "device_id = \"{DEVICE}\"\nhub_url = \"{rest_url}\"\ngrpc_url = \"{grpc_url}\"\n\
         token_file = \"device.token\"\npinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n\n\
         [labels]\nsite = \"demo\"\n\n\
         [serving]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nworker_bin = {worker:?}\n\n\
         [sync]\nbackoff_initial_ms = 100\nbackoff_cap_secs = 2\nheartbeat_secs = 2\n",
        worker = worker.display().to_string()
    )
}

async fn push(client: &HubClient, dir: &Path, version: &str, onnx: &[u8], accuracy: f64) -> Result<(), DemoError> {
    match client.send_json(Method::POST, "/api/v1/models", &json!({"name": "digits"})).await {
        Ok(_) | Err(CliError::Hub { status: 409, .. }) => {}
        Err(e) => return Err(hub_step("registering the model name")(e)),
    }
    let file = dir.join(format!("digits-{version}.onnx"));
    std::fs::write(&file, onnx).map_err(io(format!("writing {}", file.display())))?;
    let path = format!(
        "/api/v1/models/digits/versions?version={version}&stage=production&accuracy={accuracy}\
         &metric=top1&dataset=digits_test"
    );
    let v = client.upload_file(&path, &file, false).await.map_err(hub_step(format!("pushing digits {version}")))?;
    let sha = v["sha256"].as_str().unwrap_or_default();
    println!("    pushed digits {version}: sha256 {}..., signed by key {}", &sha[..sha.len().min(12)], s(&v["key_id"]));
    Ok(())
}

/// Creates a deployment and returns its id.
async fn deploy(client: &HubClient, body: Value) -> Result<i64, DemoError> {
    let v = client
        .send_json(Method::POST, "/api/v1/models/digits/deploy", &body)
        .await
        .map_err(hub_step(format!("deploying {}", body["version"])))?;
    v["id"].as_i64().ok_or_else(|| DemoError::Unexpected(format!("the deployment has no id: {v}")))
}

async fn device(client: &HubClient) -> Result<Value, DemoError> {
    client.get(&format!("/api/v1/devices/{DEVICE}")).await.map_err(hub_step("reading the device"))
}

/// Waits until the device reports `version` of digits in `state`, as the hub shows it.
async fn wait_device(client: &HubClient, version: &str, state: &str) -> Result<(), DemoError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let d = device(client).await?;
        let digits = d["models"].as_array().and_then(|ms| ms.iter().find(|m| m["name"] == "digits")).cloned();
        if let Some(m) = &digits {
            if m["version"] == version && m["state"] == state {
                return Ok(());
            }
            if m["version"] == version
                && ["failed", "refused", "rolled_back"].contains(&m["state"].as_str().unwrap_or(""))
            {
                return Err(DemoError::Unexpected(format!("{DEVICE} reports digits {version} {}", m)));
            }
        }
        if Instant::now() > deadline {
            let last = digits.map(|m| m.to_string()).unwrap_or_else(|| "nothing".into());
            return Err(DemoError::Unexpected(format!(
                "{DEVICE} did not report digits {version} {state} within {WAIT:?} (last: {last})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The reason of the device's rollback of 2.0.0, once the hub has heard of it.
async fn rollback_reason(client: &HubClient) -> Result<Option<String>, DemoError> {
    let d = device(client).await?;
    let event = d["events"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["kind"] == "rolled_back" && e["version"] == "2.0.0"))
        .cloned();
    Ok(event.map(|e| e["reason"].as_str().unwrap_or_default().to_owned()))
}

/// Waits until the hub has the device's windows of the canary (at least
/// `served` requests on 2.0.0), then prints each version's totals, as
/// `sentinel deployments show` does.
async fn kept_telemetry(client: &HubClient, id: i64, served: usize) -> Result<(), DemoError> {
    let deadline = Instant::now() + WAIT;
    let path = format!("/api/v1/deployments/{id}/telemetry");
    loop {
        let v = client.get(&path).await.map_err(hub_step("reading the deployment's telemetry"))?;
        let on_new =
            super::deploy::telemetry_totals(&v).iter().find(|t| t.version == "2.0.0").map_or(0, |t| t.requests);
        if on_new >= served as u64 {
            for line in super::deploy::telemetry_text(&v).lines() {
                println!("    {line}");
            }
            println!("    (the web UI plots these per bucket on the deployment's and the device's pages)");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Unexpected(format!("the hub did not keep the canary's {served} requests: {v}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the hub halts the deployment (one device of one rolled
/// back), then until the deployment that restores the previous version
/// has every targeted device serving; returns that deployment.
async fn wait_halted(client: &HubClient, id: i64) -> Result<Value, DemoError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = client.get(&format!("/api/v1/deployments/{id}")).await.map_err(hub_step("reading the deployment"))?;
        if v["state"] == "halted" {
            println!("    the hub halted deployment {id}: {}", s(&v["halt_reason"]));
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Unexpected(format!("the hub did not halt deployment {id}: {v}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list = client.get("/api/v1/deployments?model=digits").await.map_err(hub_step("listing deployments"))?;
    let restore = list["deployments"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["replaces"] == id))
        .and_then(|d| d["id"].as_i64())
        .ok_or_else(|| DemoError::Unexpected(format!("the hub halted deployment {id} but restored nothing")))?;
    loop {
        let v = client
            .get(&format!("/api/v1/deployments/{restore}"))
            .await
            .map_err(hub_step("reading the restoring deployment"))?;
        let status = &v["status"];
        if status["targeted"].as_u64().is_some_and(|n| n > 0) && status["counts"]["serving"] == status["targeted"] {
            println!("    and restored {} with deployment {restore}; {DEVICE} serves it", s(&v["version"]));
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Unexpected(format!("the fleet did not return to the previous version: {v}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The model's deployments, the halted one's policy and reason, and where
/// the fleet stands on the restoring one.
async fn fleet_status(client: &HubClient, halted: i64, restore: &Value) -> Result<(), DemoError> {
    let list = client.get("/api/v1/deployments?model=digits").await.map_err(hub_step("listing deployments"))?;
    let rows = list["deployments"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| vec![s(&d["id"]), s(&d["version"]), s(&d["kind"]), s(&d["state"]), s(&d["replaces"])])
                .collect()
        })
        .unwrap_or_default();
    let table = super::commands::table(&["ID", "VERSION", "KIND", "STATE", "REPLACES"], rows);
    let shown =
        client.get(&format!("/api/v1/deployments/{halted}")).await.map_err(hub_step("reading the deployment"))?;
    // Its per-device rows follow each device's latest report, which is
    // about the restoring deployment by now, so they are shown for that one.
    let halted_text = super::deploy::deployment_text(&shown);
    let lines = table
        .to_string()
        .lines()
        .map(str::to_owned)
        .chain([format!("deployment {halted} ({}):", s(&shown["version"]))])
        .chain(halted_text.lines().take_while(|l| !l.starts_with("targeted")).map(|l| format!("  {l}")))
        .chain([format!(
            "deployment {} ({}, {} of {halted}):",
            s(&restore["id"]),
            s(&restore["version"]),
            s(&restore["kind"])
        )])
        .chain(
            super::deploy::deployment_text(restore)
                .lines()
                .skip_while(|l| !l.starts_with("targeted"))
                .map(|l| format!("  {l}")),
        )
        .collect::<Vec<_>>();
    for line in lines {
        println!("    {line}");
    }
    Ok(())
}

fn s(v: &Value) -> String {
    super::commands::s(v)
}

/// Prints `sentinel-agent status`, or the device's models as the hub sees
/// them if this agent has no such command.
async fn agent_status(client: &HubClient, agent_bin: &Path, config: &Path) -> Result<(), DemoError> {
    let out = Command::new(agent_bin).arg("status").arg("--config").arg(config).output().await;
    match out {
        Ok(o) if o.status.success() => {
            println!("==> agent status (sentinel-agent status --config {})", config.display());
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                println!("    {line}");
            }
        }
        _ => {
            println!("==> {DEVICE}'s models as the hub sees them (this sentinel-agent has no `status` command)");
            let d = device(client).await?;
            let rows = d["models"]
                .as_array()
                .map(|ms| {
                    ms.iter().map(|m| vec![s(&m["name"]), s(&m["version"]), s(&m["state"]), s(&m["detail"])]).collect()
                })
                .unwrap_or_default();
            for line in
                super::commands::wrapped_table(&["MODEL", "VERSION", "STATE", "DETAIL"], rows).to_string().lines()
            {
                println!("    {line}");
            }
        }
    }
    Ok(())
}
