//! Both inference engines give the answers the models were shipped with, from
//! a real confined `sentinel-worker` started by the supervisor: every digits
//! model in `models/manifest.json` labels the held-out digits at least as well
//! as its declared accuracy (less 0.02), and the text-direction classifier
//! reproduces ONNX Runtime's reference output. With the `ort` feature (the default) the same
//! runs go through ONNX Runtime, and its labels must agree with tract's sample
//! by sample.
//!
//! The ONNX Runtime half needs the library: `ORT_DYLIB_PATH` must name it
//! (`export ORT_DYLIB_PATH="$(.ci/install-onnxruntime)"`). A build with the
//! feature but without the library fails rather than skips, so CI cannot go
//! green without having run ONNX Runtime. Without the feature that half is
//! compiled out, and asking a worker for `--engine ort` is a usage error.
// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sentinel_agent::inference_api::decode::{datatype_name, parse_datatype};
use sentinel_agent::supervisor::{SupervisorError, Worker, WorkerSpec};
use sentinel_testkit::dtype_cases;
use sentinel_testkit::models::{model_path, read_f32, read_i64};
use sentinel_worker_protocol::frame::{DType, Tensor};
use sentinel_worker_protocol::launch::Engine;
use serde_json::Value;

/// Bound on loading and on each request; generous because another build may share the machine.
const BOUND: Duration = Duration::from_secs(120);
/// How far below its declared accuracy a model may land on the test set.
const ACCURACY_SLACK: f64 = 0.02;
/// The share of samples on which tract and ONNX Runtime must give the same label.
#[cfg(feature = "ort")]
const MIN_AGREEMENT: f64 = 0.99;
/// How far the text classifier's outputs may drift from the reference.
const TEXTCLS_TOLERANCE: f32 = 1e-3;

fn manifest() -> Value {
    serde_json::from_slice(&std::fs::read(model_path("manifest.json")).unwrap()).unwrap()
}

/// A digits model from the manifest with its declared accuracy.
struct DigitsModel {
    name: String,
    file: PathBuf,
    declared_accuracy: f64,
}

/// The held-out digits: `[n, 64]` pixels and their labels.
struct DigitsTest {
    x: Vec<f32>,
    y: Vec<i64>,
}

/// Every manifest model evaluated on `digits_test`, and that test set.
fn digits_cases() -> (Vec<DigitsModel>, DigitsTest) {
    let manifest = manifest();
    let dataset = &manifest["datasets"]["digits_test"];
    let x = read_f32(dataset["inputs"]["file"].as_str().unwrap());
    let y = read_i64(dataset["labels"]["file"].as_str().unwrap());
    assert_eq!(x.len(), y.len() * 64, "digits_test inputs and labels disagree on the sample count");
    let mut models: Vec<DigitsModel> = manifest["models"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, m)| m["dataset"] == "digits_test")
        .map(|(name, m)| DigitsModel {
            name: name.clone(),
            file: model_path(m["file"].as_str().unwrap()),
            declared_accuracy: m["accuracy_onnxruntime"].as_f64().unwrap(),
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    // v1, v2_degraded and v3_slow: a manifest that lost one must not pass quietly.
    assert_eq!(
        models.len(),
        3,
        "digits models in the manifest: {:?}",
        models.iter().map(|m| &m.name).collect::<Vec<_>>()
    );
    (models, DigitsTest { x, y })
}

/// How one engine did on every model.
struct EngineRun {
    engine: Engine,
    /// Per digits model (manifest order by name): the argmax label of each test sample.
    digits: Vec<Vec<usize>>,
    /// The text classifier's output on the sample input.
    textcls: Vec<f32>,
}

fn spec(engine: Engine, ort_dylib: Option<&Path>, model: PathBuf, shape: &[usize], work_dir: &Path) -> WorkerSpec {
    let mut spec = WorkerSpec::new(
        PathBuf::from(env!("CARGO_BIN_EXE_sentinel-worker")),
        model,
        vec![shape.to_vec()],
        work_dir.to_path_buf(),
    );
    spec.engine = engine;
    spec.ort_dylib = ort_dylib.map(Path::to_path_buf);
    spec.load_timeout = BOUND;
    spec.request_timeout = BOUND;
    spec
}

/// Starts a worker and insists that it confined itself.
async fn confined_worker(spec: &WorkerSpec) -> Worker {
    let worker = Worker::spawn(spec).await.unwrap_or_else(|e| panic!("{} worker: {e}", spec.engine));
    assert!(worker.confined(), "{} worker is not confined: {:?}", spec.engine, worker.unconfined_reason());
    worker
}

/// Asserts that a serving worker stayed within what its sandbox allows after
/// it stops answering: one thread (a second one would wake up to `futex`,
/// which the filter forbids) and nothing written under its private HOME
/// (ONNX Runtime's telemetry store would be locked with `fcntl` at exit).
fn assert_stays_inside_the_sandbox(worker: &Worker, engine: Engine, work_dir: &Path) {
    let threads = std::fs::read_dir(format!("/proc/{}/task", worker.pid())).unwrap().count();
    assert_eq!(threads, 1, "{engine} worker runs {threads} threads");
    let mut written = Vec::new();
    for home in std::fs::read_dir(work_dir).unwrap() {
        written.extend(std::fs::read_dir(home.unwrap().path()).unwrap().map(|e| e.unwrap().path()));
    }
    assert!(written.is_empty(), "{engine} worker wrote under its HOME: {written:?}");
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Runs every digits sample and the text classifier through confined workers of `engine`.
async fn run_engine(engine: Engine, ort_dylib: Option<&Path>, models: &[DigitsModel], test: &DigitsTest) -> EngineRun {
    let work_dir = tempfile::tempdir().unwrap();
    let mut digits = Vec::with_capacity(models.len());
    for model in models {
        let worker = confined_worker(&spec(engine, ort_dylib, model.file.clone(), &[1, 64], work_dir.path())).await;
        let mut labels = Vec::with_capacity(test.y.len());
        for pixels in test.x.chunks_exact(64) {
            let outputs = worker.infer(&[Tensor::from_f32(vec![1, 64], pixels)]).await.unwrap();
            assert_eq!(outputs.len(), 2, "{engine} {}: probabilities and label", model.name);
            assert_eq!((outputs[0].dtype, outputs[0].shape.as_slice()), (DType::F32, &[1, 10][..]));
            assert_eq!((outputs[1].dtype, outputs[1].shape.as_slice()), (DType::I64, &[1][..]));
            labels.push(argmax(&outputs[0].to_f32().unwrap()));
        }
        assert_stays_inside_the_sandbox(&worker, engine, work_dir.path());
        digits.push(labels);
    }

    let input = read_f32("data/textcls_sample_input.bin");
    let model = model_path("vision/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    let worker = confined_worker(&spec(engine, ort_dylib, model, &[1, 3, 48, 192], work_dir.path())).await;
    let outputs = worker.infer(&[Tensor::from_f32(vec![1, 3, 48, 192], &input)]).await.unwrap();
    assert_eq!(outputs.len(), 1, "{engine}: text classifier outputs");
    assert_eq!((outputs[0].dtype, outputs[0].shape.as_slice()), (DType::F32, &[1, 2][..]));
    assert_stays_inside_the_sandbox(&worker, engine, work_dir.path());
    EngineRun { engine, digits, textcls: outputs[0].to_f32().unwrap() }
}

/// Asserts that `run` meets every model's declared accuracy and the text
/// classifier's reference output.
fn assert_matches_references(run: &EngineRun, models: &[DigitsModel], test: &DigitsTest) {
    for (model, labels) in models.iter().zip(&run.digits) {
        let correct = labels.iter().zip(&test.y).filter(|&(&got, &want)| i64::try_from(got) == Ok(want)).count();
        let accuracy = correct as f64 / test.y.len() as f64;
        eprintln!(
            "{} {}: accuracy {accuracy:.4} ({correct}/{}), declared {:.4}",
            run.engine,
            model.name,
            test.y.len(),
            model.declared_accuracy
        );
        assert!(
            accuracy >= model.declared_accuracy - ACCURACY_SLACK,
            "{} {}: accuracy {accuracy:.4} is below the declared {:.4} less {ACCURACY_SLACK}",
            run.engine,
            model.name,
            model.declared_accuracy
        );
    }

    let reference = read_f32("data/textcls_sample_ref_output.bin");
    assert_eq!(reference.len(), 2);
    eprintln!("{} text direction: {:?}, reference {reference:?}", run.engine, run.textcls);
    assert_eq!(argmax(&run.textcls), argmax(&reference), "{}: text direction class differs", run.engine);
    for (got, want) in run.textcls.iter().zip(&reference) {
        assert!(
            (got - want).abs() <= TEXTCLS_TOLERANCE,
            "{}: text direction {:?} vs reference {reference:?}",
            run.engine,
            run.textcls
        );
    }
}

/// Runs every dtype case `engine` can run through a confined worker of it
/// and compares the outputs with ONNX Runtime's Python reference: tract's
/// and ONNX Runtime's workers carry every dtype alike (bfloat16: ONNX
/// Runtime only, tract has no such tensor type).
async fn run_dtype_cases(engine: Engine, ort_dylib: Option<&Path>) {
    let tmp = tempfile::tempdir().unwrap();
    let cases = dtype_cases::make_models(&tmp.path().join("models"));
    let work_dir = tmp.path().join("work");
    std::fs::create_dir_all(&work_dir).unwrap();
    let mut ran = Vec::new();
    for case in cases.iter().filter(|c| c.runs_on(engine.name())) {
        let inputs: Vec<Tensor> = case.spec["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let datatype = i["datatype"].as_str().unwrap();
                let shape: Vec<usize> = serde_json::from_value(i["shape"].clone()).unwrap();
                let data = dtype_cases::to_binary(datatype, i["data"].as_array().unwrap());
                Tensor { dtype: parse_datatype(datatype).unwrap(), shape, data }
            })
            .collect();
        let model = tmp.path().join("models").join(case.spec["model"].as_str().unwrap());
        let mut spec = spec(engine, ort_dylib, model, &[], &work_dir);
        spec.input_shapes = inputs.iter().map(|t| t.shape.clone()).collect();
        let worker = confined_worker(&spec).await;
        let outputs = worker.infer(&inputs).await.unwrap_or_else(|e| panic!("{engine} {}: {e}", case.name));
        let want = case.spec["outputs"].as_array().unwrap();
        let got: Vec<(Value, Vec<Value>)> = outputs
            .iter()
            .zip(want)
            .map(|(t, w)| {
                let datatype = datatype_name(t.dtype);
                let head = serde_json::json!({"name": w["name"], "datatype": datatype, "shape": t.shape});
                (head, dtype_cases::from_binary(datatype, &t.data))
            })
            .collect();
        dtype_cases::assert_matches(&case.name, engine.name(), &got, want);
        ran.push(case.name.clone());
    }
    eprintln!("{engine} ran the dtype cases {ran:?}");
    assert!(ran.len() >= 7, "{engine} ran only {ran:?}");
}

#[tokio::test]
async fn tract_workers_carry_every_dtype_as_onnx_runtime_computes_it() {
    run_dtype_cases(Engine::Tract, None).await;
}

#[cfg(feature = "ort")]
#[tokio::test]
async fn onnx_runtime_workers_carry_every_dtype_bfloat16_and_strings_included() {
    run_dtype_cases(Engine::Ort, Some(&sentinel_testkit::ort::library())).await;
}

#[tokio::test]
async fn tract_meets_the_declared_accuracy_and_reference_output() {
    let (models, test) = digits_cases();
    let run = run_engine(Engine::Tract, None, &models, &test).await;
    assert_matches_references(&run, &models, &test);
}

#[cfg(feature = "ort")]
#[tokio::test]
async fn onnx_runtime_meets_the_references_and_agrees_with_tract() {
    let dylib = sentinel_testkit::ort::library();
    let (models, test) = digits_cases();
    let ort = run_engine(Engine::Ort, Some(&dylib), &models, &test).await;
    assert_matches_references(&ort, &models, &test);

    let tract = run_engine(Engine::Tract, None, &models, &test).await;
    for ((model, t), o) in models.iter().zip(&tract.digits).zip(&ort.digits) {
        let same = t.iter().zip(o).filter(|(a, b)| a == b).count();
        let agreement = same as f64 / t.len() as f64;
        eprintln!("{}: tract and ort agree on {same}/{} labels ({agreement:.4})", model.name, t.len());
        assert!(agreement >= MIN_AGREEMENT, "{}: tract and ort agree on only {same}/{} labels", model.name, t.len());
    }
    assert_eq!(argmax(&tract.textcls), argmax(&ort.textcls), "text direction: tract and ort disagree");
}

#[cfg(feature = "ort")]
#[tokio::test]
async fn an_onnx_runtime_worker_without_the_library_says_where_to_get_it() {
    // The spec carries no library path: the worker's cleared environment has
    // no ORT_DYLIB_PATH and it must refuse to load rather than search for one.
    let work_dir = tempfile::tempdir().unwrap();
    let spec = spec(Engine::Ort, None, model_path("digits/digits_mlp_v1.onnx"), &[1, 64], work_dir.path());
    match Worker::spawn(&spec).await {
        Err(SupervisorError::ExitedBeforeReady { exit, stderr, .. }) => {
            assert_eq!(exit.code, Some(65), "{exit}; stderr: {stderr:?}");
            let stderr = stderr.join("\n");
            assert!(stderr.contains("ORT_DYLIB_PATH is not set"), "{stderr}");
            assert!(stderr.contains("install-onnxruntime"), "{stderr}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("an ONNX Runtime worker started without its library"),
    }
}

#[cfg(not(feature = "ort"))]
#[tokio::test]
async fn asking_a_build_without_ort_for_it_is_a_usage_error() {
    let work_dir = tempfile::tempdir().unwrap();
    let spec = spec(Engine::Ort, None, model_path("digits/digits_mlp_v1.onnx"), &[1, 64], work_dir.path());
    match Worker::spawn(&spec).await {
        Err(SupervisorError::ExitedBeforeReady { exit, stderr, .. }) => {
            assert_eq!(exit.code, Some(64), "{exit}; stderr: {stderr:?}");
            let stderr = stderr.join("\n");
            assert!(stderr.contains("built without the `ort` feature"), "{stderr}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a worker built without `ort` started an ONNX Runtime engine"),
    }
}

/// Rows for a batch of `n` from one sample: each row scaled differently, so
/// a row answered from the wrong place in the batch shows.
fn rows(sample: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|i| sample.iter().map(|v| v * (1.0 - 0.1 * i as f32)).collect()).collect()
}

/// A confined worker with `--max-batch 8` answers batches of every size up
/// to 8 as one request, each row as the same row sent alone answers (to f32
/// rounding). For the text-direction model tract cannot keep the batch dim
/// symbolic, so the sizes 3, 5 and 8 make new per-size plans after the
/// sandbox is up: the worker must survive that, and stay in one thread.
async fn batches_match_singles(engine: Engine, ort_dylib: Option<&Path>) {
    let work_dir = tempfile::tempdir().unwrap();
    let cases = [
        ("digits/digits_mlp_v1.onnx", vec![1, 64], read_f32("data/digits_test_x.bin")[..64].to_vec()),
        ("vision/ch_ppocr_mobile_v2.0_cls_infer.onnx", vec![1, 3, 48, 192], read_f32("data/textcls_sample_input.bin")),
    ];
    for (model, shape, sample) in cases {
        let mut spec = spec(engine, ort_dylib, model_path(model), &shape, work_dir.path());
        spec.max_batch = 8;
        let worker = confined_worker(&spec).await;
        assert_eq!(worker.max_batch(), 8, "{engine} {model}");
        for n in [2, 3, 5, 8] {
            let rows = rows(&sample, n);
            let mut batch_shape = shape.clone();
            batch_shape[0] = n;
            let batch = Tensor::from_f32(batch_shape, &rows.concat());
            let outputs = worker.infer(&[batch]).await.unwrap_or_else(|e| panic!("{engine} {model} batch {n}: {e}"));
            for (i, row) in rows.iter().enumerate() {
                let single = worker.infer(&[Tensor::from_f32(shape.clone(), row)]).await.unwrap();
                for (o, (b, s)) in outputs.iter().zip(&single).enumerate() {
                    assert_eq!(b.shape[0], n, "{engine} {model} batch {n} output {o}");
                    let per = b.data.len() / n;
                    let got = Tensor {
                        dtype: b.dtype,
                        shape: s.shape.clone(),
                        data: b.data[i * per..(i + 1) * per].to_vec(),
                    };
                    match (got.to_f32(), s.to_f32()) {
                        (Ok(got), Ok(want)) => {
                            for (g, w) in got.iter().zip(&want) {
                                assert!(
                                    (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
                                    "{engine} {model} batch {n} row {i}: {g} vs {w}"
                                );
                            }
                        }
                        _ => assert_eq!(got, *s, "{engine} {model} batch {n} row {i} output {o}"),
                    }
                }
            }
        }
        assert_stays_inside_the_sandbox(&worker, engine, work_dir.path());
    }
}

#[tokio::test]
async fn tract_runs_batches_of_every_size_as_one_inside_the_sandbox() {
    batches_match_singles(Engine::Tract, None).await;
}

#[cfg(feature = "ort")]
#[tokio::test]
async fn onnx_runtime_runs_batches_of_every_size_as_one_inside_the_sandbox() {
    batches_match_singles(Engine::Ort, Some(&sentinel_testkit::ort::library())).await;
}
