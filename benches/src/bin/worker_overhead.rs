//! Confined-worker overhead benchmark: what serving a model through a
//! seccomp-confined `sentinel-worker` process costs against running the same
//! tract model in this process, for the digits v1 MLP and the text-direction
//! vision model:
//! - per-request latency, p50 and p99, after a warm-up; worker and in-process
//!   requests alternate so that noise from other load hits both alike;
//! - "verified file on disk" to "serving": `Worker::spawn` until the ready frame,
//!   against in-process load + optimise + first inference (median of 5 each);
//! - worker RSS after ready, against this process's RSS growth from loading the
//!   model in-process;
//! - throughput of 4 concurrent client tasks on one worker against sequential
//!   requests (the worker serves one request at a time);
//! - a batch of 64 samples in one request (`--max-batch 64`) against the same
//!   64 samples as single requests, with tract and, when `ORT_DYLIB_PATH`
//!   names the library, ONNX Runtime (median of 9 rounds, alternating).
//!
//! The in-process baseline uses the worker's own loader
//! ([`sentinel_worker::model::LoadedModel`]), so the difference is the
//! process boundary, the framing and the sandbox, not a different tract setup.
//!
//! `cargo build --release --workspace && target/release/worker_overhead`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sentinel_agent::supervisor::{Worker, WorkerSpec};
use sentinel_benches::{median, percentile, rss_kib, workspace_bin, workspace_root};
use sentinel_testkit::digits::TEST_X;
use sentinel_testkit::models::read_f32;
use sentinel_worker::model::LoadedModel;
use sentinel_worker_protocol::frame::Tensor;
use sentinel_worker_protocol::launch::Engine;

/// Spawns (and in-process loads) per model for the time-to-serving figure.
const SPAWNS: usize = 5;
/// Concurrent client tasks sharing one worker.
const CLIENTS: usize = 4;
/// Samples in the batched request, and rounds of batch against singles.
const BATCH: usize = 64;
const BATCH_ROUNDS: usize = 9;

/// One model under test and the real inputs it is fed.
struct Case {
    name: &'static str,
    model: PathBuf,
    shape: Vec<usize>,
    inputs: Vec<Tensor>,
    /// Timed requests per side for the latency figure.
    requests: usize,
    /// Untimed requests per side before it.
    warm_up: usize,
}

impl Case {
    fn input(&self, i: usize) -> &Tensor {
        &self.inputs[i % self.inputs.len()]
    }
}

/// Reads a raw little-endian f32 file and cuts it into `[1, ..row_shape]` tensors.
fn read_rows(path: &str, row_shape: &[usize]) -> anyhow::Result<Vec<Tensor>> {
    let values = read_f32(path);
    let row_len: usize = row_shape.iter().product();
    ensure!(
        !values.is_empty() && values.len().is_multiple_of(row_len),
        "{path}: {} values is not a whole number of f32 rows of {row_len}",
        values.len()
    );
    let shape: Vec<usize> = std::iter::once(1).chain(row_shape.iter().copied()).collect();
    Ok(values.chunks_exact(row_len).map(|row| Tensor::from_f32(shape.clone(), row)).collect())
}

fn cases() -> anyhow::Result<Vec<Case>> {
    let root = workspace_root();
    Ok(vec![
        Case {
            name: "digits v1 (f32 [1,64])",
            model: root.join("models/digits/digits_mlp_v1.onnx"),
            shape: vec![1, 64],
            inputs: read_rows(TEST_X, &[64])?,
            requests: 2000,
            warm_up: 200,
        },
        Case {
            name: "text-direction cls (f32 [1,3,48,192])",
            model: root.join("models/vision/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            shape: vec![1, 3, 48, 192],
            inputs: read_rows("data/textcls_sample_input.bin", &[3, 48, 192])?,
            requests: 300,
            warm_up: 30,
        },
    ])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn self_rss_kib() -> anyhow::Result<u64> {
    rss_kib(std::process::id())
}

/// Loads, optimises and runs the model once in this process.
fn load_in_process(case: &Case) -> anyhow::Result<LoadedModel> {
    let model = LoadedModel::load(&case.model, std::slice::from_ref(&case.shape))?;
    model.run(std::slice::from_ref(case.input(0)))?;
    Ok(model)
}

async fn infer(worker: &Worker, input: &Tensor) -> anyhow::Result<Vec<Tensor>> {
    Ok(worker.infer(std::slice::from_ref(input)).await?)
}

/// Sends `requests` requests from `clients` concurrent tasks; returns requests/s.
async fn throughput(worker: &Arc<Worker>, case: &Case, clients: usize, requests: usize) -> anyhow::Result<f64> {
    let per_client = requests / clients;
    let inputs = Arc::new(case.inputs.clone());
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (worker, inputs) = (Arc::clone(worker), Arc::clone(&inputs));
            tokio::spawn(async move {
                for i in 0..per_client {
                    infer(&worker, &inputs[(c * per_client + i) % inputs.len()]).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((per_client * clients) as f64 / start.elapsed().as_secs_f64())
}

/// This process's RSS growth from loading each model in-process, measured
/// before anything else is loaded: memory freed by later loads would otherwise
/// be reused and hide the growth. The models are kept as latency baselines.
fn load_baselines(cases: &[Case]) -> anyhow::Result<Vec<(LoadedModel, u64)>> {
    cases
        .iter()
        .map(|case| {
            let before = self_rss_kib()?;
            let model = load_in_process(case)?;
            Ok((model, self_rss_kib()?.saturating_sub(before)))
        })
        .collect()
}

async fn bench(case: &Case, baseline: &LoadedModel, rss_growth_kib: u64, spec: &WorkerSpec) -> anyhow::Result<()> {
    println!("== {} ==", case.name);
    let worker = Arc::new(Worker::spawn(spec).await?);
    let rss_worker = worker.rss_bytes().context("worker RSS")? / 1024;
    match worker.unconfined_reason() {
        None if worker.confined() => println!("worker confined: yes"),
        reason => println!("worker confined: NO ({})", reason.unwrap_or("no reason given")),
    }

    // The worker must compute what the in-process model computes.
    let local = baseline.run(std::slice::from_ref(case.input(0)))?;
    let remote = infer(&worker, case.input(0)).await?;
    ensure!(local == remote, "worker and in-process outputs differ");

    for i in 0..case.warm_up {
        baseline.run(std::slice::from_ref(case.input(i)))?;
        infer(&worker, case.input(i)).await?;
    }
    let (mut local, mut remote) = (Vec::with_capacity(case.requests), Vec::with_capacity(case.requests));
    for i in 0..case.requests {
        let start = Instant::now();
        baseline.run(std::slice::from_ref(case.input(i)))?;
        local.push(start.elapsed());
        let start = Instant::now();
        infer(&worker, case.input(i)).await?;
        remote.push(start.elapsed());
    }
    let (l50, l99) = (percentile(local.clone(), 50.0), percentile(local, 99.0));
    let (r50, r99) = (percentile(remote.clone(), 50.0), percentile(remote, 99.0));
    println!(
        "latency ({} requests): in-process p50 {:.0} µs p99 {:.0} µs | worker p50 {:.0} µs p99 {:.0} µs",
        case.requests,
        us(l50),
        us(l99),
        us(r50),
        us(r99)
    );
    println!(
        "  overhead p50 {:+.0} µs, x{:.2}; p99 x{:.2}",
        us(r50) - us(l50),
        r50.as_secs_f64() / l50.as_secs_f64(),
        r99.as_secs_f64() / l99.as_secs_f64()
    );

    let sequential = throughput(&worker, case, 1, case.requests).await?;
    let concurrent = throughput(&worker, case, CLIENTS, case.requests).await?;
    println!(
        "throughput on one worker: sequential {sequential:.0} req/s | {CLIENTS} clients {concurrent:.0} req/s, x{:.2}",
        concurrent / sequential
    );
    drop(worker);

    let (mut spawns, mut loads) = (Vec::with_capacity(SPAWNS), Vec::with_capacity(SPAWNS));
    for _ in 0..SPAWNS {
        let start = Instant::now();
        let worker = Worker::spawn(spec).await?;
        spawns.push(start.elapsed());
        drop(worker);
        let start = Instant::now();
        drop(load_in_process(case)?);
        loads.push(start.elapsed());
    }
    let (spawn, load) = (median(spawns), median(loads));
    println!(
        "file to serving (median of {SPAWNS}): in-process load+optimise+first run {:.1} ms | worker spawn to ready {:.1} ms, x{:.2}",
        ms(load),
        ms(spawn),
        spawn.as_secs_f64() / load.as_secs_f64()
    );
    println!(
        "memory: in-process RSS growth {:.1} MiB | worker RSS after ready {:.1} MiB, x{:.2}",
        rss_growth_kib as f64 / 1024.0,
        rss_worker as f64 / 1024.0,
        rss_worker as f64 / (rss_growth_kib.max(1)) as f64
    );
    println!();
    Ok(())
}

/// One request of [`BATCH`] samples against [`BATCH`] single requests, on
/// one worker that runs batches as one.
async fn batching(case: &Case, spec: &WorkerSpec, engine: Engine, ort_dylib: Option<PathBuf>) -> anyhow::Result<()> {
    let mut spec = spec.clone();
    (spec.max_batch, spec.engine, spec.ort_dylib) = (BATCH, engine, ort_dylib);
    let worker = Worker::spawn(&spec).await?;
    ensure!(worker.max_batch() == BATCH, "{engine}: the worker runs batches of {} only", worker.max_batch());
    let rows: Vec<&Tensor> = (0..BATCH).map(|i| case.input(i)).collect();
    let mut shape = rows[0].shape.clone();
    shape[0] = BATCH;
    let batch = Tensor { dtype: rows[0].dtype, shape, data: rows.iter().flat_map(|r| r.data.clone()).collect() };
    let (mut singles, mut batched) = (Vec::new(), Vec::new());
    for round in 0..=BATCH_ROUNDS {
        let start = Instant::now();
        for row in &rows {
            infer(&worker, row).await?;
        }
        let single = start.elapsed();
        let start = Instant::now();
        let outputs = infer(&worker, &batch).await?;
        let whole = start.elapsed();
        ensure!(outputs.iter().all(|o| o.shape.first() == Some(&BATCH)), "{engine}: outputs of the batch");
        // Round 0 warms both paths.
        if round > 0 {
            singles.push(single);
            batched.push(whole);
        }
    }
    let (single, whole) = (median(singles), median(batched));
    println!(
        "{engine}: {BATCH} single requests {:.2} ms | one request of {BATCH} {:.2} ms: batch time x{:.2}, throughput x{:.2}",
        ms(single),
        ms(whole),
        whole.as_secs_f64() / single.as_secs_f64(),
        single.as_secs_f64() / whole.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let worker_bin = workspace_bin("sentinel-worker")?;
    let work_dir = tempfile::tempdir()?;
    let cases = cases()?;
    let baselines = load_baselines(&cases)?;
    for (case, (baseline, rss_growth_kib)) in cases.iter().zip(&baselines) {
        let spec = WorkerSpec::new(
            worker_bin.clone(),
            case.model.clone(),
            vec![case.shape.clone()],
            work_dir.path().to_owned(),
        );
        bench(case, baseline, *rss_growth_kib, &spec).await?;
    }
    println!("== batching ==");
    let ort = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).filter(|p| p.is_file());
    for case in &cases {
        let spec = WorkerSpec::new(
            worker_bin.clone(),
            case.model.clone(),
            vec![case.shape.clone()],
            work_dir.path().to_owned(),
        );
        println!("{}:", case.name);
        batching(case, &spec, Engine::Tract, None).await?;
        match &ort {
            Some(lib) => batching(case, &spec, Engine::Ort, Some(lib.clone())).await?,
            None => println!("ort: skipped (ORT_DYLIB_PATH names no file)"),
        }
    }
    println!("ratios are worker / in-process, except throughput ({CLIENTS} clients / sequential)");
    Ok(())
}
