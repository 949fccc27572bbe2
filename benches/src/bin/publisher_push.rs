//! What the publisher check costs (issue 16): `sentinel model push` of the
//! 8.7 MB `digits_mlp_v3_slow.onnx` with `--signature` (a bundle made by
//! OpenSSF's `model_signing`, verified by the hub against a registered key)
//! against the same push without one, to the same hub, interleaved. Also the
//! verification alone, in process, against hashing the file it covers.
//!
//! Needs `model-signing` from PyPI (as `.ci/test` installs it). Build first:
//! `cargo build --release --workspace`, then
//! `cargo run --release -p sentinel-benches --bin publisher_push`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sentinel_benches::{HubProcess, median, time, workspace_bin, workspace_root};
use sentinel_proto::publisher::{PublisherKey, verify_bundle};
use sentinel_testkit::signing::{keypair, sign};

const REPS: usize = 9;
const VERIFY_REPS: u32 = 1000;

fn main() -> anyhow::Result<()> {
    let model = workspace_root().join("models/digits/digits_mlp_v3_slow.onnx");
    let dir = tempfile::tempdir()?;
    let key = keypair(dir.path(), "pipeline");
    let bundle = sign(&model, &key, &dir.path().join("model.sig"));
    let hub = HubProcess::start()?;
    let sentinel = workspace_bin("sentinel")?;
    let run = |args: &[&str]| -> anyhow::Result<Duration> {
        let (out, d) =
            time(|| Command::new(&sentinel).args(["--hub", &hub.url, "--token", &hub.admin]).args(args).output());
        let out = out.context("running sentinel")?;
        ensure!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(d)
    };
    run(&["publisher", "add", "pipeline", "--key", key.public.to_str().context("path")?])?;
    let m = model.to_str().context("path")?;
    let b = bundle.to_str().context("path")?;
    // Warm up (registers the name), then interleave so drift hits both alike.
    run(&["model", "push", m, "--name", "slow", "--version", "0.0.1"])?;
    let (mut signed, mut plain) = (Vec::new(), Vec::new());
    for i in 0..REPS {
        let v = format!("1.0.{i}");
        signed.push(run(&["model", "push", m, "--name", "slow", "--version", &v, "--signature", b])?);
        let v = format!("2.0.{i}");
        plain.push(run(&["model", "push", m, "--name", "slow", "--version", &v])?);
    }
    let (signed, plain) = (median(signed), median(plain));

    // The check alone, against the SHA-256 of the file that every push pays.
    let bytes = std::fs::read(&bundle)?;
    let keys = [PublisherKey::from_pem("pipeline", &std::fs::read(&key.public)?)?];
    let file = std::fs::read(&model)?;
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &file));
    let start = Instant::now();
    for _ in 0..VERIFY_REPS {
        verify_bundle(&bytes, &keys, &sha)?;
    }
    let verify = start.elapsed() / VERIFY_REPS;
    let (_, hash) = time(|| ring::digest::digest(&ring::digest::SHA256, &file));

    println!("push of the {:.1} MB model, median of {REPS}:", file.len() as f64 / 1e6);
    println!("  with --signature   {:>8.1} ms", signed.as_secs_f64() * 1e3);
    println!("  without            {:>8.1} ms", plain.as_secs_f64() * 1e3);
    println!("  ratio              {:>8.3}x", signed.as_secs_f64() / plain.as_secs_f64());
    println!("bundle verification alone, mean of {VERIFY_REPS}: {:.1} us", verify.as_secs_f64() * 1e6);
    println!(
        "  against hashing the file once ({:.1} ms): {:.4}x",
        hash.as_secs_f64() * 1e3,
        verify.as_secs_f64() / hash.as_secs_f64()
    );
    Ok(())
}
