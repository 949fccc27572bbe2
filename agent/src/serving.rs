//! Serving: each model's blue and green slots at run time.
//!
//! A [`ModelServing`] pairs the pure slot state machine ([`Slots`], committed
//! through the store) with the running workers behind it. Requests read the
//! current [`Route`] (an `Arc` snapshot) and keep the [`Loaded`] slot they
//! picked until they finish, so promoting a version is one pointer swap:
//! requests already in flight finish on the old slot, every later one goes to
//! the new slot, and the old slot stays warm as the standby.
//!
//! Installing a version ([`Serving::install`]) stages it in the idle slot,
//! starts its confined worker, validates it (declared output shapes and
//! dtypes, finite values, and on-device accuracy on the version's validation
//! set), and only then promotes it. A version that fails any step never
//! receives a request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use sentinel_proto::pb::ModelManifest;
use sentinel_proto::pb::dimension::Kind;

use crate::config::ServingSettings;
use crate::metrics::{AgentMetrics, RequestOutcome};
use crate::rollout::policy::{PhaseKind, Policy};
use crate::rollout::window::{SlotMetrics, SlotWindow};
use crate::slots::{Color, SlotState, Slots};
use crate::store::{Store, StoreError};
use crate::supervisor::{RestartPolicy, SlotError, SlotState as WorkerState, Supervised, WorkerSpec};
use crate::worker::protocol::{DType, Tensor};

/// One input or output of a model, from its signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Declared dims; `None` where the model declares a symbolic dim.
    pub declared: Vec<Option<u64>>,
    /// The shape the worker runs with (inputs only; symbolic dims fixed).
    pub fixed: Vec<usize>,
}

impl TensorInfo {
    /// Whether the first dim is a symbolic batch dim the worker runs at 1,
    /// so requests may carry several samples.
    pub fn batched(&self) -> bool {
        self.declared.first() == Some(&None) && self.fixed.first() == Some(&1)
    }
}

/// The wire dtype of a manifest dtype name.
pub fn wire_dtype(name: &str) -> Option<DType> {
    DType::from_name(name)
}

/// A model's inputs and outputs, with input shapes fixed from the manifest
/// (its signed serving shapes, else a symbolic batch dim becomes 1) or from
/// the device's configured `overrides`; refuses other symbolic dims left open.
pub fn model_io(
    m: &ModelManifest,
    overrides: Option<&Vec<Vec<usize>>>,
) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), String> {
    let convert = |what: &str, index: usize, spec: &sentinel_proto::pb::TensorSpec, fixed: Option<&Vec<usize>>| {
        let dtype = wire_dtype(&spec.dtype).ok_or_else(|| {
            let carried: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            format!("{what} {index} `{}` has dtype {}; workers carry {}", spec.name, spec.dtype, carried.join(", "))
        })?;
        let declared: Vec<Option<u64>> = spec
            .shape
            .iter()
            .map(|d| match d.kind {
                Some(Kind::Fixed(n)) => Some(n),
                _ => None,
            })
            .collect();
        let fixed = match fixed {
            Some(f) => {
                let fits = f.len() == declared.len()
                    && f.iter().zip(&declared).all(|(g, d)| d.is_none_or(|d| u64::try_from(*g).is_ok_and(|g| g == d)));
                if !fits {
                    return Err(format!(
                        "configured shape {f:?} for {what} `{}` does not fit the declared {}",
                        spec.name,
                        show_dims(&declared)
                    ));
                }
                f.clone()
            }
            // Outputs are only described; their fixed shape is not used.
            None if what == "output" => {
                declared.iter().map(|d| d.map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))).collect()
            }
            None => {
                let signed = m.serving_shapes.iter().find(|s| s.input == spec.name);
                match signed {
                    Some(s) => s.dims.iter().map(|&n| usize::try_from(n).unwrap_or(usize::MAX)).collect(),
                    // A symbolic batch dim (the first) serves one sample; any
                    // other symbolic dim has no safe guess (1 would look ready
                    // and refuse every real request).
                    None if declared.iter().skip(1).any(Option::is_none) => {
                        return Err(format!(
                            "{what} `{}` has symbolic dims {} besides the batch; fix them at push with \
                             `sentinel model push --input-shape {}=...` or on this device with \
                             `serving.input_shapes`",
                            spec.name,
                            show_dims(&declared),
                            spec.name
                        ));
                    }
                    None => {
                        declared.iter().map(|d| d.map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))).collect()
                    }
                }
            }
        };
        Ok(TensorInfo { name: spec.name.clone(), dtype, declared, fixed })
    };
    if let Some(o) = overrides
        && o.len() != m.inputs.len()
    {
        return Err(format!("configured {} input shapes, but the model has {} inputs", o.len(), m.inputs.len()));
    }
    let inputs = m
        .inputs
        .iter()
        .enumerate()
        .map(|(i, s)| convert("input", i, s, overrides.and_then(|o| o.get(i))))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs =
        m.outputs.iter().enumerate().map(|(i, s)| convert("output", i, s, None)).collect::<Result<Vec<_>, _>>()?;
    Ok((inputs, outputs))
}

/// `[N, 64]` style rendering of declared dims.
pub fn show_dims(dims: &[Option<u64>]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.map_or_else(|| "?".to_owned(), |n| n.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// A version loaded into one slot, with its supervised worker.
#[derive(Debug)]
pub struct Loaded {
    pub model: String,
    pub color: Color,
    pub version: String,
    pub sha256: String,
    pub deployment_id: i64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub worker: Supervised,
    /// Accuracy measured on the validation set at load, if it had one.
    pub validation_accuracy: RwLock<Option<f64>>,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Sliding-window metrics the rollout decisions read.
    pub window: Mutex<SlotWindow>,
    /// Shadow requests in flight to this slot (bounded, see [`MAX_SHADOW_IN_FLIGHT`]).
    shadow_in_flight: AtomicUsize,
}

/// Metrics windows keep at most this many samples per kind...
pub const WINDOW_SAMPLES: usize = 10_000;
/// ...and none older than this.
pub const WINDOW_AGE: Duration = Duration::from_secs(300);
/// Mirrored requests beyond this many in flight are dropped, so a slow
/// shadow slot never queues without bound.
pub const MAX_SHADOW_IN_FLIGHT: usize = 8;
/// Requests remembered for ground-truth feedback, per agent.
pub const FEEDBACK_MEMORY: usize = 20_000;
/// Bytes of model names and request ids remembered for feedback, per agent
/// (ids are capped at 256 bytes by the API; this bounds any other caller).
pub const FEEDBACK_MEMORY_BYTES: usize = 8 << 20;
/// What one remembered request costs beyond its key's bytes (map entry,
/// queue entry, weak pointer, label), for the byte bound.
const FEEDBACK_ENTRY_OVERHEAD: usize = 96;

impl Loaded {
    /// A snapshot of the slot's window, with its validation accuracy.
    pub fn metrics(&self, now: Instant) -> SlotMetrics {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.snapshot(now)
    }

    /// The slot's metrics over events since `since` only.
    pub fn metrics_since(&self, now: Instant, since: Instant) -> SlotMetrics {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.snapshot_since(now, Some(since))
    }

    /// Records one request: the model's compute time when it succeeded.
    /// Rollout decisions compare compute times, which the worker measures
    /// around the model alone: pipe transport and host scheduling are the
    /// same for both slots and would only add noise.
    fn record(&self, compute: Option<Duration>) {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        match compute {
            Some(c) => w.record_ok(c, now),
            None => w.record_error(now),
        }
    }
}

/// How a candidate slot takes part in traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CandidateMode {
    /// Loading or validating: no traffic.
    #[default]
    Idle,
    /// Gets a mirror of every request; only the active slot answers.
    Shadow,
    /// Answers this percentage of requests.
    Canary(u8),
}

/// Which loaded slots take traffic. Replaced as a whole, never edited.
#[derive(Debug, Default, Clone)]
pub struct Route {
    pub active: Option<Arc<Loaded>>,
    /// The previous active version, warm, for an instant rollback.
    pub standby: Option<Arc<Loaded>>,
    /// A version being loaded, validated, shadowed or canaried.
    pub candidate: Option<Arc<Loaded>>,
    pub mode: CandidateMode,
}

/// One model's slots.
#[derive(Debug)]
pub struct ModelServing {
    pub name: String,
    route: RwLock<Arc<Route>>,
    /// The committed state machine; held across an install so installs of
    /// one model never interleave.
    pub(crate) slots: tokio::sync::Mutex<Slots>,
    seq: AtomicU64,
}

impl ModelServing {
    /// The current route (a snapshot).
    pub fn route(&self) -> Arc<Route> {
        self.route.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the route in one step.
    pub(crate) fn swap(&self, f: impl FnOnce(&Route) -> Route) {
        let mut guard = self.route.write().unwrap_or_else(PoisonError::into_inner);
        let next = f(&guard);
        *guard = Arc::new(next);
    }
}

/// Why an inference request got no outputs. Each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("model `{model}` has no version `{version}` in service")]
    UnknownVersion { model: String, version: String },
    #[error("model `{0}` has no version in service yet")]
    NotReady(String),
    #[error("{0}")]
    BadInput(String),
    #[error("model `{model}` {version}: {reason}")]
    Unavailable { model: String, version: String, reason: String },
}

/// Outputs of one request and who served them.
#[derive(Debug, Clone)]
pub struct Served {
    /// The request id to quote in feedback.
    pub id: String,
    pub version: String,
    pub color: Color,
    pub outputs: Vec<Tensor>,
    pub output_names: Vec<String>,
}

/// Why a version was not installed. The slot it was staged in is failed and
/// the previous version keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Refused(String),
    #[error("loading failed: {0}")]
    Load(String),
    #[error("validation failed: {0}")]
    Validation(String),
    #[error("saving the slot state failed: {0}")]
    Store(String),
}

impl InstallError {
    /// Stable kind for events and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            InstallError::Refused(_) => "refused",
            InstallError::Load(_) => "load_failed",
            InstallError::Validation(_) => "validation_failed",
            InstallError::Store(_) => "store_failed",
        }
    }
}

impl From<StoreError> for InstallError {
    fn from(e: StoreError) -> Self {
        InstallError::Store(crate::util::error_chain(&e))
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

/// Every model served on this device.
#[derive(Debug)]
pub struct Serving {
    settings: ServingSettings,
    work_dir: PathBuf,
    restart: RestartPolicy,
    models: RwLock<BTreeMap<String, Arc<ModelServing>>>,
    predictions: Mutex<Predictions>,
    next_id: AtomicU64,
    metrics: Arc<AgentMetrics>,
}

/// Recent predictions by request id, for ground-truth feedback.
#[derive(Debug, Default)]
struct Predictions {
    by_id: HashMap<(String, String), (Weak<Loaded>, i64)>,
    order: VecDeque<(String, String)>,
    /// Bytes the entries of `order` account for.
    bytes: usize,
}

fn feedback_cost(key: &(String, String)) -> usize {
    key.0.len() + key.1.len() + FEEDBACK_ENTRY_OVERHEAD
}

impl Predictions {
    /// Remembers `key`, forgetting the oldest entries past either bound.
    fn insert(&mut self, key: (String, String), value: (Weak<Loaded>, i64)) {
        if self.by_id.insert(key.clone(), value).is_none() {
            self.bytes += feedback_cost(&key);
            self.order.push_back(key);
        }
        while self.order.len() > FEEDBACK_MEMORY || self.bytes > FEEDBACK_MEMORY_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            self.bytes -= feedback_cost(&old);
            self.by_id.remove(&old);
        }
    }
}

/// What feedback on one request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackOutcome {
    pub version: String,
    pub predicted: i64,
    pub correct: bool,
}

impl Serving {
    /// Workers get private directories below `work_dir`.
    pub fn new(settings: ServingSettings, work_dir: PathBuf) -> Serving {
        Serving::with_metrics(settings, work_dir, Arc::default())
    }

    /// Like [`Serving::new`], counting into the agent's `metrics`.
    pub fn with_metrics(settings: ServingSettings, work_dir: PathBuf, metrics: Arc<AgentMetrics>) -> Serving {
        Serving {
            metrics,
            settings,
            work_dir,
            restart: RestartPolicy::default(),
            models: RwLock::new(BTreeMap::new()),
            predictions: Mutex::new(Predictions::default()),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn settings(&self) -> &ServingSettings {
        &self.settings
    }

    /// The agent's Prometheus metrics.
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }

    /// The model's slots, if it is known here.
    pub fn model(&self, name: &str) -> Option<Arc<ModelServing>> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// Every model, by name.
    pub fn models(&self) -> Vec<Arc<ModelServing>> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    fn entry(&self, name: &str, slots: Slots) -> Arc<ModelServing> {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        models
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(ModelServing {
                    name: name.to_owned(),
                    route: RwLock::new(Arc::new(Route::default())),
                    slots: tokio::sync::Mutex::new(slots),
                    seq: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Stops serving a model (no longer in the desired state); its workers exit
    /// once the last in-flight request finishes.
    pub fn remove(&self, name: &str) {
        self.models.write().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    fn start_worker(
        &self,
        model: &str,
        color: Color,
        m: &ModelManifest,
        deployment_id: i64,
        path: PathBuf,
    ) -> Result<Arc<Loaded>, String> {
        let (inputs, outputs) = model_io(m, self.settings.input_shapes.get(model))?;
        // The worker runs in its own working directory.
        let path = std::path::absolute(&path).map_err(|e| format!("resolving {}: {e}", path.display()))?;
        let mut spec = WorkerSpec::new(
            self.settings.worker_bin.clone(),
            path,
            inputs.iter().map(|i| i.fixed.clone()).collect(),
            self.work_dir.clone(),
        );
        spec.confinement = self.settings.confinement;
        spec.memory_limit_bytes = self.settings.memory_limit_bytes;
        spec.request_timeout = self.settings.request_timeout;
        spec.load_timeout = self.settings.load_timeout;
        let worker = Supervised::start(spec, self.restart.clone());
        self.metrics.watch_worker(model, color.as_str(), &worker);
        Ok(Arc::new(Loaded {
            model: model.to_owned(),
            color,
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            deployment_id,
            inputs,
            outputs,
            worker,
            validation_accuracy: RwLock::new(None),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            window: Mutex::new(SlotWindow::new(WINDOW_AGE, WINDOW_SAMPLES)),
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
        for row in rows.iter().filter(|r| r.status != "removed") {
            let Ok(Some(mut slots)) = store.load_slots(&row.name) else { continue };
            let mut changed = false;
            for c in [Color::Blue, Color::Green] {
                if matches!(slots.get(c).state, SlotState::Loading | SlotState::Validating | SlotState::Canary) {
                    changed |= slots.fail(c, "interrupted by an agent restart").is_ok();
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
                    Some(m) if store.has_model(sha) => {
                        self.start_worker(&row.name, c, &m, row.active_deployment.unwrap_or(0), store.model_path(sha))
                    }
                    _ => Err(format!("the model file or manifest of {sha} is gone")),
                };
                match loaded {
                    Ok(l) if slot.state == SlotState::Active => route.active = Some(l),
                    Ok(l) => route.standby = Some(l),
                    Err(reason) => tracing::error!(model = %row.name, slot = c.as_str(), %reason, "slot not restored"),
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
        let color = slots.stage(&m.version, &m.sha256).map_err(|e| InstallError::Refused(e.to_string()))?;
        store.commit_slots(&slots)?;
        let fail = |slots: &mut Slots, err: InstallError| {
            let _ = slots.fail(color, &err.to_string());
            if let Err(e) = store.commit_slots(slots) {
                tracing::error!(error = %crate::util::error_chain(&e), "saving a failed slot failed");
            }
            ms.swap(|r| Route { candidate: None, mode: CandidateMode::Idle, ..r.clone() });
            Err(err)
        };
        let loaded = match self.start_worker(&m.name, color, m, req.deployment_id, req.model_path) {
            Ok(l) => l,
            Err(reason) => return fail(&mut slots, InstallError::Load(reason)),
        };
        ms.swap(|r| Route {
            // Whatever was in the idle slot (an old standby) is replaced.
            standby: r.standby.clone().filter(|s| s.color != color),
            candidate: Some(loaded.clone()),
            mode: CandidateMode::Idle,
            ..r.clone()
        });
        if let Err(reason) = wait_running(&loaded.worker).await {
            return fail(&mut slots, InstallError::Load(reason));
        }
        if let Err(e) = slots.begin_validation(color) {
            return fail(&mut slots, InstallError::Refused(e.to_string()));
        }
        store.commit_slots(&slots)?;
        let accuracy = match validate(&loaded, m, req.validation.as_ref(), self.settings.validation_tolerance).await {
            Ok(a) => a,
            Err(reason) => return fail(&mut slots, InstallError::Validation(reason)),
        };
        *loaded.validation_accuracy.write().unwrap_or_else(PoisonError::into_inner) = accuracy;
        loaded.window.lock().unwrap_or_else(PoisonError::into_inner).set_validation_accuracy(accuracy);
        let first = req.policy.phases.first().map(|p| p.kind);
        let promoted = match first {
            Some(PhaseKind::Shadow | PhaseKind::Canary { .. }) if slots.active().is_some() => {
                if let Err(e) = slots.start_canary(color) {
                    return fail(&mut slots, InstallError::Refused(e.to_string()));
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
                    return fail(&mut slots, InstallError::Refused(e.to_string()));
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

    /// The slot a request goes to: `version` when given (active, or the warm
    /// standby), else the active slot.
    pub fn pick(&self, model: &str, version: Option<&str>) -> Result<Arc<Loaded>, ServeError> {
        let ms = self.model(model).ok_or_else(|| ServeError::UnknownModel(model.to_owned()))?;
        pick_in(&ms.route(), model, version)
    }

    /// Runs one request with named inputs: on `version` when given, else on
    /// the active slot or, for a canary's share, on the candidate; in shadow
    /// mode the candidate also gets a mirror whose answer is only compared.
    /// A batch of N samples on a model whose batch dim is symbolic is run
    /// sample by sample.
    pub async fn infer(
        &self,
        model: &str,
        version: Option<&str>,
        named: Vec<(String, Tensor)>,
        id: Option<String>,
    ) -> Result<Served, ServeError> {
        let ms = self.model(model).ok_or_else(|| ServeError::UnknownModel(model.to_owned()))?;
        let route = ms.route();
        let seq = ms.seq.fetch_add(1, Ordering::Relaxed);
        let slot = match (version, &route.candidate, route.mode) {
            (None, Some(c), CandidateMode::Canary(p)) if route.active.is_some() && canary_turn(seq, p) => c.clone(),
            // The same route snapshot decides the slot and the shadow below.
            _ => pick_in(&route, model, version)?,
        };
        let inputs = order_inputs(&slot.inputs, named)?;
        let shadow = match (&route.candidate, route.mode) {
            (Some(c), CandidateMode::Shadow) if version.is_none() && !Arc::ptr_eq(c, &slot) => Some(c.clone()),
            _ => None,
        };
        drop(route);
        let mirror = shadow
            .filter(|c| c.shadow_in_flight.load(Ordering::Relaxed) < MAX_SHADOW_IN_FLIGHT)
            .map(|c| (c, inputs.clone()));
        slot.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = run_batched(&slot, inputs).await;
        let outcome = match &result {
            Ok((_, compute)) => RequestOutcome::Ok { compute: *compute },
            Err(ServeError::BadInput(_)) => RequestOutcome::BadInput,
            Err(_) => RequestOutcome::Unavailable,
        };
        self.metrics.inference([&slot.model, slot.color.as_str(), &slot.version], outcome, started.elapsed());
        match &result {
            Ok((_, compute)) => slot.record(Some(*compute)),
            Err(ServeError::Unavailable { .. }) => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                slot.record(None);
            }
            Err(_) => {}
        }
        let (outputs, _) = result?;
        let predicted = predicted_label(&outputs).filter(|_| outputs.first().and_then(|t| t.shape.first()) <= Some(&1));
        if let Some((candidate, inputs)) = mirror {
            candidate.shadow_in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let result = run_batched(&candidate, inputs).await;
                candidate.record(result.as_ref().ok().map(|(_, compute)| *compute));
                if let (Ok((outputs, _)), Some(active_label)) = (result, predicted) {
                    let agreed = predicted_label(&outputs) == Some(active_label);
                    candidate
                        .window
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record_agreement(agreed, Instant::now());
                }
                candidate.shadow_in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let id = id.unwrap_or_else(|| format!("sentinel-{}", self.next_id.fetch_add(1, Ordering::Relaxed)));
        if let Some(label) = predicted {
            self.remember(model, &id, &slot, label);
        }
        Ok(Served {
            id,
            version: slot.version.clone(),
            color: slot.color,
            outputs,
            output_names: slot.outputs.iter().map(|o| o.name.clone()).collect(),
        })
    }

    fn remember(&self, model: &str, id: &str, slot: &Arc<Loaded>, label: i64) {
        let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
        p.insert((model.to_owned(), id.to_owned()), (Arc::downgrade(slot), label));
    }

    /// Ground truth for an earlier request: scores the slot that answered it.
    /// `None` when the id is unknown or too old.
    pub fn feedback(&self, model: &str, id: &str, label: i64) -> Option<FeedbackOutcome> {
        let (slot, predicted) = {
            let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
            p.by_id.remove(&(model.to_owned(), id.to_owned()))?
        };
        let slot = slot.upgrade()?;
        let correct = predicted == label;
        slot.window.lock().unwrap_or_else(PoisonError::into_inner).record_feedback(correct, Instant::now());
        Some(FeedbackOutcome { version: slot.version.clone(), predicted, correct })
    }
}

/// [`Serving::pick`] within one route snapshot.
fn pick_in(route: &Route, model: &str, version: Option<&str>) -> Result<Arc<Loaded>, ServeError> {
    match version {
        None => route.active.clone().ok_or_else(|| ServeError::NotReady(model.to_owned())),
        Some(v) => [&route.active, &route.standby]
            .into_iter()
            .flatten()
            .find(|l| l.version == v)
            .cloned()
            .ok_or_else(|| ServeError::UnknownVersion { model: model.to_owned(), version: v.to_owned() }),
    }
}

/// Whether request number `seq` goes to a canary taking `percent`% of the
/// traffic: spread evenly (request n goes to the canary when the running
/// share crosses a whole request), so both slots serve side by side in every
/// stretch of traffic rather than in blocks.
fn canary_turn(seq: u64, percent: u8) -> bool {
    let p = u64::from(percent);
    (seq + 1) * p / 100 > seq * p / 100
}

/// Waits until the worker is ready, or returns why it never will be.
async fn wait_running(worker: &Supervised) -> Result<(), String> {
    let mut rx = worker.subscribe();
    let end = rx.wait_for(|s| matches!(s, WorkerState::Running { .. } | WorkerState::Failed(_))).await;
    match end.as_deref() {
        Ok(WorkerState::Running { confined: false, unconfined_reason, .. }) => {
            tracing::warn!(reason = ?unconfined_reason, "WORKER RUNS WITHOUT ITS SECCOMP SANDBOX");
            Ok(())
        }
        Ok(WorkerState::Running { .. }) => Ok(()),
        Ok(WorkerState::Failed(reason)) => Err(reason.clone()),
        Ok(WorkerState::Starting { .. }) | Err(_) => Err("the worker supervisor stopped".to_owned()),
    }
}

/// Checks the inputs against the model and runs them, splitting a batch
/// into single samples when the worker runs the model at batch 1. Returns
/// the outputs and the model's compute time, as the worker measured it.
async fn run_batched(slot: &Loaded, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, Duration), ServeError> {
    let batch = check_inputs(&slot.inputs, &inputs)?;
    let unavailable = |e: SlotError| match e {
        SlotError::Worker(crate::supervisor::InferError::BadInput(reason)) => ServeError::BadInput(reason),
        other => ServeError::Unavailable {
            model: slot.model.clone(),
            version: slot.version.clone(),
            reason: other.to_string(),
        },
    };
    let Some(n) = batch else {
        let (outputs, compute) = slot.worker.infer_timed(&inputs).await.map_err(unavailable)?;
        return Ok((outputs, compute.unwrap_or_default()));
    };
    let mut per_output: Vec<Vec<Tensor>> = Vec::new();
    let mut total = Duration::ZERO;
    for i in 0..n {
        let sample: Vec<Tensor> = inputs.iter().map(|t| slice_sample(t, i, n)).collect();
        let (outputs, compute) = slot.worker.infer_timed(&sample).await.map_err(unavailable)?;
        total += compute.unwrap_or_default();
        if per_output.is_empty() {
            per_output = vec![Vec::with_capacity(n); outputs.len()];
        }
        for (acc, t) in per_output.iter_mut().zip(outputs) {
            acc.push(t);
        }
    }
    let joined = per_output
        .into_iter()
        .map(|parts| {
            concat_batch(parts).ok_or_else(|| ServeError::Unavailable {
                model: slot.model.clone(),
                version: slot.version.clone(),
                reason: "outputs of single samples cannot be joined into a batch".to_owned(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((joined, total))
}

/// Puts named inputs in model order; a missing or unknown name is bad input.
pub fn order_inputs(specs: &[TensorInfo], mut named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, ServeError> {
    let expected = || specs.iter().map(|s| format!("`{}`", s.name)).collect::<Vec<_>>().join(", ");
    let mut ordered = Vec::with_capacity(specs.len());
    for spec in specs {
        let at = named.iter().position(|(n, _)| *n == spec.name).ok_or_else(|| {
            ServeError::BadInput(format!("missing input `{}`; the model takes {}", spec.name, expected()))
        })?;
        ordered.push(named.swap_remove(at).1);
    }
    if let Some((extra, _)) = named.first() {
        return Err(ServeError::BadInput(format!("unknown input `{extra}`; the model takes {}", expected())));
    }
    Ok(ordered)
}

/// Checks count, dtypes and shapes. Returns `Some(n)` when the request is a
/// batch of `n` samples to be run one by one, `None` when it has the fixed shape.
pub fn check_inputs(specs: &[TensorInfo], inputs: &[Tensor]) -> Result<Option<usize>, ServeError> {
    if inputs.len() != specs.len() {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(ServeError::BadInput(format!(
            "expected {} input(s) [{}], got {}",
            specs.len(),
            names.join(", "),
            inputs.len()
        )));
    }
    let mut batch: Option<usize> = None;
    let mut split = false;
    for (spec, t) in specs.iter().zip(inputs) {
        if t.dtype != spec.dtype {
            return Err(ServeError::BadInput(format!("input `{}` must be {}, got {}", spec.name, spec.dtype, t.dtype)));
        }
        let n = if t.shape == spec.fixed {
            if !spec.batched() {
                continue;
            }
            1
        } else {
            let fits = spec.batched()
                && t.shape.len() == spec.fixed.len()
                && t.shape.get(1..) == spec.fixed.get(1..)
                && t.shape.first().is_some_and(|n| *n > 0);
            if !fits {
                return Err(ServeError::BadInput(format!(
                    "input `{}` has shape {:?}; the model takes {:?}{}",
                    spec.name,
                    t.shape,
                    spec.fixed,
                    if spec.batched() { " (any batch size in the first dim)" } else { "" }
                )));
            }
            split = true;
            t.shape[0]
        };
        if batch.is_some_and(|b| b != n) {
            return Err(ServeError::BadInput("inputs disagree on the batch size".to_owned()));
        }
        batch = Some(n);
    }
    Ok(if split { batch } else { None })
}

/// Sample `i` of `n` of a batched tensor, with a batch dim of 1.
fn slice_sample(t: &Tensor, i: usize, n: usize) -> Tensor {
    let mut shape = t.shape.clone();
    if let Some(first) = shape.first_mut() {
        *first = 1;
    }
    let data = match t.dtype.width() {
        Some(_) => {
            let per = t.data.len() / n.max(1);
            t.data[i * per..(i + 1) * per].to_vec()
        }
        // Strings are length-prefixed: sample i is the bytes from its first
        // element's prefix to the end of its last element. The request
        // decoder checked the encoding, so the walk cannot fail.
        None => {
            let count = t.element_count().unwrap_or(0);
            let per = count / n.max(1);
            let elements = t.strings().unwrap_or_default();
            let mut out = Vec::new();
            for e in elements.iter().skip(i * per).take(per) {
                out.extend_from_slice(&u32::try_from(e.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(e);
            }
            out
        }
    };
    Tensor { dtype: t.dtype, shape, data }
}

/// Joins single-sample outputs (batch dim 1, or rank 1 of length 1 per sample)
/// along the first dim.
fn concat_batch(parts: Vec<Tensor>) -> Option<Tensor> {
    let first = parts.first()?;
    let (dtype, mut shape) = (first.dtype, first.shape.clone());
    if shape.first() != Some(&1) || parts.iter().any(|p| p.shape != shape || p.dtype != dtype) {
        return None;
    }
    shape[0] = parts.len();
    let data = parts.into_iter().flat_map(|p| p.data).collect();
    Some(Tensor { dtype, shape, data })
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
) -> Result<Option<f64>, String> {
    let first = slot.inputs.first().ok_or("the model has no inputs")?;
    let probe: Vec<Tensor> = match (set, sample_bytes(first)) {
        (Some(s), Some(per)) if slot.inputs.len() == 1 && first.batched() && s.inputs.len() >= per => {
            vec![Tensor { dtype: first.dtype, shape: first.fixed.clone(), data: s.inputs[..per].to_vec() }]
        }
        // Zeros of each input's dtype (empty strings for string inputs).
        _ => slot
            .inputs
            .iter()
            .map(|i| Tensor::zeros(i.dtype, &i.fixed).map_err(|e| format!("probe input `{}`: {e}", i.name)))
            .collect::<Result<_, _>>()?,
    };
    let outputs = slot.worker.infer(&probe).await.map_err(|e| format!("a probe inference failed: {e}"))?;
    check_outputs(&slot.outputs, &outputs)?;
    let Some(set) = set else { return Ok(None) };
    if slot.inputs.len() != 1 || !first.batched() {
        tracing::warn!(model = %m.name, "a validation set needs one input with a batch dim; accuracy not measured");
        return Ok(None);
    }
    let Some(per) = sample_bytes(first) else {
        return Err(format!(
            "input `{}` is {}: validation sets carry fixed-width inputs only (raw little-endian elements)",
            first.name, first.dtype
        ));
    };
    if per == 0 || set.inputs.len() != per * set.labels.len() {
        return Err(format!(
            "the validation set has {} bytes of inputs for {} labels; expected {} bytes per sample",
            set.inputs.len(),
            set.labels.len(),
            per
        ));
    }
    let mut correct = 0usize;
    for (i, label) in set.labels.iter().enumerate() {
        let sample = Tensor {
            dtype: first.dtype,
            shape: first.fixed.clone(),
            data: set.inputs[i * per..(i + 1) * per].to_vec(),
        };
        let outputs = slot.worker.infer(&[sample]).await.map_err(|e| format!("validation sample {i}: {e}"))?;
        check_outputs(&slot.outputs, &outputs).map_err(|e| format!("validation sample {i}: {e}"))?;
        if predicted_label(&outputs) == Some(*label) {
            correct += 1;
        }
    }
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let accuracy = correct as f64 / set.labels.len() as f64;
    if let Some(declared) = m.accuracy.as_ref().map(|a| a.value).filter(|v| *v > 0.0)
        && accuracy < declared - tolerance - 1e-12
    {
        return Err(format!(
            "accuracy {accuracy:.4} on the {}-sample validation set is below the declared {declared:.4} minus the tolerance {tolerance}",
            set.labels.len()
        ));
    }
    Ok(Some(accuracy))
}

/// The class a model predicted for one sample: an integer output holding
/// one value (an int64 one first), else the argmax of the first float output
/// (f32, f16, bf16 or f64).
pub fn predicted_label(outputs: &[Tensor]) -> Option<i64> {
    let single = |t: &Tensor| -> Option<i64> {
        if t.element_count() != Some(1) {
            return None;
        }
        match t.dtype {
            DType::I64 => t.to_i64().ok()?.first().copied(),
            DType::I32 => t.values::<i32>().ok()?.first().map(|v| i64::from(*v)),
            DType::I16 => t.values::<i16>().ok()?.first().map(|v| i64::from(*v)),
            DType::I8 => t.values::<i8>().ok()?.first().map(|v| i64::from(*v)),
            DType::U8 => t.values::<u8>().ok()?.first().map(|v| i64::from(*v)),
            DType::U16 => t.values::<u16>().ok()?.first().map(|v| i64::from(*v)),
            DType::U32 => t.values::<u32>().ok()?.first().map(|v| i64::from(*v)),
            DType::U64 => t.values::<u64>().ok()?.first().and_then(|v| i64::try_from(*v).ok()),
            _ => None,
        }
    };
    if let Some(v) = outputs.iter().filter(|t| t.dtype == DType::I64).find_map(single) {
        return Some(v);
    }
    if let Some(v) = outputs.iter().find_map(single) {
        return Some(v);
    }
    let probs = outputs.iter().find_map(Tensor::floats)?;
    let (best, _) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    i64::try_from(best).ok()
}

/// Outputs must match the declared count, dtypes and fixed dims, and be finite.
pub fn check_outputs(specs: &[TensorInfo], outputs: &[Tensor]) -> Result<(), String> {
    if !specs.is_empty() && outputs.len() != specs.len() {
        return Err(format!("the model produced {} outputs; its manifest declares {}", outputs.len(), specs.len()));
    }
    for (spec, t) in specs.iter().zip(outputs) {
        if t.dtype != spec.dtype {
            return Err(format!("output `{}` is {}; its manifest declares {}", spec.name, t.dtype, spec.dtype));
        }
        let fits = t.shape.len() == spec.declared.len()
            && t.shape
                .iter()
                .zip(&spec.declared)
                .all(|(g, d)| d.is_none_or(|d| u64::try_from(*g).is_ok_and(|g| g == d)));
        if !fits {
            return Err(format!(
                "output `{}` has shape {:?}; its manifest declares {}",
                spec.name,
                t.shape,
                show_dims(&spec.declared)
            ));
        }
    }
    for (i, t) in outputs.iter().enumerate() {
        if let Some((at, v)) = t.first_non_finite() {
            return Err(format!("output {i} element {at} is {v}, not finite"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 2 of issue 11: 200 ids of 4 MB took the agent to 1.66 GB.
    #[test]
    fn remembered_feedback_is_bounded_in_count_and_bytes() {
        let mut p = Predictions::default();
        for i in 0..FEEDBACK_MEMORY + 10 {
            p.insert(("m".into(), i.to_string()), (Weak::new(), 0));
        }
        assert_eq!((p.order.len(), p.by_id.len()), (FEEDBACK_MEMORY, FEEDBACK_MEMORY));
        assert!(!p.by_id.contains_key(&("m".to_owned(), "9".to_owned())), "the oldest go first");
        let long = "x".repeat(1 << 20);
        for i in 0..20 {
            p.insert(("m".into(), format!("{i}{long}")), (Weak::new(), 0));
            assert!(p.bytes <= FEEDBACK_MEMORY_BYTES, "{} bytes after {i}", p.bytes);
        }
        let held: usize = p.order.iter().map(feedback_cost).sum();
        assert_eq!(held, p.bytes);
        assert!(p.order.len() < 10, "{} entries", p.order.len());
    }

    fn info(name: &str, declared: &[Option<u64>], fixed: &[usize]) -> TensorInfo {
        TensorInfo { name: name.to_owned(), dtype: DType::F32, declared: declared.to_vec(), fixed: fixed.to_vec() }
    }

    #[test]
    fn batches_split_only_on_a_symbolic_first_dim() {
        let specs = [info("input", &[None, Some(64)], &[1, 64])];
        let t = |shape: Vec<usize>| Tensor::from_f32(shape.clone(), &vec![0.0; shape.iter().product()]);
        assert_eq!(check_inputs(&specs, &[t(vec![1, 64])]), Ok(None));
        assert_eq!(check_inputs(&specs, &[t(vec![5, 64])]), Ok(Some(5)));
        assert!(
            matches!(check_inputs(&specs, &[t(vec![5, 63])]), Err(ServeError::BadInput(m)) if m.contains("[5, 63]"))
        );
        assert!(matches!(check_inputs(&specs, &[t(vec![0, 64])]), Err(ServeError::BadInput(_))));
        assert!(matches!(check_inputs(&specs, &[]), Err(ServeError::BadInput(m)) if m.contains("[input]")));
        let fixed = [info("x", &[Some(1), Some(4)], &[1, 4])];
        assert!(check_inputs(&fixed, &[t(vec![2, 4])]).is_err(), "a fixed batch dim does not split");
        let i64_input = Tensor::from_i64(vec![1, 64], &[0; 64]);
        assert!(
            matches!(check_inputs(&specs, &[i64_input]), Err(ServeError::BadInput(m)) if m.contains("must be float32, got int64"))
        );
    }

    #[test]
    fn canary_shares_are_exact_and_interleaved() {
        for p in [1u8, 10, 33, 50, 99] {
            let picks: Vec<bool> = (0..1000).map(|s| canary_turn(s, p)).collect();
            assert_eq!(picks.iter().filter(|x| **x).count(), usize::from(p) * 10, "{p}%");
            // No stretch of 100 requests is far from the share.
            for w in picks.windows(100) {
                assert!(w.iter().filter(|x| **x).count().abs_diff(usize::from(p)) <= 1, "{p}%");
            }
        }
    }

    #[test]
    fn samples_split_and_join_back() {
        let t = Tensor::from_f32(vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let parts: Vec<Tensor> = (0..3).map(|i| slice_sample(&t, i, 3)).collect();
        assert_eq!(parts[1].to_f32().unwrap(), vec![3.0, 4.0]);
        assert_eq!(parts[1].shape, vec![1, 2]);
        assert_eq!(concat_batch(parts), Some(t));
    }

    #[test]
    fn string_and_narrow_samples_split_and_join_back() {
        // Strings vary in length: a sample is cut at element boundaries.
        let t = Tensor::from_strings(vec![3, 2], &["a", "", "longer one", "b", "é", "xyz"]);
        let parts: Vec<Tensor> = (0..3).map(|i| slice_sample(&t, i, 3)).collect();
        assert_eq!(parts[1].strings().unwrap(), vec![&b"longer one"[..], b"b"]);
        assert!(parts.iter().all(|p| p.shape == [1, 2] && p.check(0).is_ok()));
        assert_eq!(concat_batch(parts), Some(t));
        let t = Tensor::from_values::<u8>(vec![2, 3], &[1, 2, 3, 4, 5, 6]);
        let parts: Vec<Tensor> = (0..2).map(|i| slice_sample(&t, i, 2)).collect();
        assert_eq!(parts[1].values::<u8>().unwrap(), vec![4, 5, 6]);
        assert_eq!(concat_batch(parts), Some(t));
    }

    #[test]
    fn labels_come_from_any_integer_output_or_any_float_argmax() {
        use half::f16;
        let probs16 = Tensor::from_values(vec![1, 3], &[f16::from_f32(0.1), f16::from_f32(0.7), f16::from_f32(0.2)]);
        assert_eq!(predicted_label(std::slice::from_ref(&probs16)), Some(1));
        let label32 = Tensor::from_values::<i32>(vec![1], &[2]);
        assert_eq!(predicted_label(&[probs16.clone(), label32]), Some(2));
        let label64 = Tensor::from_i64(vec![1], &[0]);
        let label8 = Tensor::from_values::<u8>(vec![1], &[2]);
        assert_eq!(predicted_label(&[label8, label64, probs16]), Some(0), "an int64 label first");
        let probs64 = Tensor::from_values::<f64>(vec![1, 2], &[0.9, 0.1]);
        assert_eq!(predicted_label(&[probs64]), Some(0));
        assert_eq!(predicted_label(&[Tensor::from_strings(vec![1], &["cat"])]), None);
    }

    #[test]
    fn outputs_are_checked_against_the_manifest() {
        let specs = [info("p", &[None, Some(10)], &[]), TensorInfo { dtype: DType::I64, ..info("l", &[None], &[]) }];
        let probs = Tensor::from_f32(vec![1, 10], &[0.1; 10]);
        let label = Tensor::from_i64(vec![1], &[3]);
        check_outputs(&specs, &[probs.clone(), label.clone()]).expect("fits");
        assert_eq!(predicted_label(&[probs.clone(), label.clone()]), Some(3));
        let wrong = Tensor::from_f32(vec![1, 9], &[0.1; 9]);
        assert!(check_outputs(&specs, &[wrong, label.clone()]).unwrap_err().contains("[?, 10]"));
        let nan = Tensor::from_f32(vec![1, 10], &[f32::NAN; 10]);
        assert!(check_outputs(&specs, &[nan, label.clone()]).unwrap_err().contains("not finite"));
        assert!(check_outputs(&specs, &[probs]).unwrap_err().contains("2"));
    }
}
