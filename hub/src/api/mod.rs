//! The REST API under `/api/v1`, one module per resource.
//!
//! Every request passes [`auth::authenticate`], which resolves the bearer
//! token to a [`Caller`] once and, for every mutating call, appends who did
//! what, when, and with which outcome to the audit log.
//!
//! # Layout
//! - [`error`]: [`ApiError`], the only error type handlers return.
//! - [`auth`]: the authentication middleware, audit logging, and the [`Caller`] extractor.
//! - [`models`]: register, list, show, update, delete models.
//! - [`upload`]: the streamed upload of a new version.
//! - [`versions`]: read or edit versions and their signed manifests.
//! - [`artifact`]: model bytes with HTTP Range and ETag.
//! - [`deployments`]: deploy, roll back, list deployments.
//! - [`devices`]: device enrolment and what devices report.
//! - [`telemetry`]: device and deployment telemetry over time.
//! - [`admin`]: tokens, keys, audit log, health.
//! - [`session`]: who the caller is, and tickets for the event stream.
//! - [`events`]: the change feed as server-sent events, for the web interface.
//! - [`openapi`]: the generated OpenAPI description.

pub mod admin;
pub mod artifact;
pub mod auth;
pub mod deployments;
pub mod devices;
pub mod error;
pub mod events;
pub mod models;
pub mod openapi;
pub mod publishers;
pub mod session;
pub mod telemetry;
pub mod upload;
pub mod versions;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::routing::{get, post};

pub use auth::Caller;
pub use error::ApiError;

pub use crate::service::SharedState;

/// A JSON object body, parsed as `axum::Json` does, whose rejections are
/// [`ApiError`]s (JSON bodies, not text). Anything but an object is refused:
/// serde would read `[null, null]` as a struct of two absent fields.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .is_some_and(|m| m.strip_prefix("application/").is_some_and(|sub| sub == "json" || sub.ends_with("+json")));
        if !is_json {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send a JSON object with Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(e.status(), "invalid_body", sentinel_proto::quote::clip_message(&e.body_text()))
        })?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::unprocessable(
                "invalid_json",
                "the body must be a JSON object, e.g. {\"name\": \"digits\"}; send it with Content-Type: application/json",
            ));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(Self(value))
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Page size when a list request names none, and the most it may ask for.
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;
/// The largest `offset` a list accepts: what a signed 32-bit integer holds,
/// as the OpenAPI description declares.
pub const MAX_OFFSET: u32 = 2_147_483_647;

/// Checks a requested page size.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(0) => Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) if n > MAX_PAGE => Err(ApiError::bad_request(format!("limit must be at most {MAX_PAGE}"))),
        Some(n) => Ok(n),
    }
}

/// Checks a requested page: its size and where it starts.
pub fn page(limit: Option<u32>, offset: Option<u32>) -> Result<(u32, u32), ApiError> {
    let limit = page_limit(limit)?;
    match offset {
        Some(o) if o > MAX_OFFSET => Err(ApiError::bad_request(format!("offset must be at most {MAX_OFFSET}"))),
        o => Ok((limit, o.unwrap_or(0))),
    }
}

/// One page of a list held in memory, and the list's length.
pub fn page_of<T>(items: Vec<T>, limit: u32, offset: u32) -> (Vec<T>, u64) {
    let total = items.len() as u64;
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let page = items.into_iter().skip(start).take(limit as usize).collect();
    (page, total)
}

/// `limit` and `offset` of a list, for lists that take nothing else.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1..=500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Items to skip, 0..=2147483647 (default 0).
    #[param(minimum = 0, maximum = 2_147_483_647)]
    pub offset: Option<u32>,
}

/// The REST API, to be nested under `/api/v1`; [`crate::server`] adds the
/// probes, the web interface and the middleware around it.
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/models", get(models::list).post(models::create))
        .route("/models/{name}", get(models::show).put(models::update).delete(models::delete))
        .route("/models/{name}/versions", get(versions::list).post(upload::upload).layer(DefaultBodyLimit::disable()))
        .route("/models/{name}/versions/{version}", get(versions::show).put(versions::update))
        .route("/models/{name}/versions/{version}/manifest", get(versions::manifest))
        .route("/models/{name}/versions/{version}/artifact", get(artifact::model))
        .route("/models/{name}/versions/{version}/validation/{part}", get(artifact::validation))
        .route("/models/{name}/versions/{version}/signature", get(artifact::signature))
        .route("/models/{name}/deploy", post(deployments::deploy))
        .route("/models/{name}/rollback", post(deployments::rollback))
        .route("/deployments", get(deployments::list))
        .route("/deployments/{id}", get(deployments::show))
        .route("/deployments/{id}/telemetry", get(telemetry::deployment))
        .route("/devices", get(devices::list).post(devices::enroll))
        .route("/devices/{id}", get(devices::show).delete(devices::remove))
        .route("/devices/{id}/telemetry", get(telemetry::device))
        .route("/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/tokens/{id}", axum::routing::delete(admin::revoke_token))
        .route("/keys", get(admin::keys))
        .route("/publishers", get(publishers::list).post(publishers::add))
        .route("/publishers/{name}", axum::routing::delete(publishers::remove))
        .route("/keys/rotate", post(admin::rotate_key))
        .route("/audit", get(admin::audit))
        .route("/openapi.json", get(openapi::spec))
        .route("/whoami", get(session::whoami))
        .route("/events/ticket", post(session::ticket))
        .route("/events/stream", get(events::stream))
        .fallback(|| async { ApiError::not_found("no such API endpoint; see /api/v1/openapi.json") })
}

/// The probes, outside `/api/v1`.
pub fn probe_routes() -> Router<SharedState> {
    Router::new().route("/healthz", get(admin::healthz)).route("/readyz", get(admin::readyz))
}
