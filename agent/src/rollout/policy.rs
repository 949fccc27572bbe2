//! The rollout policy: its phases and thresholds, their validation, and how
//! a deployment's policy (from the hub or `[rollout]` in the configuration)
//! becomes the device's [`Policy`]. Pure: no clock, no I/O, nothing of the
//! agent above it, so the configuration can parse policies without the
//! controller.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use sentinel_proto::pb::RolloutPolicy;

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
    /// [`super::decision::MIN_BLUE_P95`] is raised to it.
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

/// Why a deployment's policy could not become the device's [`Policy`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyFromError {
    #[error("phase {0:?}: bad percentage")]
    BadPercent(String),
    #[error("phase {0:?}: expected shadow, canary:N or full")]
    UnknownPhase(String),
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

/// Requests each phase of a deployment's own phase list needs when the
/// deployment gives no `min_samples`: phases named without counts keep this
/// documented default, never 0 (a single sample proves nothing).
pub const DEFAULT_PHASE_SAMPLES: u64 = 100;
/// Bake of each phase of a deployment's own phase list when the deployment
/// gives no `bake_seconds`.
pub const DEFAULT_PHASE_BAKE: Duration = Duration::from_secs(30);

/// Builds the device's policy for one deployment: the deployment's own
/// fields where set, the agent's defaults elsewhere. Phases named without
/// `min_samples` or `bake_seconds` get [`DEFAULT_PHASE_SAMPLES`] and
/// [`DEFAULT_PHASE_BAKE`].
pub fn policy_from(proto: Option<&RolloutPolicy>, defaults: &Policy) -> Result<Policy, PolicyFromError> {
    let Some(p) = proto else { return Ok(defaults.clone()) };
    let mut policy = defaults.clone();
    let bake = if p.bake_seconds > 0 { Some(Duration::from_secs(p.bake_seconds)) } else { None };
    if !p.phases.is_empty() {
        policy.phases = p
            .phases
            .iter()
            .map(|s| {
                let kind = match s.split_once(':') {
                    None if s == "shadow" => PhaseKind::Shadow,
                    None if s == "full" => PhaseKind::Full,
                    Some(("canary", n)) => {
                        PhaseKind::Canary { percent: n.parse().map_err(|_| PolicyFromError::BadPercent(s.clone()))? }
                    }
                    _ => return Err(PolicyFromError::UnknownPhase(s.clone())),
                };
                let min_samples = if p.min_samples > 0 { p.min_samples } else { DEFAULT_PHASE_SAMPLES };
                Ok(Phase { kind, bake: bake.unwrap_or(DEFAULT_PHASE_BAKE), min_samples })
            })
            .collect::<Result<_, PolicyFromError>>()?;
    } else if bake.is_some() || p.min_samples > 0 {
        for phase in &mut policy.phases {
            phase.bake = bake.unwrap_or(phase.bake);
            phase.min_samples = if p.min_samples > 0 { p.min_samples } else { phase.min_samples };
        }
    }
    let set = |v: f64| (v > 0.0).then_some(v);
    let t = &mut policy.thresholds;
    t.max_p95_ratio = set(p.max_latency_ratio).or(t.max_p95_ratio);
    t.max_p95 = set(p.latency_slo_ms).map(|ms| Duration::from_secs_f64(ms / 1000.0)).or(t.max_p95);
    t.max_error_rate = set(p.max_error_rate).or(t.max_error_rate);
    t.min_accuracy = set(p.min_accuracy).or(t.min_accuracy);
    t.max_accuracy_drop = set(p.max_accuracy_drop).or(t.max_accuracy_drop);
    t.min_agreement = set(p.min_shadow_agreement).or(t.min_agreement);
    if p.max_restarts > 0 {
        t.max_restarts = Some(u64::from(p.max_restarts));
    }
    if p.standby_bake_seconds > 0 {
        policy.standby_bake = Duration::from_secs(p.standby_bake_seconds);
    }
    if p.min_accuracy_samples > 0 {
        policy.min_accuracy_samples = p.min_accuracy_samples;
    }
    policy.validate()?;
    Ok(policy)
}

/// Makes the manifest's declared accuracy the default accuracy floor:
/// `declared - tolerance` (the validation tolerance), when the policy sets no
/// `min_accuracy` of its own. [`super::decision::decide`] applies it to validation and to
/// feedback accuracy (once `min_accuracy_samples` is reached) in every
/// phase, `full` and the standby bake included.
#[must_use]
pub fn with_declared_floor(mut policy: Policy, declared: Option<f64>, tolerance: f64) -> Policy {
    if policy.thresholds.min_accuracy.is_none()
        && let Some(declared) = declared.filter(|d| *d > 0.0 && *d <= 1.0)
    {
        policy.thresholds.min_accuracy = Some((declared - tolerance).max(0.0));
    }
    policy
}

/// The agent's default when a deployment names no policy: straight to full,
/// then the old version stays warm and watched for a minute, judged on at
/// least 200 requests (fewer p95s are mostly noise).
pub fn default_policy() -> Policy {
    Policy {
        phases: vec![Phase { kind: PhaseKind::Full, bake: Duration::ZERO, min_samples: 200 }],
        thresholds: Thresholds::default(),
        standby_bake: Duration::from_secs(60),
        min_accuracy_samples: 50,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(names: &[&str]) -> RolloutPolicy {
        RolloutPolicy { phases: names.iter().map(|s| (*s).to_owned()).collect(), ..RolloutPolicy::default() }
    }

    #[test]
    fn phases_named_without_counts_keep_the_per_phase_defaults() {
        // The finding: a ratio given with phases but no counts turned every
        // phase into 0 samples and 0 s, promoting on one shadow sample.
        let p = RolloutPolicy { max_latency_ratio: 1.5, ..phases(&["shadow", "canary:10", "full"]) };
        let policy = policy_from(Some(&p), &default_policy()).unwrap();
        assert_eq!(policy.phases.len(), 3);
        for phase in &policy.phases {
            assert_eq!((phase.min_samples, phase.bake), (DEFAULT_PHASE_SAMPLES, DEFAULT_PHASE_BAKE), "{phase:?}");
        }
        assert_eq!(policy.thresholds.max_p95_ratio, Some(1.5));
        // Given values still win, each on its own.
        let p = RolloutPolicy { min_samples: 7, ..phases(&["canary:10", "full"]) };
        let policy = policy_from(Some(&p), &default_policy()).unwrap();
        assert!(policy.phases.iter().all(|ph| ph.min_samples == 7 && ph.bake == DEFAULT_PHASE_BAKE));
        let p = RolloutPolicy { bake_seconds: 2, ..phases(&["full"]) };
        let policy = policy_from(Some(&p), &default_policy()).unwrap();
        assert_eq!(policy.phases[0].bake, Duration::from_secs(2));
        assert_eq!(policy.phases[0].min_samples, DEFAULT_PHASE_SAMPLES);
    }

    #[test]
    fn a_bad_phase_name_or_percentage_is_refused_with_its_reason() {
        let bad = policy_from(Some(&phases(&["canary:x"])), &default_policy()).unwrap_err();
        assert_eq!(bad.to_string(), "phase \"canary:x\": bad percentage");
        let bad = policy_from(Some(&phases(&["half"])), &default_policy()).unwrap_err();
        assert_eq!(bad, PolicyFromError::UnknownPhase("half".into()));
        let bad = policy_from(Some(&phases(&["full", "shadow"])), &default_policy()).unwrap_err();
        assert_eq!(bad, PolicyFromError::Invalid(PolicyError::FullNotLast { phase: 0 }));
    }
}
