//! The worker's one model: loaded by an [`Engine`] (tract, or ONNX Runtime with
//! the `ort` feature) for fixed input shapes, warmed up, and run on requests
//! that are checked against those shapes first.
//!
//! Every input shape is fixed at load time (models may declare symbolic
//! dimensions such as `N`), so the optimised plan is concrete and the warm-up
//! exercises exactly the code paths later requests take. That matters for the
//! sandbox: tract reads `/sys` and sizes its buffers on the first run, which
//! must happen before the filter forbids opening files.
//!
//! Both engines share the request checks (count, element type, shape, finite
//! values) in [`LoadedModel::run`], so a request is refused with the same
//! message whichever engine would have run it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use sentinel_worker_protocol::frame::{DType, Element, Tensor};
pub use sentinel_worker_protocol::launch::{Engine, ORT_DYLIB_ENV, ORT_TELEMETRY_ENV, Provider, Providers};

/// Whether this build can run `engine`: ONNX Runtime needs the `ort` feature.
pub fn is_available(engine: Engine) -> bool {
    match engine {
        Engine::Tract => true,
        Engine::Ort => cfg!(feature = "ort"),
    }
}

/// The model could not be prepared for serving.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the `{engine}` engine is unavailable: sentinel-worker was built without the `ort` feature")]
    EngineUnavailable { engine: Engine },
    #[error("loading the ONNX Runtime library: {message}")]
    Runtime { message: String },
    #[error(
        "the ONNX Runtime library {} has no {provider} execution provider (a CPU-only build?); point \
         ORT_DYLIB_PATH / serving.ort_library at a build that has it, or allow falling back to the next \
         provider (provider_fallback = true)",
        library.display()
    )]
    Provider { provider: Provider, library: PathBuf },
    #[error("loading {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: the model has {model} inputs but {given} input shapes were given")]
    InputCount { path: PathBuf, model: usize, given: usize },
    #[error(
        "{path}: {what} {index} has type {datum}, which this engine cannot carry (tract: every ONNX \
         tensor type but bfloat16, complex and 4/8-bit ones; ONNX Runtime: all but complex and 4/8-bit ones)"
    )]
    UnsupportedDType { path: PathBuf, what: &'static str, index: usize, datum: String },
    #[error("{path}: input {index} is declared with shape {declared:?} (-1: any), which {given:?} does not fit")]
    IncompatibleShape { path: PathBuf, index: usize, declared: Vec<i64>, given: Vec<usize> },
    #[error("{path}: warm-up inference failed: {message}")]
    WarmUp { path: PathBuf, message: String },
}

/// A request the model cannot run; the worker answers it with an error and
/// keeps serving.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InferenceError {
    #[error("expected {expected} input tensors, got {found}")]
    InputCount { expected: usize, found: usize },
    #[error("input {index}: expected {expected}, got {found}")]
    DType { index: usize, expected: DType, found: DType },
    #[error("input {index}: expected shape {expected:?}{}, got {found:?}", batch_note(*.max_batch))]
    Shape { index: usize, expected: Vec<usize>, found: Vec<usize>, max_batch: usize },
    #[error("input {index}: element {element} is {value}; inputs must be finite")]
    NotFinite { index: usize, element: usize, value: f64 },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("output {index} has unsupported type {datum}")]
    OutputDType { index: usize, datum: String },
}

fn batch_note(max_batch: usize) -> String {
    if max_batch > 1 {
        format!(" (or a batch of up to {max_batch} in the first dim of every input)")
    } else {
        String::new()
    }
}

/// The shape and type a request must have for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// An optimised, runnable model with fixed input shapes.
#[derive(Debug)]
pub struct LoadedModel {
    runner: Runner,
    inputs: Vec<InputSpec>,
    /// Largest batch one request may carry in every input's first dim (1:
    /// exactly the fixed shapes). See [`LoadedModel::load_batched`].
    max_batch: usize,
    /// tract's plans for batches, beside the one for the fixed shapes.
    batched: Option<TractBatch>,
}

/// How tract runs a batch of several samples.
#[derive(Debug)]
enum TractBatch {
    /// One plan with a symbolic first dim, for any batch size.
    Symbolic(Arc<TypedRunnableModel>),
    /// A graph whose first dim tract cannot leave symbolic (e.g. a Reshape
    /// to a shape computed from the batch): a plan per power-of-two batch
    /// size, each made on first use from the graph kept in memory (the file
    /// cannot be opened once the sandbox is up) and kept. A batch is padded
    /// with zero samples to its bucket and the outputs cut back, so a client
    /// sending every size between 2 and 64 makes at most 6 plans.
    Buckets { graph: Box<InferenceModel>, fixed: Vec<Vec<usize>>, plans: Mutex<Vec<(usize, Arc<TypedRunnableModel>)>> },
}

/// Runs of each kind [`LoadedModel::tune_batching`] times.
pub const TUNE_RUNS: usize = 2;

/// Whether running a batch as one is worth it: a sample in the batch must
/// cost at most 0.8x of a sample alone, so timing noise cannot turn it on
/// for a model where it does not pay.
pub fn batching_pays(single: Duration, per_sample_in_batch: Duration) -> bool {
    per_sample_in_batch.as_secs_f64() <= 0.8 * single.as_secs_f64()
}

/// Whether one timed batch already settles that batching does not pay: a
/// sample in it cost 1.25x a sample alone or more. The batch ran once in
/// the warm-up already, so a second run (the fastest is kept) would have to
/// be over a third faster to come under 0.8x. A batch of a convolutional
/// model takes a few hundred milliseconds: skipping the run shortens every
/// load of such a model.
pub fn clearly_not_paying(single: Duration, per_sample_in_batch: Duration) -> bool {
    per_sample_in_batch.as_secs_f64() >= 1.25 * single.as_secs_f64()
}

/// The power-of-two bucket a batch of `n` runs in, capped at `max`.
fn bucket(n: usize, max: usize) -> usize {
    n.next_power_of_two().min(max)
}

/// The engine-specific half of a [`LoadedModel`].
#[derive(Debug)]
enum Runner {
    Tract(Arc<TypedRunnableModel>),
    #[cfg(feature = "ort")]
    Ort(crate::engine_ort::OrtModel),
}

impl LoadedModel {
    /// Loads the ONNX file at `path` with tract, one shape per model input, in
    /// order. An input's element type comes from the model (f32 when undeclared).
    pub fn load(path: &Path, input_shapes: &[Vec<usize>]) -> Result<LoadedModel, ModelError> {
        LoadedModel::load_with(Engine::Tract, path, input_shapes)
    }

    /// Loads the ONNX file at `path` with `engine`; see [`LoadedModel::load`].
    pub fn load_with(engine: Engine, path: &Path, input_shapes: &[Vec<usize>]) -> Result<LoadedModel, ModelError> {
        LoadedModel::load_batched(engine, path, input_shapes, 1, &Providers::default())
    }

    /// Like [`LoadedModel::load_with`], also running requests whose inputs
    /// all carry a batch of 1 to `max_batch` samples in their first dim (the
    /// fixed shapes' first dim being the model's symbolic batch dim, fixed to
    /// 1). Such a batch runs as one: ONNX Runtime leaves the batch dim
    /// dynamic; tract gets a second plan with a symbolic first dim, beside
    /// the one for the fixed shapes that single requests keep. A model tract
    /// cannot plan that way serves single samples only, and says so on stderr.
    /// `providers` are ONNX Runtime's execution providers (tract ignores them).
    pub fn load_batched(
        engine: Engine,
        path: &Path,
        input_shapes: &[Vec<usize>],
        max_batch: usize,
        providers: &Providers,
    ) -> Result<LoadedModel, ModelError> {
        let batchable = max_batch > 1 && !input_shapes.is_empty() && input_shapes.iter().all(|s| s.first() == Some(&1));
        match engine {
            Engine::Tract => {
                let mut model = load_tract(path, input_shapes)?;
                if batchable {
                    match tract_batching(path, input_shapes, max_batch) {
                        Ok(batched) => {
                            model.batched = Some(batched);
                            model.max_batch = max_batch;
                        }
                        Err(e) => eprintln!(
                            "sentinel-worker: {}: no plan for batches, they run sample by sample: {e}",
                            path.display()
                        ),
                    }
                }
                Ok(model)
            }
            #[cfg(feature = "ort")]
            Engine::Ort => {
                let (model, inputs) = crate::engine_ort::load(path, input_shapes, batchable, providers)?;
                let max_batch = if batchable { max_batch } else { 1 };
                Ok(LoadedModel { runner: Runner::Ort(model), inputs, max_batch, batched: None })
            }
            #[cfg(not(feature = "ort"))]
            Engine::Ort => {
                let _ = providers;
                Err(ModelError::EngineUnavailable { engine })
            }
        }
    }

    /// The largest batch a request may carry (1 when batches are not run as one).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// What each request input must look like.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// Runs once on zeros so that everything the engine initialises lazily
    /// (tract's CPU feature and cache-size probes under `/sys`, scratch
    /// buffers, ONNX Runtime's allocation arenas) is done before the sandbox
    /// goes up.
    pub fn warm_up(&self, path: &Path) -> Result<(), ModelError> {
        let warm_err = |e: InferenceError| ModelError::WarmUp { path: path.to_owned(), message: e.to_string() };
        self.run_zeros().map_err(warm_err)?;
        if self.max_batch > 1 {
            // The batched path too, at the largest batch, so that its
            // buffers are sized before the sandbox goes up.
            self.run(&self.zeros(Some(self.max_batch)).map_err(warm_err)?).map_err(warm_err)?;
        }
        Ok(())
    }

    /// Zeros of each input's fixed shape and own dtype (empty strings for
    /// string inputs), with `batch` samples in the first dim when given.
    /// Allocated fallibly: under a memory limit a huge shape is an error to
    /// report, not an abort.
    fn zeros(&self, batch: Option<usize>) -> Result<Vec<Tensor>, InferenceError> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let mut shape = spec.shape.clone();
                if let Some(n) = batch {
                    shape[0] = n;
                }
                Tensor::zeros(spec.dtype, &shape).map_err(|e| InferenceError::Run(format!("input {index}: {e}")))
            })
            .collect()
    }

    /// Times one sample against the largest batch ([`TUNE_RUNS`] runs each,
    /// the fastest of each kept) and stops running batches as one unless
    /// that is worth it per sample (see [`batching_pays`]). Convolutional
    /// models on one CPU thread often run a large batch slower per sample
    /// than single ones (the activations leave the cache). Call after
    /// [`LoadedModel::warm_up`], before the sandbox goes up. Returns the
    /// per-sample times (single, batched) measured, if it measured.
    pub fn tune_batching(&mut self) -> Result<Option<(Duration, Duration)>, InferenceError> {
        if self.max_batch <= 1 {
            return Ok(None);
        }
        let single = self.zeros(None)?;
        let batch = self.zeros(Some(self.max_batch))?;
        let n = u32::try_from(self.max_batch).unwrap_or(u32::MAX);
        // The fastest of TUNE_RUNS runs, each divided by `per`; `enough`
        // may end the runs early.
        let fastest = |inputs: &[Tensor], per: u32, enough: &dyn Fn(Duration) -> bool| {
            let mut best = Duration::MAX;
            for _ in 0..TUNE_RUNS {
                let start = Instant::now();
                self.run(inputs)?;
                best = best.min(start.elapsed() / per);
                if enough(best) {
                    break;
                }
            }
            Ok::<_, InferenceError>(best)
        };
        let one = fastest(&single, 1, &|_| false)?;
        let per_sample = fastest(&batch, n, &|per_sample| clearly_not_paying(one, per_sample))?;
        if !batching_pays(one, per_sample) {
            self.max_batch = 1;
            self.batched = None;
            // The batch's plans and buffers are freed; hand the pages back
            // rather than carry them as resident memory for the worker's life.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free heap memory; it takes an
            // integer and touches no memory the program owns.
            #[allow(unsafe_code)]
            unsafe {
                libc::malloc_trim(0);
            }
        }
        Ok(Some((one, per_sample)))
    }

    /// Runs the model once on all-zero inputs of the fixed shapes: the
    /// warm-up, and the probe of `sentinel-worker --check`.
    pub fn run_zeros(&self) -> Result<Vec<Tensor>, InferenceError> {
        self.run(&self.zeros(None)?)
    }

    /// Checks `inputs` against the fixed specs (or a batch of them), then runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        let batch = check_inputs(&self.inputs, inputs, self.max_batch)?;
        match (&self.runner, &self.batched, batch) {
            // A single sample keeps the plan made for its fixed shape, the
            // fastest. tract picks a matrix-vector kernel for one row and a
            // matrix-matrix kernel for several, so a sample's float outputs
            // may differ in the last bits with the batch it came in (labels
            // do not); running singles on the batched plan would not help,
            // as it makes the same choice at run time.
            (Runner::Tract(_), Some(TractBatch::Symbolic(plan)), Some(_)) => run_tract(plan, inputs),
            (Runner::Tract(_), Some(TractBatch::Buckets { graph, fixed, plans }), Some(n)) => {
                let size = bucket(n, self.max_batch);
                let plan = bucket_plan(graph, fixed, plans, size)?;
                let padded: Vec<Tensor> = inputs.iter().map(|t| pad_batch(t, size)).collect::<Result<_, _>>()?;
                let outputs = run_tract(&plan, &padded)?;
                outputs.into_iter().enumerate().map(|(index, o)| cut_batch(index, o, n, size)).collect()
            }
            (Runner::Tract(plan), _, _) => run_tract(plan, inputs),
            #[cfg(feature = "ort")]
            (Runner::Ort(model), _, _) => model.run(inputs),
        }
    }

    /// Runs each sample of the inputs' first dim by itself, as a request
    /// carrying it alone would run, and joins the outputs along the first
    /// dim: each sample's outputs are bit for bit those it gets alone, which
    /// one batched run does not promise. The whole request is checked before
    /// any sample runs, so a bad one runs nothing.
    pub fn run_rows(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        if let Some(index) = self.inputs.iter().position(|spec| spec.shape.first() != Some(&1)) {
            return Err(InferenceError::Run(format!(
                "input {index} has no batch dim of 1 (shape {:?}), so its samples cannot run one by one",
                self.inputs[index].shape
            )));
        }
        let Some(n) = check_inputs(&self.inputs, inputs, usize::MAX)? else {
            return self.run(inputs);
        };
        let runs = (0..n)
            .map(|i| self.run(&inputs.iter().map(|t| t.samples(i, 1)).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::concat_each(runs).map_err(|index| {
            InferenceError::Run(format!("output {index} has no first dim to join the samples' outputs along"))
        })
    }
}

/// The request checks both engines rely on: the right number of inputs, each
/// with the fixed element type and shape, and no NaN or infinity in float
/// data. With `max_batch` over 1, every input may instead carry the same
/// batch of 2 to `max_batch` samples in its first dim, returned.
fn check_inputs(specs: &[InputSpec], inputs: &[Tensor], max_batch: usize) -> Result<Option<usize>, InferenceError> {
    if inputs.len() != specs.len() {
        return Err(InferenceError::InputCount { expected: specs.len(), found: inputs.len() });
    }
    let mut batch = 1;
    for (index, (t, spec)) in inputs.iter().zip(specs).enumerate() {
        if t.dtype != spec.dtype {
            return Err(InferenceError::DType { index, expected: spec.dtype, found: t.dtype });
        }
        // Fixed shapes are a batch of 1; with batching on, the first dim may
        // carry 2 to `max_batch` samples, the same number in every input.
        let n = if t.shape == spec.shape {
            1
        } else if max_batch > 1 && t.shape.len() == spec.shape.len() && t.shape[1..] == spec.shape[1..] {
            t.shape[0]
        } else {
            0
        };
        if !(1..=max_batch).contains(&n) || (index > 0 && n != batch) {
            return Err(InferenceError::Shape {
                index,
                expected: spec.shape.clone(),
                found: t.shape.clone(),
                max_batch,
            });
        }
        batch = n;
        if let Some((element, value)) = t.first_non_finite() {
            return Err(InferenceError::NotFinite { index, element, value });
        }
    }
    Ok((batch > 1).then_some(batch))
}

fn load_tract(path: &Path, input_shapes: &[Vec<usize>]) -> Result<LoadedModel, ModelError> {
    let typed = optimise_tract(path, input_shapes)?;
    LoadedModel::from_optimised(path, typed)
}

/// One documented way of reading an ONNX graph into tract, tried in order by
/// [`optimise_tract`] until one loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStep {
    /// As declared: the file's `value_info` kept; output shapes ignored
    /// (often wrong for other batch sizes) and inferred from the inputs.
    AsDeclared,
    /// Ignoring the file's `value_info` and output shapes. Converters
    /// (PaddlePaddle's among them) type intermediate values with symbols such
    /// as `DynamicDimension.0` that tract cannot unify with fixed inputs.
    IgnoreValueInfo,
}

impl LoadStep {
    /// Every step, in the order they are tried.
    pub const ALL: [LoadStep; 2] = [LoadStep::AsDeclared, LoadStep::IgnoreValueInfo];

    /// The step's name in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            LoadStep::AsDeclared => "as declared",
            LoadStep::IgnoreValueInfo => "ignoring value_info and output shapes",
        }
    }
}

/// How one [`LoadStep`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadAttempt {
    pub step: LoadStep,
    /// `None` when the step loaded the model.
    pub error: Option<String>,
}

/// Loads the ONNX file at `path` with tract and optimises it for the fixed
/// `input_shapes`, whatever its element types. This is the expensive half of
/// loading (analysis and optimisation grow with the graph and may fold
/// constants of any size), kept apart so that `--check` can report a model
/// that optimises but has a dtype the wire protocol does not carry yet.
///
/// Tries each [`LoadStep`] in order and logs each attempt on stderr; the
/// error of a model no step loads is the first step's (the file as declared),
/// naming the later steps that failed too.
pub fn optimise_tract(path: &Path, input_shapes: &[Vec<usize>]) -> Result<TypedModel, ModelError> {
    let (result, attempts) = optimise_tract_steps(path, input_shapes);
    for attempt in &attempts {
        match &attempt.error {
            None => eprintln!("sentinel-worker: {}: loaded {}", path.display(), attempt.step.name()),
            Some(e) => eprintln!("sentinel-worker: {}: loading {} failed: {e}", path.display(), attempt.step.name()),
        }
    }
    result
}

/// [`optimise_tract`] without the logging: the result, and every step tried.
pub fn optimise_tract_steps(
    path: &Path,
    input_shapes: &[Vec<usize>],
) -> (Result<TypedModel, ModelError>, Vec<LoadAttempt>) {
    let mut attempts = Vec::new();
    let mut first_error = None;
    for step in LoadStep::ALL {
        match optimise_tract_step(path, input_shapes, step) {
            Ok(typed) => {
                attempts.push(LoadAttempt { step, error: None });
                return (Ok(typed), attempts);
            }
            // Not a graph problem: no other step can do better.
            Err(e @ ModelError::InputCount { .. }) => {
                attempts.push(LoadAttempt { step, error: Some(e.to_string()) });
                return (Err(e), attempts);
            }
            Err(e) => {
                attempts.push(LoadAttempt { step, error: Some(e.to_string()) });
                first_error.get_or_insert(e);
            }
        }
    }
    let error = match first_error {
        Some(ModelError::Load { path, message }) if attempts.len() > 1 => {
            let tried: Vec<&str> = attempts[1..].iter().map(|a| a.step.name()).collect();
            ModelError::Load { path, message: format!("{message} (also tried: {})", tried.join("; ")) }
        }
        Some(other) => other,
        None => ModelError::Load { path: path.to_owned(), message: "no load step was tried".into() },
    };
    (Err(error), attempts)
}

/// tract's way to run batches of up to `max_batch`: one plan with a symbolic
/// first dim when the graph allows it, else per-size plans made from the
/// graph kept in memory (the largest made here, so the file is read and the
/// batched path exercised before the sandbox goes up).
fn tract_batching(path: &Path, input_shapes: &[Vec<usize>], max_batch: usize) -> Result<TractBatch, ModelError> {
    let load_err = |e: TractError| ModelError::Load { path: path.to_owned(), message: format!("{e:#}") };
    let mut first_error = None;
    for step in LoadStep::ALL {
        match optimise_tract_with(path, input_shapes, step, true).and_then(|t| t.into_runnable().map_err(load_err)) {
            Ok(plan) => return Ok(TractBatch::Symbolic(plan)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let symbolic = first_error.map(|e| e.to_string()).unwrap_or_default();
    for step in LoadStep::ALL {
        let graph = step_framework(step).model_for_path(path).map_err(load_err)?;
        let plans = Mutex::new(Vec::new());
        if bucket_plan(&graph, input_shapes, &plans, max_batch).is_ok() {
            eprintln!(
                "sentinel-worker: {}: tract cannot leave the batch dim symbolic ({symbolic}); batches run on a plan per power-of-two size",
                path.display()
            );
            return Ok(TractBatch::Buckets { graph: Box::new(graph), fixed: input_shapes.to_vec(), plans });
        }
    }
    Err(ModelError::Load { path: path.to_owned(), message: symbolic })
}

/// The plan for batches of `size`, made from `graph` on first use and kept.
fn bucket_plan(
    graph: &InferenceModel,
    fixed: &[Vec<usize>],
    plans: &Mutex<Vec<(usize, Arc<TypedRunnableModel>)>>,
    size: usize,
) -> Result<Arc<TypedRunnableModel>, InferenceError> {
    let mut plans = plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, plan)) = plans.iter().find(|(s, _)| *s == size) {
        return Ok(Arc::clone(plan));
    }
    let plan_err = |e: TractError| InferenceError::Run(format!("planning a batch of {size}: {e:#}"));
    let mut model = graph.clone();
    for (index, shape) in fixed.iter().enumerate() {
        let datum = model.input_fact(index).map_err(plan_err)?.datum_type().unwrap_or(f32::datum_type());
        let mut shape = shape.clone();
        shape[0] = size;
        model.set_input_fact(index, InferenceFact::dt_shape(datum, shape)).map_err(plan_err)?;
    }
    let plan = model.into_optimized().and_then(TypedModel::into_runnable).map_err(plan_err)?;
    plans.push((size, Arc::clone(&plan)));
    Ok(plan)
}

/// `t` (a batch in its first dim) with zero samples added up to `size`.
fn pad_batch(t: &Tensor, size: usize) -> Result<Tensor, InferenceError> {
    let n = t.shape.first().copied().unwrap_or(0);
    if n == size {
        return Ok(t.clone());
    }
    let mut shape = t.shape.clone();
    shape[0] = size;
    if t.dtype.width().is_none() {
        return Err(InferenceError::Run("string inputs are not padded".into()));
    }
    let mut padded = Tensor::zeros(t.dtype, &shape).map_err(|e| InferenceError::Run(e.to_string()))?;
    // Fixed-width elements: the samples come first, the zeros after them.
    padded.data[..t.data.len()].copy_from_slice(&t.data);
    Ok(padded)
}

/// Output `index` of a padded batch of `size`, cut back to its first `n` samples.
fn cut_batch(index: usize, t: Tensor, n: usize, size: usize) -> Result<Tensor, InferenceError> {
    if n == size {
        return Ok(t);
    }
    if t.shape.first() != Some(&size) {
        return Err(InferenceError::Run(format!(
            "output {index} has shape {:?}, not a batch of {size} in its first dim to cut to {n}",
            t.shape
        )));
    }
    let width =
        t.dtype.width().ok_or_else(|| InferenceError::Run(format!("output {index}: string outputs are not cut")))?;
    let per = t.shape[1..].iter().product::<usize>() * width;
    let mut shape = t.shape;
    shape[0] = n;
    let mut data = t.data;
    data.truncate(n * per);
    Ok(Tensor { dtype: t.dtype, shape, data })
}

fn step_framework(step: LoadStep) -> tract_onnx::Onnx {
    match step {
        LoadStep::AsDeclared => onnx().with_ignore_output_shapes(true),
        LoadStep::IgnoreValueInfo => onnx().with_ignore_output_shapes(true).with_ignore_value_info(true),
    }
}

fn optimise_tract_step(path: &Path, input_shapes: &[Vec<usize>], step: LoadStep) -> Result<TypedModel, ModelError> {
    optimise_tract_with(path, input_shapes, step, false)
}

fn optimise_tract_with(
    path: &Path,
    input_shapes: &[Vec<usize>],
    step: LoadStep,
    symbolic_batch: bool,
) -> Result<TypedModel, ModelError> {
    let load_err = |e: TractError| ModelError::Load { path: path.to_owned(), message: format!("{e:#}") };
    let mut model = step_framework(step).model_for_path(path).map_err(load_err)?;
    let count = model.inputs.len();
    if count != input_shapes.len() {
        return Err(ModelError::InputCount { path: path.to_owned(), model: count, given: input_shapes.len() });
    }
    let batch = model.symbols.sym("N");
    for (index, shape) in input_shapes.iter().enumerate() {
        let datum = model.input_fact(index).map_err(load_err)?.datum_type().unwrap_or(f32::datum_type());
        let fact = if symbolic_batch {
            let dims: TVec<TDim> =
                shape.iter().enumerate().map(|(i, &d)| if i == 0 { batch.to_dim() } else { d.to_dim() }).collect();
            InferenceFact::dt_shape(datum, dims)
        } else {
            InferenceFact::dt_shape(datum, shape.clone())
        };
        model.set_input_fact(index, fact).map_err(load_err)?;
    }
    model.into_optimized().map_err(load_err)
}

impl LoadedModel {
    /// Makes an optimised tract model runnable, refusing element types the
    /// wire protocol does not carry.
    pub fn from_optimised(path: &Path, typed: TypedModel) -> Result<LoadedModel, ModelError> {
        let load_err = |e: TractError| ModelError::Load { path: path.to_owned(), message: format!("{e:#}") };
        let unsupported = |what, index, datum: DatumType| ModelError::UnsupportedDType {
            path: path.to_owned(),
            what,
            index,
            datum: format!("{datum:?}"),
        };
        let mut inputs = Vec::with_capacity(typed.inputs.len());
        for index in 0..typed.inputs.len() {
            let fact = typed.input_fact(index).map_err(load_err)?;
            let dtype =
                wire_dtype(fact.datum_type, false).ok_or_else(|| unsupported("input", index, fact.datum_type))?;
            let shape = fact.shape.as_concrete().map(<[usize]>::to_vec).ok_or_else(|| ModelError::Load {
                path: path.to_owned(),
                message: format!("input {index} has no concrete shape after optimisation: {:?}", fact.shape),
            })?;
            inputs.push(InputSpec { dtype, shape });
        }
        for index in 0..typed.outputs.len() {
            let datum = typed.output_fact(index).map_err(load_err)?.datum_type;
            if wire_dtype(datum, true).is_none() {
                return Err(unsupported("output", index, datum));
            }
        }
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(LoadedModel { runner: Runner::Tract(plan), inputs, max_batch: 1, batched: None })
    }
}

fn run_tract(plan: &Arc<TypedRunnableModel>, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
    let values = inputs
        .iter()
        .enumerate()
        .map(|(index, t)| to_tract(index, t).map(IntoTValue::into_tvalue))
        .collect::<Result<TVec<_>, _>>()?;
    let outputs = plan.run(values).map_err(|e| InferenceError::Run(format!("{e:#}")))?;
    outputs.iter().enumerate().map(|(index, v)| from_tract(index, v)).collect()
}

/// The wire dtype of a tract datum type. tract has no bfloat16; its `TDim`
/// (symbolic dims, e.g. a shape computed in the graph and returned, as
/// skl2onnx's label outputs are typed) is carried as i64, for outputs only.
fn wire_dtype(datum: DatumType, output: bool) -> Option<DType> {
    Some(match datum {
        DatumType::F32 => DType::F32,
        DatumType::F16 => DType::F16,
        DatumType::F64 => DType::F64,
        DatumType::U8 => DType::U8,
        DatumType::I8 => DType::I8,
        DatumType::U16 => DType::U16,
        DatumType::I16 => DType::I16,
        DatumType::U32 => DType::U32,
        DatumType::I32 => DType::I32,
        DatumType::U64 => DType::U64,
        DatumType::I64 => DType::I64,
        DatumType::Bool => DType::Bool,
        DatumType::String => DType::String,
        DatumType::TDim if output => DType::I64,
        _ => return None,
    })
}

/// Builds a tract tensor from wire bytes. The protocol decoder has already
/// checked the bytes against the shape (booleans 0 or 1, strings well
/// formed), and [`check_inputs`] that float values are finite.
fn to_tract(index: usize, t: &Tensor) -> Result<tract_onnx::prelude::Tensor, InferenceError> {
    fn typed<T: Element + Datum>(t: &Tensor) -> TractResult<tract_onnx::prelude::Tensor> {
        let values = t.values::<T>()?;
        tract_onnx::prelude::Tensor::from_shape(&t.shape, &values)
    }
    let converted = match t.dtype {
        DType::F32 => typed::<f32>(t),
        DType::F16 => typed::<f16>(t),
        DType::F64 => typed::<f64>(t),
        DType::U8 => typed::<u8>(t),
        DType::I8 => typed::<i8>(t),
        DType::U16 => typed::<u16>(t),
        DType::I16 => typed::<i16>(t),
        DType::U32 => typed::<u32>(t),
        DType::I32 => typed::<i32>(t),
        DType::U64 => typed::<u64>(t),
        DType::I64 => typed::<i64>(t),
        DType::Bool => typed::<bool>(t),
        DType::String => t.strings().map_err(TractError::from).and_then(|elements| {
            // tract's strings are Rust `String`s: bytes that are not UTF-8
            // are refused rather than altered.
            let values = elements
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    String::from_utf8(e.to_vec())
                        .map_err(|_| TractError::msg(format!("string element {i} is not UTF-8")))
                })
                .collect::<TractResult<Vec<String>>>()?;
            Ok(tract_ndarray::ArrayD::from_shape_vec(t.shape.clone(), values)?.into())
        }),
        DType::BF16 => Err(TractError::msg("tract has no bfloat16 tensors")),
    };
    converted.map_err(|e| InferenceError::Run(format!("input {index}: {e:#}")))
}

fn from_tract(index: usize, v: &TValue) -> Result<Tensor, InferenceError> {
    fn typed<T: Element + Datum>(shape: Vec<usize>, v: &tract_onnx::prelude::Tensor) -> TractResult<Tensor> {
        Ok(Tensor::from_values(shape, v.try_as_plain_ram()?.as_slice::<T>()?))
    }
    let shape = v.shape().to_vec();
    let datum = v.datum_type();
    let dtype =
        wire_dtype(datum, true).ok_or_else(|| InferenceError::OutputDType { index, datum: format!("{datum:?}") })?;
    let converted = match dtype {
        // A TDim output: concrete dims after the run, carried as i64.
        DType::I64 if datum == DatumType::TDim => v.cast_to::<i64>().and_then(|c| typed::<i64>(shape.clone(), &c)),
        DType::F32 => typed::<f32>(shape, v),
        DType::F16 => typed::<f16>(shape, v),
        DType::F64 => typed::<f64>(shape, v),
        DType::U8 => typed::<u8>(shape, v),
        DType::I8 => typed::<i8>(shape, v),
        DType::U16 => typed::<u16>(shape, v),
        DType::I16 => typed::<i16>(shape, v),
        DType::U32 => typed::<u32>(shape, v),
        DType::I32 => typed::<i32>(shape, v),
        DType::U64 => typed::<u64>(shape, v),
        DType::I64 => typed::<i64>(shape, v),
        DType::Bool => typed::<bool>(shape, v),
        DType::String => {
            v.try_as_plain_ram().and_then(|view| Ok(Tensor::from_strings(shape, view.as_slice::<String>()?)))
        }
        DType::BF16 => Err(TractError::msg("tract has no bfloat16 tensors")),
    };
    converted.map_err(|e| InferenceError::Run(format!("output {index}: {e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_pays_only_when_a_sample_in_the_batch_is_clearly_cheaper() {
        let us = Duration::from_micros;
        // digits on tract: 46 µs alone, 3.6 µs per sample in a batch of 64.
        assert!(batching_pays(us(46), us(4)));
        // the text-direction model: 3.3 ms alone, 9 ms per sample in a batch of 64.
        assert!(!batching_pays(us(3_300), us(9_000)));
        assert!(batching_pays(us(100), us(80)), "0.8x is enough");
        assert!(!batching_pays(us(100), us(81)), "a hair better is noise");
        // text-direction on tract: a sample in a batch of 64 at 1.7-2.5x a
        // lone one; one timed batch settles it.
        assert!(clearly_not_paying(us(3_700), us(6_200)));
        assert!(clearly_not_paying(us(100), us(125)));
        assert!(!clearly_not_paying(us(100), us(110)), "close to 1x the second run is still timed");
        assert!(!clearly_not_paying(us(46), us(4)));
    }

    #[test]
    fn every_input_carries_the_fixed_shape_or_the_same_batch_up_to_the_largest() {
        let specs =
            [InputSpec { dtype: DType::F32, shape: vec![1, 2] }, InputSpec { dtype: DType::F32, shape: vec![1, 3] }];
        let t = |n: usize, w: usize| Tensor::from_f32(vec![n, w], &vec![0.5; n * w]);
        assert_eq!(check_inputs(&specs, &[t(1, 2), t(1, 3)], 8), Ok(None), "fixed shapes");
        assert_eq!(check_inputs(&specs, &[t(4, 2), t(4, 3)], 8), Ok(Some(4)));
        assert_eq!(check_inputs(&specs, &[t(8, 2), t(8, 3)], 8), Ok(Some(8)), "the largest batch");
        let refused = |inputs: &[Tensor], max: usize| check_inputs(&specs, inputs, max).unwrap_err().to_string();
        assert_eq!(
            refused(&[t(9, 2), t(9, 3)], 8),
            "input 0: expected shape [1, 2] (or a batch of up to 8 in the first dim of every input), got [9, 2]"
        );
        assert!(refused(&[t(4, 2), t(5, 3)], 8).starts_with("input 1:"), "batches that disagree");
        assert!(refused(&[t(1, 2), t(4, 3)], 8).starts_with("input 1:"), "a batch beside a single sample");
        assert!(refused(&[t(4, 2), t(1, 3)], 8).starts_with("input 1:"), "a single sample beside a batch");
        assert!(refused(&[t(0, 2), t(0, 3)], 8).starts_with("input 0:"), "an empty batch");
        assert_eq!(refused(&[t(4, 2), t(4, 3)], 1), "input 0: expected shape [1, 2], got [4, 2]", "batching off");
    }

    #[test]
    fn batches_are_padded_to_power_of_two_buckets_up_to_the_largest() {
        assert_eq!([2, 3, 4, 5, 9, 33, 64].map(|n| bucket(n, 64)), [2, 4, 4, 8, 16, 64, 64]);
        assert_eq!(bucket(7, 6), 6, "capped at the largest batch");
    }

    #[test]
    fn padding_adds_zero_samples_and_cutting_takes_them_away() {
        let t = Tensor::from_f32(vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let padded = pad_batch(&t, 4).unwrap();
        assert_eq!(padded.shape, vec![4, 2]);
        assert_eq!(padded.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
        assert_eq!(cut_batch(0, padded, 3, 4).unwrap(), t);
        let not_batched = Tensor::from_f32(vec![2], &[0.0, 1.0]);
        assert!(cut_batch(1, not_batched, 3, 4).unwrap_err().to_string().contains("output 1 has shape [2]"));
    }
}
