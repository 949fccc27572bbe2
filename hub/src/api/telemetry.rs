//! `GET /api/v1/devices/{id}/telemetry` and `GET /api/v1/deployments/{id}/telemetry`:
//! device telemetry over time (see [`crate::telemetry`]).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiPath, ApiQuery, Caller, SharedState};
use crate::auth::Role;
use crate::service::telemetry::{self as series, Range};

/// A time range and resolution, and which model and version of a device.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeviceRangeParams {
    /// Start, Unix milliseconds (default: an hour before `to_ms`).
    pub from_ms: Option<i64>,
    /// End, Unix milliseconds (default: now).
    pub to_ms: Option<i64>,
    /// `fine`, `coarse` or `auto` (default): fine while the range is within
    /// the fine retention and 1,500 fine buckets.
    #[param(pattern = "^(fine|coarse|auto)$")]
    pub resolution: Option<String>,
    /// Only this model.
    #[param(min_length = 1, max_length = 128)]
    pub model: Option<String>,
    /// Only this version.
    #[param(min_length = 1, max_length = 256)]
    pub version: Option<String>,
}

/// A time range and resolution. A deployment's telemetry is of its own
/// model, every version.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// Start, Unix milliseconds (default: a quarter of an hour before the
    /// deployment was created).
    pub from_ms: Option<i64>,
    /// End, Unix milliseconds (default: now).
    pub to_ms: Option<i64>,
    /// `fine`, `coarse` or `auto` (default): fine while the range is within
    /// the fine retention and 1,500 fine buckets.
    #[param(pattern = "^(fine|coarse|auto)$")]
    pub resolution: Option<String>,
}

/// Telemetry over time: per model and version, one point per bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryOut {
    /// The device (a device's telemetry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The deployment, its model and version, and how many devices it
    /// reached (a deployment's telemetry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// `fine` or `coarse`.
    pub resolution: String,
    /// Width of each bucket, milliseconds.
    pub bucket_ms: i64,
    pub from_ms: i64,
    pub to_ms: i64,
    /// How percentiles and rates are combined across windows and devices.
    pub combination: String,
    /// Per model and version: `points`, each with `t_ms`, `devices`,
    /// `requests`, `errors`, `error_rate`, `latency_ms` {p50, p95, p99},
    /// `compute_ms` {p50, p95}, `feedback`, `agreement`, `validation`,
    /// `restarts` and `rss_max_bytes`.
    #[schema(value_type = Vec<Object>)]
    pub series: serde_json::Value,
    /// A deployment's devices by state at the end of each bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub states: Option<serde_json::Value>,
}

impl From<series::Answer> for TelemetryOut {
    fn from(a: series::Answer) -> Self {
        Self {
            combination: a.combination().to_owned(),
            device_id: a.device_id,
            deployment_id: a.deployment_id,
            model: a.model,
            version: a.version,
            devices: a.devices,
            resolution: a.resolution.as_str().to_owned(),
            bucket_ms: a.bucket_ms,
            from_ms: a.from_ms,
            to_ms: a.to_ms,
            series: a.series,
            states: a.states,
        }
    }
}

fn range(
    (from_ms, to_ms, resolution): (Option<i64>, Option<i64>, Option<&str>),
    default_span_ms: Option<i64>,
    state: &SharedState,
) -> Result<Option<Range>, ApiError> {
    let retention = state.config().telemetry;
    let to = to_ms.unwrap_or_else(crate::now_ms);
    let from = match (from_ms, default_span_ms) {
        (Some(f), _) => f,
        (None, Some(span)) => to.saturating_sub(span),
        (None, None) if to_ms.is_none() && resolution.is_none() => return Ok(None),
        (None, None) => to.saturating_sub(3_600_000),
    };
    Range::new(from, to, resolution, &retention)
        .map(Some)
        .map_err(|e| ApiError::unprocessable("bad_range", e.to_string()))
}

/// One device's telemetry over time, per model and version.
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", params(super::openapi::DevicePath, DeviceRangeParams),
    security(("bearer" = [])),
    responses((status = 200, body = TelemetryOut), (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)))]
pub async fn device(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    query: Result<ApiQuery<DeviceRangeParams>, ApiError>,
) -> Result<Json<TelemetryOut>, ApiError> {
    caller.require(Role::Viewer, "reading device telemetry")?;
    let ApiQuery(p) = query?;
    for (name, value, most) in [("model", &p.model, 128), ("version", &p.version, 256)] {
        if value.as_ref().is_some_and(|v| v.is_empty() || v.len() > most) {
            return Err(ApiError::bad_request(format!("{name} must be 1 to {most} bytes when given")));
        }
    }
    let asked = (p.from_ms, p.to_ms, p.resolution.as_deref());
    let r = range(asked, Some(3_600_000), &state)?.ok_or_else(|| ApiError::bad_request("no range"))?;
    let i = id.clone();
    if state.meta(move |m| m.get_device(&i)).await?.is_none() {
        return Err(ApiError::not_found(format!("device {} is not enrolled", sentinel_proto::quote(&id))));
    }
    Ok(Json(series::device(&state, id, p.model, p.version, r).await?.into()))
}

/// A deployment's telemetry over time: per version of its model (the new one
/// and those it replaces), combined across the devices it reached, and its
/// devices by state.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/telemetry", params(super::openapi::IdPath, RangeParams),
    security(("bearer" = [])),
    responses((status = 200, body = TelemetryOut), (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)))]
pub async fn deployment(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
    query: Result<ApiQuery<RangeParams>, ApiError>,
) -> Result<Json<TelemetryOut>, ApiError> {
    caller.require(Role::Viewer, "reading deployment telemetry")?;
    let ApiQuery(p) = query?;
    let r = range((p.from_ms, p.to_ms, p.resolution.as_deref()), None, &state)?;
    let v = series::deployment(&state, id, r).await?;
    Ok(Json(v.ok_or_else(|| ApiError::not_found(format!("deployment {id} does not exist")))?.into()))
}
