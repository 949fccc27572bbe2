//! Local inference API benchmark: what the agent's KServe v2 HTTP API costs
//! on top of the confined worker it routes to, for digits v1.
//!
//! - per-request latency, p50 and p99, of the v2 API with JSON tensors and
//!   with the binary tensor extension, against `Worker::infer` on a worker
//!   spawned directly (the same confined process, without HTTP, JSON,
//!   routing and metrics); requests alternate so that noise hits all alike;
//! - throughput of 4 concurrent HTTP clients against 4 concurrent tasks on a
//!   direct worker (one worker serves one request at a time either way);
//! - promotions under load: 4 clients while 1.0.1 to 1.0.8 replace each
//!   other; failed requests, and p99 of the requests started during the
//!   swaps against p99 of those started between them.
//!
//! A real hub process, an in-process agent on a Tokio runtime of its own
//! (its workers are real processes).
//! `cargo build --release --workspace && target/release/inference_api`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sentinel_agent::supervisor::{Worker, WorkerSpec};
use sentinel_benches::{HubProcess, bench_agent_dir, percentile, workspace_bin, workspace_root};
use sentinel_testkit::digits::Digits;
use sentinel_worker_protocol::frame::Tensor;
use serde_json::{Value, json};

const ROUNDS: usize = 2000;
const CLIENTS: usize = 4;
const PER_CLIENT: usize = 1000;
/// Promotions in the promotion run, and the steady stretch before each.
const PROMOTIONS: usize = 8;
const STEADY: Duration = Duration::from_secs(1);

fn json_body(x: &[f32]) -> Value {
    json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]})
}

fn binary_body(x: &[f32]) -> (Vec<u8>, usize) {
    let head = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}],
                      "outputs": [{"name": "label", "parameters": {"binary_data": true}}]})
    .to_string();
    let n = head.len();
    let mut body = head.into_bytes();
    body.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    (body, n)
}

struct Setup {
    hub: HubProcess,
    agent: sentinel_agent::AgentHandle,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

async fn push(hub: &HubProcess, http: &reqwest::Client, version: &str, rel: &str) -> anyhow::Result<()> {
    let bytes = std::fs::read(workspace_root().join("models").join(rel))?;
    let r = http
        .post(format!("{}/api/v1/models/digits/versions?version={version}", hub.url))
        .bearer_auth(&hub.admin)
        .body(bytes)
        .send()
        .await?;
    ensure!(r.status() == 201, "push {version}: {}", r.text().await?);
    Ok(())
}

async fn deploy(s: &Setup, version: &str) -> anyhow::Result<()> {
    let r = s
        .http
        .post(format!("{}/api/v1/models/digits/deploy", s.hub.url))
        .bearer_auth(&s.hub.admin)
        .json(&json!({"version": version, "target": "*"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "deploy {version}: {}", r.text().await?);
    s.agent
        .wait_for(Duration::from_secs(60), |v| {
            v.models.iter().any(|m| m.name == "digits" && m.active_version.as_deref() == Some(version))
        })
        .await
        .map_err(|v| anyhow::anyhow!("{version} never became active: {v:?}"))?;
    Ok(())
}

async fn setup() -> anyhow::Result<Setup> {
    sentinel_hub::install_crypto_provider();
    // In a fleet the hub runs on another machine: here it yields the two
    // CPUs to the device side, whose latency across a promotion is measured.
    let hub = HubProcess::start_niced(&["--grpc-listen", "127.0.0.1:0"], 19)?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    http.post(format!("{}/api/v1/models", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"name": "digits"}))
        .send()
        .await?;
    push(&hub, &http, "1.0.0", "digits/digits_mlp_v1.onnx").await?;
    let dir = bench_agent_dir(&hub, &http, json!({}), "listen = \"127.0.0.1:0\"").await?;
    let cfg = sentinel_agent::AgentConfig::load(&dir.path().join("agent.toml"), &BTreeMap::new())?;
    // The agent gets a runtime of its own, as its own process would: the
    // clients' tasks must not wait behind the agent's work, nor it behind theirs.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let agent = runtime.spawn(sentinel_agent::start(cfg)).await??;
    let base = format!("http://{}", agent.inference_addr.context("no inference address")?);
    let s = Setup { hub, agent, http, base, _dir: dir, runtime };
    deploy(&s, "1.0.0").await?;
    Ok(s)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let digits = Digits::get();
    let s = setup().await?;
    let url = format!("{}/v2/models/digits/infer", s.base);
    let work = tempfile::tempdir()?;
    let spec = WorkerSpec::new(
        workspace_bin("sentinel-worker")?,
        workspace_root().join("models/digits/digits_mlp_v1.onnx"),
        vec![vec![1, 64]],
        work.path().to_path_buf(),
    );
    let worker = Arc::new(Worker::spawn(&spec).await?);

    // Warm-up, then alternating rounds.
    for x in (0..50).map(|i| digits.pixels(i)) {
        worker.infer(&[Tensor::from_f32(vec![1, 64], x)]).await?;
        s.http.post(&url).json(&json_body(x)).send().await?.bytes().await?;
    }
    let (mut direct, mut api_json, mut api_bin) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let x = digits.pixels(i);
        let t = Instant::now();
        worker.infer(&[Tensor::from_f32(vec![1, 64], x)]).await?;
        direct.push(t.elapsed());
        let t = Instant::now();
        let r = s.http.post(&url).json(&json_body(x)).send().await?;
        ensure!(r.status() == 200, "json request failed: {}", r.status());
        r.bytes().await?;
        api_json.push(t.elapsed());
        let (body, n) = binary_body(x);
        let t = Instant::now();
        let r = s.http.post(&url).header("Inference-Header-Content-Length", n).body(body).send().await?;
        ensure!(r.status() == 200, "binary request failed: {}", r.status());
        r.bytes().await?;
        api_bin.push(t.elapsed());
    }
    let row = |name: &str, xs: &[Duration], base: &[Duration]| {
        let (p50, p99) = (percentile(xs.to_vec(), 50.0), percentile(xs.to_vec(), 99.0));
        let (b50, b99) = (percentile(base.to_vec(), 50.0), percentile(base.to_vec(), 99.0));
        println!(
            "{name:<28} p50 {:>7.3} ms ({:>5.2}x)   p99 {:>7.3} ms ({:>5.2}x)",
            ms(p50),
            p50.as_secs_f64() / b50.as_secs_f64(),
            ms(p99),
            p99.as_secs_f64() / b99.as_secs_f64()
        );
    };
    println!("digits v1, {ROUNDS} alternating rounds (ratios against the direct worker)");
    row("direct worker (baseline)", &direct, &direct);
    row("v2 API, JSON tensors", &api_json, &direct);
    row("v2 API, binary tensors", &api_bin, &direct);

    // Throughput: 4 concurrent clients each way.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let worker = worker.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                worker.infer(&[Tensor::from_f32(vec![1, 64], digits.pixels(c + i))]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let direct_rps = (CLIENTS * PER_CLIENT) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, url) = (s.http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                let r = http.post(&url).json(&json_body(digits.pixels(c + i))).send().await?;
                ensure!(r.status() == 200, "{}", r.status());
                r.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let api_rps = (CLIENTS * PER_CLIENT) as f64 / t.elapsed().as_secs_f64();
    println!(
        "{CLIENTS} clients: direct worker {direct_rps:.0} req/s; v2 API (JSON) {api_rps:.0} req/s ({:.2}x)",
        api_rps / direct_rps
    );

    // Promotions under load: PROMOTIONS versions replace each other while
    // CLIENTS clients run; requests started during a swap (deploy to
    // active) are pooled against those started in the steady stretches
    // between swaps. One swap is 25-90 ms, 100-500 requests: its own p99
    // is its 2nd-3rd slowest request, so each swap's is shown too.
    for k in 1..=PROMOTIONS {
        push(&s.hub, &s.http, &format!("1.0.{k}"), "digits/digits_mlp_v1.onnx").await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    // 0 between swaps, k during the swap to 1.0.k.
    let phase = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, url, stop, phase) = (s.http.clone(), url.clone(), stop.clone(), phase.clone());
        tasks.push(tokio::spawn(async move {
            let (mut seen, mut failed) = (Vec::new(), 0usize);
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let in_phase = phase.load(Ordering::Relaxed);
                let t = Instant::now();
                let served = match http.post(&url).json(&json_body(digits.pixels(i))).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                i += CLIENTS;
                if served {
                    seen.push((in_phase, t.elapsed()));
                } else {
                    failed += 1;
                }
            }
            (seen, failed)
        }));
    }
    let mut swap_times = Vec::new();
    for k in 1..=PROMOTIONS {
        tokio::time::sleep(STEADY).await;
        phase.store(k, Ordering::Relaxed);
        let t = Instant::now();
        deploy(&s, &format!("1.0.{k}")).await?;
        swap_times.push(t.elapsed());
        phase.store(0, Ordering::Relaxed);
    }
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::Relaxed);
    let (mut seen, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (r, f) = task.await?;
        seen.extend(r);
        failed += f;
    }
    let of = |want: &dyn Fn(usize) -> bool| -> Vec<Duration> {
        seen.iter().filter(|(p, _)| want(*p)).map(|(_, took)| *took).collect()
    };
    let steady = of(&|p| p == 0);
    let during = of(&|p| p > 0);
    let (b99, d99) = (percentile(steady.clone(), 99.0), percentile(during.clone(), 99.0));
    let each: Vec<String> = (1..=PROMOTIONS)
        .map(|k| format!("{:.2}x", percentile(of(&|p| p == k), 99.0).as_secs_f64() / b99.as_secs_f64()))
        .collect();
    swap_times.sort();
    println!(
        "{PROMOTIONS} promotions under {CLIENTS} clients: {failed} failed of {} requests; deploy-to-active median {:.0} ms; \
         p99 during the swaps ({} requests) {:.3} ms vs between them ({} requests) {:.3} ms ({:.2}x); each swap: {}",
        seen.len() + failed,
        ms(swap_times[swap_times.len() / 2]),
        during.len(),
        ms(d99),
        steady.len(),
        ms(b99),
        d99.as_secs_f64() / b99.as_secs_f64(),
        each.join(" ")
    );
    s.agent.shutdown().await;
    s.runtime.shutdown_background();
    drop(s.hub);
    Ok(())
}
