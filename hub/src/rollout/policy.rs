//! The rollout policy of a deployment: the JSON mirror of the wire
//! `RolloutPolicy`, its validation, and the halt thresholds.
//!
//! Every field is optional; an unset field is sent as the protobuf zero,
//! which the agent reads as "use your safe default".
//! [`RolloutPolicy::effective`] fills those defaults in for display, and
//! [`RolloutPolicy::check_usable`] refuses what could not act: a comparison
//! with the old version where it answers nothing (we chose refusal over a
//! reinterpretation against the standby's last window, which would compare
//! with a window measured under other load), and a policy that detects nothing.

use sentinel_proto::pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Halt when more than this fraction of targeted devices rolled back or failed.
pub const DEFAULT_HALT_FRACTION: f64 = 0.2;

/// Longest bake of a phase or of the warm standby: a week. A longer one is a
/// mistake (a canary held for ever), not a policy.
pub const MAX_BAKE_SECONDS: u64 = 7 * 24 * 3600;
/// Most samples a phase or the accuracy check may wait for.
pub const MAX_SAMPLES: u64 = 10_000_000;
/// Largest latency ratio against the old version.
pub const MAX_LATENCY_RATIO: f64 = 1000.0;
/// Largest absolute latency bound: an hour, in milliseconds.
pub const MAX_LATENCY_SLO_MS: f64 = 3_600_000.0;
/// Most worker restarts a policy may tolerate.
pub const MAX_RESTARTS: u32 = 1000;
/// Largest `halt_count`.
pub const MAX_HALT_COUNT: u32 = 1_000_000;

crate::string_schema!(
    /// A rollout phase as the OpenAPI description declares it: `shadow`,
    /// `canary:N` (1 to 99, no leading zero) or `full`.
    Phase,
    "^(?:shadow|full|canary:[1-9][0-9]?)$");

/// How devices move traffic to a new version and when they give up on it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Phases in order: `shadow`, `canary:N` (1 <= N <= 99, percent of
    /// traffic), `full` (only last). E.g. `["shadow", "canary:10", "full"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Phase>>, min_items = 1)]
    pub phases: Option<Vec<String>>,
    /// How long each phase runs before the next, in seconds (0..=604800, a
    /// week). Unset or 0: 30 s per phase when `phases` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 604_800)]
    pub bake_seconds: Option<u64>,
    /// Requests a phase needs before its metrics count (1..=10000000).
    /// Unset: 100 per phase when `phases` is given (200 for the default `full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub min_samples: Option<u64>,
    /// p95 latency of the new version at most this times the old one's (above
    /// 0, at most 1000; default 1.5). Compares with the old version, so it
    /// needs a `shadow` or `canary` phase: set in a rollout without one
    /// (`["full"]`, or no phases: the default is `full`) it is refused (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 1000)]
    pub max_latency_ratio: Option<f64>,
    /// Absolute p95 latency bound in milliseconds (above 0, at most 3600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 3_600_000)]
    pub latency_slo_ms: Option<f64>,
    /// Largest error rate, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Absolute minimum accuracy, 0..=1, of feedback (once
    /// `min_accuracy_samples` arrived) and of the validation set, in every
    /// phase. Unset or 0: the version's declared accuracy minus the device's
    /// `serving.validation_tolerance` (0.02 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_accuracy: Option<f64>,
    /// Largest accuracy drop from the old version, 0..=1. Needs a `shadow` or
    /// `canary` phase (refused with 422 otherwise, as `max_latency_ratio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Smallest agreement with the old version in shadow, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_shadow_agreement: Option<f64>,
    /// How long the old version stays warm after full promotion, in seconds (0..=604800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 604_800)]
    pub standby_bake_seconds: Option<u64>,
    /// Feedback (or shadow agreement) samples needed before accuracy counts (1..=10000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub min_accuracy_samples: Option<u64>,
    /// Worker restarts of the new version that roll it back (1..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_restarts: Option<u32>,
}

/// A policy or halt threshold that cannot be used; `field` names it as the
/// request does (`policy.phases[1]`, `halt_fraction`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError { field: field.into(), message: message.into() }
}

/// A fraction in 0..=1 (NaN is refused too).
fn check_rate(field: &str, value: Option<f64>) -> Result<(), PolicyError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => {
            Err(invalid(format!("policy.{field}"), format!("{v} is not a fraction between 0 and 1 (e.g. 0.05)")))
        }
        _ => Ok(()),
    }
}

fn check_positive(field: &str, value: Option<f64>, max: f64, example: &str) -> Result<(), PolicyError> {
    match value {
        Some(v) if !(v > 0.0 && v <= max) => Err(invalid(
            format!("policy.{field}"),
            format!("{v} must be a number above 0 and at most {max} (e.g. {example})"),
        )),
        _ => Ok(()),
    }
}

/// A count or duration in `min..=max`.
fn check_range(field: &str, value: Option<u64>, min: u64, max: u64, unit: &str) -> Result<(), PolicyError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => {
            Err(invalid(format!("policy.{field}"), format!("{v} is out of range: use {min} to {max} {unit}")))
        }
        _ => Ok(()),
    }
}

/// Checks one phase; returns the canary percentage for `canary:N`.
fn check_phase(field: &str, phase: &str) -> Result<Option<u8>, PolicyError> {
    const USE: &str = "use `shadow`, `canary:N` with N from 1 to 99, or `full`";
    match phase {
        "shadow" | "full" => Ok(None),
        _ => {
            let n = phase
                .strip_prefix("canary:")
                .ok_or_else(|| invalid(field, format!("unknown phase {}; {USE}", sentinel_proto::quote(phase))))?;
            // Digits only, no sign or leading zero: what the OpenAPI pattern says.
            let plain = !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit());
            match n.parse::<u8>() {
                Ok(n @ 1..=99) if plain => Ok(Some(n)),
                _ => Err(invalid(
                    field,
                    format!("{}: the canary share must be a whole percent from 1 to 99", sentinel_proto::quote(phase)),
                )),
            }
        }
    }
}

impl RolloutPolicy {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(phases) = &self.phases {
            if phases.is_empty() {
                return Err(invalid("policy.phases", "name at least one phase, e.g. [\"canary:10\", \"full\"]"));
            }
            let mut last_canary = 0;
            for (i, phase) in phases.iter().enumerate() {
                let field = format!("policy.phases[{i}]");
                if phase == "full" && i + 1 != phases.len() {
                    return Err(invalid(field, "`full` can only be the last phase"));
                }
                if let Some(n) = check_phase(&field, phase)? {
                    if n <= last_canary {
                        return Err(invalid(
                            field,
                            format!(
                                "canary shares must grow: {} after canary:{last_canary}",
                                sentinel_proto::quote(phase)
                            ),
                        ));
                    }
                    last_canary = n;
                }
            }
        }
        check_range("bake_seconds", self.bake_seconds, 0, MAX_BAKE_SECONDS, "seconds")?;
        check_range("min_samples", self.min_samples, 1, MAX_SAMPLES, "requests")?;
        check_positive("max_latency_ratio", self.max_latency_ratio, MAX_LATENCY_RATIO, "1.5")?;
        check_positive("latency_slo_ms", self.latency_slo_ms, MAX_LATENCY_SLO_MS, "50")?;
        check_rate("max_error_rate", self.max_error_rate)?;
        check_rate("min_accuracy", self.min_accuracy)?;
        check_rate("max_accuracy_drop", self.max_accuracy_drop)?;
        check_rate("min_shadow_agreement", self.min_shadow_agreement)?;
        check_range("standby_bake_seconds", self.standby_bake_seconds, 0, MAX_BAKE_SECONDS, "seconds")?;
        check_range("min_accuracy_samples", self.min_accuracy_samples, 1, MAX_SAMPLES, "samples")?;
        check_range("max_restarts", self.max_restarts.map(u64::from), 1, u64::from(MAX_RESTARTS), "restarts")?;
        Ok(())
    }

    /// The wire form; unset fields become zero (the agent's default).
    pub fn to_proto(&self) -> pb::RolloutPolicy {
        pb::RolloutPolicy {
            phases: self.phases.clone().unwrap_or_default(),
            bake_seconds: self.bake_seconds.unwrap_or(0),
            min_samples: self.min_samples.unwrap_or(0),
            max_latency_ratio: self.max_latency_ratio.unwrap_or(0.0),
            latency_slo_ms: self.latency_slo_ms.unwrap_or(0.0),
            max_error_rate: self.max_error_rate.unwrap_or(0.0),
            min_accuracy: self.min_accuracy.unwrap_or(0.0),
            max_accuracy_drop: self.max_accuracy_drop.unwrap_or(0.0),
            min_shadow_agreement: self.min_shadow_agreement.unwrap_or(0.0),
            standby_bake_seconds: self.standby_bake_seconds.unwrap_or(0),
            min_accuracy_samples: self.min_accuracy_samples.unwrap_or(0),
            max_restarts: self.max_restarts.unwrap_or(0),
        }
    }
}

/// Requests and bake of each phase of a policy that names its phases but
/// not `min_samples`/`bake_seconds` (the agent's per-phase defaults).
pub const DEFAULT_PHASE_SAMPLES: u64 = 100;
pub const DEFAULT_PHASE_BAKE_SECONDS: u64 = 30;
/// The agent's built-in policy for a deployment that names no phases: straight
/// to `full`, judged on 200 requests, then 60 s of warm standby.
pub const DEFAULT_PHASES: [&str; 1] = ["full"];
pub const DEFAULT_FULL_SAMPLES: u64 = 200;
pub const DEFAULT_LATENCY_RATIO: f64 = 1.5;
pub const DEFAULT_ERROR_RATE: f64 = 0.05;
pub const DEFAULT_STANDBY_BAKE_SECONDS: u64 = 60;
pub const DEFAULT_ACCURACY_SAMPLES: u64 = 50;
pub const DEFAULT_MAX_RESTARTS: u32 = 3;
/// The agent's default `serving.validation_tolerance`: the declared accuracy
/// minus this is the default accuracy floor.
pub const DEFAULT_VALIDATION_TOLERANCE: f64 = 0.02;

impl RolloutPolicy {
    /// True when some phase lets both versions answer side by side (shadow or
    /// canary), the only place a comparison with the old version means
    /// anything. Without phases the agent's default (`full`) applies.
    pub fn compares_with_old(&self) -> bool {
        self.phases.as_ref().is_some_and(|p| p.iter().any(|ph| ph != "full"))
    }

    /// The policy devices apply, with every default filled in as the agent's
    /// built-in defaults set it: phases named without counts get 100 samples
    /// and 30 s each; no phases means `["full"]` on 200 samples; the declared
    /// accuracy minus the default validation tolerance is the accuracy floor
    /// when the policy sets no `min_accuracy`. The latency ratio is left out
    /// where no phase can compare (`full` only). A device whose config has a
    /// `[rollout]` section uses those defaults for what the deployment leaves
    /// unset instead.
    #[must_use]
    pub fn effective(&self, declared_accuracy: Option<f64>) -> RolloutPolicy {
        // On the wire 0 means "the agent's default", so a 0 here is shown as that.
        let pos = |v: Option<f64>| v.filter(|v| *v > 0.0);
        let nonzero = |v: Option<u64>| v.filter(|v| *v > 0);
        let named = self.phases.is_some();
        let compares = self.compares_with_old();
        let floor = declared_accuracy
            .filter(|d| *d > 0.0 && *d <= 1.0)
            .map(|d| ((d - DEFAULT_VALIDATION_TOLERANCE).max(0.0) * 1e6).round() / 1e6);
        RolloutPolicy {
            phases: Some(self.phases.clone().unwrap_or_else(|| DEFAULT_PHASES.map(str::to_owned).to_vec())),
            bake_seconds: Some(nonzero(self.bake_seconds).unwrap_or(if named {
                DEFAULT_PHASE_BAKE_SECONDS
            } else {
                0
            })),
            min_samples: Some(self.min_samples.unwrap_or(if named {
                DEFAULT_PHASE_SAMPLES
            } else {
                DEFAULT_FULL_SAMPLES
            })),
            max_latency_ratio: if compares {
                Some(self.max_latency_ratio.unwrap_or(DEFAULT_LATENCY_RATIO))
            } else {
                None
            },
            latency_slo_ms: self.latency_slo_ms,
            max_error_rate: Some(pos(self.max_error_rate).unwrap_or(DEFAULT_ERROR_RATE)),
            min_accuracy: pos(self.min_accuracy).or(floor),
            max_accuracy_drop: pos(self.max_accuracy_drop).filter(|_| compares),
            min_shadow_agreement: pos(self.min_shadow_agreement)
                .filter(|_| self.phases.as_ref().is_some_and(|p| p.iter().any(|ph| ph == "shadow"))),
            standby_bake_seconds: Some(nonzero(self.standby_bake_seconds).unwrap_or(DEFAULT_STANDBY_BAKE_SECONDS)),
            min_accuracy_samples: Some(self.min_accuracy_samples.unwrap_or(DEFAULT_ACCURACY_SAMPLES)),
            max_restarts: Some(self.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS)),
        }
    }

    /// Refuses what a deployment of a version declaring `declared_accuracy`
    /// could not act on: a comparison with the old version (`max_accuracy_drop`,
    /// `max_latency_ratio`) in a rollout with no shadow or canary phase, where
    /// the old version answers nothing to compare with; and a policy under
    /// which no check could roll back a slower, failing or less accurate
    /// version (only worker crashes would).
    pub fn check_usable(&self, declared_accuracy: Option<f64>) -> Result<(), PolicyError> {
        if !self.compares_with_old() {
            let phases = self.phases.as_ref().map_or_else(|| "the default [\"full\"]".to_owned(), |p| format!("{p:?}"));
            for (field, set) in [
                ("max_accuracy_drop", self.max_accuracy_drop.is_some_and(|v| v > 0.0)),
                ("max_latency_ratio", self.max_latency_ratio.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        format!("policy.{field}"),
                        format!(
                            "compares with the old version, which answers nothing to compare with in phases {phases}; \
                             add a shadow or canary phase (e.g. [\"canary:10\", \"full\"]), or use {}",
                            if field == "max_accuracy_drop" { "min_accuracy" } else { "latency_slo_ms" }
                        ),
                    ));
                }
            }
        }
        let e = self.effective(declared_accuracy);
        let latency = e.latency_slo_ms.is_some() || e.max_latency_ratio.is_some();
        let errors = e.max_error_rate.is_some_and(|r| r < 1.0);
        let accuracy = e.min_accuracy.is_some_and(|a| a > 0.0) || e.max_accuracy_drop.is_some();
        let agreement = e.min_shadow_agreement.is_some_and(|a| a > 0.0);
        if !(latency || errors || accuracy || agreement) {
            return Err(invalid(
                "policy",
                "this policy cannot detect anything: no latency check can apply (no latency_slo_ms, and no shadow or \
                 canary phase for max_latency_ratio), max_error_rate 1 accepts every failure, and there is no \
                 accuracy floor (no min_accuracy, and the version declares no accuracy); set one of them",
            ));
        }
        Ok(())
    }
}

/// Checks the halt thresholds of a deployment.
pub fn validate_halt(fraction: f64, count: Option<u32>) -> Result<(), PolicyError> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(invalid(
            "halt_fraction",
            format!("{fraction} is not a fraction between 0 and 1 (0.2 halts when more than 20% of devices fail)"),
        ));
    }
    if let Some(n) = count
        && !(1..=MAX_HALT_COUNT).contains(&n)
    {
        return Err(invalid(
            "halt_count",
            format!("{n} is out of range: use 1 to {MAX_HALT_COUNT} (the number of failed devices that halts)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(p: &[&str]) -> RolloutPolicy {
        RolloutPolicy { phases: Some(p.iter().map(|s| (*s).to_owned()).collect()), ..RolloutPolicy::default() }
    }

    #[test]
    fn accepts_the_usual_phases() {
        assert_eq!(phases(&["shadow", "canary:10", "canary:50", "full"]).validate(), Ok(()));
        assert_eq!(phases(&["canary:1", "canary:99"]).validate(), Ok(()));
        assert_eq!(RolloutPolicy::default().validate(), Ok(()));
    }

    #[test]
    fn refuses_bad_phases_naming_the_index() {
        for (p, field) in [
            (&["canary:0"][..], "policy.phases[0]"),
            (&["shadow", "canary:100"][..], "policy.phases[1]"),
            (&["full", "shadow"][..], "policy.phases[0]"),
            (&["canary:x"][..], "policy.phases[0]"),
            (&["blue"][..], "policy.phases[0]"),
            (&["canary:50", "canary:10"][..], "policy.phases[1]"),
            (&[][..], "policy.phases"),
        ] {
            assert_eq!(phases(p).validate().unwrap_err().field, field, "{p:?}");
        }
    }

    #[test]
    fn refuses_rates_and_ratios_out_of_range() {
        let p = RolloutPolicy { min_accuracy: Some(1.5), ..RolloutPolicy::default() };
        assert_eq!(p.validate().unwrap_err().field, "policy.min_accuracy");
        let p = RolloutPolicy { max_error_rate: Some(f64::NAN), ..RolloutPolicy::default() };
        assert_eq!(p.validate().unwrap_err().field, "policy.max_error_rate");
        let p = RolloutPolicy { max_latency_ratio: Some(0.0), ..RolloutPolicy::default() };
        assert_eq!(p.validate().unwrap_err().field, "policy.max_latency_ratio");
        assert_eq!(validate_halt(1.2, None).unwrap_err().field, "halt_fraction");
        assert_eq!(validate_halt(0.2, Some(0)).unwrap_err().field, "halt_count");
        assert_eq!(validate_halt(0.0, Some(1)), Ok(()));
    }

    #[test]
    fn refuses_durations_and_counts_past_their_bounds() {
        let cases = [
            (RolloutPolicy { bake_seconds: Some(u64::MAX), ..RolloutPolicy::default() }, "policy.bake_seconds"),
            (
                RolloutPolicy { bake_seconds: Some(MAX_BAKE_SECONDS + 1), ..RolloutPolicy::default() },
                "policy.bake_seconds",
            ),
            (RolloutPolicy { min_samples: Some(0), ..RolloutPolicy::default() }, "policy.min_samples"),
            (RolloutPolicy { min_samples: Some(u64::MAX), ..RolloutPolicy::default() }, "policy.min_samples"),
            (
                RolloutPolicy { standby_bake_seconds: Some(u64::MAX), ..RolloutPolicy::default() },
                "policy.standby_bake_seconds",
            ),
            (
                RolloutPolicy { min_accuracy_samples: Some(0), ..RolloutPolicy::default() },
                "policy.min_accuracy_samples",
            ),
            (RolloutPolicy { max_restarts: Some(u32::MAX), ..RolloutPolicy::default() }, "policy.max_restarts"),
            (
                RolloutPolicy { max_latency_ratio: Some(f64::INFINITY), ..RolloutPolicy::default() },
                "policy.max_latency_ratio",
            ),
            (RolloutPolicy { latency_slo_ms: Some(1e300), ..RolloutPolicy::default() }, "policy.latency_slo_ms"),
        ];
        for (p, field) in cases {
            assert_eq!(p.validate().unwrap_err().field, field, "{p:?}");
        }
        assert_eq!(validate_halt(0.2, Some(u32::MAX)).unwrap_err().field, "halt_count");
        let edge = RolloutPolicy {
            bake_seconds: Some(MAX_BAKE_SECONDS),
            min_samples: Some(1),
            max_restarts: Some(MAX_RESTARTS),
            ..RolloutPolicy::default()
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn the_effective_policy_fills_in_every_default() {
        let given = RolloutPolicy { max_latency_ratio: Some(2.0), ..phases(&["shadow", "canary:10", "full"]) };
        let e = given.effective(Some(0.97));
        assert_eq!((e.min_samples, e.bake_seconds), (Some(DEFAULT_PHASE_SAMPLES), Some(DEFAULT_PHASE_BAKE_SECONDS)));
        assert_eq!((e.max_latency_ratio, e.min_accuracy, e.max_error_rate), (Some(2.0), Some(0.95), Some(0.05)));
        assert_eq!((e.standby_bake_seconds, e.min_accuracy_samples, e.max_restarts), (Some(60), Some(50), Some(3)));
        // No phases: the agent's `full` on 200 samples, no ratio to apply.
        let e = RolloutPolicy::default().effective(None);
        assert_eq!(e.phases, Some(vec!["full".to_owned()]));
        assert_eq!(
            (e.min_samples, e.bake_seconds, e.max_latency_ratio, e.min_accuracy),
            (Some(200), Some(0), None, None)
        );
        // A 0 on the wire is the agent's default, and is shown as that; a
        // given min_accuracy wins over the declared floor.
        let zeros = RolloutPolicy {
            bake_seconds: Some(0),
            max_error_rate: Some(0.0),
            min_accuracy: Some(0.5),
            ..phases(&["full"])
        };
        let e = zeros.effective(Some(0.99));
        assert_eq!((e.bake_seconds, e.max_error_rate, e.min_accuracy), (Some(30), Some(0.05), Some(0.5)));
    }

    #[test]
    fn comparisons_without_a_side_by_side_phase_and_blind_policies_are_refused() {
        let drop = RolloutPolicy { max_accuracy_drop: Some(0.05), ..phases(&["full"]) };
        assert_eq!(drop.check_usable(Some(0.9)).unwrap_err().field, "policy.max_accuracy_drop");
        let ratio = RolloutPolicy { max_latency_ratio: Some(1.5), ..RolloutPolicy::default() };
        assert_eq!(ratio.check_usable(Some(0.9)).unwrap_err().field, "policy.max_latency_ratio");
        let ok = RolloutPolicy {
            max_latency_ratio: Some(1.5),
            max_accuracy_drop: Some(0.05),
            ..phases(&["canary:5", "full"])
        };
        assert_eq!(ok.check_usable(None), Ok(()));
        let blind = RolloutPolicy { max_error_rate: Some(1.0), ..phases(&["full"]) };
        let err = blind.check_usable(None).unwrap_err();
        assert_eq!(err.field, "policy");
        assert!(err.message.contains("cannot detect anything"), "{err}");
        // Each one thing that can detect makes it usable.
        assert_eq!(blind.check_usable(Some(0.9)), Ok(()));
        assert_eq!(RolloutPolicy { latency_slo_ms: Some(50.0), ..blind.clone() }.check_usable(None), Ok(()));
        assert_eq!(RolloutPolicy { max_error_rate: Some(0.99), ..blind.clone() }.check_usable(None), Ok(()));
        let shadow = RolloutPolicy { max_error_rate: Some(1.0), ..phases(&["shadow", "full"]) };
        assert_eq!(shadow.check_usable(None), Ok(()), "the default ratio applies in shadow");
        assert_eq!(RolloutPolicy::default().check_usable(None), Ok(()));
    }
}
