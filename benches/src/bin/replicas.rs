//! Hub replicas benchmark (issue 15), every figure against a baseline of the
//! same run:
//! - deploy -> state at every device, for DEVICES devices on real gRPC
//!   streams: one hub on SQLite (the embedded default), one replica on
//!   PostgreSQL, and two replicas on PostgreSQL with the devices split
//!   between them (the deploy goes through the first; the second hears of it
//!   by NOTIFY);
//! - the registry (push, get, list) on PostgreSQL + S3 against SQLite + disk.
//!
//! Needs a PostgreSQL server (`SENTINEL_BENCH_POSTGRES`, an admin URL) and,
//! for the S3 half, the rig's variables (`SENTINEL_TEST_S3*`, see `.ci/s3-rig`).
//!
//! `cargo build --release --workspace && SENTINEL_BENCH_POSTGRES=postgres://... target/release/replicas [DEVICES]`

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use sentinel_benches::{HubProcess, median, percentile, raise_fd_limit, workspace_root};
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{DesiredState, Hello, hub_message};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ROUNDS: usize = 5;

/// Deploy -> state latencies at `devices` devices split over `hubs`,
/// deploying through the first; the admin token is `admin`.
async fn deploy_latency(hubs: &[&HubProcess], admin: &str, devices: usize) -> anyhow::Result<Vec<Duration>> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = hubs[0].url.clone();
    let post = |path: String, body: Value| {
        let (http, admin, url) = (http.clone(), admin.to_owned(), url.clone());
        async move {
            let r = http.post(format!("{url}{path}")).bearer_auth(admin).json(&body).send().await?;
            ensure!(r.status().is_success(), "POST {path}: {}", r.status());
            Ok::<Value, anyhow::Error>(r.json().await?)
        }
    };
    post("/api/v1/models".into(), json!({"name": "digits"})).await?;
    for (version, file) in [("1.0.0", "digits_mlp_v1.onnx"), ("2.0.0", "digits_mlp_v2_degraded.onnx")] {
        let body = std::fs::read(workspace_root().join("models/digits").join(file))?;
        let r = http
            .post(format!("{url}/api/v1/models/digits/versions?version={version}"))
            .bearer_auth(admin)
            .body(body)
            .send()
            .await?;
        ensure!(r.status().is_success(), "push {version}: {}", r.status());
    }
    let mut tokens = Vec::with_capacity(devices);
    let mut pending = futures_util::stream::iter((0..devices).map(|i| {
        let p = post("/api/v1/devices".into(), json!({"id": format!("dev-{i:05}"), "labels": {"fleet": "bench"}}));
        async move { p.await.map(|v| (i, v["token"].as_str().unwrap_or_default().to_owned())) }
    }))
    .buffer_unordered(16);
    while let Some(r) = pending.next().await {
        tokens.push(r?);
    }
    tokens.sort();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut streams = Vec::with_capacity(devices);
    for (i, token) in &tokens {
        let grpc = hubs[i % hubs.len()].url.clone();
        let channel = tonic::transport::Endpoint::from_shared(grpc)?.tcp_nodelay(true).connect().await?;
        let mut req = tonic::Request::new(Hello { device_id: format!("dev-{i:05}"), ..Default::default() });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let mut stream = AgentSyncClient::new(channel).subscribe(req).await?.into_inner();
        let (tx, i) = (tx.clone(), *i);
        streams.push(tokio::spawn(async move {
            while let Ok(Some(msg)) = stream.message().await {
                if let Some(hub_message::Kind::State(s)) = msg.kind {
                    let _ = <DesiredState as prost::Message>::decode(s.state.as_slice());
                    let _ = tx.send((i, Instant::now()));
                }
            }
        }));
    }
    for _ in 0..devices {
        tokio::time::timeout(Duration::from_secs(120), rx.recv()).await?.context("streams ended")?;
    }
    let mut latencies = Vec::new();
    for round in 0..ROUNDS {
        let version = if round % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let t0 = Instant::now();
        post("/api/v1/models/digits/deploy".into(), json!({"version": version, "target": "fleet=bench"})).await?;
        let mut seen = std::collections::HashSet::new();
        while seen.len() < devices {
            let (i, at) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await?.context("streams ended")?;
            if seen.insert(i) {
                latencies.push(at - t0);
            }
        }
    }
    for s in streams {
        s.abort();
    }
    Ok(latencies)
}

/// Push, get and list timings on one hub.
async fn registry(hub: &HubProcess) -> anyhow::Result<(Duration, Duration, Duration)> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let model = std::fs::read(workspace_root().join("models/digits/digits_mlp_v3_slow.onnx"))?;
    let r = http
        .post(format!("{}/api/v1/models", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"name": "m"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "register: {}", r.status());
    let (mut push, mut get, mut list) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..9 {
        let t = Instant::now();
        let r = http
            .post(format!("{}/api/v1/models/m/versions?version=1.0.{i}", hub.url))
            .bearer_auth(&hub.admin)
            .body(model.clone())
            .send()
            .await?;
        ensure!(r.status().is_success(), "push: {}", r.status());
        push.push(t.elapsed());
        let t = Instant::now();
        let bytes = http
            .get(format!("{}/api/v1/models/m/versions/1.0.{i}/artifact", hub.url))
            .bearer_auth(&hub.admin)
            .send()
            .await?
            .bytes()
            .await?;
        ensure!(bytes.len() == model.len(), "short download");
        get.push(t.elapsed());
        let t = Instant::now();
        let r = http.get(format!("{}/api/v1/models/m/versions", hub.url)).bearer_auth(&hub.admin).send().await?;
        ensure!(r.status().is_success(), "list: {}", r.status());
        let _ = r.bytes().await?;
        list.push(t.elapsed());
    }
    Ok((median(push), median(get), median(list)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let devices: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let pg = std::env::var("SENTINEL_BENCH_POSTGRES").context("set SENTINEL_BENCH_POSTGRES to an admin URL")?;
    let fds = raise_fd_limit();
    ensure!(fds as usize > devices + 200, "open-file limit {fds} is too low for {devices} streams");
    sentinel_hub::install_crypto_provider();
    let keys = tempfile::tempdir()?;
    let kek = keys.path().join("kek");
    sentinel_testkit::backend::write_kek(&kek);
    let kek = kek.display().to_string();
    let hb = ["--heartbeat-secs", "15"];

    // 1. One hub on SQLite.
    let sqlite = HubProcess::start_with(&hb)?;
    let base = deploy_latency(&[&sqlite], &sqlite.admin, devices).await?;
    drop(sqlite);
    // 2. One replica on PostgreSQL.
    let url = sentinel_testkit::backend::fresh_database(&pg).await;
    let one = HubProcess::start_with(&[&hb[..], &["--database", &url, "--key-encryption-key-file", &kek]].concat())?;
    let single = deploy_latency(&[&one], &one.admin, devices).await?;
    drop(one);
    // 3. Two replicas on PostgreSQL, the devices split between them.
    let url = sentinel_testkit::backend::fresh_database(&pg).await;
    let flags = [&hb[..], &["--database", &url, "--key-encryption-key-file", &kek]].concat();
    let a = HubProcess::start_with(&flags)?;
    let b = HubProcess::start_with(&flags)?;
    let two = deploy_latency(&[&a, &b], &a.admin, devices).await?;
    drop((a, b));

    println!("hub replicas benchmark: {devices} devices on real gRPC streams, {ROUNDS} deploys each");
    let row = |name: &str, xs: &[Duration]| {
        let (p50, p99) = (percentile(xs.to_vec(), 50.0), percentile(xs.to_vec(), 99.0));
        println!(
            "{name:<38} deploy -> state p50 {:>7.1} ms  p99 {:>7.1} ms  (p99 {:.2}x SQLite, {:.2}x one PostgreSQL replica)",
            ms(p50),
            ms(p99),
            p99.as_secs_f64() / percentile(base.clone(), 99.0).as_secs_f64(),
            p99.as_secs_f64() / percentile(single.clone(), 99.0).as_secs_f64()
        );
    };
    row("one hub, SQLite (baseline)", &base);
    row("one replica, PostgreSQL", &single);
    row("two replicas, PostgreSQL, split", &two);

    // The registry on PostgreSQL + S3 against SQLite + disk.
    let s3 = (
        std::env::var("SENTINEL_TEST_S3"),
        std::env::var("SENTINEL_TEST_S3_BUCKET"),
        std::env::var("SENTINEL_TEST_S3_KEY"),
        std::env::var("SENTINEL_TEST_S3_SECRET"),
    );
    let local = HubProcess::start()?;
    let (lp, lg, ll) = registry(&local).await?;
    drop(local);
    println!(
        "registry, SQLite + disk (baseline):     push {:.1} ms, get {:.1} ms, list {:.2} ms (medians of 9, 8.7 MB model)",
        ms(lp),
        ms(lg),
        ms(ll)
    );
    if let (Ok(endpoint), Ok(bucket), Ok(key), Ok(secret)) = s3 {
        let url = sentinel_testkit::backend::fresh_database(&pg).await;
        let hub = HubProcess::start_with_env(
            &[
                "--database",
                &url,
                "--key-encryption-key-file",
                &kek,
                "--blobs",
                &format!("s3://{bucket}/bench-{}/", std::process::id()),
            ],
            &[
                ("AWS_ENDPOINT_URL", &endpoint),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", &key),
                ("AWS_SECRET_ACCESS_KEY", &secret),
            ],
        )?;
        let (pp, pg_, pl) = registry(&hub).await?;
        println!(
            "registry, PostgreSQL + S3 (s3s-fs):     push {:.1} ms ({:.2}x), get {:.1} ms ({:.2}x), list {:.2} ms ({:.2}x)",
            ms(pp),
            pp.as_secs_f64() / lp.as_secs_f64(),
            ms(pg_),
            pg_.as_secs_f64() / lg.as_secs_f64(),
            ms(pl),
            pl.as_secs_f64() / ll.as_secs_f64()
        );
    } else {
        println!("registry on PostgreSQL + S3: skipped (no SENTINEL_TEST_S3* variables)");
    }
    Ok(())
}
