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

use std::error::Error;
use std::fmt;
use std::time::Duration;

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

/// How much traffic the green slot gets in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Green answers a copy of the requests; clients only see blue's answers.
    Shadow,
    /// Green answers `percent`% of the requests.
    Canary {
        /// Share of requests routed to green, 1..=100.
        percent: u8,
    },
    /// Green answers every request; blue stays warm.
    Full,
}

/// One step of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// How much traffic green gets.
    pub kind: PhaseKind,
    /// How long green must stay healthy in this phase before promotion.
    pub bake: Duration,
    /// Green requests needed in the window before latency and error checks
    /// count, and before promotion. Also the blue requests needed for the
    /// latency ratio.
    pub min_samples: u64,
}

/// Limits that green must stay within; `None` disables a check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Maximum green p95 / blue p95.
    ///
    /// Blue's p95 is used as measured, even when blue is noisy: a slow,
    /// jittery blue makes this check more lenient, which is why
    /// [`Thresholds::max_p95`] exists as an absolute bound. Blue p95 below
    /// [`MIN_BLUE_P95`] is raised to it.
    pub max_p95_ratio: Option<f64>,
    /// Absolute p95 latency SLO for green.
    pub max_p95: Option<Duration>,
    /// Maximum green error rate, 0..=1.
    pub max_error_rate: Option<f64>,
    /// Minimum green accuracy (feedback or validation), 0..=1.
    pub min_accuracy: Option<f64>,
    /// Maximum blue accuracy minus green accuracy from the same source, 0..=1.
    pub max_accuracy_drop: Option<f64>,
    /// Minimum shadow agreement of green with blue, 0..=1.
    pub min_agreement: Option<f64>,
    /// Maximum green worker restarts in the window.
    pub max_restarts: Option<u64>,
}

impl Default for Thresholds {
    /// p95 at most 1.5x blue's, at most 5% errors, at most 3 restarts.
    fn default() -> Self {
        Self {
            max_p95_ratio: Some(1.5),
            max_p95: None,
            max_error_rate: Some(0.05),
            min_accuracy: None,
            max_accuracy_drop: None,
            min_agreement: None,
            max_restarts: Some(3),
        }
    }
}

/// How a green candidate is rolled out and when it is rolled back.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The phases in order; see [`Policy::validate`] for the rules.
    pub phases: Vec<Phase>,
    /// Limits checked in every phase.
    pub thresholds: Thresholds,
    /// After full promotion the old slot stays warm this long, and a
    /// degradation still rolls back.
    pub standby_bake: Duration,
    /// Feedback or agreement samples needed before accuracy or agreement is
    /// judged. Without enough, those checks are skipped, not held.
    pub min_accuracy_samples: u64,
}

impl Default for Policy {
    /// Shadow 30 s, canary 10% 30 s, full 60 s, each needing 100 samples;
    /// 60 s standby; 50 accuracy samples.
    fn default() -> Self {
        let phase = |kind, secs| Phase { kind, bake: Duration::from_secs(secs), min_samples: 100 };
        Self {
            phases: vec![
                phase(PhaseKind::Shadow, 30),
                phase(PhaseKind::Canary { percent: 10 }, 30),
                phase(PhaseKind::Full, 60),
            ],
            thresholds: Thresholds::default(),
            standby_bake: Duration::from_secs(60),
            min_accuracy_samples: 50,
        }
    }
}

/// Why a [`Policy`] was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyError {
    /// `phases` is empty.
    NoPhases,
    /// A canary phase routes 0% or more than 100% of requests.
    CanaryPercent {
        /// Index of the phase.
        phase: usize,
        /// The configured percentage.
        percent: u8,
    },
    /// A full phase is followed by another phase.
    FullNotLast {
        /// Index of the full phase.
        phase: usize,
    },
    /// A phase gives green less traffic than the phase before it.
    ExposureDecreases {
        /// Index of the phase with less traffic.
        phase: usize,
    },
    /// A threshold is outside its range.
    Threshold {
        /// Field name, e.g. `max_error_rate`.
        name: &'static str,
        /// The configured value.
        value: f64,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// `max_p95` is zero, which no request can meet.
    ZeroLatencySlo,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPhases => write!(f, "the rollout policy has no phases; add at least one"),
            Self::CanaryPercent { phase, percent } => {
                write!(f, "phases[{phase}]: canary percent {percent} is outside 1..=100")
            }
            Self::FullNotLast { phase } => {
                write!(f, "phases[{phase}]: the full phase must be the last phase")
            }
            Self::ExposureDecreases { phase } => write!(
                f,
                "phases[{phase}]: gives green less traffic than the phase before it; \
                 order phases shadow, then canaries by increasing percent, then full"
            ),
            Self::Threshold { name, value, expected } => {
                write!(f, "thresholds.{name} is {value}, expected {expected}")
            }
            Self::ZeroLatencySlo => write!(f, "thresholds.max_p95 is zero; set a positive SLO or remove it"),
        }
    }
}

impl Error for PolicyError {}

impl Policy {
    /// Checks the phase order and threshold ranges.
    ///
    /// Phases must not reduce green's traffic (shadow, then canaries by
    /// non-decreasing percent, then full), a full phase must be last, canary
    /// percentages are 1..=100, the p95 ratio is finite and positive, rates are
    /// within 0..=1 and the latency SLO is non-zero. A policy that does not end
    /// with a full phase is accepted: promoting past its last phase hands all
    /// traffic to green.
    ///
    /// # Errors
    ///
    /// The first rule broken, as a [`PolicyError`] naming the field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.phases.is_empty() {
            return Err(PolicyError::NoPhases);
        }
        let last = self.phases.len() - 1;
        let mut previous_exposure = 0;
        for (index, phase) in self.phases.iter().enumerate() {
            let exposure = match phase.kind {
                PhaseKind::Shadow => 0,
                PhaseKind::Canary { percent } if percent == 0 || percent > 100 => {
                    return Err(PolicyError::CanaryPercent { phase: index, percent });
                }
                PhaseKind::Canary { percent } => u16::from(percent),
                PhaseKind::Full if index != last => return Err(PolicyError::FullNotLast { phase: index }),
                PhaseKind::Full => 101,
            };
            if exposure < previous_exposure {
                return Err(PolicyError::ExposureDecreases { phase: index });
            }
            previous_exposure = exposure;
        }

        let t = &self.thresholds;
        if let Some(ratio) = t.max_p95_ratio
            && !(ratio.is_finite() && ratio > 0.0)
        {
            return Err(PolicyError::Threshold {
                name: "max_p95_ratio",
                value: ratio,
                expected: "a finite number above 0",
            });
        }
        for (name, value) in [
            ("max_error_rate", t.max_error_rate),
            ("min_accuracy", t.min_accuracy),
            ("max_accuracy_drop", t.max_accuracy_drop),
            ("min_agreement", t.min_agreement),
        ] {
            if let Some(value) = value
                && !(0.0..=1.0).contains(&value)
            {
                return Err(PolicyError::Threshold { name, value, expected: "a fraction within 0..=1" });
            }
        }
        if t.max_p95 == Some(Duration::ZERO) {
            return Err(PolicyError::ZeroLatencySlo);
        }
        Ok(())
    }
}

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
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A slot with `requests` requests, `errors` of them failed, and the given p95.
    fn slot(requests: u64, errors: u64, p95: Duration) -> SlotMetrics {
        SlotMetrics {
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            p50: Some(p95 / 2),
            p95: Some(p95),
            p99: Some(p95 * 2),
            ..SlotMetrics::default()
        }
    }

    fn healthy() -> SlotMetrics {
        slot(1000, 0, MS * 10)
    }

    /// An observation in phase 1 (canary 10%) after its 30 s bake.
    fn baked(green: SlotMetrics, blue: SlotMetrics) -> Observation {
        Observation { phase: 1, phase_elapsed: Duration::from_secs(30), green, blue }
    }

    fn rollback_kind(decision: Decision) -> &'static str {
        match decision {
            Decision::Rollback(reason) => reason.kind(),
            other => panic!("expected a rollback, got {other:?}"),
        }
    }

    fn with_feedback(mut metrics: SlotMetrics, correct: u64, total: u64) -> SlotMetrics {
        metrics.feedback_correct = correct;
        metrics.feedback_total = total;
        metrics.feedback_accuracy = Some(correct as f64 / total as f64);
        metrics
    }

    fn with_agreement(mut metrics: SlotMetrics, agreed: u64, total: u64) -> SlotMetrics {
        metrics.agreement_agreed = agreed;
        metrics.agreement_total = total;
        metrics.agreement_rate = Some(agreed as f64 / total as f64);
        metrics
    }

    #[test]
    fn default_policy_is_valid() {
        Policy::default().validate().unwrap();
    }

    #[test]
    fn promotes_after_bake_and_holds_before() {
        let policy = Policy::default();
        assert_eq!(decide(&policy, &baked(healthy(), healthy())), Decision::Promote);

        let early = Observation { phase_elapsed: Duration::from_secs(20), ..baked(healthy(), healthy()) };
        assert_eq!(decide(&policy, &early), Decision::Hold(HoldReason::Baking { remaining: Duration::from_secs(10) }));
    }

    #[test]
    fn too_few_samples_hold_even_when_baked() {
        let policy = Policy::default();
        // Terrible latency and errors, but only 99 requests: not enough to judge.
        let green = slot(99, 50, MS * 500);
        assert_eq!(
            decide(&policy, &baked(green, healthy())),
            Decision::Hold(HoldReason::TooFewSamples { have: 99, need: 100 })
        );
    }

    #[test]
    fn restarts_roll_back_immediately_even_with_no_samples() {
        let policy = Policy::default();
        let green = SlotMetrics { restarts: 4, ..SlotMetrics::default() };
        let obs = Observation { phase: 0, phase_elapsed: Duration::ZERO, green, blue: SlotMetrics::default() };
        assert_eq!(decide(&policy, &obs), Decision::Rollback(RollbackReason::Restarts { restarts: 4, limit: 3 }));

        let at_limit = Observation { green: SlotMetrics { restarts: 3, ..green }, ..obs };
        assert!(matches!(decide(&policy, &at_limit), Decision::Hold(HoldReason::TooFewSamples { .. })));
    }

    #[test]
    fn error_rate_at_limit_passes_and_above_rolls_back() {
        let policy = Policy::default();
        assert_eq!(decide(&policy, &baked(slot(100, 5, MS * 10), healthy())), Decision::Promote);
        assert_eq!(rollback_kind(decide(&policy, &baked(slot(100, 6, MS * 10), healthy()))), "error_rate");
    }

    #[test]
    fn latency_ratio_at_limit_passes_and_above_rolls_back() {
        let policy = Policy::default();
        let blue = slot(1000, 0, MS * 10);
        assert_eq!(decide(&policy, &baked(slot(1000, 0, MS * 15), blue)), Decision::Promote);

        let green = slot(1000, 0, MS * 15 + Duration::from_micros(1));
        match decide(&policy, &baked(green, blue)) {
            Decision::Rollback(RollbackReason::Latency { green_p95, blue_p95, ratio, limit }) => {
                assert_eq!((green_p95, blue_p95, limit), (green.p95.unwrap(), MS * 10, 1.5));
                assert!(ratio > 1.5 && ratio < 1.501, "{ratio}");
            }
            other => panic!("expected a latency rollback, got {other:?}"),
        }
    }

    #[test]
    fn noisy_blue_p95_is_used_as_is() {
        let policy = Policy::default();
        // Blue usually answers in 10 ms but its p95 is 40 ms from jitter. A
        // 50 ms green is 5x blue's usual latency, yet 1.25x its p95: it passes.
        let blue = slot(1000, 0, MS * 40);
        assert_eq!(decide(&policy, &baked(slot(1000, 0, MS * 50), blue)), Decision::Promote);
        // The absolute SLO is what catches it.
        let slo = Policy { thresholds: Thresholds { max_p95: Some(MS * 30), ..Thresholds::default() }, ..policy };
        assert_eq!(rollback_kind(decide(&slo, &baked(slot(1000, 0, MS * 50), blue))), "latency_slo");
    }

    #[test]
    fn tiny_blue_p95_is_floored() {
        let policy = Policy::default();
        let blue = slot(1000, 0, Duration::from_micros(10));
        // 75 µs against the 50 µs floor is exactly 1.5x, not 7.5x.
        let green = slot(1000, 0, Duration::from_micros(75));
        assert_eq!(decide(&policy, &baked(green, blue)), Decision::Promote);

        let green = slot(1000, 0, Duration::from_micros(80));
        match decide(&policy, &baked(green, blue)) {
            Decision::Rollback(reason @ RollbackReason::Latency { ratio, .. }) => {
                assert!((ratio - 1.6).abs() < 1e-12, "{ratio}");
                assert_eq!(
                    reason.to_string(),
                    "p95 latency 80 µs is 1.6x blue's 10 µs (counted as 50 µs), above the 1.5x limit"
                );
            }
            other => panic!("expected a latency rollback, got {other:?}"),
        }
    }

    #[test]
    fn blue_with_too_few_samples_holds_while_it_answers_and_is_skipped_after() {
        let policy = Policy::default();
        let blue = slot(99, 0, MS);
        let slow = slot(1000, 0, MS * 100);
        // Canary: blue still answers, so the comparison waits for it.
        assert_eq!(
            decide(&policy, &baked(slow, blue)),
            Decision::Hold(HoldReason::BlueTooFewSamples { have: 99, need: 100 })
        );
        let shadow = Observation { phase: 0, ..baked(slow, blue) };
        assert_eq!(decide(&policy, &shadow), Decision::Hold(HoldReason::BlueTooFewSamples { have: 99, need: 100 }));
        assert_eq!(rollback_kind(decide(&policy, &baked(slow, slot(100, 0, MS)))), "latency");

        // Full phase and standby bake: blue takes no traffic; only absolute limits apply.
        let full = Observation { phase: 2, phase_elapsed: Duration::from_secs(60), ..baked(slow, blue) };
        assert_eq!(decide(&policy, &full), Decision::Promote);
        let slo = Policy { thresholds: Thresholds { max_p95: Some(MS * 100), ..Thresholds::default() }, ..policy };
        assert_eq!(decide(&slo, &full), Decision::Promote);
        let slower = Observation { green: slot(1000, 0, MS * 101), ..full };
        assert_eq!(rollback_kind(decide(&slo, &slower)), "latency_slo");
    }

    #[test]
    fn accuracy_drop_with_feedback() {
        let policy = Policy {
            thresholds: Thresholds { max_accuracy_drop: Some(0.05), ..Thresholds::default() },
            ..Policy::default()
        };
        let blue = with_feedback(healthy(), 90, 100);

        // 90% vs 85% is a drop of 0.05 give or take binary rounding: at the limit.
        let green = with_feedback(healthy(), 85, 100);
        assert_eq!(decide(&policy, &baked(green, blue)), Decision::Promote);

        let green = with_feedback(healthy(), 84, 100);
        match decide(&policy, &baked(green, blue)) {
            Decision::Rollback(reason @ RollbackReason::AccuracyDrop { source, .. }) => {
                assert_eq!(source, AccuracySource::Feedback);
                assert_eq!(
                    reason.to_string(),
                    "feedback accuracy 84.0% is 6.0 points below blue's 90.0%, more than the 5.0-point limit"
                );
            }
            other => panic!("expected an accuracy drop rollback, got {other:?}"),
        }

        // Fewer than min_accuracy_samples (50) on either side: no verdict on accuracy.
        let few_green = with_feedback(healthy(), 20, 49);
        assert_eq!(decide(&policy, &baked(few_green, blue)), Decision::Promote);
        let few_blue = with_feedback(healthy(), 49, 49);
        assert_eq!(decide(&policy, &baked(green, few_blue)), Decision::Promote);
    }

    #[test]
    fn min_accuracy_from_feedback_and_validation() {
        let policy =
            Policy { thresholds: Thresholds { min_accuracy: Some(0.9), ..Thresholds::default() }, ..Policy::default() };
        let green = with_feedback(healthy(), 45, 50);
        assert_eq!(decide(&policy, &baked(green, healthy())), Decision::Promote);
        let green = with_feedback(healthy(), 44, 50);
        assert_eq!(rollback_kind(decide(&policy, &baked(green, healthy()))), "accuracy");

        // Validation accuracy needs no live samples at all.
        let green = SlotMetrics { validation_accuracy: Some(0.8), ..SlotMetrics::default() };
        let obs = Observation { phase: 0, phase_elapsed: Duration::ZERO, green, blue: SlotMetrics::default() };
        assert_eq!(
            decide(&policy, &obs),
            Decision::Rollback(RollbackReason::Accuracy { green: 0.8, limit: 0.9, source: AccuracySource::Validation })
        );
        let broken = Observation { green: SlotMetrics { validation_accuracy: Some(f64::NAN), ..green }, ..obs };
        assert_eq!(rollback_kind(decide(&policy, &broken)), "accuracy");
    }

    #[test]
    fn agreement_is_checked_in_shadow_only() {
        let policy = Policy {
            thresholds: Thresholds { min_agreement: Some(0.95), ..Thresholds::default() },
            ..Policy::default()
        };
        let shadow = |green| Observation { phase: 0, ..baked(green, healthy()) };

        assert_eq!(decide(&policy, &shadow(with_agreement(healthy(), 95, 100))), Decision::Promote);
        let disagreeing = with_agreement(healthy(), 94, 100);
        match decide(&policy, &shadow(disagreeing)) {
            Decision::Rollback(reason) => {
                assert_eq!(reason.kind(), "agreement");
                assert_eq!(reason.to_string(), "agreement with blue 94.0% (94 of 100) is below the 95.0% minimum");
            }
            other => panic!("expected an agreement rollback, got {other:?}"),
        }
        // Too few comparisons, or not in shadow: not judged.
        assert_eq!(decide(&policy, &shadow(with_agreement(healthy(), 0, 49))), Decision::Promote);
        assert_eq!(decide(&policy, &baked(disagreeing, healthy())), Decision::Promote);
    }

    #[test]
    fn standby_bake_still_rolls_back_then_releases() {
        let policy = Policy::default();
        let standby = |green, elapsed| Observation {
            phase: policy.phases.len(),
            phase_elapsed: Duration::from_secs(elapsed),
            green,
            blue: SlotMetrics::default(),
        };
        assert_eq!(rollback_kind(decide(&policy, &standby(slot(1000, 100, MS), 10))), "error_rate");
        assert_eq!(
            decide(&policy, &standby(healthy(), 10)),
            Decision::Hold(HoldReason::Baking { remaining: Duration::from_secs(50) })
        );
        assert_eq!(decide(&policy, &standby(healthy(), 60)), Decision::Promote);
        // A degradation after the bake still wins over the release.
        assert_eq!(rollback_kind(decide(&policy, &standby(slot(1000, 100, MS), 60))), "error_rate");
    }

    #[test]
    fn unknown_phase_holds_but_still_rolls_back() {
        let policy = Policy::default();
        let obs = Observation { phase: 7, ..baked(healthy(), healthy()) };
        assert_eq!(decide(&policy, &obs), Decision::Hold(HoldReason::UnknownPhase { phase: 7, phases: 3 }));
        let crashing = Observation { green: SlotMetrics { restarts: 9, ..healthy() }, ..obs };
        assert_eq!(rollback_kind(decide(&policy, &crashing)), "restarts");
    }

    #[test]
    fn validate_rejects_bad_policies() {
        let phase = |kind| Phase { kind, bake: Duration::from_secs(1), min_samples: 1 };
        let with_phases = |phases| Policy { phases, ..Policy::default() };
        let with_thresholds = |thresholds| Policy { thresholds, ..Policy::default() };

        assert_eq!(with_phases(vec![]).validate(), Err(PolicyError::NoPhases));
        assert_eq!(
            with_phases(vec![phase(PhaseKind::Canary { percent: 0 })]).validate(),
            Err(PolicyError::CanaryPercent { phase: 0, percent: 0 })
        );
        assert_eq!(
            with_phases(vec![phase(PhaseKind::Shadow), phase(PhaseKind::Canary { percent: 101 })]).validate(),
            Err(PolicyError::CanaryPercent { phase: 1, percent: 101 })
        );
        assert_eq!(
            with_phases(vec![phase(PhaseKind::Full), phase(PhaseKind::Canary { percent: 50 })]).validate(),
            Err(PolicyError::FullNotLast { phase: 0 })
        );
        assert_eq!(
            with_phases(vec![phase(PhaseKind::Canary { percent: 50 }), phase(PhaseKind::Canary { percent: 10 })])
                .validate(),
            Err(PolicyError::ExposureDecreases { phase: 1 })
        );
        assert_eq!(
            with_phases(vec![phase(PhaseKind::Canary { percent: 10 }), phase(PhaseKind::Shadow)]).validate(),
            Err(PolicyError::ExposureDecreases { phase: 1 })
        );
        with_phases(vec![phase(PhaseKind::Canary { percent: 100 })]).validate().unwrap();

        for ratio in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = with_thresholds(Thresholds { max_p95_ratio: Some(ratio), ..Thresholds::default() })
                .validate()
                .unwrap_err();
            assert!(matches!(err, PolicyError::Threshold { name: "max_p95_ratio", .. }), "{err}");
        }
        let err =
            with_thresholds(Thresholds { max_error_rate: Some(1.5), ..Thresholds::default() }).validate().unwrap_err();
        assert_eq!(err.to_string(), "thresholds.max_error_rate is 1.5, expected a fraction within 0..=1");
        let err =
            with_thresholds(Thresholds { min_agreement: Some(-0.1), ..Thresholds::default() }).validate().unwrap_err();
        assert!(matches!(err, PolicyError::Threshold { name: "min_agreement", .. }));
        let err = with_thresholds(Thresholds { min_accuracy: Some(f64::NAN), ..Thresholds::default() })
            .validate()
            .unwrap_err();
        assert!(matches!(err, PolicyError::Threshold { name: "min_accuracy", .. }));
        assert_eq!(
            with_thresholds(Thresholds { max_p95: Some(Duration::ZERO), ..Thresholds::default() }).validate(),
            Err(PolicyError::ZeroLatencySlo)
        );
        assert_eq!(
            PolicyError::CanaryPercent { phase: 2, percent: 0 }.to_string(),
            "phases[2]: canary percent 0 is outside 1..=100"
        );
    }

    #[test]
    fn display_includes_the_numbers() {
        let latency = RollbackReason::Latency {
            green_p95: Duration::from_micros(12_100),
            blue_p95: Duration::from_micros(1_500),
            ratio: 12.1 / 1.5,
            limit: 1.5,
        };
        assert_eq!(latency.to_string(), "p95 latency 12.1 ms is 8.1x blue's 1.5 ms, above the 1.5x limit");
        let slo = RollbackReason::LatencySlo { green_p95: MS * 250, limit: MS * 200 };
        assert_eq!(slo.to_string(), "p95 latency 250.0 ms is above the 200.0 ms SLO");
        let errors = RollbackReason::ErrorRate { rate: 0.07, errors: 7, requests: 100, limit: 0.05 };
        assert_eq!(errors.to_string(), "error rate 7.0% (7 of 100 requests) is above the 5.0% limit");
        let accuracy = RollbackReason::Accuracy { green: 0.81, limit: 0.9, source: AccuracySource::Validation };
        assert_eq!(accuracy.to_string(), "validation accuracy 81.0% is below the 90.0% minimum");
        let restarts = RollbackReason::Restarts { restarts: 4, limit: 3 };
        assert_eq!(restarts.to_string(), "4 worker restarts in the window, above the limit of 3");

        assert_eq!(
            HoldReason::TooFewSamples { have: 42, need: 100 }.to_string(),
            "too few samples: 42 of 100 requests"
        );
        assert_eq!(
            HoldReason::Baking { remaining: Duration::from_millis(12_300) }.to_string(),
            "baking, 12.3 s remaining"
        );
    }
}
