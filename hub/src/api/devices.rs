//! `/api/v1/devices`: enrolment, and what each device last reported.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::AuditDetail;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, PageParams, SharedState, page, page_of};
use crate::auth::{Role, generate_token, hash_token};
use crate::selector::{DEPRECATED_RING, RING, RingLabel, deprecated_ring_warning, rename_deprecated_label};
use crate::service::fleet::Connection;
use crate::store::{DeploymentState, DeviceEvent, DeviceRecord};
use crate::targeting::{assignments_for, target_of};
use sentinel_proto::quote;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollDevice {
    /// Device id: letters, digits, '-', '_' and '.', at most 128 characters.
    #[schema(value_type = super::openapi::ModelName)]
    pub id: String,
    /// Labels deployments select on, e.g. {"site": "a", "ring": "production"}:
    /// keys and values of letters, digits, '-', '_', '.' or '/', 1 to 63;
    /// not `hardware` (422: devices report their hardware themselves). The
    /// old key `stage` is stored as `ring`, with a warning, until the next
    /// release (422 beside a `ring`).
    #[serde(default)]
    #[schema(schema_with = label_schema)]
    pub labels: BTreeMap<String, String>,
}

/// `labels`: an object whose keys and values are selector tokens.
fn label_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let token = || ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[A-Za-z0-9._/-]{1,63}$"));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(token()))
        .additional_properties(Some(token()))
        .build()
}

/// A new device and its token. The token is shown once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrolledDevice {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub token: String,
    /// What the caller should know: labels given under the old key `stage`,
    /// stored as `ring`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceOut {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub hardware: Vec<String>,
    pub agent_version: String,
    pub created_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    /// Whether the device has a live notification stream now.
    pub connected: bool,
    pub connected_since_ms: Option<i64>,
    /// The desired-state revision the device last applied.
    pub applied_revision: Option<u64>,
    /// Per model: version, state, detail (from the device's last report);
    /// empty before the first report.
    #[schema(value_type = Vec<Object>)]
    pub models: serde_json::Value,
    /// Newest first (only in `GET /devices/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub events: Option<Vec<DeviceEvent>>,
    /// What the hub wants the device to run now (only in `GET /devices/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<Vec<DesiredModel>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DesiredModel {
    pub model: String,
    pub version: String,
    pub deployment_id: i64,
}

fn device_out(state: &SharedState, d: DeviceRecord) -> DeviceOut {
    let conn: Option<Connection> = state.fleet().connection(&d.id);
    let report = d.report.unwrap_or(serde_json::Value::Null);
    DeviceOut {
        connected: conn.is_some(),
        connected_since_ms: conn.map(|c| c.connected_at_ms),
        applied_revision: report["applied_revision"].as_u64(),
        models: report.get("models").filter(|m| m.is_array()).cloned().unwrap_or(serde_json::json!([])),
        id: d.id,
        labels: d.labels,
        hardware: d.hardware,
        agent_version: d.agent_version,
        created_at_ms: d.created_at_ms,
        last_seen_ms: d.last_seen_ms,
        events: None,
        desired: None,
    }
}

/// Enrol a device (admin). Returns its token, once.
#[utoipa::path(post, path = "/api/v1/devices", request_body = EnrollDevice, security(("bearer" = [])),
    responses((status = 201, body = EnrolledDevice), (status = 409, body = super::error::ErrorBody)))]
pub async fn enroll(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<EnrollDevice>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "enrolling devices")?;
    let ApiJson(mut body) = body?;
    sentinel_proto::manifest::validate_model_name(&body.id)
        .map_err(|reason| ApiError::bad_request(format!("device id {} {reason}", quote(&body.id))))?;
    for (k, v) in &body.labels {
        if !crate::selector::valid_token(k) || !crate::selector::valid_token(v) {
            return Err(ApiError::bad_request(format!(
                "label {}={} is invalid: keys and values are letters, digits, '-', '_', '.' or '/', 1 to 63",
                quote(k),
                quote(v)
            )));
        }
    }
    if body.labels.contains_key("hardware") {
        return Err(ApiError::unprocessable(
            "invalid_label",
            "`hardware` is not a label: devices report their hardware themselves",
        ));
    }
    let warnings = match rename_deprecated_label(&mut body.labels) {
        RingLabel::Unchanged => Vec::new(),
        RingLabel::Renamed => vec![deprecated_ring_warning("labels")],
        RingLabel::Both => {
            return Err(ApiError::unprocessable(
                "invalid_label",
                format!("labels give both `{RING}` and its old name `{DEPRECATED_RING}`: give `{RING}` alone"),
            ));
        }
    };
    let token = generate_token();
    let hash = hash_token(&token);
    let by = caller.name.clone();
    let l = body.labels.clone();
    let id = body.id.clone();
    let d = state.meta(move |m| m.enroll_device(&id, &l, &hash, &by, crate::now_ms())).await?;
    let mut resp = (StatusCode::CREATED, Json(EnrolledDevice { id: d.id.clone(), labels: d.labels, token, warnings }))
        .into_response();
    resp.extensions_mut().insert(AuditDetail(format!("enrolled device {}", d.id)));
    Ok(resp)
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<DeviceOut>,
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

/// List devices with their connection state and what they run, one page at a time.
#[utoipa::path(get, path = "/api/v1/devices", params(PageParams), security(("bearer" = [])),
    responses((status = 200, body = DeviceList)))]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    query: Result<ApiQuery<PageParams>, ApiError>,
) -> Result<Json<DeviceList>, ApiError> {
    caller.require(Role::Viewer, "listing devices")?;
    let ApiQuery(p) = query?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let (devices, total) = page_of(state.meta(|m| m.list_devices()).await?, limit, offset);
    Ok(Json(DeviceList { devices: devices.into_iter().map(|d| device_out(&state, d)).collect(), total, limit, offset }))
}

/// One device: last report, recent events, and what it should run.
#[utoipa::path(get, path = "/api/v1/devices/{id}", params(super::openapi::DevicePath), security(("bearer" = [])),
    responses((status = 200, body = DeviceOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceOut>, ApiError> {
    caller.require(Role::Viewer, "reading a device")?;
    let i = id.clone();
    let (device, active) = state
        .meta(move |m| {
            let d = m.device_with_events(&i, 100)?;
            let a = m.list_deployments(None, Some(DeploymentState::Active), u32::MAX, 0)?.0;
            Ok((d, a))
        })
        .await?;
    let (device, events) =
        device.ok_or_else(|| ApiError::not_found(format!("device {} is not enrolled", quote(&id))))?;
    let hello: Option<sentinel_proto::pb::Hello> = device.hello.clone().and_then(|h| serde_json::from_value(h).ok());
    let target = target_of(&device, hello.as_ref());
    let st = state.clone();
    let desired = tokio::task::spawn_blocking(move || {
        assignments_for(&active, &mut |m, v| st.metadata().get_version(m, v), &target)
    })
    .await
    .map_err(|e| ApiError::internal("computing desired state", &e))??;
    let mut out = device_out(&state, device);
    out.events = Some(events);
    out.desired = Some(
        desired
            .into_iter()
            .map(|a| DesiredModel {
                model: a.version.model,
                version: a.version.version,
                deployment_id: a.deployment.id,
            })
            .collect(),
    );
    Ok(Json(out))
}

/// Remove a device (admin): its token stops working and its stream closes.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", params(super::openapi::DevicePath), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)))]
pub async fn remove(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "removing devices")?;
    let i = id.clone();
    state.meta(move |m| m.remove_device(&i)).await?;
    state.fleet().disconnect(&id);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(AuditDetail(format!("removed device {id}")));
    Ok(resp)
}

/// Whether `caller`, if it is a device, may fetch `model` `version`: only
/// what its own desired state names.
pub async fn device_may_fetch(
    state: &SharedState,
    caller: &Caller,
    model: &str,
    version: &str,
) -> Result<(), ApiError> {
    let Some(id) = caller.device_id.clone() else {
        return caller.require(Role::Viewer, "downloading a model");
    };
    let st = state.clone();
    let (m, v) = (model.to_owned(), version.to_owned());
    let allowed = tokio::task::spawn_blocking(move || -> Result<bool, crate::store::StoreError> {
        let Some(device) = st.metadata().get_device(&id)? else { return Ok(false) };
        let hello: Option<sentinel_proto::pb::Hello> =
            device.hello.clone().and_then(|h| serde_json::from_value(h).ok());
        let target = target_of(&device, hello.as_ref());
        let active = st.metadata().list_deployments(Some(&m), Some(DeploymentState::Active), u32::MAX, 0)?.0;
        let mine = assignments_for(&active, &mut |m, v| st.metadata().get_version(m, v), &target)?;
        Ok(mine.iter().any(|a| a.version.model == m && a.version.version == v))
    })
    .await
    .map_err(|e| ApiError::internal("checking device access", &e))??;
    if allowed {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{model} {version} is not in the desired state of {}; a device may fetch only what it is told to run",
            caller.name
        )))
    }
}
