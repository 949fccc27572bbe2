//! Device telemetry kept as a bounded time series (pure: no I/O).
//!
//! Each report carries one [`SlotWindow`] per loaded slot. The hub checks it
//! ([`accept`]), places it on its own clock, and adds it to two buckets of
//! its device, model and version: a fine one (a minute by default, kept a
//! day) and a coarse one (an hour, kept a month). Adding is exact for counts
//! and, for latencies, merges log-bucketed sketches (see
//! [`sentinel_proto::telemetry`]); so is combining buckets across devices
//! ([`Series`]). A percentile read from any bucket or any combination of
//! devices is therefore the nearest-rank percentile of every request inside
//! it, within [`RELATIVE_ERROR`] (4.4%), never an average of percentiles.
//!
//! Old buckets are deleted by the store's pruning ([`Retention`]); the
//! database then stays flat, growing only with the number of devices and
//! the versions they run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sentinel_proto::pb::SlotWindow;
pub use sentinel_proto::telemetry::RELATIVE_ERROR;
use sentinel_proto::telemetry::Sketch;
use serde_json::{Value, json};

/// Windows one report may carry; the agent's queue holds at most 240 per slot kind.
pub const MAX_WINDOWS_PER_REPORT: usize = 1024;
/// Longest model or version name a window may carry (the registry's own bound).
const MAX_NAME: usize = 256;

/// Which of the two series a bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resolution {
    Fine,
    Coarse,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fine => "fine",
            Self::Coarse => "coarse",
        }
    }

    /// The stored code.
    pub fn code(self) -> i64 {
        match self {
            Self::Fine => 0,
            Self::Coarse => 1,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Self::Fine),
            1 => Some(Self::Coarse),
            _ => None,
        }
    }
}

/// Bucket widths and how long each series is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub fine_bucket: Duration,
    pub fine_keep: Duration,
    pub coarse_bucket: Duration,
    pub coarse_keep: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            fine_bucket: Duration::from_secs(60),
            fine_keep: Duration::from_secs(86_400),
            coarse_bucket: Duration::from_secs(3_600),
            coarse_keep: Duration::from_secs(30 * 86_400),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Retention {
    /// The width of a series' buckets, in milliseconds.
    pub fn width_ms(&self, r: Resolution) -> i64 {
        ms(match r {
            Resolution::Fine => self.fine_bucket,
            Resolution::Coarse => self.coarse_bucket,
        })
    }

    /// How long a series is kept, in milliseconds.
    pub fn keep_ms(&self, r: Resolution) -> i64 {
        ms(match r {
            Resolution::Fine => self.fine_keep,
            Resolution::Coarse => self.coarse_keep,
        })
    }

    /// The start of the bucket holding instant `at_ms`.
    pub fn bucket_of(&self, r: Resolution, at_ms: i64) -> i64 {
        let w = self.width_ms(r);
        at_ms.saturating_sub(at_ms.rem_euclid(w))
    }

    /// Buckets starting before this instant are pruned at `now_ms`.
    pub fn cutoff(&self, r: Resolution, now_ms: i64) -> i64 {
        self.bucket_of(r, now_ms.saturating_sub(self.keep_ms(r)))
    }
}

/// A checked window, placed on the hub's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub model: String,
    pub version: String,
    pub seq: u64,
    /// When the window ended, on the hub's clock.
    pub at_ms: i64,
    pub counts: Counts,
    pub latency: Sketch,
    pub compute: Sketch,
    pub validation: Option<(f64, u64)>,
    pub rss_bytes: u64,
}

/// What adds up across windows and devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub feedback_correct: u64,
    pub feedback_total: u64,
    pub agreement_agreed: u64,
    pub agreement_total: u64,
    pub restarts: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.feedback_correct = self.feedback_correct.saturating_add(o.feedback_correct);
        self.feedback_total = self.feedback_total.saturating_add(o.feedback_total);
        self.agreement_agreed = self.agreement_agreed.saturating_add(o.agreement_agreed);
        self.agreement_total = self.agreement_total.saturating_add(o.agreement_total);
        self.restarts = self.restarts.saturating_add(o.restarts);
    }
}

/// One stored bucket: one device, model and version over one bucket width.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub device_id: String,
    pub model: String,
    pub version: String,
    pub resolution: Resolution,
    pub bucket_ms: i64,
    pub counts: Counts,
    pub latency: Sketch,
    pub compute: Sketch,
    /// The last validation accuracy reported, with its sample count.
    pub validation: Option<(f64, u64)>,
    /// The largest worker memory reported in the bucket.
    pub rss_max_bytes: u64,
}

impl Bucket {
    /// An empty bucket for `w` at `resolution`.
    pub fn empty(device_id: &str, w: &Window, resolution: Resolution, retention: &Retention) -> Self {
        Self {
            device_id: device_id.to_owned(),
            model: w.model.clone(),
            version: w.version.clone(),
            resolution,
            bucket_ms: retention.bucket_of(resolution, w.at_ms),
            counts: Counts::default(),
            latency: Sketch::new(),
            compute: Sketch::new(),
            validation: None,
            rss_max_bytes: 0,
        }
    }

    /// Adds one window of the same device, model, version and bucket.
    pub fn absorb(&mut self, w: &Window) {
        self.counts.add(&w.counts);
        self.latency.merge(&w.latency);
        self.compute.merge(&w.compute);
        if w.validation.is_some() {
            self.validation = w.validation;
        }
        self.rss_max_bytes = self.rss_max_bytes.max(w.rss_bytes);
    }
}

/// Checks a report's windows and places each on the hub's clock.
///
/// The agent's clock may be off (a device without a real-time clock), so a
/// window is placed by how long before the report it ended, taken from the
/// hub's receipt time `now_ms`. Refused, each with why: windows past
/// [`MAX_WINDOWS_PER_REPORT`], a missing or overlong model or version, an
/// end before its start, an unreadable sketch, more errors than requests,
/// and windows older than the coarse retention.
pub fn accept(
    windows: &[SlotWindow],
    sent_at_ms: i64,
    now_ms: i64,
    retention: &Retention,
) -> (Vec<Window>, Vec<String>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        if i >= MAX_WINDOWS_PER_REPORT {
            refused.push(format!(
                "{} windows past the first {MAX_WINDOWS_PER_REPORT} of one report",
                windows.len() - MAX_WINDOWS_PER_REPORT
            ));
            break;
        }
        match check(w, sent_at_ms, now_ms, retention) {
            Ok(w) => ok.push(w),
            Err(why) => refused.push(format!(
                "window {} ({} {}): {why}",
                w.seq,
                sentinel_proto::quote(&w.model),
                sentinel_proto::quote(&w.version)
            )),
        }
    }
    (ok, refused)
}

fn check(w: &SlotWindow, sent_at_ms: i64, now_ms: i64, retention: &Retention) -> Result<Window, String> {
    for (what, v) in [("model", &w.model), ("version", &w.version)] {
        if v.is_empty() || v.len() > MAX_NAME {
            return Err(format!("{what} must be 1 to {MAX_NAME} bytes"));
        }
    }
    if w.end_unix_ms < w.start_unix_ms {
        return Err("it ends before it starts".into());
    }
    if w.errors > w.requests {
        return Err(format!("{} errors out of {} requests", w.errors, w.requests));
    }
    let sketch = |what: &str, s: Option<&sentinel_proto::pb::LatencySketch>| {
        s.map_or(Ok(Sketch::new()), |s| Sketch::from_pb(s).map_err(|e| format!("{what} sketch: {e}")))
    };
    let latency = sketch("latency", w.latency.as_ref())?;
    let compute = sketch("compute", w.compute.as_ref())?;
    let age = sent_at_ms.saturating_sub(w.end_unix_ms).max(0);
    let at_ms = now_ms.saturating_sub(age);
    if at_ms < retention.cutoff(Resolution::Coarse, now_ms) {
        return Err(format!("it ended {} s before its report, past the retention", age / 1000));
    }
    let validation = (w.validation_samples > 0 && w.validation_accuracy.is_finite())
        .then_some((w.validation_accuracy.clamp(0.0, 1.0), w.validation_samples));
    Ok(Window {
        model: w.model.clone(),
        version: w.version.clone(),
        seq: w.seq,
        at_ms,
        counts: Counts {
            requests: w.requests,
            errors: w.errors,
            feedback_correct: w.feedback_correct.min(w.feedback_total),
            feedback_total: w.feedback_total,
            agreement_agreed: w.agreement_agreed.min(w.agreement_total),
            agreement_total: w.agreement_total,
            restarts: w.restarts,
        },
        latency,
        compute,
        validation,
        rss_bytes: w.rss_bytes,
    })
}

/// Buckets combined across devices: per model and version, per bucket start.
#[derive(Debug, Default)]
pub struct Series {
    points: BTreeMap<(String, String), BTreeMap<i64, Point>>,
}

/// One combined bucket.
#[derive(Debug, Clone, Default)]
struct Point {
    counts: Counts,
    latency: Sketch,
    compute: Sketch,
    /// Sum of accuracy x samples and of samples, for a weighted mean.
    validation: (f64, u64),
    rss_max_bytes: u64,
    devices: BTreeSet<String>,
}

impl Series {
    /// Adds a stored bucket.
    pub fn add(&mut self, b: &Bucket) {
        let p = self.points.entry((b.model.clone(), b.version.clone())).or_default().entry(b.bucket_ms).or_default();
        p.counts.add(&b.counts);
        p.latency.merge(&b.latency);
        p.compute.merge(&b.compute);
        if let Some((acc, n)) = b.validation {
            #[allow(clippy::cast_precision_loss)] // sample counts far below 2^52
            let weighted = acc * n as f64;
            p.validation = (p.validation.0 + weighted, p.validation.1.saturating_add(n));
        }
        p.rss_max_bytes = p.rss_max_bytes.max(b.rss_max_bytes);
        if !p.devices.contains(&b.device_id) {
            p.devices.insert(b.device_id.clone());
        }
    }

    /// Model and version pairs seen, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &(String, String)> {
        self.points.keys()
    }

    /// The JSON series: one entry per model and version, its points in time order.
    pub fn to_json(&self, width_ms: i64) -> Value {
        Value::Array(
            self.points
                .iter()
                .map(|((model, version), points)| {
                    json!({
                        "model": model,
                        "version": version,
                        "points": points.iter().map(|(t, p)| point_json(*t, width_ms, p)).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

fn ratio(part: u64, total: u64) -> Value {
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    if total == 0 { Value::Null } else { json!(part as f64 / total as f64) }
}

fn millis(s: &Sketch, q: f64) -> Value {
    s.quantile(q).map_or(Value::Null, |d| json!((d.as_secs_f64() * 1e6).round() / 1e3))
}

fn point_json(t_ms: i64, width_ms: i64, p: &Point) -> Value {
    let c = &p.counts;
    json!({
        "t_ms": t_ms,
        "width_ms": width_ms,
        "devices": p.devices.len(),
        "requests": c.requests,
        "errors": c.errors,
        "error_rate": ratio(c.errors, c.requests),
        "latency_ms": {"p50": millis(&p.latency, 0.5), "p95": millis(&p.latency, 0.95), "p99": millis(&p.latency, 0.99)},
        "compute_ms": {"p50": millis(&p.compute, 0.5), "p95": millis(&p.compute, 0.95)},
        "feedback": {"correct": c.feedback_correct, "total": c.feedback_total, "accuracy": ratio(c.feedback_correct, c.feedback_total)},
        "agreement": {"agreed": c.agreement_agreed, "total": c.agreement_total, "rate": ratio(c.agreement_agreed, c.agreement_total)},
        "validation": if p.validation.1 == 0 {
            Value::Null
        } else {
            #[allow(clippy::cast_precision_loss)]
            let mean = p.validation.0 / p.validation.1 as f64;
            json!({"accuracy": mean, "samples": p.validation.1})
        },
        "restarts": c.restarts,
        "rss_max_bytes": p.rss_max_bytes,
    })
}

/// How the series' percentiles are combined, for the API's answers.
pub const COMBINATION: &str = "Latency percentiles are read from log-bucketed histograms (bucket ratio 2^(1/8)) \
    merged across windows and devices by adding counts: each is the nearest-rank percentile of every request \
    in the bucket, within 4.4%. Rates are totals over totals; validation accuracy is weighted by samples; \
    rss_max_bytes is the largest single report.";

/// A device's state change under a deployment, as the hub recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub device_id: String,
    pub state: String,
    pub at_ms: i64,
}

/// Devices by state at the end of each bucket from `from_ms` to `to_ms`:
/// each device counts in the last state it entered by then.
pub fn states_over_time(transitions: &[Transition], from_ms: i64, to_ms: i64, width_ms: i64) -> Value {
    let width = width_ms.max(1);
    let mut sorted: Vec<&Transition> = transitions.iter().collect();
    sorted.sort_by_key(|t| t.at_ms);
    let mut current: BTreeMap<&str, &str> = BTreeMap::new();
    let mut next = sorted.into_iter().peekable();
    let mut out = Vec::new();
    let mut t = from_ms.saturating_sub(from_ms.rem_euclid(width));
    while t <= to_ms {
        let end = t.saturating_add(width);
        if end == t {
            break; // at the end of time
        }
        while let Some(tr) = next.next_if(|tr| tr.at_ms < end) {
            current.insert(&tr.device_id, &tr.state);
        }
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for state in current.values() {
            *counts.entry(state).or_insert(0) += 1;
        }
        out.push(json!({"t_ms": t, "counts": counts}));
        t = end;
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::pb::LatencySketch;

    fn sketch_of(us: &[u64]) -> Sketch {
        let mut s = Sketch::new();
        for v in us {
            s.record(Duration::from_micros(*v));
        }
        s
    }

    fn window(model: &str, version: &str, end: i64) -> SlotWindow {
        SlotWindow {
            model: model.into(),
            version: version.into(),
            start_unix_ms: end - 15_000,
            end_unix_ms: end,
            requests: 4,
            errors: 1,
            latency: Some(sketch_of(&[1000, 2000, 3000]).to_pb()),
            ..SlotWindow::default()
        }
    }

    #[test]
    fn windows_are_placed_by_their_age_on_the_hubs_clock() {
        let r = Retention::default();
        // The device's clock is a day behind; its window ended 5 s before it sent.
        let device_now = 1_000_000_000;
        let hub_now = device_now + 86_400_000;
        let (ok, refused) = accept(&[window("m", "1", device_now - 5_000)], device_now, hub_now, &r);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(ok[0].at_ms, hub_now - 5_000);
        // A window "from the future" is placed at receipt.
        let (ok, _) = accept(&[window("m", "1", device_now + 60_000)], device_now, hub_now, &r);
        assert_eq!(ok[0].at_ms, hub_now);
    }

    #[test]
    fn each_bad_window_is_refused_with_why_and_the_rest_kept() {
        let r = Retention::default();
        let now = 10_000_000_000;
        let bad_sketch =
            SlotWindow { latency: Some(LatencySketch { index: vec![1, 2], count: vec![1] }), ..window("m", "1", now) };
        let cases = [
            (window("", "1", now), "model must be"),
            (window("m", &"v".repeat(300), now), "version must be"),
            (SlotWindow { start_unix_ms: now + 1, ..window("m", "1", now) }, "ends before it starts"),
            (SlotWindow { errors: 9, ..window("m", "1", now) }, "9 errors out of 4 requests"),
            (bad_sketch, "latency sketch: 2 bucket indexes but 1 counts"),
            (window("m", "1", now - 31 * 86_400_000), "past the retention"),
        ];
        for (w, why) in cases {
            let (ok, refused) = accept(&[w, window("m", "1", now)], now, now, &r);
            assert_eq!(ok.len(), 1, "the good window is kept");
            assert_eq!(refused.len(), 1);
            assert!(refused[0].contains(why), "{refused:?} should say {why}");
        }
        let many = vec![window("m", "1", now); MAX_WINDOWS_PER_REPORT + 3];
        let (ok, refused) = accept(&many, now, now, &r);
        assert_eq!(ok.len(), MAX_WINDOWS_PER_REPORT);
        assert_eq!(refused, ["3 windows past the first 1024 of one report"]);
    }

    #[test]
    fn buckets_add_windows_and_a_series_combines_devices_exactly() {
        let r = Retention::default();
        let now = 3_600_000 * 1000 + 30_000;
        let (ws, _) = accept(&[window("m", "1", now), window("m", "1", now)], now, now, &r);
        let mut a = Bucket::empty("dev-a", &ws[0], Resolution::Fine, &r);
        for w in &ws {
            a.absorb(w);
        }
        assert_eq!(a.bucket_ms, now - 30_000);
        assert_eq!((a.counts.requests, a.counts.errors, a.latency.count()), (8, 2, 6));
        let mut b = a.clone();
        b.device_id = "dev-b".into();
        b.latency = sketch_of(&[100_000; 6]);
        let mut s = Series::default();
        s.add(&a);
        s.add(&b);
        let v = s.to_json(60_000);
        let p = &v[0]["points"][0];
        assert_eq!((p["devices"].as_u64(), p["requests"].as_u64(), p["errors"].as_u64()), (Some(2), Some(16), Some(4)));
        assert_eq!(p["error_rate"], 0.25);
        // 12 latencies: 6 of 1–3 ms on dev-a, 6 of 100 ms on dev-b: the median is
        // the 6th value (3 ms), the p95 is 100 ms, each within the sketch's bound.
        let p50 = p["latency_ms"]["p50"].as_f64().expect("p50");
        let p95 = p["latency_ms"]["p95"].as_f64().expect("p95");
        assert!((p50 - 3.0).abs() <= 3.0 * RELATIVE_ERROR + 1e-3, "{p50}");
        assert!((p95 - 100.0).abs() <= 100.0 * RELATIVE_ERROR + 1e-3, "{p95}");
    }

    #[test]
    fn devices_by_state_follow_their_last_transition_in_each_bucket() {
        let t = |d: &str, s: &str, at| Transition { device_id: d.into(), state: s.into(), at_ms: at };
        let v = states_over_time(
            &[t("a", "downloading", 10), t("b", "downloading", 20), t("a", "serving", 70), t("b", "rolled_back", 130)],
            0,
            150,
            60,
        );
        assert_eq!(v[0]["counts"], json!({"downloading": 2}));
        assert_eq!(v[1]["counts"], json!({"serving": 1, "downloading": 1}));
        assert_eq!(v[2]["counts"], json!({"serving": 1, "rolled_back": 1}));
        assert_eq!(v.as_array().map(Vec::len), Some(3));
        // The ends of time neither overflow nor loop.
        assert_eq!(states_over_time(&[], i64::MIN, i64::MIN + 1, 60).as_array().map(Vec::len), Some(1));
        assert_eq!(states_over_time(&[], i64::MAX - 1, i64::MAX, 60).as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn pruning_cutoffs_fall_on_bucket_starts() {
        let r = Retention::default();
        let now = 40 * 86_400_000 + 12_345;
        assert_eq!(r.cutoff(Resolution::Fine, now), r.bucket_of(Resolution::Fine, now - 86_400_000));
        assert_eq!(r.cutoff(Resolution::Coarse, now) % 3_600_000, 0);
        assert_eq!(r.bucket_of(Resolution::Fine, i64::MIN), i64::MIN, "saturates, never overflows");
    }
}
