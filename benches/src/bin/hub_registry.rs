//! Registry benchmark (issue 2): push and download throughput of the 8.7 MB
//! `digits_mlp_v3_slow.onnx`, and hub RSS idle and after 1,000 versions.
//!
//! Baselines, measured in the same run:
//! - push: `sentinel model push` against `curl --data-binary` to the same hub endpoint;
//! - download: the hub's artifact endpoint against reading the blob file from disk.
//!
//! Build first: `cargo build --release --workspace`, then
//! `cargo run --release -p sentinel-benches --bin hub_registry`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use sentinel_benches::{HubProcess, mbps, median, rss_kib, time, workspace_bin, workspace_root};

const REPS: usize = 9;

fn main() -> anyhow::Result<()> {
    let model = workspace_root().join("models/digits/digits_mlp_v3_slow.onnx");
    let small = workspace_root().join("models/digits/digits_mlp_v1.onnx");
    let size = std::fs::metadata(&model)?.len();
    let hub = HubProcess::start()?;
    let sentinel = workspace_bin("sentinel")?;

    let push = |version: &str| -> anyhow::Result<Duration> {
        let (out, d) = time(|| {
            Command::new(&sentinel)
                .args(["--hub", &hub.url, "--token", &hub.admin, "model", "push"])
                .arg(&model)
                .args(["--name", "slow", "--version", version])
                .output()
        });
        let out = out?;
        ensure!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(d)
    };
    let curl_push = |version: &str| -> anyhow::Result<Duration> {
        let url = format!("{}/api/v1/models/slow/versions?version={version}", hub.url);
        let (out, d) = time(|| {
            Command::new("curl")
                .args(["-sS", "-f", "-o", "/dev/null", "-H", &format!("Authorization: Bearer {}", hub.admin)])
                .args(["-H", "Content-Type: application/octet-stream", "--data-binary"])
                .arg(format!("@{}", model.display()))
                .arg(&url)
                .output()
        });
        let out = out.context("running curl")?;
        ensure!(out.status.success(), "curl push failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(d)
    };
    // Warm up (registers the name, fills caches), then interleave so drift hits both alike.
    push("0.0.1")?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..REPS {
        ours.push(push(&format!("1.0.{i}"))?);
        theirs.push(curl_push(&format!("2.0.{i}"))?);
    }
    let (push_ours, push_curl) = (median(ours), median(theirs));

    // Download: the artifact endpoint through reqwest, against the blob file on disk.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    sentinel_hub::install_crypto_provider();
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("{}/api/v1/models/slow/versions/1.0.0/artifact", hub.url);
    let sha = hex_sha256(&std::fs::read(&model)?);
    let blob = hub.dir.path().join("blobs/sha256").join(&sha);
    let (mut dl, mut disk, mut curl_dl) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let (n, d) = time(|| {
            rt.block_on(async {
                let mut resp = client.get(&url).bearer_auth(&hub.admin).send().await?.error_for_status()?;
                let mut n = 0u64;
                while let Some(chunk) = resp.chunk().await? {
                    n += chunk.len() as u64;
                }
                anyhow::Ok(n)
            })
        });
        ensure!(n? == size, "short download");
        dl.push(d);
        let (bytes, d) = time(|| std::fs::read(&blob));
        ensure!(bytes?.len() as u64 == size, "short read");
        disk.push(d);
        let (out, d) = time(|| {
            Command::new("curl")
                .args(["-sS", "-f", "-o", "/dev/null", "-H", &format!("Authorization: Bearer {}", hub.admin)])
                .arg(&url)
                .output()
        });
        ensure!(out?.status.success(), "curl download failed");
        curl_dl.push(d);
    }
    let (dl, disk, curl_dl) = (median(dl), median(disk), median(curl_dl));

    // RSS after 1,000 registered versions, on a fresh hub, of the small
    // model: the registry's own footprint, not what parsing big files left.
    let rss_after_pushes = rss_kib(hub.pid())?;
    drop(hub);
    let hub = HubProcess::start()?;
    let idle_rss = rss_kib(hub.pid())?;
    let small_bytes = std::fs::read(&small)?;
    rt.block_on(async {
        client
            .post(format!("{}/api/v1/models", hub.url))
            .bearer_auth(&hub.admin)
            .json(&serde_json::json!({"name": "many"}))
            .send()
            .await?
            .error_for_status()?;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000 {
            let (client, body) = (client.clone(), small_bytes.clone());
            let url = format!("{}/api/v1/models/many/versions?version=1.{}.{}", hub.url, i / 100, i % 100);
            let token = hub.admin.clone();
            tasks.spawn(async move {
                client.post(url).bearer_auth(token).body(body).send().await?.error_for_status()?;
                anyhow::Ok(())
            });
            if tasks.len() >= 8 {
                tasks.join_next().await.transpose()?.transpose()?;
            }
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })?;
    let rss_1000 = rss_kib(hub.pid())?;

    println!("hub registry benchmark, model {} ({size} bytes), median of {REPS}", model.display());
    println!(
        "push   sentinel CLI  {:>8.1} ms  {:>7.1} MB/s   curl --data-binary {:>8.1} ms  {:>7.1} MB/s   ratio {:.2}x curl's time",
        push_ours.as_secs_f64() * 1e3,
        mbps(size, push_ours),
        push_curl.as_secs_f64() * 1e3,
        mbps(size, push_curl),
        push_ours.as_secs_f64() / push_curl.as_secs_f64()
    );
    println!(
        "get    hub artifact  {:>8.1} ms  {:>7.1} MB/s   disk read          {:>8.1} ms  {:>7.1} MB/s   ratio {:.2}x disk's time (curl -o /dev/null: {:.1} ms, {:.2}x)",
        dl.as_secs_f64() * 1e3,
        mbps(size, dl),
        disk.as_secs_f64() * 1e3,
        mbps(size, disk),
        dl.as_secs_f64() / disk.as_secs_f64(),
        curl_dl.as_secs_f64() * 1e3,
        curl_dl.as_secs_f64() / disk.as_secs_f64()
    );
    println!(
        "rss    fresh hub idle {idle_rss} KiB; after 1,000 versions {rss_1000} KiB ({:.2}x idle); \
         first hub after the {} pushes and {} downloads above: {rss_after_pushes} KiB",
        rss_1000 as f64 / idle_rss as f64,
        2 * REPS + 1,
        3 * REPS
    );
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
