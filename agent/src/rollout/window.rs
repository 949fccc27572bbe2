//! Sliding-window metrics for one slot.
//!
//! A [`SlotWindow`] keeps the recent outcomes of one slot (request latencies
//! and errors, worker restarts, ground-truth feedback, shadow agreement) in
//! ring buffers bounded both by age and by count, so memory stays bounded
//! whatever the request rate. [`SlotWindow::snapshot`] turns them into a
//! [`SlotMetrics`] for [`super::decision::decide`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Recent outcomes of one slot over a window bounded by age and by count.
///
/// Each kind of event (requests, restarts, feedback, agreement) has its own
/// ring of at most `max_samples` entries, so a burst of requests cannot push
/// a rare restart out of the window. Entries older than `max_age` are evicted
/// on every record and on every snapshot. Times come from the caller and are
/// expected to be monotonic, as [`Instant`] is.
#[derive(Debug, Clone)]
pub struct SlotWindow {
    max_age: Duration,
    max_samples: usize,
    /// `Some(latency)` for a successful request, `None` for an error.
    requests: VecDeque<(Instant, Option<Duration>)>,
    restarts: VecDeque<Instant>,
    feedback: VecDeque<(Instant, bool)>,
    agreement: VecDeque<(Instant, bool)>,
    validation_accuracy: Option<f64>,
    /// Reused by [`SlotWindow::snapshot`] to sort latencies without allocating each time.
    scratch: Vec<Duration>,
}

/// A point-in-time summary of a [`SlotWindow`].
///
/// Rates and latencies are `None` when the window holds nothing to compute
/// them from, never a made-up zero.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SlotMetrics {
    /// Requests in the window, successful or not.
    pub requests: u64,
    /// Failed requests in the window.
    pub errors: u64,
    /// `errors / requests`; `None` without requests.
    pub error_rate: Option<f64>,
    /// Median latency of the successful requests (nearest rank).
    pub p50: Option<Duration>,
    /// 95th percentile latency of the successful requests (nearest rank).
    pub p95: Option<Duration>,
    /// 99th percentile latency of the successful requests (nearest rank).
    pub p99: Option<Duration>,
    /// Worker restarts in the window.
    pub restarts: u64,
    /// Ground-truth feedback samples that said the prediction was correct.
    pub feedback_correct: u64,
    /// Ground-truth feedback samples in the window.
    pub feedback_total: u64,
    /// `feedback_correct / feedback_total`; `None` without feedback.
    pub feedback_accuracy: Option<f64>,
    /// Shadow comparisons in which this slot agreed with the other slot.
    pub agreement_agreed: u64,
    /// Shadow comparisons in the window.
    pub agreement_total: u64,
    /// `agreement_agreed / agreement_total`; `None` without comparisons.
    pub agreement_rate: Option<f64>,
    /// Accuracy on the validation set, scored once when the version was loaded.
    pub validation_accuracy: Option<f64>,
}

impl SlotWindow {
    /// An empty window keeping events for at most `max_age` and at most
    /// `max_samples` events of each kind. A `max_samples` of 0 is treated as 1.
    pub fn new(max_age: Duration, max_samples: usize) -> Self {
        Self {
            max_age,
            max_samples: max_samples.max(1),
            requests: VecDeque::new(),
            restarts: VecDeque::new(),
            feedback: VecDeque::new(),
            agreement: VecDeque::new(),
            validation_accuracy: None,
            scratch: Vec::new(),
        }
    }

    /// Records a successful request that took `latency`.
    pub fn record_ok(&mut self, latency: Duration, now: Instant) {
        push(&mut self.requests, (now, Some(latency)), self.max_samples);
        self.evict(now);
    }

    /// Records a failed request. Errors count towards the error rate but not
    /// towards the latency quantiles.
    pub fn record_error(&mut self, now: Instant) {
        push(&mut self.requests, (now, None), self.max_samples);
        self.evict(now);
    }

    /// Records a restart of this slot's worker.
    pub fn record_restart(&mut self, now: Instant) {
        push(&mut self.restarts, now, self.max_samples);
        self.evict(now);
    }

    /// Records ground-truth feedback on one of this slot's predictions.
    pub fn record_feedback(&mut self, correct: bool, now: Instant) {
        push(&mut self.feedback, (now, correct), self.max_samples);
        self.evict(now);
    }

    /// Records whether this slot agreed with the other slot on a request
    /// answered by both (shadow mode).
    pub fn record_agreement(&mut self, agreed: bool, now: Instant) {
        push(&mut self.agreement, (now, agreed), self.max_samples);
        self.evict(now);
    }

    /// Sets the accuracy scored on the validation set when the version was
    /// loaded. It does not age out of the window; [`SlotWindow::reset`] clears it.
    pub fn set_validation_accuracy(&mut self, accuracy: Option<f64>) {
        self.validation_accuracy = accuracy;
    }

    /// Forgets everything, for a new version entering the slot.
    pub fn reset(&mut self) {
        self.requests.clear();
        self.restarts.clear();
        self.feedback.clear();
        self.agreement.clear();
        self.validation_accuracy = None;
    }

    /// Evicts expired events and summarises the rest.
    ///
    /// Costs one pass over the window plus a sort of the successful
    /// latencies, in a buffer reused between calls.
    pub fn snapshot(&mut self, now: Instant) -> SlotMetrics {
        self.snapshot_since(now, None)
    }

    /// Like [`SlotWindow::snapshot`], counting only events at or after
    /// `since`: the baseline slot is judged over the same period as the
    /// slot it is compared with, under the same load.
    pub fn snapshot_since(&mut self, now: Instant, since: Option<Instant>) -> SlotMetrics {
        self.evict(now);
        let recent = |at: Instant| since.is_none_or(|s| at >= s);

        self.scratch.clear();
        self.scratch.extend(self.requests.iter().filter(|(at, _)| recent(*at)).filter_map(|&(_, latency)| latency));
        self.scratch.sort_unstable();
        let latencies = &self.scratch;

        let requests = count(self.requests.iter().filter(|(at, _)| recent(*at)).count());
        let errors = requests - count(latencies.len());
        let feedback = || self.feedback.iter().filter(|(at, _)| recent(*at));
        let feedback_total = count(feedback().count());
        let feedback_correct = count(feedback().filter(|&&(_, correct)| correct).count());
        let agreement = || self.agreement.iter().filter(|(at, _)| recent(*at));
        let agreement_total = count(agreement().count());
        let agreement_agreed = count(agreement().filter(|&&(_, agreed)| agreed).count());

        SlotMetrics {
            requests,
            errors,
            error_rate: ratio(errors, requests),
            p50: nearest_rank(latencies, 50),
            p95: nearest_rank(latencies, 95),
            p99: nearest_rank(latencies, 99),
            restarts: count(self.restarts.iter().filter(|at| recent(**at)).count()),
            feedback_correct,
            feedback_total,
            feedback_accuracy: ratio(feedback_correct, feedback_total),
            agreement_agreed,
            agreement_total,
            agreement_rate: ratio(agreement_agreed, agreement_total),
            validation_accuracy: self.validation_accuracy,
        }
    }

    fn evict(&mut self, now: Instant) {
        let max_age = self.max_age;
        let expired = |at: Instant| now.saturating_duration_since(at) > max_age;
        while self.requests.front().is_some_and(|&(at, _)| expired(at)) {
            self.requests.pop_front();
        }
        while self.restarts.front().is_some_and(|&at| expired(at)) {
            self.restarts.pop_front();
        }
        while self.feedback.front().is_some_and(|&(at, _)| expired(at)) {
            self.feedback.pop_front();
        }
        while self.agreement.front().is_some_and(|&(at, _)| expired(at)) {
            self.agreement.pop_front();
        }
    }
}

/// Appends to a ring, dropping the oldest entry when it is full.
fn push<T>(ring: &mut VecDeque<T>, entry: T, max_samples: usize) {
    if ring.len() >= max_samples {
        ring.pop_front();
    }
    ring.push_back(entry);
}

/// Widens a length; `usize` never exceeds `u64` on supported targets.
fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn ratio(part: u64, total: u64) -> Option<f64> {
    // `as f64` loses precision only above 2^53, far beyond a bounded window.
    (total > 0).then(|| part as f64 / total as f64)
}

/// The nearest-rank `percent`th percentile of `sorted`: the smallest value
/// with at least `percent`% of the values at or below it.
fn nearest_rank(sorted: &[Duration], percent: usize) -> Option<Duration> {
    // rank = ceil(percent * n / 100), at least 1; integer maths avoids float rounding.
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn empty_window_gives_none() {
        let mut window = SlotWindow::new(Duration::from_secs(60), 100);
        let metrics = window.snapshot(Instant::now());
        assert_eq!(metrics, SlotMetrics::default());
        assert_eq!(metrics.error_rate, None);
        assert_eq!(metrics.p95, None);
        assert_eq!(metrics.feedback_accuracy, None);
        assert_eq!(metrics.agreement_rate, None);
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut window = SlotWindow::new(Duration::from_secs(60), 1000);
        let now = Instant::now();
        // 1..=100 ms, recorded out of order.
        for i in (1..=100).rev() {
            window.record_ok(MS * i, now);
        }
        let metrics = window.snapshot(now);
        assert_eq!(metrics.p50, Some(MS * 50));
        assert_eq!(metrics.p95, Some(MS * 95));
        assert_eq!(metrics.p99, Some(MS * 99));

        // Ten values: ranks ceil(5) = 5, ceil(9.5) = 10, ceil(9.9) = 10.
        let mut window = SlotWindow::new(Duration::from_secs(60), 1000);
        for i in 1..=10 {
            window.record_ok(MS * i, now);
        }
        let metrics = window.snapshot(now);
        assert_eq!(metrics.p50, Some(MS * 5));
        assert_eq!(metrics.p95, Some(MS * 10));
        assert_eq!(metrics.p99, Some(MS * 10));

        // A single value is every quantile.
        let mut window = SlotWindow::new(Duration::from_secs(60), 1000);
        window.record_ok(MS * 7, now);
        let metrics = window.snapshot(now);
        assert_eq!((metrics.p50, metrics.p99), (Some(MS * 7), Some(MS * 7)));
    }

    #[test]
    fn errors_count_as_requests_but_not_latency() {
        let mut window = SlotWindow::new(Duration::from_secs(60), 1000);
        let now = Instant::now();
        for _ in 0..95 {
            window.record_ok(MS, now);
        }
        for _ in 0..5 {
            window.record_error(now);
        }
        let metrics = window.snapshot(now);
        assert_eq!((metrics.requests, metrics.errors), (100, 5));
        assert_eq!(metrics.error_rate, Some(0.05));
        assert_eq!(metrics.p99, Some(MS));

        let mut only_errors = SlotWindow::new(Duration::from_secs(60), 1000);
        only_errors.record_error(now);
        let metrics = only_errors.snapshot(now);
        assert_eq!(metrics.error_rate, Some(1.0));
        assert_eq!(metrics.p50, None);
    }

    #[test]
    fn evicts_by_age() {
        let mut window = SlotWindow::new(Duration::from_secs(10), 1000);
        let start = Instant::now();
        window.record_ok(MS * 100, start);
        window.record_error(start);
        window.record_restart(start);
        window.record_feedback(false, start);
        window.record_agreement(false, start);
        window.record_ok(MS, start + Duration::from_secs(5));

        // Exactly max_age old is still inside the window.
        let metrics = window.snapshot(start + Duration::from_secs(10));
        assert_eq!((metrics.requests, metrics.restarts), (3, 1));

        let metrics = window.snapshot(start + Duration::from_secs(11));
        assert_eq!((metrics.requests, metrics.errors), (1, 0));
        assert_eq!(metrics.p99, Some(MS));
        assert_eq!(metrics.restarts, 0);
        assert_eq!(metrics.feedback_total, 0);
        assert_eq!(metrics.agreement_total, 0);

        let metrics = window.snapshot(start + Duration::from_secs(16));
        assert_eq!(metrics.requests, 0);
        assert_eq!(metrics.p50, None);
    }

    #[test]
    fn evicts_by_count_per_kind() {
        let mut window = SlotWindow::new(Duration::from_secs(60), 3);
        let now = Instant::now();
        window.record_restart(now);
        window.record_error(now);
        for i in 1..=5 {
            window.record_ok(MS * i, now);
        }
        let metrics = window.snapshot(now);
        // Only the last three requests (3, 4, 5 ms) remain; the error is gone.
        assert_eq!((metrics.requests, metrics.errors), (3, 0));
        assert_eq!(metrics.p50, Some(MS * 4));
        // A flood of requests does not push the restart out.
        assert_eq!(metrics.restarts, 1);
        assert_eq!(window.requests.len(), 3);
    }

    #[test]
    fn accuracy_sources() {
        let mut window = SlotWindow::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        for correct in [true, true, true, false] {
            window.record_feedback(correct, now);
        }
        for agreed in [true, false] {
            window.record_agreement(agreed, now);
        }
        window.set_validation_accuracy(Some(0.9));
        let metrics = window.snapshot(now);
        assert_eq!((metrics.feedback_correct, metrics.feedback_total), (3, 4));
        assert_eq!(metrics.feedback_accuracy, Some(0.75));
        assert_eq!((metrics.agreement_agreed, metrics.agreement_total), (1, 2));
        assert_eq!(metrics.agreement_rate, Some(0.5));
        assert_eq!(metrics.validation_accuracy, Some(0.9));

        window.reset();
        assert_eq!(window.snapshot(now), SlotMetrics::default());
    }
}
