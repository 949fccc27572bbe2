//! Where one rollout stands between ticks, and what a tick decides: the
//! pure state machine the controller drives. It does no I/O and reads no
//! clock (callers pass `now`).

use std::time::{Duration, Instant};

use super::decision::{Decision, Observation, RollbackReason, decide};
use super::policy::{PhaseKind, Policy};
use super::window::SlotMetrics;

/// Where one rollout stands between ticks: the policy, the phase and since
/// when. [`Progress::step`] turns one tick's metrics into a [`Step`]; it does
/// no I/O and reads no clock, so the controller's decisions can be tested
/// with made-up metrics on paused time.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    policy: Policy,
    /// Index into the policy's phases; `phases.len()` is the standby bake.
    phase: usize,
    phase_start: Instant,
    /// When the rollout saw its first sample: the detection delay of a
    /// rollback is measured from there.
    first_sample: Option<Instant>,
}

/// What one tick of a rollout decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Step {
    /// Stay in the phase.
    Hold,
    /// Roll back, with how long the version served first and blue's figures.
    Rollback { reason: RollbackReason, detection: Detection, blue: SlotMetrics },
    /// Past the standby bake: the rollout is complete.
    Complete,
    /// Entered the next phase (`None`: past the last phase, the standby
    /// bake); blue's figures over the phase that passed.
    Next { kind: Option<PhaseKind>, blue: SlotMetrics },
}

impl Progress {
    pub(crate) fn new(policy: Policy, phase: usize, now: Instant) -> Self {
        Progress { policy, phase, phase_start: now, first_sample: None }
    }

    /// Index into the policy's phases; `phases.len()` is the standby bake.
    pub(crate) fn phase(&self) -> usize {
        self.phase
    }

    /// When the current phase started.
    pub(crate) fn phase_start(&self) -> Instant {
        self.phase_start
    }

    /// Decides on one tick: `green` over its window, `blue` over this phase
    /// only, `promoted` when green is already the active slot.
    pub(crate) fn step(&mut self, now: Instant, promoted: bool, green: &SlotMetrics, mut blue: SlotMetrics) -> Step {
        if promoted {
            // Once promoted, the old slot takes no traffic: its latencies are
            // from another time and another load, so a ratio against them
            // would mostly measure the machine. Latency ratios are judged
            // only in shadow and canary phases, where both slots serve side
            // by side; after that only the absolute SLO applies.
            (blue.p50, blue.p95, blue.p99) = (None, None, None);
        }
        if self.first_sample.is_none() && green.requests + green.agreement_total > 0 {
            self.first_sample = Some(now);
        }
        let obs = Observation { phase: self.phase, phase_elapsed: now - self.phase_start, green: *green, blue };
        match decide(&self.policy, &obs) {
            Decision::Hold(_) => Step::Hold,
            Decision::Rollback(reason) => {
                let detection = Detection {
                    samples: green.requests.max(green.agreement_total),
                    after: self.first_sample.map_or(Duration::ZERO, |t| now - t),
                };
                Step::Rollback { reason, detection, blue }
            }
            Decision::Promote if self.phase >= self.policy.phases.len() => Step::Complete,
            Decision::Promote => {
                self.phase += 1;
                self.phase_start = now;
                Step::Next { kind: self.policy.phases.get(self.phase).map(|p| p.kind), blue }
            }
        }
    }
}

/// How long a bad version served before the decision: samples in the phase,
/// and time since the phase's first sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Detection {
    pub(crate) samples: u64,
    pub(crate) after: Duration,
}

#[cfg(test)]
mod tests;
