//! Device telemetry: pruning on a timer, and the series the API serves
//! (see [`crate::telemetry`] for how buckets are kept and combined).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::{ServiceError, SharedState};
use crate::store::{Resolution, TelemetryQuery};
use crate::telemetry::{COMBINATION, Retention, Series, states_over_time};

/// Most buckets one series may answer with.
pub const MAX_POINTS: i64 = 1_500;

/// Prunes old buckets at start, then every fine bucket width (at most every
/// ten minutes), until the task is dropped.
pub async fn prune_forever(state: SharedState) {
    let retention = state.config().telemetry;
    let every = retention.fine_bucket.clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.meta(move |m| m.prune_telemetry(&retention, crate::now_ms())).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "pruned device telemetry"),
            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "pruning device telemetry failed; will retry"),
        }
    }
}

/// A time range and resolution a caller asked for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
    pub resolution: Resolution,
}

/// Why a range cannot be served (the API answers 422 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("from_ms ({from}) must be before to_ms ({to})")]
    Empty { from: i64, to: i64 },
    #[error("resolution must be fine, coarse or auto, not {0}")]
    Resolution(String),
    #[error(
        "{from_ms}..{to_ms} at {resolution} resolution is {points} buckets, more than {MAX_POINTS}: narrow the range \
         or ask for resolution=coarse"
    )]
    TooMany { from_ms: i64, to_ms: i64, resolution: &'static str, points: i64 },
}

impl Range {
    /// Checks a request: `resolution` is `fine`, `coarse`, or `auto`/absent
    /// (fine while the range is within the fine retention and
    /// [`MAX_POINTS`] fine buckets, else coarse).
    pub fn new(from_ms: i64, to_ms: i64, resolution: Option<&str>, r: &Retention) -> Result<Self, RangeError> {
        if from_ms >= to_ms {
            return Err(RangeError::Empty { from: from_ms, to: to_ms });
        }
        // Saturating: a caller may send any i64.
        let points = |res: Resolution| (to_ms.saturating_sub(from_ms) / r.width_ms(res)).saturating_add(1);
        let resolution = match resolution.unwrap_or("auto") {
            "fine" => Resolution::Fine,
            "coarse" => Resolution::Coarse,
            "auto" => {
                // A bucket's width of slack: "the last 24 h" asked a moment
                // ago still reads fine.
                let kept = r.keep_ms(Resolution::Fine) + r.width_ms(Resolution::Fine);
                let within = crate::now_ms().saturating_sub(from_ms) <= kept;
                if within && points(Resolution::Fine) <= MAX_POINTS { Resolution::Fine } else { Resolution::Coarse }
            }
            other => return Err(RangeError::Resolution(sentinel_proto::quote(other))),
        };
        let n = points(resolution);
        if n > MAX_POINTS {
            return Err(RangeError::TooMany { from_ms, to_ms, resolution: resolution.as_str(), points: n });
        }
        Ok(Self { from_ms, to_ms, resolution })
    }
}

/// A telemetry answer: the range served and the series over it; the API
/// shows it as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// What it is about: a device, or a deployment with its model, version
    /// and the devices it reached.
    pub device_id: Option<String>,
    pub deployment_id: Option<i64>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub devices: Option<u64>,
    pub resolution: Resolution,
    pub bucket_ms: i64,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Per model and version, its points ([`Series::to_json`]).
    pub series: Value,
    /// A deployment's devices by state per bucket ([`states_over_time`]).
    pub states: Option<Value>,
}

impl Answer {
    /// How percentiles and rates are combined ([`COMBINATION`]).
    pub fn combination(&self) -> &'static str {
        COMBINATION
    }

    fn over(range: Range, retention: &Retention, series: &Series) -> Self {
        let bucket_ms = retention.width_ms(range.resolution);
        Self {
            device_id: None,
            deployment_id: None,
            model: None,
            version: None,
            devices: None,
            resolution: range.resolution,
            bucket_ms,
            from_ms: range.from_ms,
            to_ms: range.to_ms,
            series: series.to_json(bucket_ms),
            states: None,
        }
    }
}

/// The stored buckets `q` selects, combined.
async fn series_of(state: &SharedState, q: TelemetryQuery) -> Result<Series, ServiceError> {
    state
        .meta(move |m| {
            let mut s = Series::default();
            m.visit_telemetry(&q, &mut |b| s.add(&b))?;
            Ok(s)
        })
        .await
}

/// One device's series: per model and version, each bucket as the device
/// reported it.
pub async fn device(
    state: &SharedState,
    device_id: String,
    model: Option<String>,
    version: Option<String>,
    range: Range,
) -> Result<Answer, ServiceError> {
    let retention = state.config().telemetry;
    let q = TelemetryQuery {
        devices: Some(vec![device_id.clone()]),
        model,
        version,
        resolution: range.resolution,
        from_ms: retention.bucket_of(range.resolution, range.from_ms),
        to_ms: range.to_ms,
    };
    let series = series_of(state, q).await?;
    Ok(Answer { device_id: Some(device_id), ..Answer::over(range, &retention, &series) })
}

/// A deployment's series: its model, per version, combined across the
/// devices it reached; and its devices by state over the same buckets.
/// `None` when the deployment does not exist.
pub async fn deployment(state: &SharedState, id: i64, range: Option<Range>) -> Result<Option<Answer>, ServiceError> {
    let retention = state.config().telemetry;
    let found = state
        .meta(move |m| {
            let Some(d) = m.get_deployment(id)? else { return Ok(None) };
            let transitions = m.deployment_transitions(id)?;
            let mut devices: BTreeSet<String> = transitions.iter().map(|t| t.device_id.clone()).collect();
            devices.extend(m.deployment_devices(id)?.into_iter().map(|x| x.device_id));
            Ok(Some((d, transitions, devices)))
        })
        .await?;
    let Some((d, transitions, devices)) = found else { return Ok(None) };
    // By default: from a quarter of an hour before the deployment (the old
    // version's baseline) to now.
    let range = match range {
        Some(r) => r,
        None => {
            let to = crate::now_ms();
            let from = d.created_at_ms.saturating_sub(15 * 60_000).min(to - 1);
            Range::new(from, to, None, &retention)
                .or_else(|_| Range::new(from, to, Some("coarse"), &retention))
                .unwrap_or(Range { from_ms: from, to_ms: to, resolution: Resolution::Coarse })
        }
    };
    let q = TelemetryQuery {
        devices: Some(devices.iter().cloned().collect()),
        model: Some(d.model.clone()),
        version: None,
        resolution: range.resolution,
        from_ms: retention.bucket_of(range.resolution, range.from_ms),
        to_ms: range.to_ms,
    };
    let series = series_of(state, q).await?;
    let answer = Answer::over(range, &retention, &series);
    let states = states_over_time(&transitions, range.from_ms, range.to_ms, answer.bucket_ms);
    Ok(Some(Answer {
        deployment_id: Some(d.id),
        model: Some(d.model),
        version: Some(d.version),
        devices: Some(devices.len() as u64),
        states: Some(states),
        ..answer
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_pick_a_resolution_and_refuse_what_cannot_be_served() {
        let r = Retention::default();
        let now = crate::now_ms();
        let hour = 3_600_000;
        assert_eq!(Range::new(now - hour, now, None, &r).map(|x| x.resolution), Ok(Resolution::Fine));
        // "The last day", asked a moment ago, is still fine.
        assert_eq!(Range::new(now - 24 * hour - 50, now, None, &r).map(|x| x.resolution), Ok(Resolution::Fine));
        // A week is past the fine retention: coarse.
        assert_eq!(Range::new(now - 168 * hour, now, None, &r).map(|x| x.resolution), Ok(Resolution::Coarse));
        assert_eq!(Range::new(now, now, None, &r), Err(RangeError::Empty { from: now, to: now }));
        assert!(matches!(Range::new(now - 168 * hour, now, Some("fine"), &r), Err(RangeError::TooMany { .. })));
        assert_eq!(Range::new(now - hour, now, Some("hourly"), &r), Err(RangeError::Resolution("\"hourly\"".into())));
        // The widest range a caller can send is refused, not overflowed.
        for res in [None, Some("fine"), Some("coarse")] {
            assert!(matches!(Range::new(i64::MIN, i64::MAX, res, &r), Err(RangeError::TooMany { .. })), "{res:?}");
        }
    }
}
