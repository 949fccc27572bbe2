//! MLflow import benchmark (issue 16): `sentinel model import mlflow --all`
//! of N registered versions (default 20) from a real tracking server, against
//! N `sentinel model push` of the same files into a fresh hub; and the second,
//! no-op import.
//!
//! The versions alternate `digits_mlp_v1.onnx` and `digits_mlp_v2_degraded.onnx`
//! (20 KB each), so the figures are the per-version cost of the import (MLflow
//! lookups, artifact listing, download, hashing) more than bytes moved.
//! The server is `mlflow server --serve-artifacts` from `.ci/install-mlflow`'s
//! venv, as in the tests. Each rep uses fresh hubs; the two are interleaved so
//! drift hits both alike.
//!
//! Build first: `cargo build --release --workspace`, then
//! `cargo run --release -p sentinel-benches --bin mlflow_import [N]`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use sentinel_benches::{HubProcess, median, time, workspace_bin, workspace_root};
use sentinel_testkit::mlflow::MlflowServer;
use serde_json::{Value, json};

const REPS: usize = 3;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(20);
    let sentinel = workspace_bin("sentinel")?;
    let files = [
        workspace_root().join("models/digits/digits_mlp_v1.onnx"),
        workspace_root().join("models/digits/digits_mlp_v2_degraded.onnx"),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mlflow = rt.block_on(MlflowServer::start());
    let spec: Vec<Value> = (0..n).map(|i| json!({"onnx": files[i % 2], "accuracy": 0.9})).collect();
    let (registered, reg_time) = time(|| rt.block_on(mlflow.register("digits", &json!(spec))));
    ensure!(registered.len() == n, "registered {} versions, not {n}", registered.len());
    for (i, r) in registered.iter().enumerate() {
        let ours = hex_sha256(&std::fs::read(&files[i % 2])?);
        ensure!(
            r.sha256.as_deref() == Some(ours.as_str()),
            "MLflow's copy of version {} differs from the file",
            r.version
        );
    }

    let run = |hub: &HubProcess, args: &[&str]| -> anyhow::Result<(String, Duration)> {
        let (out, d) = time(|| {
            Command::new(&sentinel).args(["--hub", &hub.url, "--token", &hub.admin, "--json"]).args(args).output()
        });
        let out = out.context("running sentinel")?;
        ensure!(out.status.success(), "sentinel {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), d))
    };
    let import = |hub: &HubProcess| -> anyhow::Result<(Value, Duration)> {
        let args = ["model", "import", "mlflow", "--tracking-uri", &mlflow.url, "--model", "digits", "--all"];
        let (out, d) = run(hub, &[&args[..], &["--metric", "accuracy"]].concat())?;
        Ok((serde_json::from_str(&out)?, d))
    };

    let (mut imports, mut pushes, mut noops) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let hub = HubProcess::start()?;
        let (v, d) = import(&hub)?;
        ensure!(v["imported"] == n, "the first import imported {}", v["imported"]);
        imports.push(d);
        let (v, d) = import(&hub)?;
        ensure!(v["imported"] == 0 && v["already_present"] == n, "the second import: {v}");
        noops.push(d);

        let hub = HubProcess::start()?;
        let mut total = Duration::ZERO;
        for i in 0..n {
            let path = files[i % 2].display().to_string();
            let version = format!("{}.0.0", i + 1);
            let args = ["model", "push", &path, "--name", "digits", "--version", &version, "--accuracy", "0.9"];
            total += run(&hub, &args)?.1;
        }
        pushes.push(total);
    }
    let (import_t, push_t, noop_t) = (median(imports), median(pushes), median(noops));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("MLflow import benchmark: {n} versions (20 KB ONNX files), median of {REPS} fresh hubs");
    println!("registering them with MLflow's client (setup, not measured): {:.1} s", reg_time.as_secs_f64());
    println!(
        "import --all     {:>8.0} ms  ({:>6.1} ms a version)   {n} x model push {:>8.0} ms  ({:>6.1} ms a version)   ratio {:.2}x",
        ms(import_t),
        ms(import_t) / n as f64,
        ms(push_t),
        ms(push_t) / n as f64,
        import_t.as_secs_f64() / push_t.as_secs_f64()
    );
    println!(
        "second import    {:>8.0} ms  ({:>6.1} ms a version), 0 imported, {n} already present   ratio {:.2}x the first",
        ms(noop_t),
        ms(noop_t) / n as f64,
        noop_t.as_secs_f64() / import_t.as_secs_f64()
    );
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
