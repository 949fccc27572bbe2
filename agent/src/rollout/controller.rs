//! The rollout of one validated version: moves it through the policy's
//! phases (shadow, canary N%, full, standby bake) on the decisions of
//! [`super::decision::decide`], and rolls it back on the device, at once,
//! when it is worse than the version it would replace.
//!
//! A rollback puts traffic back on the old slot with one route swap first,
//! then commits the slots, marks the version rejected at this desired-state
//! revision (so a restart does not retry it), stops the bad worker, and
//! tells the hub why, with a metrics snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sentinel_proto::pb::{RolloutEvidence, WindowMetrics};
use serde_json::json;
use tokio::sync::watch;

use super::policy::{PhaseKind, Policy};
use super::progress::{Detection, Progress, Step};
use super::window::SlotMetrics;
use crate::serving::{CandidateMode, Loaded, ModelServing, Route};
use crate::slots::SlotState;
use crate::state::Shared;
use crate::store::{EventKind, ModelStatus};
use crate::supervisor::SlotState as WorkerState;

/// How often a rollout looks at the metrics. A control-loop period: decisions
/// depend on sample counts and bake times, never on this.
pub const TICK: Duration = Duration::from_millis(20);

/// What a running rollout is told to stop for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Running,
    /// A newer desired state supersedes it.
    Superseded,
    /// An operator or the hub asked for a rollback ([`Rollouts::rollback_now`]): its
    /// kind ([`OPERATOR`] or [`HUB`]) and reason.
    RollBack {
        kind: &'static str,
        reason: String,
    },
}

/// A running rollout; cancelled when a newer desired state supersedes it.
#[derive(Debug)]
struct RolloutTask {
    version: String,
    sha256: String,
    cancel: watch::Sender<Stop>,
    done: tokio::task::JoinHandle<()>,
}

impl RolloutTask {
    /// Stops the rollout and waits for it: a candidate still in shadow or
    /// canary is failed (traffic stays on the active slot); a version already
    /// promoted stays active and its standby is released from watching.
    async fn cancel(self) {
        let _ = self.cancel.send(Stop::Superseded);
        let _ = self.done.await;
    }

    /// Rolls the version back from inside the rollout (which owns its
    /// metrics) and waits for it.
    async fn roll_back(self, kind: &'static str, reason: &str) {
        let _ = self.cancel.send(Stop::RollBack { kind, reason: reason.to_owned() });
        let _ = self.done.await;
    }

    fn is_finished(&self) -> bool {
        self.done.is_finished()
    }
}

/// Why [`Rollouts::rollback_now`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    #[error("no model `{model}` on this device")]
    UnknownModel { model: String },
    #[error("{model}: a version is loading or validating; it takes no traffic yet and fails on its own if it is bad")]
    NotInTraffic { model: String },
    #[error("{model}: no warm standby to go back to ({active} is active and has no predecessor here)")]
    NoStandby { model: String, active: String },
    #[error("{model}: no warm standby to go back to any more")]
    StandbyGone { model: String },
}

/// The rollouts running on this device, at most one per model. The
/// controller owns their tasks: the apply loop and the control socket reach
/// them only through these methods.
#[derive(Debug, Default)]
pub struct Rollouts {
    tasks: Mutex<BTreeMap<String, RolloutTask>>,
}

impl Rollouts {
    fn take(&self, model: &str) -> Option<RolloutTask> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner).remove(model)
    }

    /// Starts watching `green` from `phase` (the phase
    /// [`crate::serving::Serving::install`] put it in), in place of any
    /// rollout of the model before.
    pub fn spawn(&self, shared: Arc<Shared>, ms: Arc<ModelServing>, green: Arc<Loaded>, policy: Policy, phase: usize) {
        let (cancel, cancel_rx) = watch::channel(Stop::Running);
        let (version, sha256) = (green.version.clone(), green.sha256.clone());
        let model = ms.name.clone();
        let done = tokio::spawn(run(shared, ms, green, policy, phase, cancel_rx));
        let task = RolloutTask { version, sha256, cancel, done };
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner).insert(model, task);
    }

    /// Keeps the rollout of `model` when it is still running this `sha256`
    /// and `version` (returns true); otherwise cancels it (see
    /// [`Rollouts::cancel`]) and returns false.
    pub async fn keep_or_cancel(&self, model: &str, sha256: &str, version: &str) -> bool {
        match self.take(model) {
            Some(task) if task.sha256 == sha256 && task.version == version && !task.is_finished() => {
                self.tasks.lock().unwrap_or_else(PoisonError::into_inner).insert(model.to_owned(), task);
                true
            }
            Some(task) => {
                task.cancel().await;
                false
            }
            None => false,
        }
    }

    /// Stops the rollout of `model`, if any, and waits for it: a candidate
    /// still in shadow or canary is failed (traffic stays on the active slot);
    /// a version already promoted stays active and its standby is released
    /// from watching.
    pub async fn cancel(&self, model: &str) {
        if let Some(task) = self.take(model) {
            task.cancel().await;
        }
    }

    /// A rollback of `model` at once, by an operator or the hub (`kind`): a
    /// version in shadow or canary is aborted (traffic stays on the active
    /// slot); otherwise the warm standby becomes active again in one route swap.
    /// Either way the slots are committed, the version is rejected at the
    /// current desired-state revision (a restart does not retry it) and the hub
    /// gets a `rolled_back` event with `reason`, as for an automatic rollback.
    /// Returns what was done, or why nothing was (unknown model, nothing to
    /// roll back to).
    pub async fn rollback_now(
        &self,
        shared: &Shared,
        model: &str,
        kind: &'static str,
        reason: &str,
    ) -> Result<String, RollbackError> {
        let ms = shared.serving.model(model).ok_or_else(|| RollbackError::UnknownModel { model: model.to_owned() })?;
        let route = ms.route();
        let describe = |before: &Route| match (&before.candidate, &before.active) {
            (Some(c), Some(a)) if before.mode != CandidateMode::Idle => {
                format!("{model}: the rollout of {} was aborted; {} keeps serving", c.version, a.version)
            }
            (_, Some(a)) => match &before.standby {
                Some(s) => format!("{model}: {} rolled back; {} is active again", a.version, s.version),
                None => format!("{model}: {} rolled back", a.version),
            },
            _ => format!("{model}: rolled back"),
        };
        let mid_rollout = route.candidate.is_some() && route.mode != CandidateMode::Idle;
        if route.candidate.is_some() && !mid_rollout {
            return Err(RollbackError::NotInTraffic { model: model.to_owned() });
        }
        if !mid_rollout && route.standby.is_none() {
            let active = route.active.as_ref().map_or("nothing", |a| a.version.as_str());
            return Err(RollbackError::NoStandby { model: model.to_owned(), active: active.to_owned() });
        }
        let task = self.take(model);
        let message = describe(&route);
        drop(route);
        match task {
            // The rollout watching this version rolls it back itself, with its metrics.
            Some(task) if !task.is_finished() => task.roll_back(kind, reason).await,
            _ => {
                // Looked at again: the rollout may have finished (or rolled
                // back on its own) since the checks above.
                let route = ms.route();
                let (Some(green), Some(blue)) = (route.active.clone(), route.standby.clone()) else {
                    return Err(RollbackError::StandbyGone { model: model.to_owned() });
                };
                drop(route);
                let now = Instant::now();
                let (g, b) = (green.metrics(now), Some(blue.metrics(now)));
                rollback(shared, &ms, &green, kind, reason, &g, b, Detection::default()).await;
            }
        }
        Ok(message)
    }
}

fn agent_state(kind: Option<PhaseKind>) -> ModelStatus {
    match kind {
        Some(PhaseKind::Shadow) => ModelStatus::Shadow,
        Some(PhaseKind::Canary { .. }) => ModelStatus::Canary,
        _ => ModelStatus::Serving,
    }
}

async fn run(
    shared: Arc<Shared>,
    ms: Arc<ModelServing>,
    green: Arc<Loaded>,
    policy: Policy,
    phase: usize,
    mut cancel: watch::Receiver<Stop>,
) {
    let mut seen_restarts = green.worker.restarts();
    set_status(&shared, &green, agent_state(policy.phases.get(phase).map(|p| p.kind)), "");
    let mut progress = Progress::new(policy, phase, Instant::now());
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.changed() => {
                let stop = cancel.borrow_and_update().clone();
                match stop {
                    Stop::RollBack { kind, reason } => {
                        let now = Instant::now();
                        let blue = {
                            let route = ms.route();
                            if route.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &green)) {
                                route.standby.clone()
                            } else {
                                route.active.clone()
                            }
                        };
                        let blue_metrics = blue.map(|b| b.metrics(now));
                        let green_metrics = green.metrics(now);
                        let d = Detection::default();
                        rollback(&shared, &ms, &green, kind, &reason, &green_metrics, blue_metrics, d).await;
                    }
                    Stop::Superseded | Stop::Running => cancelled(&shared, &ms, &green).await,
                }
                return;
            }
        }
        let now = Instant::now();
        let restarts = green.worker.restarts();
        if restarts > seen_restarts {
            let mut w = green.window.lock().unwrap_or_else(PoisonError::into_inner);
            for _ in seen_restarts..restarts {
                w.record_restart(now);
            }
            seen_restarts = restarts;
        }
        let route = ms.route();
        let promoted = route.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &green));
        let blue = if promoted { route.standby.clone() } else { route.active.clone() };
        drop(route);
        if let WorkerState::Failed(reason) = green.worker.state() {
            let text = format!("the new version's worker keeps failing: {reason}");
            let blue_metrics = blue.map(|b| b.metrics(now));
            rollback(&shared, &ms, &green, "crash", &text, &green.metrics(now), blue_metrics, Detection::default())
                .await;
            return;
        }
        let green_metrics = green.metrics(now);
        // The old slot over this phase only: the same period and load as the new one.
        let blue_metrics = blue.as_ref().map(|b| b.metrics_since(now, progress.phase_start())).unwrap_or_default();
        match progress.step(now, promoted, &green_metrics, blue_metrics) {
            Step::Hold => {}
            Step::Rollback { reason, detection, blue: blue_metrics } => {
                let text = reason.to_string();
                rollback(&shared, &ms, &green, reason.kind(), &text, &green_metrics, Some(blue_metrics), detection)
                    .await;
                return;
            }
            Step::Complete => {
                tracing::info!(model = %green.model, version = %green.version, "standby bake over; rollout complete");
                set_status(&shared, &green, ModelStatus::Serving, "");
                shared.event(EventKind::RolloutComplete, &green.model, &green.version, "promoted through every phase");
                return;
            }
            Step::Next { kind, blue: blue_metrics } => {
                let phase = progress.phase();
                {
                    let mut w = green.window.lock().unwrap_or_else(PoisonError::into_inner);
                    let accuracy = *green.validation_accuracy.read().unwrap_or_else(PoisonError::into_inner);
                    w.reset();
                    w.set_validation_accuracy(accuracy);
                }
                match kind {
                    Some(PhaseKind::Full) | None if !promoted => {
                        if let Err(e) = promote(&shared, &ms, &green).await {
                            let reason = crate::util::error_chain(&e);
                            let d = Detection::default();
                            rollback(&shared, &ms, &green, "promote_failed", &reason, &green_metrics, None, d).await;
                            return;
                        }
                    }
                    Some(PhaseKind::Shadow) => ms.swap(|r| Route { mode: CandidateMode::Shadow, ..r.clone() }),
                    Some(PhaseKind::Canary { percent }) => {
                        ms.swap(|r| Route { mode: CandidateMode::Canary(percent), ..r.clone() });
                    }
                    _ => {}
                }
                let state = agent_state(kind);
                set_status(&shared, &green, state, "");
                let passed = RolloutEvidence {
                    candidate: Some(window_metrics(&green_metrics)),
                    baseline: Some(window_metrics(&blue_metrics)),
                    ..RolloutEvidence::default()
                };
                shared.event_with(
                    EventKind::RolloutPhase,
                    &green.model,
                    &green.version,
                    &format!("entered phase {phase} ({state})"),
                    Some(&passed),
                );
                tracing::info!(model = %green.model, version = %green.version, phase, state = state.as_str(), "rollout phase");
            }
        }
    }
}

/// Makes the canary the active slot: one committed step, one route swap.
/// Why the last phase could not promote the new version (it is rolled back).
#[derive(Debug, thiserror::Error)]
enum PromoteError {
    #[error(transparent)]
    Refused(#[from] crate::slots::SlotError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

async fn promote(shared: &Shared, ms: &ModelServing, green: &Arc<Loaded>) -> Result<(), PromoteError> {
    let mut slots = ms.slots.lock().await;
    slots.promote(green.color)?;
    if let Err(e) = shared.store.activate(&slots, green.deployment_id) {
        *slots = shared.store.load_slots(&ms.name).ok().flatten().unwrap_or_else(|| slots.clone());
        return Err(e.into());
    }
    ms.swap(|r| Route {
        active: Some(green.clone()),
        standby: r.active.clone(),
        candidate: None,
        mode: CandidateMode::Idle,
    });
    Ok(())
}

/// Traffic back to the old slot first, then the durable record and the report.
#[allow(clippy::too_many_arguments)]
async fn rollback(
    shared: &Shared,
    ms: &ModelServing,
    green: &Arc<Loaded>,
    kind: &str,
    reason: &str,
    green_metrics: &SlotMetrics,
    blue_metrics: Option<SlotMetrics>,
    detection: Detection,
) {
    let started = Instant::now();
    let mut was_active = false;
    ms.swap(|r| {
        if r.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, green)) {
            was_active = true;
            Route { active: r.standby.clone(), standby: None, candidate: None, mode: CandidateMode::Idle }
        } else {
            Route { candidate: None, mode: CandidateMode::Idle, ..r.clone() }
        }
    });
    let switch = started.elapsed();
    let mut slots = ms.slots.lock().await;
    let committed = match slots.rollback(reason) {
        Ok(back) if was_active => {
            let deployment = ms.route().active.as_ref().map_or(0, |a| a.deployment_id);
            tracing::info!(model = %ms.name, to = back.as_str(), "standby active again");
            shared.store.activate(&slots, deployment)
        }
        Ok(_) => shared.store.commit_slots(&slots),
        Err(e) => {
            tracing::error!(error = %e, %slots, "slot rollback refused");
            Ok(())
        }
    };
    if let Err(e) = committed {
        tracing::error!(error = %crate::util::error_chain(&e), "saving the rollback failed; traffic is back on the old slot");
    }
    drop(slots);
    let revision = shared.applied_revision();
    if let Err(e) = shared.store.reject(&green.model, &green.sha256, &green.version, revision, reason) {
        tracing::error!(error = %crate::util::error_chain(&e), "recording the rejected version failed");
    }
    let evidence = RolloutEvidence {
        kind: kind.to_owned(),
        switch_us: u64::try_from(switch.as_micros()).unwrap_or(u64::MAX),
        detected_after_samples: detection.samples,
        detected_after_ms: u64::try_from(detection.after.as_millis()).unwrap_or(u64::MAX),
        candidate: Some(window_metrics(green_metrics)),
        baseline: blue_metrics.as_ref().map(window_metrics),
    };
    tracing::warn!(model = %green.model, version = %green.version, kind, %reason, switch_us = switch.as_micros(), "rolled back");
    shared.serving.metrics().rollback(&green.model, kind);
    set_status(shared, green, ModelStatus::RolledBack, reason);
    shared.event_with(EventKind::RolledBack, &green.model, &green.version, reason, Some(&evidence));
}

/// The rollback kind of an operator's `sentinel-agent rollback`.
pub const OPERATOR: &str = "operator";

/// The rollback kind when the hub's desired state names the version this
/// device keeps warm as standby (a fleet halt, or a rollback on the hub).
pub const HUB: &str = "hub";

/// A superseded rollout: a candidate not yet promoted fails; a promoted
/// version keeps serving.
async fn cancelled(shared: &Shared, ms: &ModelServing, green: &Arc<Loaded>) {
    let route = ms.route();
    if route.candidate.as_ref().is_some_and(|c| Arc::ptr_eq(c, green)) {
        ms.swap(|r| Route { candidate: None, mode: CandidateMode::Idle, ..r.clone() });
        let mut slots = ms.slots.lock().await;
        if slots.get(green.color).state == SlotState::Canary {
            if let Err(e) = slots.fail(green.color, "superseded by a newer desired state") {
                tracing::warn!(error = %crate::util::error_chain(&e), %slots, "failing the cancelled canary slot was refused");
            }
            if let Err(e) = shared.store.commit_slots(&slots) {
                tracing::error!(error = %crate::util::error_chain(&e), "saving a cancelled rollout failed");
            }
        }
        shared.event(EventKind::RolloutCancelled, &green.model, &green.version, "superseded by a newer desired state");
    }
}

fn set_status(shared: &Shared, green: &Loaded, state: ModelStatus, detail: &str) {
    shared.set_status(&green.model, state, &green.version, detail, Some(green.deployment_id));
    shared.changed();
}

/// The figures a report and the status show for one slot.
/// A window as rollout evidence on the wire.
fn window_metrics(m: &SlotMetrics) -> WindowMetrics {
    let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
    WindowMetrics {
        requests: m.requests,
        errors: m.errors,
        p50_ms: ms(m.p50),
        p95_ms: ms(m.p95),
        p99_ms: ms(m.p99),
        restarts: m.restarts,
        feedback_correct: m.feedback_correct,
        feedback_total: m.feedback_total,
        agreement_agreed: m.agreement_agreed,
        agreement_total: m.agreement_total,
        validation_accuracy: m.validation_accuracy,
    }
}

pub fn metrics_json(m: &SlotMetrics) -> serde_json::Value {
    let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
    json!({
        "requests": m.requests,
        "errors": m.errors,
        "error_rate": m.error_rate,
        "p50_ms": ms(m.p50),
        "p95_ms": ms(m.p95),
        "p99_ms": ms(m.p99),
        "restarts": m.restarts,
        "feedback_accuracy": m.feedback_accuracy,
        "feedback_total": m.feedback_total,
        "agreement_rate": m.agreement_rate,
        "agreement_total": m.agreement_total,
        "validation_accuracy": m.validation_accuracy,
    })
}
