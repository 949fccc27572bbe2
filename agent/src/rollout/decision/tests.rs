//! Tests of [`super::decide`] and of the policies it is given.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::rollout::policy::{Phase, PolicyError, Thresholds, default_policy, policy_from, with_declared_floor};
use sentinel_proto::pb::RolloutPolicy;

fn phases(names: &[&str]) -> RolloutPolicy {
    RolloutPolicy { phases: names.iter().map(|s| (*s).to_owned()).collect(), ..RolloutPolicy::default() }
}

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
    let policy =
        Policy { thresholds: Thresholds { min_agreement: Some(0.95), ..Thresholds::default() }, ..Policy::default() };
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
        let err =
            with_thresholds(Thresholds { max_p95_ratio: Some(ratio), ..Thresholds::default() }).validate().unwrap_err();
        assert!(matches!(err, PolicyError::Threshold { name: "max_p95_ratio", .. }), "{err}");
    }
    let err =
        with_thresholds(Thresholds { max_error_rate: Some(1.5), ..Thresholds::default() }).validate().unwrap_err();
    assert_eq!(err.to_string(), "thresholds.max_error_rate is 1.5, expected a fraction within 0..=1");
    let err =
        with_thresholds(Thresholds { min_agreement: Some(-0.1), ..Thresholds::default() }).validate().unwrap_err();
    assert!(matches!(err, PolicyError::Threshold { name: "min_agreement", .. }));
    let err =
        with_thresholds(Thresholds { min_accuracy: Some(f64::NAN), ..Thresholds::default() }).validate().unwrap_err();
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

    assert_eq!(HoldReason::TooFewSamples { have: 42, need: 100 }.to_string(), "too few samples: 42 of 100 requests");
    assert_eq!(HoldReason::Baking { remaining: Duration::from_millis(12_300) }.to_string(), "baking, 12.3 s remaining");
}

#[test]
fn one_shadow_sample_of_a_slow_version_does_not_promote() {
    let p = RolloutPolicy { max_latency_ratio: 1.5, ..phases(&["shadow", "canary:10", "full"]) };
    let policy = policy_from(Some(&p), &default_policy()).unwrap();
    let slot = |requests, p95_ms| SlotMetrics {
        requests,
        p95: Some(Duration::from_millis(p95_ms)),
        error_rate: Some(0.0),
        ..SlotMetrics::default()
    };
    let obs = |green| Observation { phase: 0, phase_elapsed: Duration::from_secs(3600), green, blue: slot(1000, 20) };
    assert!(matches!(decide(&policy, &obs(slot(1, 100))), Decision::Hold(_)));
    assert!(matches!(decide(&policy, &obs(slot(100, 100))), Decision::Rollback(RollbackReason::Latency { .. })));
}

#[test]
fn the_declared_accuracy_is_the_floor_in_full_unless_the_policy_sets_one() {
    let p = phases(&["full"]);
    let policy = with_declared_floor(policy_from(Some(&p), &default_policy()).unwrap(), Some(1.0), 0.02);
    assert_eq!(policy.thresholds.min_accuracy, Some(0.98));
    let green = SlotMetrics {
        requests: 50,
        feedback_total: policy.min_accuracy_samples,
        feedback_accuracy: Some(0.25),
        ..SlotMetrics::default()
    };
    let obs = Observation { phase: 0, phase_elapsed: Duration::ZERO, green, blue: SlotMetrics::default() };
    assert!(matches!(decide(&policy, &obs), Decision::Rollback(RollbackReason::Accuracy { .. })));
    // One feedback sample short of min_accuracy_samples: not judged yet.
    let few = SlotMetrics { feedback_total: policy.min_accuracy_samples - 1, ..green };
    assert!(matches!(decide(&policy, &Observation { green: few, ..obs }), Decision::Hold(_)));
    // The standby bake after full promotion keeps the floor.
    let standby = Observation { phase: 1, ..obs };
    assert!(matches!(decide(&policy, &standby), Decision::Rollback(RollbackReason::Accuracy { .. })));
    // A policy's own min_accuracy wins; no declaration, no floor.
    let own = RolloutPolicy { min_accuracy: 0.2, ..p.clone() };
    let policy = with_declared_floor(policy_from(Some(&own), &default_policy()).unwrap(), Some(1.0), 0.02);
    assert_eq!(policy.thresholds.min_accuracy, Some(0.2));
    let policy = with_declared_floor(policy_from(Some(&p), &default_policy()).unwrap(), None, 0.02);
    assert_eq!(policy.thresholds.min_accuracy, None);
}
