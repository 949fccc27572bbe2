//! A rollout's steps on made-up metrics and paused tokio time: no worker,
//! no store, no agent. `now` is read from tokio's clock, which only
//! moves when a test advances it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;
use crate::rollout::policy::{Phase, Thresholds};

/// Shadow, then canary 10%, then full, 30 s and 10 requests each, then a
/// 60 s standby bake.
fn policy() -> Policy {
    let phase = |kind| Phase { kind, bake: Duration::from_secs(30), min_samples: 10 };
    Policy {
        phases: vec![phase(PhaseKind::Shadow), phase(PhaseKind::Canary { percent: 10 }), phase(PhaseKind::Full)],
        thresholds: Thresholds::default(),
        standby_bake: Duration::from_secs(60),
        min_accuracy_samples: 50,
    }
}

/// A slot that answered `requests` requests without error at this p95.
fn slot(requests: u64, p95_ms: u64) -> SlotMetrics {
    let p95 = Duration::from_millis(p95_ms);
    SlotMetrics {
        requests,
        error_rate: Some(0.0),
        p50: Some(p95 / 2),
        p95: Some(p95),
        p99: Some(p95 * 2),
        ..SlotMetrics::default()
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[tokio::test(start_paused = true)]
async fn a_healthy_version_is_promoted_phase_by_phase_then_completes() {
    let mut progress = Progress::new(policy(), 0, now());
    let (green, blue) = (slot(100, 10), slot(100, 10));
    assert_eq!(progress.step(now(), false, &green, blue), Step::Hold, "shadow has not baked yet");
    tokio::time::advance(Duration::from_secs(30)).await;
    let next = progress.step(now(), false, &green, blue);
    assert!(matches!(next, Step::Next { kind: Some(PhaseKind::Canary { percent: 10 }), .. }), "{next:?}");
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(progress.step(now(), false, &green, blue), Step::Hold, "the bake restarts with each phase");
    tokio::time::advance(Duration::from_secs(1)).await;
    let next = progress.step(now(), false, &green, blue);
    assert!(matches!(next, Step::Next { kind: Some(PhaseKind::Full), .. }), "{next:?}");
    // Promoted: blue takes no traffic, so its latencies are not compared.
    tokio::time::advance(Duration::from_secs(30)).await;
    match progress.step(now(), true, &green, blue) {
        Step::Next { kind: None, blue } => assert_eq!((blue.p50, blue.p95, blue.p99), (None, None, None)),
        other => panic!("expected the standby bake, got {other:?}"),
    }
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(progress.step(now(), true, &green, blue), Step::Hold);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(progress.step(now(), true, &green, blue), Step::Complete);
}

#[tokio::test(start_paused = true)]
async fn a_slow_canary_rolls_back_with_how_long_it_served() {
    let mut progress = Progress::new(policy(), 1, now());
    let blue = slot(100, 10);
    // No samples yet: nothing to judge, and the detection clock has not started.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(progress.step(now(), false, &SlotMetrics::default(), blue), Step::Hold);
    // The first samples: too few to judge latency.
    assert_eq!(progress.step(now(), false, &slot(3, 40), blue), Step::Hold);
    tokio::time::advance(Duration::from_secs(7)).await;
    match progress.step(now(), false, &slot(12, 40), blue) {
        Step::Rollback { reason, detection, .. } => {
            assert_eq!(reason.kind(), "latency", "{reason}");
            assert_eq!(detection, Detection { samples: 12, after: Duration::from_secs(7) });
        }
        other => panic!("expected a rollback, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_degradation_in_the_standby_bake_still_rolls_back() {
    let mut progress = Progress::new(policy(), 3, now());
    let failing = SlotMetrics { errors: 50, error_rate: Some(0.5), ..slot(100, 10) };
    tokio::time::advance(Duration::from_secs(10)).await;
    match progress.step(now(), true, &failing, slot(100, 10)) {
        Step::Rollback { reason, .. } => assert_eq!(reason.kind(), "error_rate", "{reason}"),
        other => panic!("expected a rollback, got {other:?}"),
    }
}
