//! Device telemetry: the mergeable latency sketch and the window arithmetic
//! the agent and the hub share.
//!
//! A [`Sketch`] is a histogram over log-spaced buckets: bucket `i` counts
//! latencies in `[g^(i-1), g^i)` microseconds with `g = 2^(1/8)`, and a
//! quantile reads as the geometric middle of its bucket, so it is within
//! `2^(1/16) - 1` (4.4%) of the true nearest-rank value. Two sketches merge
//! by adding counts, which is exact: the quantile of a merged sketch is the
//! quantile of all the values together, within the same bound. That is how
//! the hub combines windows into buckets and devices into a fleet.
//!
//! Buckets run up to [`MAX_INDEX`] (about 134 s); longer values count in the
//! last one. A sketch holds at most `MAX_INDEX + 1` counts whatever it saw.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pb::{LatencySketch, SlotWindow};

/// Buckets per doubling.
const PER_DOUBLING: f64 = 8.0;
/// The last bucket: `2^(216/8)` µs = 2^27 µs, about 134 s.
pub const MAX_INDEX: u32 = 216;
/// Largest relative error of a quantile read from a sketch.
pub const RELATIVE_ERROR: f64 = 0.044_273_782_427_413_84; // 2^(1/16) - 1

/// A mergeable latency histogram (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    counts: BTreeMap<u32, u64>,
}

/// Why a sketch from the wire cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SketchError {
    #[error("{index} bucket indexes but {count} counts")]
    Lengths { index: usize, count: usize },
    #[error("bucket index {0} is past the last bucket, {MAX_INDEX}")]
    Index(u32),
    #[error("bucket indexes are not strictly ascending at {0}")]
    Order(u32),
}

/// The bucket of a latency.
fn index_of(d: Duration) -> u32 {
    let us = d.as_secs_f64() * 1e6;
    if us < 1.0 {
        return 0;
    }
    // floor(log2(us) * 8) + 1, so bucket i holds [g^(i-1), g^i).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_INDEX below
    let i = (us.log2() * PER_DOUBLING).floor() as u32 + 1;
    i.min(MAX_INDEX)
}

/// The value a bucket stands for: the geometric middle of its bounds.
fn value_of(index: u32) -> Duration {
    if index == 0 {
        return Duration::from_nanos(500);
    }
    let us = ((f64::from(index) - 0.5) / PER_DOUBLING).exp2();
    Duration::from_secs_f64(us / 1e6)
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one latency.
    pub fn record(&mut self, d: Duration) {
        *self.counts.entry(index_of(d)).or_insert(0) += 1;
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.values().fold(0u64, |a, c| a.saturating_add(*c))
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Adds `other`'s counts to this one.
    pub fn merge(&mut self, other: &Sketch) {
        for (i, c) in &other.counts {
            let slot = self.counts.entry(*i).or_insert(0);
            *slot = slot.saturating_add(*c);
        }
    }

    /// The nearest-rank `q` quantile (`0 < q <= 1`), within
    /// [`RELATIVE_ERROR`]; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in &self.counts {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return Some(value_of(*i));
            }
        }
        self.counts.keys().next_back().map(|i| value_of(*i))
    }

    /// Each non-empty bucket's value (its geometric middle) and count, ascending.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.counts.iter().map(|(i, c)| (value_of(*i), *c))
    }

    /// The wire form.
    pub fn to_pb(&self) -> LatencySketch {
        LatencySketch { index: self.counts.keys().copied().collect(), count: self.counts.values().copied().collect() }
    }

    /// Reads the wire form, refusing what a correct sender never writes.
    /// Zero counts are dropped. Bounded: at most `MAX_INDEX + 1` entries pass.
    pub fn from_pb(pb: &LatencySketch) -> Result<Self, SketchError> {
        if pb.index.len() != pb.count.len() {
            return Err(SketchError::Lengths { index: pb.index.len(), count: pb.count.len() });
        }
        let mut counts = BTreeMap::new();
        let mut last: Option<u32> = None;
        for (i, c) in pb.index.iter().zip(&pb.count) {
            if *i > MAX_INDEX {
                return Err(SketchError::Index(*i));
            }
            if last.is_some_and(|l| l >= *i) {
                return Err(SketchError::Order(*i));
            }
            last = Some(*i);
            if *c > 0 {
                counts.insert(*i, *c);
            }
        }
        Ok(Self { counts })
    }

    /// Compact bytes for storage: the protobuf encoding of [`Sketch::to_pb`].
    pub fn to_bytes(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.to_pb())
    }

    /// Reads [`Sketch::to_bytes`]; `None` for bytes it did not write.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let pb: LatencySketch = prost::Message::decode(bytes).ok()?;
        Self::from_pb(&pb).ok()
    }
}

/// Folds `b` into `a`: two windows of the same model and version become one
/// covering both (counts add, sketches merge, the later window's gauges win).
pub fn merge_windows(a: &mut SlotWindow, b: &SlotWindow) {
    let sketch = |x: Option<&LatencySketch>| x.and_then(|s| Sketch::from_pb(s).ok()).unwrap_or_default();
    let mut latency = sketch(a.latency.as_ref());
    latency.merge(&sketch(b.latency.as_ref()));
    let mut compute = sketch(a.compute.as_ref());
    compute.merge(&sketch(b.compute.as_ref()));
    a.latency = Some(latency.to_pb());
    a.compute = Some(compute.to_pb());
    a.start_unix_ms = a.start_unix_ms.min(b.start_unix_ms);
    a.end_unix_ms = a.end_unix_ms.max(b.end_unix_ms);
    a.seq = a.seq.max(b.seq);
    a.requests = a.requests.saturating_add(b.requests);
    a.errors = a.errors.saturating_add(b.errors);
    a.feedback_correct = a.feedback_correct.saturating_add(b.feedback_correct);
    a.feedback_total = a.feedback_total.saturating_add(b.feedback_total);
    a.agreement_agreed = a.agreement_agreed.saturating_add(b.agreement_agreed);
    a.agreement_total = a.agreement_total.saturating_add(b.agreement_total);
    a.restarts = a.restarts.saturating_add(b.restarts);
    if b.validation_samples > 0 {
        a.validation_accuracy = b.validation_accuracy;
        a.validation_samples = b.validation_samples;
    }
    a.rss_bytes = b.rss_bytes;
    a.role.clone_from(&b.role);
    a.slot.clone_from(&b.slot);
    a.deployment_id = b.deployment_id;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// The exact nearest-rank quantile of `values`.
    fn exact(values: &mut [Duration], q: f64) -> Duration {
        values.sort_unstable();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let rank = ((q * values.len() as f64).ceil() as usize).max(1);
        values[rank - 1]
    }

    #[test]
    fn quantiles_are_within_the_stated_error_of_the_exact_ones() {
        // A spread from 3 µs to 2 s, skewed like real latencies.
        let mut values: Vec<Duration> = (1..=5000u64).map(|i| us(3 + i * i * i / 60_000)).collect();
        let mut s = Sketch::new();
        for v in &values {
            s.record(*v);
        }
        assert_eq!(s.count(), 5000);
        for q in [0.01, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let want = exact(&mut values, q).as_secs_f64();
            let got = s.quantile(q).expect("non-empty").as_secs_f64();
            assert!((got - want).abs() <= want * RELATIVE_ERROR + 1e-12, "q{q}: {got} against {want}");
        }
    }

    #[test]
    fn a_merged_sketch_reads_like_one_fed_every_value() {
        let (mut a, mut b, mut all) = (Sketch::new(), Sketch::new(), Sketch::new());
        for i in 0..1000u64 {
            let v = us(100 + i * 7);
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(a.quantile(0.95), all.quantile(0.95));
    }

    #[test]
    fn the_wire_and_storage_forms_round_trip_and_bad_ones_are_refused() {
        let mut s = Sketch::new();
        for v in [0, 1, 2, 900, 5_000_000, u64::MAX / 2] {
            s.record(us(v));
        }
        assert_eq!(Sketch::from_pb(&s.to_pb()), Ok(s.clone()));
        assert_eq!(Sketch::from_bytes(&s.to_bytes()), Some(s.clone()));
        assert!(s.to_pb().index.iter().all(|i| *i <= MAX_INDEX), "huge values land in the last bucket");
        let bad = |index: Vec<u32>, count: Vec<u64>| Sketch::from_pb(&LatencySketch { index, count });
        assert_eq!(bad(vec![1, 2], vec![1]), Err(SketchError::Lengths { index: 2, count: 1 }));
        assert_eq!(bad(vec![MAX_INDEX + 1], vec![1]), Err(SketchError::Index(MAX_INDEX + 1)));
        assert_eq!(bad(vec![5, 5], vec![1, 1]), Err(SketchError::Order(5)));
        assert_eq!(bad(vec![5, 3], vec![1, 1]), Err(SketchError::Order(3)));
        assert_eq!(bad(vec![4], vec![0]), Ok(Sketch::new()), "zero counts are dropped");
        assert_eq!(Sketch::from_bytes(b"\xff\xff"), None);
        assert_eq!(Sketch::new().quantile(0.5), None);
    }

    #[test]
    fn merging_windows_adds_counts_and_spans_both() {
        let mut s1 = Sketch::new();
        s1.record(us(100));
        let mut s2 = Sketch::new();
        s2.record(us(300));
        let mut a = SlotWindow {
            seq: 1,
            start_unix_ms: 1000,
            end_unix_ms: 2000,
            requests: 3,
            errors: 1,
            feedback_total: 2,
            feedback_correct: 1,
            latency: Some(s1.to_pb()),
            rss_bytes: 10,
            ..SlotWindow::default()
        };
        let b = SlotWindow {
            seq: 2,
            start_unix_ms: 2000,
            end_unix_ms: 3000,
            requests: 4,
            restarts: 1,
            latency: Some(s2.to_pb()),
            rss_bytes: 20,
            validation_accuracy: 0.9,
            validation_samples: 50,
            ..SlotWindow::default()
        };
        merge_windows(&mut a, &b);
        assert_eq!((a.seq, a.start_unix_ms, a.end_unix_ms), (2, 1000, 3000));
        assert_eq!((a.requests, a.errors, a.feedback_total, a.feedback_correct, a.restarts), (7, 1, 2, 1, 1));
        assert_eq!(Sketch::from_pb(a.latency.as_ref().expect("sketch")).expect("valid").count(), 2);
        assert_eq!((a.rss_bytes, a.validation_samples), (20, 50));
    }
}
