//! Fleet benchmark (issue 3):
//! - deploy-to-device latency for 1,000 subscribers on real gRPC streams
//!   (one process, one connection each): p50 and p99, over several deploys;
//! - download + verify of the 8.7 MB model with the agent's own fetcher,
//!   against `curl -o FILE` plus `sha256sum FILE` of the same URL;
//! - hub RSS with 10,000 idle streams (and with none, as the baseline).
//!
//! `cargo build --release --workspace && target/release/fleet_sync [SUBSCRIBERS] [IDLE]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use sentinel_benches::{HubProcess, mbps, median, percentile, raise_fd_limit, rss_kib, time, workspace_root};
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{DesiredState, Hello, hub_message};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ROUNDS: usize = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let subscribers: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let idle: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let fds = raise_fd_limit();
    ensure!(fds as usize > idle + 200, "open-file limit {fds} is too low for {idle} streams");
    sentinel_hub::install_crypto_provider();

    let hub = HubProcess::start_with(&["--grpc-listen", "127.0.0.1:0", "--heartbeat-secs", "15"])?;
    let grpc = hub.grpc_url.clone().context("no grpc url")?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let admin = hub.admin.clone();
    let post = |path: String, body: Value| {
        let (http, admin, url) = (http.clone(), admin.clone(), hub.url.clone());
        async move {
            let r = http.post(format!("{url}{path}")).bearer_auth(admin).json(&body).send().await?;
            ensure!(r.status().is_success(), "POST {path}: {}", r.status());
            Ok::<Value, anyhow::Error>(r.json().await?)
        }
    };
    let rss_empty = rss_kib(hub.pid())?;

    // Models.
    post("/api/v1/models".into(), json!({"name": "digits"})).await?;
    post("/api/v1/models".into(), json!({"name": "slow"})).await?;
    for (name, version, file) in [
        ("digits", "1.0.0", "digits_mlp_v1.onnx"),
        ("digits", "2.0.0", "digits_mlp_v2_degraded.onnx"),
        ("slow", "1.0.0", "digits_mlp_v3_slow.onnx"),
    ] {
        let body = std::fs::read(workspace_root().join("models/digits").join(file))?;
        let r = http
            .post(format!("{}/api/v1/models/{name}/versions?version={version}", hub.url))
            .bearer_auth(&admin)
            .body(body)
            .send()
            .await?;
        ensure!(r.status().is_success(), "push {name} {version}: {}", r.status());
    }

    // Enrol every device (8 at a time).
    let total = subscribers.max(idle);
    let mut tokens = Vec::with_capacity(total);
    let mut pending = futures_util::stream::iter((0..total).map(|i| {
        let p = post("/api/v1/devices".into(), json!({"id": format!("dev-{i:05}"), "labels": {"fleet": "bench"}}));
        async move { p.await.map(|v| (i, v["token"].as_str().unwrap_or_default().to_owned())) }
    }))
    .buffer_unordered(8);
    while let Some(r) = pending.next().await {
        tokens.push(r?);
    }
    tokens.sort();

    // Open `n` real streams; each reports (device index, revision, when) for every state.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let open = |range: std::ops::Range<usize>, tx: mpsc::UnboundedSender<(usize, u64, Instant)>| {
        let tokens = tokens.clone();
        let grpc = grpc.clone();
        async move {
            let mut handles = Vec::new();
            for i in range {
                let (token, grpc, tx) = (tokens[i].1.clone(), grpc.clone(), tx.clone());
                let channel = tonic::transport::Endpoint::from_shared(grpc)?.tcp_nodelay(true).connect().await?;
                let mut client = AgentSyncClient::new(channel);
                let mut req = tonic::Request::new(Hello { device_id: format!("dev-{i:05}"), ..Default::default() });
                req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
                let mut stream = client.subscribe(req).await?.into_inner();
                handles.push(tokio::spawn(async move {
                    while let Ok(Some(msg)) = stream.message().await {
                        if let Some(hub_message::Kind::State(s)) = msg.kind {
                            let now = Instant::now();
                            let state =
                                <DesiredState as prost::Message>::decode(s.state.as_slice()).unwrap_or_default();
                            let _ = tx.send((i, state.revision, now));
                        }
                    }
                }));
            }
            anyhow::Ok(handles)
        }
    };
    // Baseline: the same deploys with a single subscriber connected.
    let mut streams = open(0..1, tx.clone()).await?;
    rx.recv().await.context("stream ended")?;
    let mut single = Vec::new();
    for round in 0..ROUNDS {
        let version = if round % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let t0 = Instant::now();
        post("/api/v1/models/digits/deploy".into(), json!({"version": version, "target": "fleet=bench"})).await?;
        let (_, _, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await?.context("stream ended")?;
        single.push(at - t0);
    }
    streams.extend(open(1..subscribers, tx.clone()).await?);
    // Drain the initial states.
    let mut initial = 1;
    while initial < subscribers {
        rx.recv().await.context("streams ended")?;
        initial += 1;
    }

    // Deploy, alternate versions, and time arrival at every subscriber.
    let mut latencies = Vec::new();
    let mut round_totals = Vec::new();
    for round in 0..ROUNDS {
        let version = if round % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let t0 = Instant::now();
        let d =
            post("/api/v1/models/digits/deploy".into(), json!({"version": version, "target": "fleet=bench"})).await?;
        let _ = d;
        let mut seen = std::collections::HashSet::new();
        let mut last = t0;
        while seen.len() < subscribers {
            let (i, _rev, at) =
                tokio::time::timeout(Duration::from_secs(60), rx.recv()).await?.context("streams ended")?;
            if seen.insert(i) {
                latencies.push(at - t0);
                last = last.max(at);
            }
        }
        round_totals.push(last - t0);
    }
    let rss_subscribed = rss_kib(hub.pid())?;

    // Download + verify with the agent's fetcher vs curl + sha256sum.
    post("/api/v1/models/slow/deploy".into(), json!({"version": "1.0.0", "target": "fleet=bench"})).await?;
    let url = format!("{}/api/v1/models/slow/versions/1.0.0/artifact", hub.url);
    let model = std::fs::read(workspace_root().join("models/digits/digits_mlp_v3_slow.onnx"))?;
    let sha = hex_sha256(&model);
    let size = model.len() as u64;
    let token = tokens[0].1.clone();
    let fetch_client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let dir = tempfile::tempdir()?;
        let wanted = sentinel_agent::download::Wanted { url: &url, token: &token, sha256: &sha, size };
        let t = Instant::now();
        sentinel_agent::download::fetch(&fetch_client, dir.path(), &wanted, 3, |_| {}).await?;
        ours.push(t.elapsed());
        let file = dir.path().join("curl.out");
        let ((), d) = time(|| {
            let c = Command::new("curl")
                .args(["-sS", "-f", "-o"])
                .arg(&file)
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .arg(&url)
                .status();
            let s = Command::new("sha256sum").arg(&file).output();
            assert!(c.map(|s| s.success()).unwrap_or(false) && s.map(|o| o.status.success()).unwrap_or(false));
        });
        theirs.push(d);
    }
    let (ours, theirs) = (median(ours), median(theirs));

    // Idle streams: open the rest, then let the hub settle and read RSS.
    if idle > subscribers {
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let more = open(subscribers..idle, tx2).await?;
        let mut got = 0;
        while got < idle - subscribers {
            rx2.recv().await.context("streams ended")?;
            got += 1;
        }
        streams.extend(more);
    }
    let rss_idle = rss_kib(hub.pid())?;
    let connected = streams.len();

    println!("fleet sync benchmark: {subscribers} subscribers on real gRPC streams, {ROUNDS} deploys");
    let single_p50 = median(single);
    println!(
        "baseline, 1 subscriber: deploy -> state p50 {:.2} ms; 1,000 subscribers p50 = {:.1}x, p99 = {:.1}x that",
        single_p50.as_secs_f64() * 1e3,
        percentile(latencies.clone(), 50.0).as_secs_f64() / single_p50.as_secs_f64(),
        percentile(latencies.clone(), 99.0).as_secs_f64() / single_p50.as_secs_f64()
    );
    println!(
        "deploy -> state at device: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; whole fleet per deploy: median {:.1} ms ({:.3} ms per device)",
        percentile(latencies.clone(), 50.0).as_secs_f64() * 1e3,
        percentile(latencies.clone(), 99.0).as_secs_f64() * 1e3,
        percentile(latencies, 100.0).as_secs_f64() * 1e3,
        median(round_totals.clone()).as_secs_f64() * 1e3,
        median(round_totals).as_secs_f64() * 1e3 / subscribers as f64,
    );
    println!(
        "download+verify {size} B: agent fetcher {:.1} ms ({:.0} MB/s) vs curl + sha256sum {:.1} ms ({:.0} MB/s): ratio {:.2}x curl's time",
        ours.as_secs_f64() * 1e3,
        mbps(size, ours),
        theirs.as_secs_f64() * 1e3,
        mbps(size, theirs),
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
    println!(
        "hub rss: no streams {rss_empty} KiB; {subscribers} streams {rss_subscribed} KiB; {connected} idle streams {rss_idle} KiB ({:.1} KiB per stream)",
        (rss_idle.saturating_sub(rss_empty)) as f64 / connected as f64
    );
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
