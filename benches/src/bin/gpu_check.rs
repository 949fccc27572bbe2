//! The GPU check that CI cannot run (it has no GPU): on a Jetson or a CUDA
//! machine, with `ORT_DYLIB_PATH` naming an ONNX Runtime build that has the
//! CUDA or TensorRT execution provider, it starts confined workers with that
//! provider (no fallback) and checks that each
//! - comes up confined (its GPU allow-list installed),
//! - answers the digits and text-direction models as ONNX Runtime on the CPU
//!   does (same labels, outputs within 1e-2: GPU kernels round differently),
//! - survives 200 requests without a `SIGSYS` (a syscall its allow-list lacks),
//! - and, for TensorRT, writes its engine cache and starts again from it
//!   (the second start is timed against the first).
//!
//! Exits non-zero on the first failure, naming it.
//!
//! `cargo build --release --workspace && ORT_DYLIB_PATH=/path/libonnxruntime.so \
//!   target/release/gpu_check [cuda|tensorrt] [device-id]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use sentinel_agent::supervisor::{Worker, WorkerSpec};
use sentinel_benches::{workspace_bin, workspace_root};
use sentinel_testkit::models::read_f32;
use sentinel_worker_protocol::frame::Tensor;
use sentinel_worker_protocol::launch::{Engine, Provider, Providers};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let provider: Provider = args.next().as_deref().unwrap_or("cuda").parse()?;
    ensure!(provider != Provider::Cpu, "name a GPU provider: cuda or tensorrt");
    let device_id = args.next().map(|d| d.parse()).transpose().context("device id")?;
    let lib = PathBuf::from(std::env::var_os("ORT_DYLIB_PATH").context("ORT_DYLIB_PATH names no library")?);
    let worker_bin = workspace_bin("sentinel-worker")?;
    let work = tempfile::tempdir()?;
    let root = workspace_root();
    let cases = [
        (
            "digits v1",
            "models/digits/digits_mlp_v1.onnx",
            vec![1, 64],
            read_f32("data/digits_test_x.bin")[..64].to_vec(),
        ),
        (
            "text direction",
            "models/vision/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            vec![1, 3, 48, 192],
            read_f32("data/textcls_sample_input.bin"),
        ),
    ];
    for (name, model, shape, sample) in cases {
        let spec = |providers: Providers| {
            let mut spec =
                WorkerSpec::new(worker_bin.clone(), root.join(model), vec![shape.clone()], work.path().into());
            (spec.engine, spec.ort_dylib, spec.providers) = (Engine::Ort, Some(lib.clone()), providers);
            spec.load_timeout = std::time::Duration::from_secs(1800);
            spec
        };
        let cache = work.path().join(format!("tensorrt-{name}"));
        std::fs::create_dir_all(&cache)?;
        let gpu = Providers {
            order: vec![provider],
            fallback: false,
            device_id,
            tensorrt_fp16: false,
            tensorrt_cache: (provider == Provider::TensorRt).then(|| cache.clone()),
        };
        let input = Tensor::from_f32(shape.clone(), &sample);
        let cpu = Worker::spawn(&spec(Providers::default())).await?.infer(std::slice::from_ref(&input)).await?;
        let start = Instant::now();
        let worker = Worker::spawn(&spec(gpu.clone())).await.with_context(|| format!("{name}: {provider} worker"))?;
        let first_start = start.elapsed();
        ensure!(worker.confined(), "{name}: the {provider} worker is not confined: {:?}", worker.unconfined_reason());
        for i in 0..200 {
            let out =
                worker.infer(std::slice::from_ref(&input)).await.with_context(|| format!("{name}: request {i}"))?;
            for (g, c) in out.iter().zip(&cpu) {
                match (g.to_f32(), c.to_f32()) {
                    (Ok(g), Ok(c)) => {
                        if let Some((a, b)) = g.iter().zip(&c).find(|(a, b)| (*a - *b).abs() > 1e-2) {
                            bail!("{name}: {provider} gave {a} where the CPU gives {b}");
                        }
                    }
                    _ => ensure!(g == c, "{name}: {provider} and the CPU disagree"),
                }
            }
        }
        ensure!(worker.exit_status().is_none(), "{name}: the worker ended: {:?}", worker.exit_status());
        drop(worker);
        println!("{name}: {provider} confined, 200 requests as the CPU answers, started in {first_start:.1?}");
        if provider == Provider::TensorRt {
            ensure!(
                std::fs::read_dir(&cache)?.next().is_some(),
                "{name}: TensorRT wrote no engine under {}",
                cache.display()
            );
            let start = Instant::now();
            drop(Worker::spawn(&spec(gpu)).await?);
            println!(
                "{name}: restarted from the engine cache in {:.1?} (first start {first_start:.1?})",
                start.elapsed()
            );
        }
    }
    println!("gpu check passed");
    Ok(())
}
