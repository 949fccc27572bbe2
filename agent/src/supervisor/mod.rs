//! Spawning and supervising `sentinel-worker` processes.
//!
//! A [`Worker`] is one child process: started with a cleared environment, a
//! private `HOME`, an optional address-space limit, and checked through its
//! ready frame. A [`Supervised`] slot owns the current worker of one model and
//! replaces it when it dies, with exponential backoff, until too many
//! consecutive failures make it give up ([`SlotState::Failed`]).
//!
//! # Layout
//! - [`process`]: [`WorkerSpec`], [`Worker`] and their errors.
//! - this module: [`Supervised`], one self-restarting worker.
//! - [`pool`]: [`Pool`], the supervised workers that serve one slot.

pub mod pool;
pub mod process;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, watch};

pub use pool::{Pool, WorkerView};
use process::Failure;
pub use process::{Exit, InferError, SupervisorError, TestProbes, Worker, WorkerSpec};

use sentinel_worker_protocol::frame::Tensor;

/// When and how often a [`Supervised`] slot restarts its worker.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Delay before the first restart after a failure.
    pub initial_backoff: Duration,
    /// The delay doubles per consecutive failure up to this.
    pub max_backoff: Duration,
    /// A worker that served this long resets the failure count and the backoff.
    pub healthy_after: Duration,
    /// This many consecutive failures (spawn or crash) make the slot give up.
    pub max_consecutive_failures: u32,
    /// What a sandbox violation does to the slot.
    pub on_violation: ViolationPolicy,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            healthy_after: Duration::from_secs(60),
            max_consecutive_failures: 5,
            on_violation: ViolationPolicy::FailSlot,
        }
    }
}

/// What a worker killed by its seccomp filter means for its slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ViolationPolicy {
    /// A model that attempts forbidden syscalls is not restarted: the slot fails.
    #[default]
    FailSlot,
    /// Count it like any crash and restart.
    Restart,
}

/// What a [`Supervised`] slot is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Starting a worker (first start, or a restart after `attempt` failures).
    Starting { attempt: u32 },
    /// A worker is serving.
    Running { pid: u32, confined: bool, unconfined_reason: Option<String> },
    /// The slot gave up; the reason names the last failure.
    Failed(String),
}

/// Why [`Supervised::infer`] produced no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Worker(#[from] InferError),
    /// No worker came up within the wait bound.
    #[error("no worker available (restarting)")]
    Unavailable,
    #[error("slot failed: {0}")]
    Failed(String),
}

/// Whether a failed request reached a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Written in full (or timed out): it may be what killed the worker.
    Yes,
    /// The worker was gone first; another worker may safely run it.
    No,
}

#[derive(Debug, Default)]
struct Stats {
    restarts: u64,
    last_failure: Option<String>,
    consecutive_failures: u32,
    backoff: Duration,
    running_since: Option<Instant>,
    /// A start/restart task is running: at most one at a time.
    starting: bool,
}

#[derive(Debug)]
struct Inner {
    spec: WorkerSpec,
    policy: RestartPolicy,
    current: RwLock<Option<Arc<Worker>>>,
    state: watch::Sender<SlotState>,
    stats: StdMutex<Stats>,
    /// The last started worker's [`Worker::max_batch`]; 0 before the first.
    max_batch: AtomicUsize,
}

/// A worker slot that restarts its worker when it dies. Cloning shares the slot.
#[derive(Debug, Clone)]
pub struct Supervised {
    inner: Arc<Inner>,
}

impl Supervised {
    /// Creates the slot and starts its first worker in the background. Must run
    /// inside a Tokio runtime; watch [`Supervised::subscribe`] for the outcome.
    pub fn start(spec: WorkerSpec, policy: RestartPolicy) -> Supervised {
        Supervised::start_after(spec, policy, None)
    }

    /// Like [`Supervised::start`], the first worker starting only once
    /// `after` (another slot's state) is running or failed.
    pub fn start_after(
        spec: WorkerSpec,
        policy: RestartPolicy,
        after: Option<watch::Receiver<SlotState>>,
    ) -> Supervised {
        let (state, _) = watch::channel(SlotState::Starting { attempt: 0 });
        let stats = Stats { backoff: policy.initial_backoff, starting: true, ..Stats::default() };
        let inner = Arc::new(Inner {
            spec,
            policy,
            current: RwLock::new(None),
            state,
            stats: StdMutex::new(stats),
            max_batch: AtomicUsize::new(0),
        });
        let first = Arc::clone(&inner);
        tokio::spawn(async move {
            // The slot before went away (its pool was dropped): nothing to start.
            if let Some(mut after) = after
                && after.wait_for(|s| matches!(s, SlotState::Running { .. } | SlotState::Failed(_))).await.is_err()
            {
                return;
            }
            start_loop(first, Duration::ZERO).await;
        });
        Supervised { inner }
    }

    /// The slot's state, updated on every start, restart and failure.
    pub fn subscribe(&self) -> watch::Receiver<SlotState> {
        self.inner.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> SlotState {
        self.inner.state.borrow().clone()
    }

    /// Whether a worker is serving, without copying the state.
    pub fn is_running(&self) -> bool {
        matches!(*self.inner.state.borrow(), SlotState::Running { .. })
    }

    /// The largest batch its worker runs as one (see [`Worker::max_batch`]);
    /// 0 until a worker has started.
    pub fn max_batch(&self) -> usize {
        self.inner.max_batch.load(Ordering::Relaxed)
    }

    /// How many times a replacement worker came up after a failure.
    pub fn restarts(&self) -> u64 {
        self.inner.stats().restarts
    }

    /// The last failure, e.g. `sandbox violation (SIGSYS)` or a spawn error.
    pub fn last_failure(&self) -> Option<String> {
        self.inner.stats().last_failure.clone()
    }

    /// The current worker, if one is serving.
    pub async fn worker(&self) -> Option<Arc<Worker>> {
        self.inner.current.read().await.clone()
    }

    /// Runs one inference on the current worker. While the slot restarts, waits
    /// for the new worker (bounded by the load timeout plus the largest backoff).
    /// A worker death returns its error and starts a restart in the background.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, SlotError> {
        self.infer_timed(inputs).await.map(|(outputs, _)| outputs)
    }

    /// Like [`Supervised::infer`], with the model's compute time as the worker measured it.
    pub async fn infer_timed(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Option<Duration>), SlotError> {
        self.attempt(&sentinel_worker_protocol::frame::request_parts(inputs, false)).await.map_err(|(e, _)| e)
    }

    /// Sends one encoded request (see [`Worker::attempt`]), saying on failure
    /// whether it reached a worker (see [`pool`]).
    pub(crate) async fn attempt(
        &self,
        parts: &[std::borrow::Cow<'_, [u8]>],
    ) -> Result<(Vec<Tensor>, Option<Duration>), (SlotError, Delivered)> {
        let worker = match self.worker().await {
            Some(w) => w,
            None => self.wait_for_worker().await.map_err(|e| (e, Delivered::No))?,
        };
        match worker.attempt(parts).await {
            Ok(done) => Ok(done),
            Err(Failure { error: e @ InferError::BadInput(_), delivered }) => Err((e.into(), delivered)),
            Err(Failure { error, delivered }) => {
                self.inner.worker_died(&worker, &error).await;
                Err((error.into(), delivered))
            }
        }
    }

    /// Health check: notices a worker that died while idle (and starts its
    /// restart), then returns the state.
    pub async fn check(&self) -> SlotState {
        if let Some(worker) = self.worker().await
            && let Some(exit) = worker.exit_status()
        {
            self.inner.worker_died(&worker, &InferError::from(exit)).await;
        }
        self.state()
    }

    async fn wait_for_worker(&self) -> Result<Arc<Worker>, SlotError> {
        let mut rx = self.subscribe();
        let bound = self.inner.spec.load_timeout + self.inner.policy.max_backoff;
        // The watch guard must not live across the await below.
        let settled = {
            let settled = tokio::time::timeout(
                bound,
                rx.wait_for(|s| matches!(s, SlotState::Running { .. } | SlotState::Failed(_))),
            )
            .await;
            match settled {
                Ok(Ok(state)) => match &*state {
                    SlotState::Failed(reason) => Err(SlotError::Failed(reason.clone())),
                    _ => Ok(()),
                },
                _ => Err(SlotError::Unavailable),
            }
        };
        settled?;
        self.worker().await.ok_or(SlotError::Unavailable)
    }
}

impl Inner {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the death of `worker` (once, however many callers saw it) and
    /// starts its replacement unless the slot gives up.
    async fn worker_died(self: &Arc<Self>, worker: &Arc<Worker>, cause: &InferError) {
        let mut current = self.current.write().await;
        if !current.as_ref().is_some_and(|w| Arc::ptr_eq(w, worker)) {
            return;
        }
        *current = None;
        drop(current);
        worker.kill();
        tracing::warn!(pid = worker.pid(), model = %self.spec.model.display(), %cause, "worker died");
        let give_up = {
            let mut stats = self.stats();
            if stats.running_since.take().is_some_and(|t| t.elapsed() >= self.policy.healthy_after) {
                stats.consecutive_failures = 0;
                stats.backoff = self.policy.initial_backoff;
            }
            stats.last_failure = Some(cause.to_string());
            stats.consecutive_failures += 1;
            let violation =
                *cause == InferError::SandboxViolation && self.policy.on_violation == ViolationPolicy::FailSlot;
            if violation || stats.consecutive_failures >= self.policy.max_consecutive_failures {
                Some(cause.to_string())
            } else if stats.starting {
                return;
            } else {
                stats.starting = true;
                None
            }
        };
        match give_up {
            Some(reason) => self.fail(reason),
            None => {
                let delay = self.next_backoff();
                self.state.send_replace(SlotState::Starting { attempt: self.stats().consecutive_failures });
                tokio::spawn(start_loop(Arc::clone(self), delay));
            }
        }
    }

    fn next_backoff(&self) -> Duration {
        let mut stats = self.stats();
        let delay = stats.backoff;
        stats.backoff = (delay * 2).min(self.policy.max_backoff);
        delay
    }

    fn fail(&self, reason: String) {
        tracing::error!(model = %self.spec.model.display(), %reason, "worker slot failed");
        self.state.send_replace(SlotState::Failed(reason));
    }
}

/// Watches a worker in the background so a death while idle is handled at
/// once, not at the next request. Holds only weak references: it never keeps
/// a retired worker or slot alive.
fn monitor(inner: &Arc<Inner>, worker: &Arc<Worker>) {
    let (inner, weak) = (Arc::downgrade(inner), Arc::downgrade(worker));
    let mut exit = worker.exit_watch();
    tokio::spawn(async move {
        let ended = match exit.wait_for(Option::is_some).await {
            Ok(e) => *e,
            Err(_) => return,
        };
        if let (Some(exit), Some(inner), Some(worker)) = (ended, inner.upgrade(), weak.upgrade()) {
            inner.worker_died(&worker, &InferError::from(exit)).await;
        }
    });
}

/// Whether a start failure will repeat on every attempt: the worker exited
/// before its ready frame saying the model does not load, or that its
/// arguments are wrong.
fn permanent(e: &SupervisorError) -> bool {
    use sentinel_worker_protocol::launch::{EXIT_MODEL, EXIT_USAGE};
    matches!(e, SupervisorError::ExitedBeforeReady { exit: Exit { code: Some(c), signal: None }, .. }
        if u8::try_from(*c).is_ok_and(|c| c == EXIT_MODEL || c == EXIT_USAGE))
}

/// Starts workers until one is ready or the failure budget is spent.
async fn start_loop(inner: Arc<Inner>, mut delay: Duration) {
    loop {
        // Backoff between attempts, not synchronisation.
        tokio::time::sleep(delay).await;
        match Worker::spawn(&inner.spec).await {
            Ok(worker) => {
                let state = SlotState::Running {
                    pid: worker.pid(),
                    confined: worker.confined(),
                    unconfined_reason: worker.unconfined_reason().map(str::to_owned),
                };
                inner.max_batch.store(worker.max_batch(), Ordering::Relaxed);
                let worker = Arc::new(worker);
                monitor(&inner, &worker);
                *inner.current.write().await = Some(worker);
                {
                    let mut stats = inner.stats();
                    if stats.last_failure.is_some() {
                        stats.restarts += 1;
                    }
                    stats.running_since = Some(Instant::now());
                    stats.starting = false;
                }
                inner.state.send_replace(state);
                return;
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(model = %inner.spec.model.display(), %reason, "starting a worker failed");
                let attempt = {
                    let mut stats = inner.stats();
                    stats.last_failure = Some(reason.clone());
                    stats.consecutive_failures += 1;
                    stats.consecutive_failures
                };
                // A model that cannot load fails the same way every time: no retries.
                if permanent(&e) || attempt >= inner.policy.max_consecutive_failures {
                    inner.stats().starting = false;
                    inner.fail(reason);
                    return;
                }
                inner.state.send_replace(SlotState::Starting { attempt });
                delay = inner.next_backoff();
            }
        }
    }
}
