//! One model's slots at run time: the [`Loaded`] version in each, the
//! [`Route`] requests read, and the [`ModelServing`] that swaps it.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::io::TensorInfo;
use crate::rollout::window::{SlotMetrics, SlotWindow};
use crate::slots::{Color, Slots};
use crate::supervisor::Pool;

/// A version loaded into one slot, with its pool of supervised workers.
#[derive(Debug)]
pub struct Loaded {
    pub model: String,
    pub color: Color,
    pub version: String,
    pub sha256: String,
    pub deployment_id: i64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub worker: Pool,
    /// Joins concurrent requests into batches, when the model's
    /// `max_queue_delay_us` asks for it (see [`super::batcher`]).
    pub batcher: Option<super::batcher::Batcher>,
    /// Accuracy measured on the validation set at load, if it had one.
    pub validation_accuracy: RwLock<Option<f64>>,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Sliding-window metrics the rollout decisions read.
    pub window: Mutex<SlotWindow>,
    /// Validation samples behind `validation_accuracy`.
    pub validation_samples: AtomicU64,
    /// Totals since the last telemetry window (see [`super::telemetry`]).
    pub telemetry: Mutex<super::telemetry::Interval>,
    /// Where this slot's last window goes when it is dropped.
    pub(super) retired: super::telemetry::Retired,
    /// Shadow requests in flight to this slot (bounded, see [`MAX_SHADOW_IN_FLIGHT`]).
    pub(super) shadow_in_flight: AtomicUsize,
}

/// Metrics windows keep at most this many samples per kind...
pub const WINDOW_SAMPLES: usize = 10_000;
/// ...and none older than this.
pub const WINDOW_AGE: Duration = Duration::from_secs(300);
/// Mirrored requests beyond this many in flight are dropped, so a slow
/// shadow slot never queues without bound.
pub const MAX_SHADOW_IN_FLIGHT: usize = 8;

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

    /// Records one request: the model's compute time when it succeeded,
    /// and how long the request took here end to end.
    /// Rollout decisions compare compute times, which the worker measures
    /// around the model alone: pipe transport and host scheduling are the
    /// same for both slots and would only add noise. Telemetry keeps both.
    pub(super) fn record(&self, compute: Option<Duration>, latency: Duration) {
        let now = Instant::now();
        {
            let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            match compute {
                Some(c) => w.record_ok(c, now),
                None => w.record_error(now),
            }
        }
        let mut t = self.telemetry.lock().unwrap_or_else(PoisonError::into_inner);
        match compute {
            Some(c) => t.ok(latency, c),
            None => t.error(),
        }
    }

    /// Records whether this slot agreed with the active slot on a mirrored request.
    pub(super) fn record_agreement(&self, agreed: bool) {
        self.window.lock().unwrap_or_else(PoisonError::into_inner).record_agreement(agreed, Instant::now());
        self.telemetry.lock().unwrap_or_else(PoisonError::into_inner).agreement(agreed);
    }

    /// Records ground truth on one of this slot's answers.
    pub(super) fn record_feedback(&self, correct: bool) {
        self.window.lock().unwrap_or_else(PoisonError::into_inner).record_feedback(correct, Instant::now());
        self.telemetry.lock().unwrap_or_else(PoisonError::into_inner).feedback(correct);
    }
}

impl Loaded {
    /// Cuts the slot's telemetry window: everything since the last cut,
    /// named by this slot, in the `role` it plays now, with its workers'
    /// memory `rss_bytes` (read by the caller: it awaits the pool).
    pub fn cut_window(&self, role: &str, rss_bytes: u64) -> sentinel_proto::pb::SlotWindow {
        let gauges = super::telemetry::Gauges {
            restarts_total: self.worker.restarts(),
            rss_bytes,
            validation_accuracy: *self.validation_accuracy.read().unwrap_or_else(PoisonError::into_inner),
            validation_samples: self.validation_samples.load(std::sync::atomic::Ordering::Relaxed),
        };
        let w = self.telemetry.lock().unwrap_or_else(PoisonError::into_inner).cut(crate::util::now_ms(), gauges);
        sentinel_proto::pb::SlotWindow {
            model: self.model.clone(),
            version: self.version.clone(),
            slot: self.color.as_str().to_owned(),
            role: role.to_owned(),
            deployment_id: self.deployment_id,
            ..w
        }
    }
}

/// A slot that leaves for good (rolled back, superseded, replaced) leaves
/// what it did since the last report, so no request goes uncounted.
impl Drop for Loaded {
    fn drop(&mut self) {
        // Its workers are going: no memory to report.
        super::telemetry::retire(&self.retired, self.cut_window("retired", 0));
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
    pub(super) route: RwLock<Arc<Route>>,
    /// The committed state machine; held across an install so installs of
    /// one model never interleave.
    pub(crate) slots: tokio::sync::Mutex<Slots>,
    pub(super) seq: AtomicU64,
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
