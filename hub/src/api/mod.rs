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
//! - [`admin`]: tokens, keys, audit log, health.
//! - [`openapi`]: the generated OpenAPI description.

pub mod admin;
pub mod artifact;
pub mod auth;
pub mod deployments;
pub mod devices;
pub mod error;
pub mod models;
pub mod openapi;
pub mod upload;
pub mod versions;

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::routing::{get, post};

pub use auth::Caller;
pub use error::ApiError;

use crate::config::HubConfig;
use crate::keys::Keyring;
use crate::store::{BlobStore, MetadataStore};

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub meta: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub keys: RwLock<Keyring>,
    pub config: HubConfig,
    pub fleet: crate::fleet::Fleet,
    /// The web interface's change feed and event-stream tickets.
    pub live: crate::web::Live,
    /// Base URL devices download from; set once the listener is bound.
    pub public_url: RwLock<String>,
    /// This hub's Prometheus registry and metric handles.
    pub metrics: crate::metrics::HubMetrics,
    /// Inspects uploads in confined, bounded child processes.
    pub inspector: crate::inspect::Inspector,
    /// Every connection of the REST, gRPC and metrics listeners, under one
    /// cap and its timeouts; its counts are exported as metrics.
    pub connections: sentinel_net::Connections,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Runs a metadata operation on a blocking thread.
    pub async fn meta<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn MetadataStore) -> Result<T, crate::store::StoreError> + Send + 'static,
    {
        let meta = Arc::clone(&self.meta);
        let joined = tokio::task::spawn_blocking(move || f(meta.as_ref())).await;
        match joined {
            Ok(result) => result.map_err(ApiError::from),
            Err(e) => Err(ApiError::from_join("metadata task", &e)),
        }
    }

    /// Runs a blob operation on a blocking thread.
    pub async fn blobs<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn BlobStore) -> Result<T, crate::store::BlobError> + Send + 'static,
    {
        let blobs = Arc::clone(&self.blobs);
        let joined = tokio::task::spawn_blocking(move || f(blobs.as_ref())).await;
        match joined {
            Ok(result) => result.map_err(ApiError::from),
            Err(e) => Err(ApiError::from_join("blob task", &e)),
        }
    }

    /// Base URL of this hub's REST API, as devices should reach it.
    pub fn public_url(&self) -> String {
        self.public_url.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads the keyring. The lock is never held across an await.
    pub fn keyring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

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

/// Pushes the new desired state to every connected device after a change
/// to deployments. A failure is logged, not returned: the change is stored,
/// and devices get it on their next connection.
pub async fn push_to_fleet(state: &SharedState) {
    if let Err(e) = crate::fleet::Fleet::publish(state).await {
        tracing::error!(error = %e, "pushing the desired state failed; devices will get it when they reconnect");
    }
    state.live.notify(crate::web::ChangeKind::Deployments, "");
}

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

/// The whole HTTP surface of the hub.
pub fn router(state: SharedState) -> Router {
    let api = Router::new()
        .route("/models", get(models::list).post(models::create))
        .route("/models/{name}", get(models::show).put(models::update).delete(models::delete))
        .route("/models/{name}/versions", get(versions::list).post(upload::upload).layer(DefaultBodyLimit::disable()))
        .route("/models/{name}/versions/{version}", get(versions::show).put(versions::update))
        .route("/models/{name}/versions/{version}/manifest", get(versions::manifest))
        .route("/models/{name}/versions/{version}/artifact", get(artifact::model))
        .route("/models/{name}/versions/{version}/validation/{part}", get(artifact::validation))
        .route("/models/{name}/deploy", post(deployments::deploy))
        .route("/models/{name}/rollback", post(deployments::rollback))
        .route("/deployments", get(deployments::list))
        .route("/deployments/{id}", get(deployments::show))
        .route("/devices", get(devices::list).post(devices::enroll))
        .route("/devices/{id}", get(devices::show).delete(devices::remove))
        .route("/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/tokens/{id}", axum::routing::delete(admin::revoke_token))
        .route("/keys", get(admin::keys))
        .route("/keys/rotate", post(admin::rotate_key))
        .route("/audit", get(admin::audit))
        .route("/openapi.json", get(openapi::spec))
        .merge(crate::web::api_routes())
        .fallback(|| async { ApiError::not_found("no such API endpoint; see /api/v1/openapi.json") });
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .merge(crate::web::ui_routes())
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), auth::authenticate))
        // Outermost, so requests refused by authentication are counted too.
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), crate::metrics::track_http))
        .with_state(state)
}
