//! Publisher keys: who may sign models (OpenSSF model-signing, the `key`
//! method). A push with `--signature` is accepted only when its bundle
//! verifies with one of these; a model or the hub can require one.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sentinel_proto::publisher::PublisherKey;
use sentinel_proto::quote;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::AuditDetail;
use super::{ApiError, ApiJson, ApiPath, Caller, SharedState};
use crate::auth::Role;
use crate::store::PublisherRecord;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPublisher {
    /// Who signs with the key, e.g. `ml-training`; named in manifests.
    #[schema(value_type = super::openapi::ModelName)]
    pub name: String,
    /// The EC P-256 or P-384 public key, PEM (`openssl ec -in key.pem -pubout`).
    #[schema(max_length = 4096)]
    pub public_key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublisherOut {
    pub name: String,
    /// Hex SHA-256 of the PEM: model-signing's key hint.
    pub key_id: String,
    pub algorithm: String,
    pub public_key: String,
    pub created_at_ms: i64,
    pub created_by: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublisherList {
    pub publishers: Vec<PublisherOut>,
}

fn out(p: PublisherRecord) -> PublisherOut {
    let algorithm = PublisherKey::from_pem(&p.name, p.public_key.as_bytes())
        .map_or_else(|e| format!("unreadable: {e}"), |k| k.algorithm().to_owned());
    PublisherOut {
        name: p.name,
        key_id: p.key_id,
        algorithm,
        public_key: p.public_key,
        created_at_ms: p.created_at_ms,
        created_by: p.created_by,
    }
}

/// Register a publisher key (admin).
#[utoipa::path(post, path = "/api/v1/publishers", request_body = AddPublisher, security(("bearer" = [])),
    responses((status = 201, body = PublisherOut), (status = 409, description = "the name or the key is registered already", body = super::error::ErrorBody),
        (status = 422, description = "not an EC P-256/P-384 public key in PEM", body = super::error::ErrorBody)))]
pub async fn add(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    body: Result<ApiJson<AddPublisher>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "registering publisher keys")?;
    let ApiJson(body) = body?;
    sentinel_proto::manifest::validate_model_name(&body.name)
        .map_err(|reason| ApiError::bad_request(format!("publisher name {} {reason}", quote(&body.name))))?;
    let key = PublisherKey::from_pem(&body.name, body.public_key.as_bytes())
        .map_err(|e| ApiError::unprocessable("invalid_key", format!("publisher key: {e}")))?;
    let record = PublisherRecord {
        name: body.name.clone(),
        key_id: key.key_id.clone(),
        public_key: key.pem(),
        created_at_ms: crate::now_ms(),
        created_by: caller.name.clone(),
    };
    // Say which of the two is taken (the store's constraint still decides
    // between two admins racing).
    let existing = state.meta(|m| m.publishers()).await?;
    if let Some(p) = existing.iter().find(|p| p.name == record.name) {
        return Err(ApiError::conflict(format!(
            "a publisher named {} is registered already (key {}); remove it first to replace its key",
            p.name, p.key_id
        )));
    }
    if let Some(p) = existing.iter().find(|p| p.key_id == record.key_id) {
        return Err(ApiError::conflict(format!("key {} is registered already, as publisher {}", p.key_id, p.name)));
    }
    let stored = record.clone();
    state.meta(move |m| m.add_publisher(&stored)).await?;
    let detail = AuditDetail(format!("registered publisher {} key {}", record.name, record.key_id));
    let mut resp = (StatusCode::CREATED, Json(out(record))).into_response();
    resp.extensions_mut().insert(detail);
    Ok(resp)
}

/// List the registered publisher keys.
#[utoipa::path(get, path = "/api/v1/publishers", security(("bearer" = [])),
    responses((status = 200, body = PublisherList)))]
pub async fn list(State(state): State<SharedState>, caller: Caller) -> Result<Json<PublisherList>, ApiError> {
    caller.require(Role::Viewer, "listing publishers")?;
    let all = state.meta(|m| m.publishers()).await?;
    Ok(Json(PublisherList { publishers: all.into_iter().map(out).collect() }))
}

/// Remove a publisher key (admin). Versions it signed keep their manifests;
/// new pushes signed with it are refused.
#[utoipa::path(delete, path = "/api/v1/publishers/{name}", params(super::openapi::ModelPath), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)))]
pub async fn remove(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "removing publisher keys")?;
    let n = name.clone();
    state.meta(move |m| m.remove_publisher(&n)).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(AuditDetail(format!("removed publisher {name}")));
    Ok(resp)
}
