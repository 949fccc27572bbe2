//! What one slot did since its last telemetry window: counts and latency
//! sketches, cut into a [`SlotWindow`] for each report (see `crate::report`).
//!
//! Kept beside the rollout's sliding window, not derived from it: that window
//! is reset at every phase and bounded by count, while telemetry must count
//! every request exactly once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sentinel_proto::pb::SlotWindow;
use sentinel_proto::telemetry::Sketch;

/// Where a slot leaving the route leaves its last window: shared by the
/// serving side, which drains it into each report.
pub type Retired = Arc<Mutex<Vec<SlotWindow>>>;

/// At most this many retired windows wait for a report; past it the oldest
/// is dropped (the report loop takes them at every heartbeat).
pub const MAX_RETIRED: usize = 64;

/// Leaves `w` in `retired`, unless it holds nothing new.
pub fn retire(retired: &Retired, w: SlotWindow) {
    if w.requests == 0 && w.feedback_total == 0 && w.agreement_total == 0 && w.restarts == 0 {
        return;
    }
    let mut r = retired.lock().unwrap_or_else(PoisonError::into_inner);
    if r.len() >= MAX_RETIRED {
        r.remove(0);
    }
    r.push(w);
}

/// The running totals of one slot since its last cut.
#[derive(Debug, Default)]
pub struct Interval {
    started_ms: i64,
    requests: u64,
    errors: u64,
    latency: Sketch,
    compute: Sketch,
    feedback_correct: u64,
    feedback_total: u64,
    agreement_agreed: u64,
    agreement_total: u64,
    /// The worker pool's restart count at the last cut.
    restarts_seen: u64,
}

/// Gauges of the slot read when a window is cut.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub restarts_total: u64,
    pub rss_bytes: u64,
    pub validation_accuracy: Option<f64>,
    pub validation_samples: u64,
}

impl Interval {
    /// Totals starting at `now_ms`.
    pub fn starting(now_ms: i64) -> Self {
        Self { started_ms: now_ms, ..Self::default() }
    }

    /// One answered request: its end-to-end `latency` and the model's `compute` time.
    pub fn ok(&mut self, latency: Duration, compute: Duration) {
        self.requests += 1;
        self.latency.record(latency);
        self.compute.record(compute);
    }

    /// One request the slot failed.
    pub fn error(&mut self) {
        self.requests += 1;
        self.errors += 1;
    }

    pub fn feedback(&mut self, correct: bool) {
        self.feedback_total += 1;
        self.feedback_correct += u64::from(correct);
    }

    pub fn agreement(&mut self, agreed: bool) {
        self.agreement_total += 1;
        self.agreement_agreed += u64::from(agreed);
    }

    /// The window since the last cut, ending at `now_ms`; the totals start
    /// again from zero. Model, version, slot, role and sequence are the caller's.
    pub fn cut(&mut self, now_ms: i64, g: Gauges) -> SlotWindow {
        let restarts = g.restarts_total.saturating_sub(self.restarts_seen);
        let done = std::mem::replace(self, Self { restarts_seen: g.restarts_total, ..Self::starting(now_ms) });
        SlotWindow {
            start_unix_ms: done.started_ms,
            end_unix_ms: now_ms,
            requests: done.requests,
            errors: done.errors,
            latency: Some(done.latency.to_pb()),
            compute: Some(done.compute.to_pb()),
            feedback_correct: done.feedback_correct,
            feedback_total: done.feedback_total,
            agreement_agreed: done.agreement_agreed,
            agreement_total: done.agreement_total,
            validation_accuracy: g.validation_accuracy.unwrap_or(0.0),
            validation_samples: if g.validation_accuracy.is_some() { g.validation_samples } else { 0 },
            restarts,
            rss_bytes: g.rss_bytes,
            ..SlotWindow::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_holds_everything_since_the_last_and_starts_again() {
        let mut i = Interval::starting(1_000);
        i.ok(Duration::from_millis(2), Duration::from_millis(1));
        i.ok(Duration::from_millis(4), Duration::from_millis(3));
        i.error();
        i.feedback(true);
        i.feedback(false);
        i.agreement(true);
        let g = Gauges { restarts_total: 2, rss_bytes: 7, validation_accuracy: Some(0.5), validation_samples: 10 };
        let w = i.cut(2_000, g);
        assert_eq!((w.start_unix_ms, w.end_unix_ms, w.requests, w.errors), (1_000, 2_000, 3, 1));
        assert_eq!((w.feedback_correct, w.feedback_total, w.agreement_agreed, w.agreement_total), (1, 2, 1, 1));
        assert_eq!((w.restarts, w.rss_bytes, w.validation_samples), (2, 7, 10));
        assert_eq!(Sketch::from_pb(w.latency.as_ref().expect("sketch")).expect("valid").count(), 2);
        let next = i.cut(3_000, Gauges { restarts_total: 3, ..g });
        assert_eq!((next.start_unix_ms, next.requests, next.restarts), (2_000, 0, 1), "only what came after");
        let none = i.cut(4_000, Gauges { validation_accuracy: None, restarts_total: 3, ..g });
        assert_eq!(none.validation_samples, 0, "no accuracy, no samples");
    }

    #[test]
    fn retired_windows_with_something_new_wait_for_a_report_and_are_bounded() {
        let retired = Retired::default();
        retire(&retired, SlotWindow { rss_bytes: 5, ..SlotWindow::default() });
        assert!(retired.lock().expect("lock").is_empty(), "nothing new: not kept");
        for n in 0..MAX_RETIRED as u64 + 3 {
            retire(&retired, SlotWindow { requests: n + 1, ..SlotWindow::default() });
        }
        let kept = retired.lock().expect("lock");
        assert_eq!(kept.len(), MAX_RETIRED);
        assert_eq!(kept[0].requests, 4, "the oldest went first");
    }
}
