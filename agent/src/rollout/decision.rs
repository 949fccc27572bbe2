//! The rollout policy and the decision function.
//!
//! A [`Policy`] lists the phases a green candidate goes through (shadow,
//! canaries, full) and the [`Thresholds`] it must stay within. [`decide`]
//! looks at one [`Observation`] of both slots and answers [`Decision::Promote`],
//! [`Decision::Hold`] or [`Decision::Rollback`], with the measured values and
//! limits in the reason so they can be reported as they are.
//!
//! Limits are inclusive: a value exactly at a limit passes. Rates are
//! compared with a tolerance of [`RATE_TOLERANCE`] so that, say, 85% against
//! 90% with a 0.05 drop limit counts as at the limit despite binary rounding.

use std::fmt;
use std::time::Duration;

use super::policy::{PhaseKind, Policy};
use super::window::SlotMetrics;

/// The smallest blue p95 used as the denominator of the latency ratio.
///
/// A blue p95 of a few microseconds is timer noise, not a baseline: dividing
/// by it would turn a green that answers in 80 µs into "16x slower". Below
/// this floor the ratio is computed against 50 µs instead.
pub const MIN_BLUE_P95: Duration = Duration::from_micros(50);

/// Slack added to rate and ratio limits so that values equal to the limit in
/// decimal still pass after binary rounding. It is far below the resolution
/// of any window (one sample in a billion).
pub const RATE_TOLERANCE: f64 = 1e-9;

/// What [`decide`] looks at: where the rollout is and both slots' metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Index into [`Policy::phases`]; `phases.len()` means green is fully
    /// promoted and blue is in its standby bake.
    pub phase: usize,
    /// Time spent in the current phase.
    pub phase_elapsed: Duration,
    /// The candidate.
    pub green: SlotMetrics,
    /// The current (or, in standby, previous) active version.
    pub blue: SlotMetrics,
}

/// What the agent should do with the green slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Move green to the next phase; in the standby bake, release the standby.
    Promote,
    /// Stay in the current phase.
    Hold(HoldReason),
    /// Send all traffic back to blue.
    Rollback(RollbackReason),
}

/// Why [`decide`] neither promoted nor rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// Green has too few requests in the window for latency and error checks.
    TooFewSamples {
        /// Green requests in the window.
        have: u64,
        /// [`Phase::min_samples`].
        need: u64,
    },
    /// Green has enough requests but blue, which still answers in this
    /// phase, has too few to compare latencies with.
    BlueTooFewSamples {
        /// Blue requests in the window.
        have: u64,
        /// [`Phase::min_samples`].
        need: u64,
    },
    /// All checks pass but the phase has not baked long enough.
    Baking {
        /// Time left before promotion.
        remaining: Duration,
    },
    /// [`Observation::phase`] is past the standby bake; the caller is confused.
    UnknownPhase {
        /// The observed phase index.
        phase: usize,
        /// Number of phases in the policy.
        phases: usize,
    },
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooFewSamples { have, need } => write!(f, "too few samples: {have} of {need} requests"),
            Self::BlueTooFewSamples { have, need } => {
                write!(f, "too few blue samples to compare latency: {have} of {need} requests")
            }
            Self::Baking { remaining } => write!(f, "baking, {:.1} s remaining", remaining.as_secs_f64()),
            Self::UnknownPhase { phase, phases } => {
                write!(f, "phase {phase} does not exist (the policy has {phases} phases and a standby bake)")
            }
        }
    }
}

/// Where an accuracy figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccuracySource {
    /// Ground-truth feedback on live predictions.
    Feedback,
    /// The validation set scored at load.
    Validation,
}

impl AccuracySource {
    /// Stable snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Feedback => "feedback",
            Self::Validation => "validation",
        }
    }
}

impl fmt::Display for AccuracySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`decide`] rolled back, with the measured value and the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RollbackReason {
    /// Green p95 too high relative to blue's.
    Latency {
        /// Green p95.
        green_p95: Duration,
        /// Blue p95 as measured (before the [`MIN_BLUE_P95`] floor).
        blue_p95: Duration,
        /// Green p95 / max(blue p95, [`MIN_BLUE_P95`]).
        ratio: f64,
        /// [`Thresholds::max_p95_ratio`].
        limit: f64,
    },
    /// Green p95 above the absolute SLO.
    LatencySlo {
        /// Green p95.
        green_p95: Duration,
        /// [`Thresholds::max_p95`].
        limit: Duration,
    },
    /// Green error rate too high.
    ErrorRate {
        /// Green error rate.
        rate: f64,
        /// Failed green requests.
        errors: u64,
        /// All green requests.
        requests: u64,
        /// [`Thresholds::max_error_rate`].
        limit: f64,
    },
    /// Green accuracy below the minimum.
    Accuracy {
        /// Green accuracy.
        green: f64,
        /// [`Thresholds::min_accuracy`].
        limit: f64,
        /// Where the accuracy comes from.
        source: AccuracySource,
    },
    /// Green accuracy too far below blue's from the same source.
    AccuracyDrop {
        /// Green accuracy.
        green: f64,
        /// Blue accuracy.
        blue: f64,
        /// `blue - green`.
        drop: f64,
        /// [`Thresholds::max_accuracy_drop`].
        limit: f64,
        /// Where both accuracies come from.
        source: AccuracySource,
    },
    /// Green disagrees with blue too often in shadow mode.
    Agreement {
        /// Agreement rate.
        rate: f64,
        /// Comparisons in which green agreed.
        agreed: u64,
        /// All comparisons.
        total: u64,
        /// [`Thresholds::min_agreement`].
        limit: f64,
    },
    /// Green's worker restarted too often.
    Restarts {
        /// Restarts in the window.
        restarts: u64,
        /// [`Thresholds::max_restarts`].
        limit: u64,
    },
}

impl RollbackReason {
    /// Stable snake_case label for metrics and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Latency { .. } => "latency",
            Self::LatencySlo { .. } => "latency_slo",
            Self::ErrorRate { .. } => "error_rate",
            Self::Accuracy { .. } => "accuracy",
            Self::AccuracyDrop { .. } => "accuracy_drop",
            Self::Agreement { .. } => "agreement",
            Self::Restarts { .. } => "restarts",
        }
    }
}

impl fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Latency { green_p95, blue_p95, ratio, limit } => {
                write!(f, "p95 latency {} is {ratio:.1}x blue's {}", Ms(green_p95), Ms(blue_p95))?;
                if blue_p95 < MIN_BLUE_P95 {
                    write!(f, " (counted as {})", Ms(MIN_BLUE_P95))?;
                }
                write!(f, ", above the {limit}x limit")
            }
            Self::LatencySlo { green_p95, limit } => {
                write!(f, "p95 latency {} is above the {} SLO", Ms(green_p95), Ms(limit))
            }
            Self::ErrorRate { rate, errors, requests, limit } => write!(
                f,
                "error rate {} ({errors} of {requests} requests) is above the {} limit",
                Pct(rate),
                Pct(limit)
            ),
            Self::Accuracy { green, limit, source } => {
                write!(f, "{source} accuracy {} is below the {} minimum", Pct(green), Pct(limit))
            }
            Self::AccuracyDrop { green, blue, drop, limit, source } => write!(
                f,
                "{source} accuracy {} is {:.1} points below blue's {}, more than the {:.1}-point limit",
                Pct(green),
                drop * 100.0,
                Pct(blue),
                limit * 100.0
            ),
            Self::Agreement { rate, agreed, total, limit } => {
                write!(f, "agreement with blue {} ({agreed} of {total}) is below the {} minimum", Pct(rate), Pct(limit))
            }
            Self::Restarts { restarts, limit } => {
                write!(f, "{restarts} worker restarts in the window, above the limit of {limit}")
            }
        }
    }
}

/// Formats a duration in milliseconds, or microseconds below 1 ms.
struct Ms(Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < Duration::from_millis(1) {
            write!(f, "{} µs", self.0.as_micros())
        } else {
            write!(f, "{:.1} ms", self.0.as_secs_f64() * 1000.0)
        }
    }
}

/// Formats a fraction as a percentage.
struct Pct(f64);

impl fmt::Display for Pct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}%", self.0 * 100.0)
    }
}

/// Decides what to do with the green slot. Pure: same input, same answer.
///
/// Checks run in this order and the first failure rolls back:
/// 1. restarts above [`Thresholds::max_restarts`], whatever the sample count
///    or bake time (a crashing worker needs no statistics);
/// 2. validation accuracy against [`Thresholds::min_accuracy`], and against
///    blue's validation accuracy for [`Thresholds::max_accuracy_drop`];
/// 3. feedback accuracy, the same two checks, once green (and, for the drop,
///    blue) has [`Policy::min_accuracy_samples`] feedback samples;
/// 4. in a shadow phase, agreement against [`Thresholds::min_agreement`] once
///    green has [`Policy::min_accuracy_samples`] comparisons;
/// 5. with fewer green requests than [`Phase::min_samples`], hold;
/// 6. error rate, then p95 against the SLO, then p95 against blue's. With
///    fewer than `min_samples` blue requests the ratio holds in shadow and
///    canary phases (blue answers there, so it will have enough: promoting
///    without the comparison would let a slow version through whenever the
///    decision came while blue was a request short), and is skipped in the
///    full phase and the standby bake, where blue takes no traffic.
///
/// When every check passes, green is promoted once the phase has baked, or
/// held with the time remaining. In the standby bake (`phase ==
/// phases.len()`) the checks use the last phase's `min_samples`, and
/// promotion after [`Policy::standby_bake`] means releasing the standby.
#[must_use]
pub fn decide(policy: &Policy, obs: &Observation) -> Decision {
    let phases = policy.phases.len();
    let (min_samples, bake, kind) = match policy.phases.get(obs.phase) {
        Some(phase) => (phase.min_samples, Some(phase.bake), Some(phase.kind)),
        None => {
            let min_samples = policy.phases.last().map_or(0, |phase| phase.min_samples);
            let bake = (obs.phase == phases).then_some(policy.standby_bake);
            (min_samples, bake, None)
        }
    };

    if let Err(reason) = check(policy, obs, min_samples, kind) {
        return reason;
    }
    match bake {
        Some(bake) if obs.phase_elapsed >= bake => Decision::Promote,
        Some(bake) => Decision::Hold(HoldReason::Baking { remaining: bake.saturating_sub(obs.phase_elapsed) }),
        None => Decision::Hold(HoldReason::UnknownPhase { phase: obs.phase, phases }),
    }
}

/// Runs every check; `Err` carries the rollback or hold that ends the decision.
fn check(policy: &Policy, obs: &Observation, min_samples: u64, kind: Option<PhaseKind>) -> Result<(), Decision> {
    let shadow = kind == Some(PhaseKind::Shadow);
    let blue_answers = matches!(kind, Some(PhaseKind::Shadow | PhaseKind::Canary { .. }));
    let t = &policy.thresholds;
    let (green, blue) = (&obs.green, &obs.blue);
    let rollback = |reason| Err(Decision::Rollback(reason));

    if let Some(limit) = t.max_restarts
        && green.restarts > limit
    {
        return rollback(RollbackReason::Restarts { restarts: green.restarts, limit });
    }

    let enough = |total: u64| total >= policy.min_accuracy_samples;
    let accuracy_pairs = [
        (AccuracySource::Validation, green.validation_accuracy, blue.validation_accuracy),
        (
            AccuracySource::Feedback,
            green.feedback_accuracy.filter(|_| enough(green.feedback_total)),
            blue.feedback_accuracy.filter(|_| enough(blue.feedback_total)),
        ),
    ];
    for (source, green_accuracy, blue_accuracy) in accuracy_pairs {
        let Some(green_accuracy) = green_accuracy else { continue };
        if let Some(limit) = t.min_accuracy
            && below(green_accuracy, limit)
        {
            return rollback(RollbackReason::Accuracy { green: green_accuracy, limit, source });
        }
        if let (Some(limit), Some(blue_accuracy)) = (t.max_accuracy_drop, blue_accuracy) {
            let drop = blue_accuracy - green_accuracy;
            if above(drop, limit) {
                return rollback(RollbackReason::AccuracyDrop {
                    green: green_accuracy,
                    blue: blue_accuracy,
                    drop,
                    limit,
                    source,
                });
            }
        }
    }

    if shadow
        && let (Some(limit), Some(rate)) = (t.min_agreement, green.agreement_rate)
        && enough(green.agreement_total)
        && below(rate, limit)
    {
        return rollback(RollbackReason::Agreement {
            rate,
            agreed: green.agreement_agreed,
            total: green.agreement_total,
            limit,
        });
    }

    if green.requests < min_samples {
        return Err(Decision::Hold(HoldReason::TooFewSamples { have: green.requests, need: min_samples }));
    }

    if let (Some(limit), Some(rate)) = (t.max_error_rate, green.error_rate)
        && above(rate, limit)
    {
        return rollback(RollbackReason::ErrorRate { rate, errors: green.errors, requests: green.requests, limit });
    }

    if let (Some(limit), Some(green_p95)) = (t.max_p95, green.p95)
        && green_p95 > limit
    {
        return rollback(RollbackReason::LatencySlo { green_p95, limit });
    }

    if t.max_p95_ratio.is_some() && green.p95.is_some() && blue.requests < min_samples && blue_answers {
        return Err(Decision::Hold(HoldReason::BlueTooFewSamples { have: blue.requests, need: min_samples }));
    }
    if let (Some(limit), Some(green_p95), Some(blue_p95)) = (t.max_p95_ratio, green.p95, blue.p95)
        && blue.requests >= min_samples
    {
        // Nanosecond counts keep exact ratios exact (15 ms / 10 ms is 1.5, not 1.4999…).
        let ratio = green_p95.as_nanos() as f64 / blue_p95.max(MIN_BLUE_P95).as_nanos() as f64;
        if above(ratio, limit) {
            return rollback(RollbackReason::Latency { green_p95, blue_p95, ratio, limit });
        }
    }

    Ok(())
}

/// Whether `value` is below `limit` by more than [`RATE_TOLERANCE`]. A NaN
/// value (say, a broken validation score) fails the check: fail closed.
fn below(value: f64, limit: f64) -> bool {
    value.is_nan() || value < limit - RATE_TOLERANCE
}

/// Whether `value` is above `limit` by more than [`RATE_TOLERANCE`]; NaN fails.
fn above(value: f64, limit: f64) -> bool {
    value.is_nan() || value > limit + RATE_TOLERANCE
}

#[cfg(test)]
mod tests;
