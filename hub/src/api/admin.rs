//! Tokens, signing keys, the audit log, and health checks.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::AuditDetail;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, PageParams, SharedState, page, page_of};
use crate::auth::{Role, generate_token, hash_token};
use crate::keys::PublicKeyInfo;
use crate::store::{AuditEntry, TokenRecord};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[schema(value_type = super::openapi::CreatableRole)]
    pub role: Role,
    /// A name for the audit log, e.g. `ci-publisher`.
    #[serde(default)]
    #[schema(value_type = Option<super::openapi::TokenName>)]
    pub name: Option<String>,
}

/// A new token. `token` is shown once and never again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenOut {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub revoked: bool,
}

impl From<TokenRecord> for TokenOut {
    fn from(t: TokenRecord) -> Self {
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            created_at_ms: t.created_at_ms,
            created_by: t.created_by,
            revoked: t.revoked,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeysOut {
    pub active_key_id: String,
    pub keys: Vec<PublicKeyInfoOut>,
    /// The URL devices reach this hub at, when it was started with
    /// `--public-url`: REST, artifacts and gRPC (the REST port serves it).
    /// Null: devices use the URL they were given. `sentinel device enroll
    /// --agent-config` writes it as the agent's `hub_url`.
    pub public_url: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublicKeyInfoOut {
    pub key_id: String,
    pub algorithm: String,
    /// Raw Ed25519 public key, standard base64: pin this on devices.
    pub public_key: String,
    pub active: bool,
}

impl From<PublicKeyInfo> for PublicKeyInfoOut {
    fn from(k: PublicKeyInfo) -> Self {
        Self { key_id: k.key_id, algorithm: k.algorithm.to_owned(), public_key: k.public_key, active: k.active }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditOut {
    pub entries: Vec<AuditEntryOut>,
    pub limit: u32,
    pub offset: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryOut {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub status: u16,
    pub outcome: String,
    pub detail: String,
}

impl From<AuditEntry> for AuditEntryOut {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            at_ms: e.at_ms,
            actor: e.actor,
            role: e.role,
            action: e.action,
            status: e.status,
            outcome: e.outcome.as_str().to_owned(),
            detail: e.detail,
        }
    }
}

/// Create an API token (admin).
#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken, security(("bearer" = [])),
    responses((status = 201, body = CreatedToken), (status = 403, body = super::error::ErrorBody)))]
pub async fn create_token(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first: a caller without the role
    // gets 403 whatever the body holds.
    body: Result<ApiJson<CreateToken>, ApiError>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "creating tokens")?;
    let ApiJson(body) = body?;
    if body.role == Role::Device {
        return Err(ApiError::bad_request("device tokens come from enrolment: POST /api/v1/devices"));
    }
    let name = body.name.unwrap_or_else(|| format!("{}-token", body.role));
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("token name must be 1 to 64 printable characters"));
    }
    let secret = generate_token();
    let hash = hash_token(&secret);
    let (role, by) = (body.role, caller.name.clone());
    let n = name.clone();
    let rec = state.meta(move |m| m.insert_token(&n, role.as_str(), &hash, &by, crate::now_ms())).await?;
    let mut resp =
        (StatusCode::CREATED, Json(CreatedToken { id: rec.id, name: rec.name, role, token: secret })).into_response();
    resp.extensions_mut().insert(AuditDetail(format!("created token {} ({name}, {role})", rec.id)));
    Ok(resp)
}

/// A page of tokens.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenOut>,
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

/// List tokens (admin), oldest first. Secrets are never shown.
#[utoipa::path(get, path = "/api/v1/tokens", params(PageParams), security(("bearer" = [])),
    responses((status = 200, body = TokenList)))]
pub async fn list_tokens(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    query: Result<ApiQuery<PageParams>, ApiError>,
) -> Result<Json<TokenList>, ApiError> {
    caller.require(Role::Admin, "listing tokens")?;
    let ApiQuery(p) = query?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let (tokens, total) = page_of(state.meta(|m| m.list_tokens()).await?, limit, offset);
    Ok(Json(TokenList { tokens: tokens.into_iter().map(Into::into).collect(), total, limit, offset }))
}

/// Revoke a token (admin).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(super::openapi::IdPath), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn revoke_token(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "revoking tokens")?;
    // An admin cannot lock itself out by mistake; another admin can.
    if id == caller.token_id {
        return Err(ApiError::conflict(format!(
            "token {id} is the token of this request; revoke it with another admin token"
        )));
    }
    state.meta(move |m| m.revoke_token(id)).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(AuditDetail(format!("revoked token {id}")));
    Ok(resp)
}

fn keys_out(state: &SharedState) -> KeysOut {
    let ring = state.keyring();
    KeysOut {
        active_key_id: ring.active().key_id().to_owned(),
        keys: ring.public_keys().into_iter().map(Into::into).collect(),
        public_url: state.config().public_url.as_ref().map(|u| u.trim_end_matches('/').to_owned()),
    }
}

/// The hub's public signing keys, for pinning on devices, and the public URL
/// devices reach it at. No token needed: public keys are public, and devices
/// fetch them before they have one.
#[utoipa::path(get, path = "/api/v1/keys", responses((status = 200, body = KeysOut)))]
pub async fn keys(State(state): State<SharedState>) -> Json<KeysOut> {
    Json(keys_out(&state))
}

/// Generate a new signing key and make it active (admin). Old keys stay
/// trusted, so existing manifests keep verifying.
#[utoipa::path(post, path = "/api/v1/keys/rotate", security(("bearer" = [])),
    responses((status = 200, body = KeysOut), (status = 403, body = super::error::ErrorBody)))]
pub async fn rotate_key(State(state): State<SharedState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Admin, "rotating keys")?;
    let id = match state.replicas().cloned() {
        // Replicas on one database rotate there, for all of them.
        Some(shared) => crate::service::replicas::rotate(&state, shared)
            .await
            .map_err(|e| ApiError::internal("rotating the signing key", &e))?,
        None => {
            let mut ring = state.keyring_mut();
            ring.rotate().map_err(|e| ApiError::internal("rotating the signing key", &e))?
        }
    };
    let mut resp = Json(keys_out(&state)).into_response();
    resp.extensions_mut().insert(AuditDetail(format!("rotated signing key; {id} is active")));
    Ok(resp)
}

/// `GET /api/v1/audit`: a page, filtered.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Page size, 1..=500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Entries to skip, 0..=2147483647 (default 0).
    #[param(minimum = 0, maximum = 2_147_483_647)]
    pub offset: Option<u32>,
    /// Only what this token name did (exactly).
    #[param(max_length = 128)]
    pub actor: Option<String>,
    /// Only actions containing this text, e.g. `publishers` or `DELETE`.
    #[param(max_length = 256)]
    pub action: Option<String>,
    /// Only this outcome: `ok`, `denied` or `failed`.
    #[param(pattern = "^(ok|denied|failed)$")]
    pub outcome: Option<String>,
}

/// Read the audit log, newest first, filtered by actor, action and outcome
/// (admin). A failed or denied entry's `detail` is the refusal's code and message.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams), security(("bearer" = [])),
    responses((status = 200, body = AuditOut), (status = 403, body = super::error::ErrorBody)))]
pub async fn audit(
    State(state): State<SharedState>,
    caller: Caller,
    // A result, so the role check comes first.
    query: Result<ApiQuery<AuditParams>, ApiError>,
) -> Result<Json<AuditOut>, ApiError> {
    caller.require(Role::Admin, "reading the audit log")?;
    let ApiQuery(p) = query?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let too_long = |v: &Option<String>, max: usize| v.as_ref().is_some_and(|s| s.chars().count() > max);
    if too_long(&p.actor, 128) || too_long(&p.action, 256) {
        return Err(ApiError::bad_request("actor is at most 128 characters, action at most 256"));
    }
    let outcome = match p.outcome.as_deref() {
        None => None,
        Some(o) => Some(o.parse::<crate::store::AuditOutcome>().map_err(|_| {
            ApiError::bad_request(format!("outcome {}: use ok, denied or failed", sentinel_proto::quote(o)))
        })?),
    };
    let filter = crate::store::AuditFilter { actor: p.actor, action: p.action, outcome };
    let entries = state.meta(move |m| m.list_audit(&filter, limit, offset)).await?;
    Ok(Json(AuditOut { entries: entries.into_iter().map(Into::into).collect(), limit, offset }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the database answers and the blob store is readable.
#[utoipa::path(get, path = "/readyz", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let db = state.meta(|m| m.count_tokens()).await;
    let blobs = state.blobs(|b| b.list().map(|l| l.len())).await;
    match (db, blobs) {
        (Ok(_), Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready: storage unavailable; see the hub log\n").into_response(),
    }
}
