//! `/api/v1/models`: register, list, show, update and delete model names.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::AuditDetail;
use super::versions::VersionOut;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, SharedState, page};
use crate::auth::Role;
use crate::store::{ModelFilter, ModelRecord};
use sentinel_proto::quote;

/// A model name with its metadata; `versions` only in `GET /models/{name}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelOut {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// This model's own setting: every new version must carry a publisher
    /// signature (`--signature`). Whether a push needs one is
    /// `require_publisher_effective`: the hub may require it of every model.
    pub require_publisher: bool,
    /// Whether a push of a new version needs a publisher signature: this
    /// model's `require_publisher`, or the hub's `--require-publisher`.
    pub require_publisher_effective: bool,
    /// Who requires it: `hub` (every model, whatever the model says) or
    /// `model` (this model's `require_publisher` alone); null when nothing does.
    pub require_publisher_source: Option<RequirementSource>,
    pub version_count: usize,
    /// Highest semver among its versions.
    pub latest_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<VersionOut>>,
}

/// Who requires a model's new versions to carry a publisher signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RequirementSource {
    /// The hub, of every model (`sentinel-hub --require-publisher`): the
    /// model's own setting changes nothing while it does.
    Hub,
    /// This model's `require_publisher`.
    Model,
}

impl RequirementSource {
    /// Who requires a signature of a model whose own setting is `model`, on
    /// a hub whose `--require-publisher` is `hub`: the hub first, as a push
    /// is refused in its name first.
    pub fn of(hub: bool, model: bool) -> Option<Self> {
        match (hub, model) {
            (true, _) => Some(Self::Hub),
            (false, true) => Some(Self::Model),
            (false, false) => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelOut>,
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Substring of the model name.
    pub name: Option<String>,
    /// Only models with a version at this stage.
    #[param(value_type = Option<super::openapi::StageName>)]
    pub stage: Option<String>,
    /// Only models with a version that runs on this hardware tag.
    pub hardware: Option<String>,
    /// Page size, 1..=500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Models to skip, 0..=2147483647 (default 0).
    #[param(minimum = 0, maximum = 2_147_483_647)]
    pub offset: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    #[schema(value_type = super::openapi::ModelName)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    #[schema(value_type = Vec<super::openapi::Tag>)]
    pub tags: Vec<String>,
    /// Refuse any version pushed without a publisher signature.
    #[serde(default)]
    pub require_publisher: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateModel {
    pub description: Option<String>,
    #[schema(value_type = Option<Vec<super::openapi::Tag>>)]
    pub tags: Option<Vec<String>>,
    /// Refuse (true) or accept (false) new versions pushed without a
    /// publisher signature. Versions already registered are kept.
    pub require_publisher: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Delete even while versions are deployed (admin only).
    #[serde(default)]
    pub force: bool,
}

/// Checks a model name from a path or body.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    sentinel_proto::manifest::validate_model_name(name)
        .map_err(|reason| ApiError::bad_request(format!("model name {} {reason}", quote(name))))
}

/// Checks a model name a caller looks up (from a path): a name that cannot
/// exist is not found (404) rather than malformed.
pub fn check_lookup_name(name: &str) -> Result<(), ApiError> {
    sentinel_proto::manifest::validate_model_name(name)
        .map_err(|reason| ApiError::not_found(format!("no model is named {}: a model name {reason}", quote(name))))
}

/// Checks a list of free-form tags.
pub fn check_tags(what: &str, tags: &[String]) -> Result<(), ApiError> {
    for t in tags {
        // Characters, not bytes: what the OpenAPI description's pattern counts.
        if t.is_empty() || t.chars().count() > 64 || t.contains(',') || t.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "{what} {} is invalid: 1 to 64 characters, no commas or control characters",
                quote(t)
            )));
        }
    }
    Ok(())
}

/// `m` as the API shows it; `hub_requires` is the hub's `--require-publisher`.
fn model_out(m: ModelRecord, versions: Vec<VersionOut>, include: bool, hub_requires: bool) -> ModelOut {
    let source = RequirementSource::of(hub_requires, m.require_publisher);
    ModelOut {
        require_publisher_effective: source.is_some(),
        require_publisher_source: source,
        name: m.name,
        description: m.description,
        tags: m.tags,
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
        require_publisher: m.require_publisher,
        version_count: versions.len(),
        latest_version: versions.first().map(|v| v.version.clone()),
        versions: include.then_some(versions),
    }
}

/// Loads a model and its versions, or 404.
pub async fn load_model(state: &SharedState, name: &str) -> Result<(ModelRecord, Vec<VersionOut>), ApiError> {
    check_lookup_name(name)?;
    let n = name.to_owned();
    let (model, versions) = state.meta(move |m| Ok((m.get_model(&n)?, m.list_versions(&n)?))).await?;
    let model = model.ok_or_else(|| ApiError::not_found(format!("model {} is not registered", quote(name))))?;
    let versions = versions.iter().map(VersionOut::from_record).collect::<Result<Vec<_>, _>>()?;
    Ok((model, versions))
}

/// List models, filtered by name, stage and hardware, one page at a time.
#[utoipa::path(get, path = "/api/v1/models", params(ListParams), security(("bearer" = [])),
    responses((status = 200, body = ModelList), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    query: Result<ApiQuery<ListParams>, ApiError>,
) -> Result<Json<ModelList>, ApiError> {
    caller.require(Role::Viewer, "listing models")?;
    let ApiQuery(p) = query?;
    if let Some(stage) = &p.stage {
        sentinel_proto::manifest::parse_stage(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let (limit, offset) = page(p.limit, p.offset)?;
    let filter = ModelFilter { name: p.name, stage: p.stage, hardware: p.hardware, limit, offset };
    let (rows, total) = state
        .meta(move |m| {
            let (models, total) = m.list_models(&filter)?;
            let mut rows = Vec::with_capacity(models.len());
            for model in models {
                let versions = m.list_versions(&model.name)?;
                rows.push((model, versions));
            }
            Ok((rows, total))
        })
        .await?;
    let hub_requires = state.config().require_publisher;
    let mut models = Vec::with_capacity(rows.len());
    for (model, versions) in rows {
        let versions = versions.iter().map(VersionOut::from_record).collect::<Result<Vec<_>, _>>()?;
        models.push(model_out(model, versions, false, hub_requires));
    }
    Ok(Json(ModelList { models, total, limit, offset }))
}

/// Register a model name.
#[utoipa::path(post, path = "/api/v1/models", request_body = CreateModel, security(("bearer" = [])),
    responses((status = 201, body = ModelOut), (status = 409, body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<CreateModel>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Publisher, "registering a model")?;
    let ApiJson(body) = body?;
    check_name(&body.name)?;
    check_tags("tag", &body.tags)?;
    let now = crate::now_ms();
    let model = state
        .meta(move |m| {
            let model = m.create_model(&body.name, &body.description, &body.tags, now)?;
            if body.require_publisher { m.update_model(&model.name, None, None, Some(true), now) } else { Ok(model) }
        })
        .await?;
    let detail = AuditDetail(format!("registered model {}", model.name));
    let mut resp = (StatusCode::CREATED, Json(model_out(model, Vec::new(), true, state.config().require_publisher)))
        .into_response();
    resp.extensions_mut().insert(detail);
    Ok(resp)
}

/// Show a model with all its versions, newest first.
#[utoipa::path(get, path = "/api/v1/models/{name}", params(super::openapi::ModelPath), security(("bearer" = [])),
    responses((status = 200, body = ModelOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ModelOut>, ApiError> {
    caller.require(Role::Viewer, "reading a model")?;
    let (model, versions) = load_model(&state, &name).await?;
    Ok(Json(model_out(model, versions, true, state.config().require_publisher)))
}

/// Update a model's description or tags.
#[utoipa::path(put, path = "/api/v1/models/{name}", params(super::openapi::ModelPath), request_body = UpdateModel, security(("bearer" = [])),
    responses((status = 200, body = ModelOut), (status = 404, body = super::error::ErrorBody)))]
pub async fn update(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<UpdateModel>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Publisher, "editing a model")?;
    let ApiJson(body) = body?;
    check_lookup_name(&name)?;
    if let Some(tags) = &body.tags {
        check_tags("tag", tags)?;
    }
    // Only a change to the requirement needs what it was.
    let change = match body.require_publisher {
        None => None,
        Some(wanted) => {
            let n = name.clone();
            let before = state
                .meta(move |m| m.get_model(&n))
                .await?
                .ok_or_else(|| ApiError::not_found(format!("model {} is not registered", quote(&name))))?;
            // A pipeline's publisher token must not be able to turn off the
            // check that guards against it: lifting it is an admin's call.
            if !wanted && before.require_publisher {
                caller.require(Role::Admin, "lifting a model's publisher-signature requirement")?;
            }
            (wanted != before.require_publisher).then_some(wanted)
        }
    };
    let now = crate::now_ms();
    let n = name.clone();
    state
        .meta(move |m| {
            m.update_model(&n, body.description.as_deref(), body.tags.as_deref(), body.require_publisher, now)
        })
        .await?;
    let (model, versions) = load_model(&state, &name).await?;
    let mut resp = Json(model_out(model, versions, true, state.config().require_publisher)).into_response();
    if let Some(required) = change {
        let what = if required { "now requires" } else { "no longer requires" };
        resp.extensions_mut().insert(AuditDetail(format!("model {name} {what} a publisher signature")));
    }
    Ok(resp)
}

/// Delete a model and all its versions. Refused while any version is
/// deployed, unless an admin passes `?force=true`.
#[utoipa::path(delete, path = "/api/v1/models/{name}", params(super::openapi::ModelPath, DeleteParams), security(("bearer" = [])),
    responses((status = 204), (status = 409, body = super::error::ErrorBody)))]
pub async fn delete(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    // A result, so the role check comes first.
    query: Result<ApiQuery<DeleteParams>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "deleting a model")?;
    let ApiQuery(p) = query?;
    check_lookup_name(&name)?;
    let n = name.clone();
    let active = state.meta(move |m| m.active_deployments(&n)).await?;
    if !active.is_empty() && !p.force {
        let ids: Vec<String> = active.iter().map(|d| d.id.to_string()).collect();
        return Err(ApiError::conflict(format!(
            "model {} is deployed (active deployments {}); roll it back first, or delete it anyway with \
             `sentinel model delete --force` (`?force=true`)",
            quote(&name),
            ids.join(", ")
        )));
    }
    let n = name.clone();
    let freed = state.meta(move |m| m.delete_model(&n, crate::now_ms())).await?;
    crate::service::fleet::push_to_fleet(&state).await;
    let count = freed.len();
    state
        .blobs(move |b| {
            for sha in &freed {
                b.remove(sha)?;
            }
            Ok(())
        })
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(AuditDetail(format!(
        "deleted model {name}{}; freed {count} blobs",
        if p.force { " (forced)" } else { "" }
    )));
    Ok(resp)
}
