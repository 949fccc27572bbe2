//! Installing a version: stage it in the idle slot, start its confined
//! worker, validate it (declared output shapes and dtypes, finite values,
//! accuracy on its validation set), then promote it or start its rollout;
//! and restoring the committed slots after a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use sentinel_proto::pb::ModelManifest;

use super::batcher::{Batcher, joinable};
use super::io::{OutputError, TensorsError, check_outputs, model_io, predicted_label};
use super::slot::{CandidateMode, Loaded, Route, WINDOW_AGE, WINDOW_SAMPLES};
use super::{Serving, TensorInfo};
use crate::rollout::policy::{PhaseKind, Policy};
use crate::rollout::window::SlotWindow;
use crate::slots::{Color, SlotError, SlotState, Slots};
use crate::store::{EventKind, ModelStatus, Store, StoreError};
use crate::supervisor::{Pool, SlotError as WorkerSlotError, SlotState as WorkerState, WorkerSpec};
use sentinel_worker_protocol::frame::{DType, Tensor};
use sentinel_worker_protocol::launch::{Engine, Provider};

/// Why a version was not installed. The slot it was staged in is failed and
/// the previous version keeps serving. Events, status details and logs show
/// [`crate::util::error_chain`] of it, which names the cause.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The slot state machine refused a transition.
    #[error(transparent)]
    Refused(#[from] SlotError),
    #[error("loading failed")]
    Load(#[source] LoadError),
    #[error("validation failed")]
    Validation(#[source] ValidateError),
    #[error("saving the slot state failed")]
    Store(#[from] StoreError),
}

/// Why a version's worker never came up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest's tensors do not fit this device's settings.
    #[error(transparent)]
    Tensors(#[from] TensorsError),
    #[error("resolving {}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The supervisor gave up on the worker; its reason (exit code, stderr).
    #[error("{0}")]
    Worker(String),
    #[error("the worker supervisor stopped")]
    SupervisorStopped,
    #[error(
        "engine = \"ort\", but no ONNX Runtime library was found: set serving.ort_library, or ORT_DYLIB_PATH in the agent's environment, to its libonnxruntime.so"
    )]
    NoOrtLibrary,
    /// After a restart: a committed slot's file or manifest is missing.
    #[error("the model file or manifest of {sha256} is gone")]
    Gone { sha256: String },
}

/// Why a loaded version failed validation.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("the model has no inputs")]
    NoInputs,
    /// A zero probe for this input could not be built.
    #[error("probe input `{input}`")]
    ProbeInput {
        input: String,
        #[source]
        reason: sentinel_worker_protocol::frame::ZerosError,
    },
    #[error("a probe inference failed")]
    Probe(#[source] WorkerSlotError),
    #[error(transparent)]
    ProbeOutputs(#[from] OutputError),
    #[error("input `{input}` is {dtype}: validation sets carry fixed-width inputs only (raw little-endian elements)")]
    UnsizedInput { input: String, dtype: DType },
    #[error("the validation set has {bytes} bytes of inputs for {labels} labels; expected {per} bytes per sample")]
    SetSize { bytes: usize, labels: usize, per: usize },
    #[error("validation sample {index}")]
    SampleInference {
        index: usize,
        #[source]
        source: WorkerSlotError,
    },
    #[error("validation sample {index}")]
    SampleOutputs {
        index: usize,
        #[source]
        source: OutputError,
    },
    #[error(
        "accuracy {accuracy:.4} on the {samples}-sample validation set is below the declared {declared:.4} minus the tolerance {tolerance}"
    )]
    BelowDeclared { accuracy: f64, samples: usize, declared: f64, tolerance: f64 },
}

impl InstallError {
    /// Stable kind for events and reports.
    pub fn kind(&self) -> EventKind {
        match self {
            InstallError::Refused(_) => EventKind::Refused,
            InstallError::Load(_) => EventKind::LoadFailed,
            InstallError::Validation(_) => EventKind::ValidationFailed,
            InstallError::Store(_) => EventKind::StoreFailed,
        }
    }
}

/// A labelled validation set: raw samples of the first input and int64 labels.
#[derive(Debug, Clone)]
pub struct ValidationSet {
    pub inputs: Vec<u8>,
    pub labels: Vec<i64>,
}

/// What to install.
#[derive(Debug)]
pub struct Install<'a> {
    pub manifest: &'a ModelManifest,
    pub deployment_id: i64,
    pub model_path: PathBuf,
    pub validation: Option<ValidationSet>,
    /// How traffic moves to the new version once it is validated.
    pub policy: Policy,
}

/// What an install achieved.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Accuracy on the validation set, if it came with one.
    pub accuracy: Option<f64>,
    /// The version went straight to active (single `full` phase).
    pub promoted: bool,
    /// The slot the version was loaded into.
    pub loaded: Arc<Loaded>,
    /// Index of the policy phase it entered.
    pub phase: usize,
}

impl Serving {
    /// `model`'s execution providers for the model file `sha256`: TensorRT,
    /// when asked for, keeps the engines it builds per model file under the
    /// state dir, so a restart or a rollback to the standby reuses them.
    fn providers_for(&self, model: &str, sha256: &str) -> sentinel_worker_protocol::launch::Providers {
        let mut providers = self.settings.providers_of(model);
        if providers.order.contains(&Provider::TensorRt) {
            providers.tensorrt_cache = Some(self.engine_cache(sha256));
        }
        providers
    }

    fn engine_cache(&self, sha256: &str) -> PathBuf {
        self.work_dir.join("tensorrt-cache").join(sha256)
    }

    /// Whether loading the model file `sha256` as `model` makes TensorRT
    /// build an engine (status says `building engine` meanwhile).
    pub fn builds_engine(&self, model: &str, sha256: &str) -> bool {
        self.settings.engine_of(model) == Engine::Ort && self.providers_for(model, sha256).builds_engine()
    }

    /// Deletes the TensorRT engines built for model files no longer kept.
    pub fn forget_engines(&self, removed: &[String]) {
        for sha in removed {
            let dir = self.engine_cache(sha);
            if dir.exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "removed the TensorRT engines of a removed model file")
                    }
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "removing TensorRT engines failed"),
                }
            }
        }
    }

    fn start_worker(
        &self,
        models_served: usize,
        model: &str,
        color: Color,
        m: &ModelManifest,
        deployment_id: i64,
        path: PathBuf,
    ) -> Result<Arc<Loaded>, LoadError> {
        let (inputs, outputs) = model_io(m, self.settings.input_shapes.get(model))?;
        // The worker runs in its own working directory.
        let path = std::path::absolute(&path).map_err(|source| LoadError::Resolve { path: path.clone(), source })?;
        let mut spec = WorkerSpec::new(
            self.settings.worker_bin.clone(),
            path,
            inputs.iter().map(|i| i.fixed.clone()).collect(),
            self.work_dir.clone(),
        );
        spec.confinement = self.settings.confinement;
        spec.memory_limit_bytes = self.settings.memory_limit_bytes;
        spec.request_timeout = self.settings.request_timeout;
        spec.load_timeout = self.settings.load_timeout_of(model);
        spec.engine = self.settings.engine_of(model);
        spec.ort_dylib = self.settings.ort_library.clone();
        if spec.engine == Engine::Ort && spec.ort_dylib.is_none() {
            return Err(LoadError::NoOrtLibrary);
        }
        spec.providers = self.providers_for(model, &m.sha256);
        if spec.providers.gpu() && spec.engine != Engine::Ort {
            tracing::warn!(
                model,
                "execution providers are configured, but no ONNX Runtime library was found: tract serves on the CPU"
            );
        }
        if let Some(cache) = &spec.providers.tensorrt_cache {
            sentinel_proto::private::create_dir(cache)
                .map_err(|source| LoadError::Resolve { path: cache.clone(), source })?;
            if spec.providers.builds_engine() {
                tracing::info!(
                    model,
                    version = %m.version,
                    timeout_secs = spec.load_timeout.as_secs(),
                    "TensorRT builds its engine for this version (minutes on a Jetson); the active version serves meanwhile"
                );
            }
        }
        // A batch runs as one only when every input's first dim is the
        // model's symbolic batch dim.
        if inputs.iter().all(TensorInfo::batched) {
            (spec.max_batch, spec.tune_batch) = self.settings.batch_of(model);
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let size = self.settings.workers_of(model, cpus, models_served);
        let worker = Pool::start(&spec, &self.restart, size);
        tracing::info!(model, slot = color.as_str(), version = %m.version, workers = size, engine = %spec.engine, "starting workers");
        self.metrics.watch_pool(model, color.as_str(), &worker);
        let batcher = match self.settings.dynamic_batching_of(model) {
            Some((max, delay)) if joinable(&inputs, &outputs) => {
                match Batcher::start(worker.clone(), max, delay, (self.metrics.clone(), model.to_owned())) {
                    Ok(batcher) => Some(batcher),
                    Err(e) => {
                        tracing::warn!(model, error = %e, "no thread for the dynamic batcher: requests run as they come");
                        None
                    }
                }
            }
            Some(_) => {
                tracing::warn!(
                    model,
                    "max_queue_delay_us is set, but the model's inputs and outputs do not all carry a batch in \
                     their first dim: requests run as they come"
                );
                None
            }
            None => None,
        };
        Ok(Arc::new(Loaded {
            model: model.to_owned(),
            color,
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            deployment_id,
            inputs,
            outputs,
            worker,
            batcher,
            validation_accuracy: RwLock::new(None),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            window: Mutex::new(SlotWindow::new(WINDOW_AGE, WINDOW_SAMPLES)),
            validation_samples: AtomicU64::new(0),
            telemetry: Mutex::new(super::telemetry::Interval::starting(crate::util::now_ms())),
            retired: self.retired.clone(),
            shadow_in_flight: AtomicUsize::new(0),
        }))
    }

    /// Brings back every model's committed slots after a restart: the active
    /// and standby versions get workers again; a slot that was loading or
    /// validating when the agent stopped is failed (the apply loop stages the
    /// version again if it is still wanted). `manifest_of` returns the
    /// verified manifest of a stored model file.
    pub fn restore(&self, store: &Store, manifest_of: impl Fn(&str) -> Option<ModelManifest>) {
        let rows = match store.models() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %crate::util::error_chain(&e), "reading model state failed; nothing restored");
                return;
            }
        };
        let served = rows.iter().filter(|r| r.status != ModelStatus::Removed).count();
        for row in rows.iter().filter(|r| r.status != ModelStatus::Removed) {
            let mut slots = match store.load_slots(&row.name) {
                Ok(Some(slots)) => slots,
                Ok(None) => continue,
                Err(e) => {
                    let error = crate::util::error_chain(&e);
                    tracing::error!(model = %row.name, error, "reading the model's slots failed; not restored");
                    continue;
                }
            };
            let mut changed = false;
            for c in [Color::Blue, Color::Green] {
                if matches!(slots.get(c).state, SlotState::Loading | SlotState::Validating | SlotState::Canary) {
                    match slots.fail(c, "interrupted by an agent restart") {
                        Ok(_) => changed = true,
                        Err(e) => {
                            tracing::warn!(error = %crate::util::error_chain(&e), %slots, "failing an interrupted slot was refused")
                        }
                    }
                }
            }
            if changed && let Err(e) = store.commit_slots(&slots) {
                tracing::error!(error = %crate::util::error_chain(&e), model = %row.name, "saving restored slots failed");
            }
            let mut route = Route::default();
            for c in [Color::Blue, Color::Green] {
                let slot = slots.get(c);
                let Some(sha) = slot.sha256.as_deref() else { continue };
                if !matches!(slot.state, SlotState::Active | SlotState::Standby) {
                    continue;
                }
                let loaded = match manifest_of(sha) {
                    Some(m) if store.has_model(sha) => self.start_worker(
                        served,
                        &row.name,
                        c,
                        &m,
                        row.active_deployment.unwrap_or(0),
                        store.model_path(sha),
                    ),
                    _ => Err(LoadError::Gone { sha256: sha.to_owned() }),
                };
                match loaded {
                    Ok(l) if slot.state == SlotState::Active => route.active = Some(l),
                    Ok(l) => route.standby = Some(l),
                    Err(e) => {
                        let reason = crate::util::error_chain(&e);
                        tracing::error!(model = %row.name, slot = c.as_str(), %reason, "slot not restored");
                    }
                }
            }
            tracing::info!(%slots, "slots restored");
            let ms = self.entry(&row.name, slots);
            ms.swap(|_| route);
        }
    }

    /// Stages `req` in the model's idle slot, loads and validates it, then
    /// promotes it in one committed step and one route swap. Returns the
    /// accuracy measured on the validation set, if there was one.
    pub async fn install(&self, store: &Store, req: Install<'_>) -> Result<Installed, InstallError> {
        let m = req.manifest;
        let ms = self.entry(&m.name, store.load_slots(&m.name)?.unwrap_or_else(|| Slots::new(&m.name)));
        let mut slots = ms.slots.lock().await;
        let color = slots.stage(&m.version, &m.sha256)?;
        store.commit_slots(&slots)?;
        let fail = |slots: &mut Slots, err: InstallError| {
            if let Err(e) = slots.fail(color, &crate::util::error_chain(&err)) {
                tracing::warn!(error = %crate::util::error_chain(&e), %slots, "failing the staged slot was refused");
            }
            if let Err(e) = store.commit_slots(slots) {
                tracing::error!(error = %crate::util::error_chain(&e), "saving a failed slot failed");
            }
            ms.swap(|r| Route { candidate: None, mode: CandidateMode::Idle, ..r.clone() });
            Err(err)
        };
        let served = self.models.read().unwrap_or_else(PoisonError::into_inner).len();
        let loaded = match self.start_worker(served, &m.name, color, m, req.deployment_id, req.model_path) {
            Ok(l) => l,
            Err(e) => return fail(&mut slots, InstallError::Load(e)),
        };
        ms.swap(|r| Route {
            // Whatever was in the idle slot (an old standby) is replaced.
            standby: r.standby.clone().filter(|s| s.color != color),
            candidate: Some(loaded.clone()),
            mode: CandidateMode::Idle,
            ..r.clone()
        });
        if let Err(e) = wait_running(&loaded.worker).await {
            return fail(&mut slots, InstallError::Load(e));
        }
        if let Err(e) = slots.begin_validation(color) {
            return fail(&mut slots, InstallError::Refused(e));
        }
        store.commit_slots(&slots)?;
        let accuracy = match validate(&loaded, m, req.validation.as_ref(), self.settings.validation_tolerance).await {
            Ok(a) => a,
            Err(e) => return fail(&mut slots, InstallError::Validation(e)),
        };
        *loaded.validation_accuracy.write().unwrap_or_else(PoisonError::into_inner) = accuracy;
        let samples = req.validation.as_ref().filter(|_| accuracy.is_some()).map_or(0, |v| v.labels.len());
        loaded
            .validation_samples
            .store(u64::try_from(samples).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
        loaded.window.lock().unwrap_or_else(PoisonError::into_inner).set_validation_accuracy(accuracy);
        let first = req.policy.phases.first().map(|p| p.kind);
        let promoted = match first {
            Some(PhaseKind::Shadow | PhaseKind::Canary { .. }) if slots.active().is_some() => {
                if let Err(e) = slots.start_canary(color) {
                    return fail(&mut slots, InstallError::Refused(e));
                }
                store.commit_slots(&slots)?;
                let mode = match first {
                    Some(PhaseKind::Canary { percent }) => CandidateMode::Canary(percent),
                    _ => CandidateMode::Shadow,
                };
                ms.swap(|r| Route { candidate: Some(loaded.clone()), mode, ..r.clone() });
                tracing::info!(%slots, ?mode, "rollout started");
                false
            }
            // A first version, or a policy that goes straight to full.
            _ => {
                if let Err(e) = slots.promote(color) {
                    return fail(&mut slots, InstallError::Refused(e));
                }
                // The commit point: durable before any request reaches the new slot.
                if let Err(e) = store.activate(&slots, req.deployment_id) {
                    let err = InstallError::from(e);
                    // Undo in memory what could not be made durable.
                    *slots = store.load_slots(&m.name).ok().flatten().unwrap_or_else(|| Slots::new(&m.name));
                    ms.swap(|r| Route { candidate: None, mode: CandidateMode::Idle, ..r.clone() });
                    return Err(err);
                }
                ms.swap(|r| Route {
                    active: Some(loaded.clone()),
                    standby: r.active.clone(),
                    candidate: None,
                    mode: CandidateMode::Idle,
                });
                tracing::info!(%slots, accuracy, "promoted");
                true
            }
        };
        // A first version (nothing to compare with) counts as fully rolled out.
        let phase = if promoted {
            req.policy.phases.iter().position(|p| p.kind == PhaseKind::Full).unwrap_or(req.policy.phases.len())
        } else {
            0
        };
        Ok(Installed { accuracy, promoted, loaded, phase })
    }
}

/// Waits until every worker of the pool is ready, or returns why one never will be.
async fn wait_running(pool: &Pool) -> Result<(), LoadError> {
    match pool.wait_ready().await {
        WorkerState::Running { confined: false, unconfined_reason, .. } => {
            tracing::warn!(reason = ?unconfined_reason, "WORKER RUNS WITHOUT ITS SECCOMP SANDBOX");
            Ok(())
        }
        WorkerState::Running { .. } => Ok(()),
        WorkerState::Failed(reason) => Err(LoadError::Worker(reason)),
        WorkerState::Starting { .. } => Err(LoadError::SupervisorStopped),
    }
}

/// Bytes of one sample of the first input in a validation set (raw
/// little-endian elements of the input's dtype), `None` for a string input:
/// its samples have no fixed size, so validation sets do not carry them.
fn sample_bytes(spec: &TensorInfo) -> Option<usize> {
    Some(spec.fixed.iter().skip(1).product::<usize>() * spec.dtype.width()?)
}

/// Runs before any traffic: output shapes, dtypes and finiteness on one
/// sample, then accuracy on the validation set when there is one.
async fn validate(
    slot: &Loaded,
    m: &ModelManifest,
    set: Option<&ValidationSet>,
    tolerance: f64,
) -> Result<Option<f64>, ValidateError> {
    let first = slot.inputs.first().ok_or(ValidateError::NoInputs)?;
    let probe: Vec<Tensor> = match (set, sample_bytes(first)) {
        (Some(s), Some(per)) if slot.inputs.len() == 1 && first.batched() && s.inputs.len() >= per => {
            vec![Tensor { dtype: first.dtype, shape: first.fixed.clone(), data: s.inputs[..per].to_vec() }]
        }
        // Zeros of each input's dtype (empty strings for string inputs).
        _ => slot
            .inputs
            .iter()
            .map(|i| {
                Tensor::zeros(i.dtype, &i.fixed)
                    .map_err(|reason| ValidateError::ProbeInput { input: i.name.clone(), reason })
            })
            .collect::<Result<_, _>>()?,
    };
    // Every worker of the pool runs the probe: each is checked, and warm
    // before the slot takes traffic.
    for outputs in slot.worker.infer_each(&probe).await.map_err(ValidateError::Probe)? {
        check_outputs(&slot.outputs, &outputs)?;
    }
    let Some(set) = set else { return Ok(None) };
    if slot.inputs.len() != 1 || !first.batched() {
        tracing::warn!(model = %m.name, "a validation set needs one input with a batch dim; accuracy not measured");
        return Ok(None);
    }
    let Some(per) = sample_bytes(first) else {
        return Err(ValidateError::UnsizedInput { input: first.name.clone(), dtype: first.dtype });
    };
    if per == 0 || set.inputs.len() != per * set.labels.len() {
        return Err(ValidateError::SetSize { bytes: set.inputs.len(), labels: set.labels.len(), per });
    }
    let mut correct = 0usize;
    for (i, label) in set.labels.iter().enumerate() {
        let sample = Tensor {
            dtype: first.dtype,
            shape: first.fixed.clone(),
            data: set.inputs[i * per..(i + 1) * per].to_vec(),
        };
        let outputs =
            slot.worker.infer(&[sample]).await.map_err(|source| ValidateError::SampleInference { index: i, source })?;
        check_outputs(&slot.outputs, &outputs).map_err(|source| ValidateError::SampleOutputs { index: i, source })?;
        if predicted_label(&outputs) == Some(*label) {
            correct += 1;
        }
    }
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let accuracy = correct as f64 / set.labels.len() as f64;
    if let Some(declared) = m.accuracy.as_ref().map(|a| a.value).filter(|v| *v > 0.0)
        && accuracy < declared - tolerance - 1e-12
    {
        return Err(ValidateError::BelowDeclared { accuracy, samples: set.labels.len(), declared, tolerance });
    }
    Ok(Some(accuracy))
}
