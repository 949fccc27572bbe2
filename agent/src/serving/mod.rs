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
//!
//! # Layout
//! - [`io`]: declared tensors, request and result checks, batching (pure).
//! - [`slot`]: a loaded slot, the route and one model's slots.
//! - [`telemetry`]: each slot's totals since its last telemetry window.
//! - `install`: staging, validating and promoting a version; restoring after a restart.
//! - `feedback`: ground truth on earlier requests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::config::ServingSettings;
use crate::metrics::{AgentMetrics, RequestOutcome};
use crate::slots::Slots;
use crate::supervisor::{RestartPolicy, SlotError};
use sentinel_worker_protocol::frame::Tensor;

pub mod batcher;
mod feedback;
mod install;
pub mod io;
pub mod slot;
pub mod telemetry;

use feedback::Predictions;
pub use feedback::{FEEDBACK_MEMORY, FEEDBACK_MEMORY_BYTES, FeedbackOutcome};
pub use install::{Install, InstallError, Installed, ValidationSet};
pub use io::{
    ServeError, Served, TensorInfo, check_inputs, check_outputs, model_io, order_inputs, predicted_label, show_dims,
    wire_dtype,
};
pub use slot::{CandidateMode, Loaded, MAX_SHADOW_IN_FLIGHT, ModelServing, Route, WINDOW_AGE, WINDOW_SAMPLES};

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
    /// The last telemetry windows of slots that left the route (rolled back,
    /// superseded, replaced), until the report loop takes them.
    retired: telemetry::Retired,
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
            retired: telemetry::Retired::default(),
        }
    }

    /// Takes the last windows of slots that have left the route since the
    /// last call.
    pub fn take_retired_windows(&self) -> Vec<sentinel_proto::pb::SlotWindow> {
        std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner))
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

    /// The slot a request goes to: `version` when given (active, or the warm
    /// standby), else the active slot.
    pub fn pick(&self, model: &str, version: Option<&str>) -> Result<Arc<Loaded>, ServeError> {
        let ms = self.model(model).ok_or_else(|| ServeError::UnknownModel(model.to_owned()))?;
        pick_in(&ms.route(), model, version)
    }

    /// Runs one request with named inputs: on `version` when given, else on
    /// the active slot or, for a canary's share, on the candidate; in shadow
    /// mode the candidate also gets a mirror whose answer is only compared.
    /// A batch of N samples on a model whose batch dim is symbolic runs as
    /// one batch, or in chunks of `max_batch_size` (see `run_batched`).
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
        let took = started.elapsed();
        self.metrics.inference([&slot.model, slot.color.as_str(), &slot.version], outcome, took);
        match &result {
            Ok((_, compute)) => slot.record(Some(*compute), took),
            Err(ServeError::Unavailable { .. }) => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                slot.record(None, took);
            }
            Err(_) => {}
        }
        let (outputs, _) = result?;
        let predicted = predicted_label(&outputs).filter(|_| outputs.first().and_then(|t| t.shape.first()) <= Some(&1));
        if let Some((candidate, inputs)) = mirror {
            candidate.shadow_in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let started = Instant::now();
                let result = run_batched(&candidate, inputs).await;
                candidate.record(result.as_ref().ok().map(|(_, compute)| *compute), started.elapsed());
                if let (Ok((outputs, _)), Some(active_label)) = (result, predicted) {
                    candidate.record_agreement(predicted_label(&outputs) == Some(active_label));
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

/// Checks the inputs against the model and runs them. A request the
/// slot's dynamic batcher takes joins a batch there. Otherwise a batch of N
/// samples runs as one when the slot's workers take batches that large; a
/// larger one runs in chunks, as many at a time as the pool has workers, and
/// the outputs are joined in order: chunks of the workers' largest batch, or
/// on workers that run single samples, one chunk per worker run sample by
/// sample. Returns the outputs and the model's compute time, summed over the
/// chunks, as the workers measured it.
async fn run_batched(slot: &Loaded, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, Duration), ServeError> {
    use futures_util::StreamExt;

    let batch = check_inputs(&slot.inputs, &inputs)?;
    let unavailable = |e: SlotError| match e {
        SlotError::Worker(crate::supervisor::InferError::BadInput(reason)) => ServeError::BadInput(reason),
        other => ServeError::Unavailable {
            model: slot.model.clone(),
            version: slot.version.clone(),
            reason: other.to_string(),
        },
    };
    if let Some(batcher) = slot.batcher.as_ref().filter(|b| b.takes(batch.unwrap_or(1))) {
        return batcher.run(inputs, batch.unwrap_or(1)).await.map_err(unavailable);
    }
    let limit = slot.worker.max_batch().max(1);
    let n = match batch {
        Some(n) if n > limit => n,
        // Fixed shapes, or a batch the workers run as one.
        _ => {
            let (outputs, compute) = slot.worker.infer_timed(&inputs).await.map_err(unavailable)?;
            return Ok((outputs, compute.unwrap_or_default()));
        }
    };
    let rows = limit == 1;
    let chunk = if rows {
        // Frames stay well under the protocol's bound.
        let per_sample = inputs.iter().map(|t| t.data.len()).sum::<usize>() / n;
        let fit = (sentinel_worker_protocol::frame::MAX_FRAME_LEN / 2 / per_sample.max(1)).max(1);
        n.div_ceil(slot.worker.size()).min(fit)
    } else {
        limit
    };
    let chunks: Vec<Vec<Tensor>> = (0..n)
        .step_by(chunk)
        .map(|start| inputs.iter().map(|t| t.samples(start, chunk.min(n - start))).collect())
        .collect();
    drop(inputs);
    // Every chunk runs to its end, even after one failed: dropping a chunk
    // mid-exchange would kill its (healthy) worker.
    let runs = futures_util::stream::iter(chunks)
        .map(|chunk| async move {
            if rows { slot.worker.infer_rows_timed(&chunk).await } else { slot.worker.infer_timed(&chunk).await }
        })
        .buffered(slot.worker.size())
        .collect::<Vec<_>>()
        .await;
    let runs = runs.into_iter().collect::<Result<Vec<_>, _>>().map_err(unavailable)?;
    let total = runs.iter().map(|(_, compute)| compute.unwrap_or_default()).sum();
    let joined = Tensor::concat_each(runs.into_iter().map(|(outputs, _)| outputs).collect()).map_err(|_| {
        ServeError::Unavailable {
            model: slot.model.clone(),
            version: slot.version.clone(),
            reason: "the outputs of a batch's chunks cannot be joined".to_owned(),
        }
    })?;
    Ok((joined, total))
}

#[cfg(test)]
mod tests;
