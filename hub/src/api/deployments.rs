//! Deployments: which model version should run on which devices.
//!
//! A deployment is a record: model, version, target selector, rollout
//! policy, halt thresholds, who, when, state. Deploying to a target
//! supersedes the active deployment of the same model to the same target;
//! rolling back replaces it with an earlier version and marks it
//! `rolled_back`. The hub itself halts a deployment too many devices rolled
//! back or failed ([`crate::service::deployments`]); `GET /deployments/{id}` shows where
//! it stands on each targeted device.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::AuditDetail;
use super::versions::load_named_version;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, SharedState, page};
use crate::auth::Role;
use crate::rollout::{DEFAULT_HALT_FRACTION, PolicyError, RolloutPolicy, validate_halt};
use crate::rollup::{Rollup, earlier_deployments};
use crate::selector::{Selector, SelectorError, deprecated_ring_warning};
use crate::service::deployments;
use crate::store::{DeploymentKind, DeploymentRecord, DeploymentState, NewDeployment};
use sentinel_proto::quote;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeploymentOut {
    pub id: i64,
    pub model: String,
    pub version: String,
    /// Normalised selector, e.g. `ring=production,site=a`; empty selects every device.
    pub target: String,
    /// `deploy` or `rollback`.
    pub kind: String,
    /// `active`, `superseded`, `rolled_back`, `halted` or `cancelled`.
    pub state: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub replaces: Option<i64>,
    /// The rollout policy sent to devices; absent: the agent's defaults.
    pub policy: Option<RolloutPolicy>,
    /// Halts when more than this fraction of targeted devices rolled back or failed.
    pub halt_fraction: f64,
    /// Halts when at least this many targeted devices rolled back or failed.
    pub halt_count: Option<u32>,
    /// Why the hub halted it (state `halted`).
    pub halt_reason: Option<String>,
    /// Staged rollout: cumulative percentages of the targeted devices
    /// (e.g. `[10, 50, 100]`); empty: every device at once.
    pub waves: Vec<u8>,
    /// Index of the current wave in `waves`.
    pub wave: u32,
    /// The policy devices apply, every default filled in (in `GET
    /// /deployments/{id}` and the deploy answer): phases named without
    /// `min_samples`/`bake_seconds` get 100 samples and 30 s each; no phases
    /// means `["full"]` on 200 samples; `min_accuracy` defaults to the
    /// version's declared accuracy minus 0.02 (the device's
    /// `serving.validation_tolerance`), applied in every phase once
    /// `min_accuracy_samples` feedback samples arrived; `max_latency_ratio`
    /// and `max_accuracy_drop` appear only with a shadow or canary phase
    /// (in `full` the old version answers nothing to compare with, and such
    /// a policy is refused at deploy). A device whose config has a
    /// `[rollout]` section fills a deployment without policy from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_policy: Option<RolloutPolicy>,
    /// Where it stands on each targeted device (only in `GET /deployments/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Rollup>,
    /// What the caller should know, said at deploy or rollback (only in
    /// their answer): e.g. symbolic input dims no serving shape fixes, or a
    /// target that used the old label key `stage` for `ring`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl From<DeploymentRecord> for DeploymentOut {
    fn from(d: DeploymentRecord) -> Self {
        Self {
            id: d.id,
            model: d.model,
            version: d.version,
            target: d.target,
            kind: d.kind.as_str().to_owned(),
            state: d.state.as_str().to_owned(),
            created_by: d.created_by,
            created_at_ms: d.created_at_ms,
            updated_at_ms: d.updated_at_ms,
            replaces: d.replaces,
            policy: d.policy,
            halt_fraction: d.halt_fraction,
            halt_count: d.halt_count,
            halt_reason: d.halt_reason,
            waves: d.waves,
            wave: d.wave,
            effective_policy: None,
            status: None,
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<DeploymentOut>,
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub version: String,
    /// Label selector (`ring=production,site=a`, or a bare ring name);
    /// `hardware=TAG` requires that hardware; `*` selects every device. The
    /// old key `stage` reads as `ring`, with a warning, until the next release.
    /// Required: an empty or absent target is refused, so that forgetting it
    /// never deploys to the whole fleet.
    #[schema(value_type = super::openapi::Target, required = true)]
    pub target: Option<String>,
    /// How devices move traffic to the version and when they give up on it;
    /// absent: the agent's defaults.
    pub policy: Option<RolloutPolicy>,
    /// Halt when more than this fraction (0..=1) of targeted devices rolled
    /// back or failed. Default 0.2.
    #[schema(minimum = 0, maximum = 1)]
    pub halt_fraction: Option<f64>,
    /// Also halt when at least this many targeted devices rolled back or
    /// failed (1..=1000000).
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub halt_count: Option<u32>,
    /// Staged rollout: cumulative percentages of the targeted devices,
    /// strictly increasing, ending at 100 (e.g. `[10, 50, 100]`). The
    /// deployment widens to the next wave once every device of the current
    /// one serves the version; devices outside it keep the version it
    /// replaces. Absent or empty: every targeted device at once.
    #[serde(default)]
    pub waves: Vec<u8>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Version to go back to; default: the version deployed to the target
    /// before the current one.
    pub version: Option<String>,
    /// Target whose deployment to roll back (`*`: the one to every device);
    /// needed when the model is deployed to several targets. The old key
    /// `stage` reads as `ring`, with a warning.
    #[schema(value_type = Option<super::openapi::Target>)]
    pub target: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only deployments of this model.
    pub model: Option<String>,
    /// `active`, `superseded`, `rolled_back`, `halted` or `cancelled`.
    #[param(value_type = Option<super::openapi::DeploymentState>)]
    pub state: Option<String>,
    /// Page size, 1..=500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Deployments to skip, 0..=2147483647 (default 0).
    #[param(minimum = 0, maximum = 2_147_483_647)]
    pub offset: Option<u32>,
}

/// What a target selector selects every device with.
pub const EVERY_DEVICE: &str = "*";

/// Parses a target selector; `*` selects every device, and an empty one is
/// refused rather than read as "every device". Also returns the warning for
/// a target that used the old key `stage` for `ring`, if it did.
fn parse_target(target: &str) -> Result<(Selector, Option<String>), ApiError> {
    let missing = || {
        ApiError::unprocessable(
            "missing_target",
            "target is empty; name the devices (e.g. ring=production or site=a,ring=canary), \
             or pass `*` for every device",
        )
    };
    match target.trim_matches(' ') {
        "" => Err(missing()),
        EVERY_DEVICE => Ok((Selector::default(), None)),
        _ => match Selector::parse_noting(target) {
            // Only commas and spaces: as empty as "".
            Ok((s, _)) if s == Selector::default() => Err(missing()),
            Ok((s, deprecated)) => {
                let warning = deprecated.then(|| deprecated_ring_warning(&format!("target {}", quote(target))));
                Ok((s, warning))
            }
            Err(e @ SelectorError::Duplicate(_)) => Err(ApiError::unprocessable("invalid_target", e.to_string())),
            Err(e) => Err(ApiError::bad_request(format!("target {}: {e}", quote(target)))),
        },
    }
}

fn invalid_policy(e: PolicyError) -> ApiError {
    ApiError::unprocessable("invalid_policy", e.to_string())
}

/// The accuracy a stored signed manifest declares, if any.
fn declared_accuracy(manifest: &[u8]) -> Option<f64> {
    use prost::Message;
    sentinel_proto::pb::ModelManifest::decode(manifest).ok()?.accuracy.map(|a| a.value).filter(|v| *v > 0.0)
}

fn created_with(d: DeploymentRecord, detail: String, effective: RolloutPolicy, warnings: Vec<String>) -> Response {
    let mut out = DeploymentOut::from(d);
    out.effective_policy = Some(effective);
    out.warnings = warnings;
    let mut resp = (StatusCode::CREATED, Json(out)).into_response();
    resp.extensions_mut().insert(AuditDetail(detail));
    resp
}

/// Deploy a version to the devices a target selector matches.
#[utoipa::path(post, path = "/api/v1/models/{name}/deploy", params(super::openapi::ModelPath), request_body = DeployRequest, security(("bearer" = [])),
    responses((status = 201, body = DeploymentOut), (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)))]
pub async fn deploy(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<DeployRequest>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Deployer, "deploying")?;
    let ApiJson(body) = body?;
    let (selector, target_warning) = parse_target(body.target.as_deref().unwrap_or_default())?;
    if let Some(p) = &body.policy {
        p.validate().map_err(invalid_policy)?;
    }
    let halt_fraction = body.halt_fraction.unwrap_or(DEFAULT_HALT_FRACTION);
    validate_halt(halt_fraction, body.halt_count).map_err(invalid_policy)?;
    crate::rollout::waves::validate_waves(&body.waves).map_err(invalid_policy)?;
    let version = load_named_version(&state, &name, &body.version).await?;
    let declared = declared_accuracy(&version.manifest);
    if let Some(p) = &body.policy {
        p.check_usable(declared).map_err(invalid_policy)?;
    }
    // A version that declares no hardware runs anywhere.
    if !version.hardware.is_empty()
        && let Some(missing) = selector.hardware.iter().find(|h| !version.hardware.contains(h))
    {
        return Err(ApiError::unprocessable(
            "hardware_mismatch",
            format!(
                "target requires hardware {}, but {name} {} declares only [{}]",
                quote(missing),
                body.version,
                version.hardware.join(", ")
            ),
        ));
    }
    let new = NewDeployment {
        model: name.clone(),
        version: body.version.clone(),
        target: selector.to_string(),
        kind: DeploymentKind::Deploy,
        created_by: caller.name.clone(),
        replaces: None,
        policy: body.policy,
        halt_fraction,
        halt_count: body.halt_count,
        waves: body.waves,
    };
    // A first wave may hold no device yet: then it widens at once.
    let d = deployments::create(&state, new).await?;
    let detail = format!("deployment {}: {name} {} to [{}]", d.id, d.version, d.target);
    let effective = d.policy.clone().unwrap_or_default().effective(declared);
    // Symbolic dims no serving shape fixes: devices without their own
    // `serving.input_shapes` will refuse the version. Said, not refused.
    let mut warnings = <sentinel_proto::pb::ModelManifest as prost::Message>::decode(version.manifest.as_slice())
        .map(|m| super::versions::open_dims_warnings(&m))
        .unwrap_or_default();
    if !warnings.is_empty() {
        tracing::warn!(model = %name, version = %d.version, warning = %warnings.join("; "), "deploying open dims");
    }
    warnings.extend(target_warning);
    Ok(created_with(d, detail, effective, warnings))
}

/// Roll a target back to an earlier version.
#[utoipa::path(post, path = "/api/v1/models/{name}/rollback", params(super::openapi::ModelPath), request_body = RollbackRequest,
    security(("bearer" = [])),
    responses((status = 201, body = DeploymentOut), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn rollback(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<RollbackRequest>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Deployer, "rolling back")?;
    let ApiJson(body) = body?;
    super::models::check_lookup_name(&name)?;
    let (wanted_target, target_warning) = match body.target.as_deref().map(parse_target).transpose()? {
        Some((selector, warning)) => (Some(selector.to_string()), warning),
        None => (None, None),
    };
    let n = name.clone();
    let (active, history) = state
        .meta(move |m| Ok((m.active_deployments(&n)?, m.list_deployments(Some(&n), None, u32::MAX, 0)?.0)))
        .await?;
    // Newest first: during a staged rollout the deployment it replaces is
    // still active for the same target, and the newest is the one to undo.
    let current = match &wanted_target {
        Some(t) => active.iter().find(|d| &d.target == t),
        None if active.iter().any(|d| d.target != active[0].target) => {
            let mut targets: Vec<String> = active.iter().map(|d| format!("[{}]", d.target)).collect();
            targets.dedup();
            return Err(ApiError::conflict(format!(
                "{name} is deployed to several targets ({}); say which with target",
                targets.join(", ")
            )));
        }
        None => active.first(),
    }
    .ok_or_else(|| {
        ApiError::conflict(format!(
            "{name} has no active deployment{} to roll back",
            wanted_target.as_ref().map(|t| format!(" to [{t}]")).unwrap_or_default()
        ))
    })?
    .clone();
    let to_version = match body.version {
        Some(v) => v,
        // The latest earlier deployment of another version to this target.
        None => earlier_deployments(&history, &current).map(|d| d.version.clone()).next().ok_or_else(|| {
            ApiError::conflict(format!(
                "no earlier version of {name} was deployed to [{}]; pass the version to roll back to",
                current.target
            ))
        })?,
    };
    let declared = declared_accuracy(&load_named_version(&state, &name, &to_version).await?.manifest);
    let new = NewDeployment {
        model: name.clone(),
        version: to_version.clone(),
        target: current.target.clone(),
        kind: DeploymentKind::Rollback,
        created_by: caller.name.clone(),
        replaces: Some(current.id),
        // The earlier version goes back with the agent's default policy.
        policy: None,
        halt_fraction: DEFAULT_HALT_FRACTION,
        halt_count: None,
        waves: Vec::new(),
    };
    let d = deployments::create(&state, new).await?;
    let detail =
        format!("deployment {}: rolled {name} back from {} to {} on [{}]", d.id, current.version, d.version, d.target);
    Ok(created_with(d, detail, RolloutPolicy::default().effective(declared), target_warning.into_iter().collect()))
}

/// List deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", params(ListParams), security(("bearer" = [])),
    responses((status = 200, body = DeploymentList)))]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    query: Result<ApiQuery<ListParams>, ApiError>,
) -> Result<Json<DeploymentList>, ApiError> {
    caller.require(Role::Viewer, "listing deployments")?;
    let ApiQuery(p) = query?;
    let wanted = p
        .state
        .as_deref()
        .map(|s| {
            s.parse::<DeploymentState>().map_err(|_| {
                let all: Vec<&str> = DeploymentState::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(format!("unknown state {}; use one of {}", quote(s), all.join(", ")))
            })
        })
        .transpose()?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let (rows, total) = state.meta(move |m| m.list_deployments(p.model.as_deref(), wanted, limit, offset)).await?;
    Ok(Json(DeploymentList { deployments: rows.into_iter().map(Into::into).collect(), total, limit, offset }))
}

/// Show one deployment, with where it stands on each targeted device.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", params(super::openapi::IdPath), security(("bearer" = [])),
    responses((status = 200, body = DeploymentOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<DeploymentOut>, ApiError> {
    caller.require(Role::Viewer, "reading a deployment")?;
    let found = deployments::status(&state, id).await?;
    let (d, status, manifest) = found.ok_or_else(|| ApiError::not_found(format!("deployment {id} does not exist")))?;
    let declared = manifest.and_then(|m| declared_accuracy(&m));
    let effective = d.policy.clone().unwrap_or_default().effective(declared);
    let mut out = DeploymentOut::from(d);
    out.effective_policy = Some(effective);
    out.status = Some(status);
    Ok(Json(out))
}
