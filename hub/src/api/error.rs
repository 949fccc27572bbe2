//! The one error type of the HTTP boundary.
//!
//! Bad input becomes a 4xx JSON body `{"error": {"code", "message"}}` saying
//! what was wrong and how to fix it. Internal failures are logged with their
//! full context and answered with a generic 500, so nothing about the hub's
//! disk layout or database leaks to callers.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sentinel_proto::quote;
use sentinel_proto::quote::clip_message;
use serde::Serialize;

use crate::service::ServiceError;
use crate::service::registry::RegistryError;
use crate::store::{BlobError, StoreError};

/// An error answered to an API caller.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_model`.
    pub code: String,
    /// What was wrong, for a human.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// Logs `err` with its whole source chain and answers a generic 500.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let chain = crate::error_chain(err);
        tracing::error!(context, error = %chain, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the hub log has the details")
    }

    /// Maps a blocking task that did not finish: cancelled means the runtime
    /// is shutting down, which is no error of the hub's (503, logged at
    /// debug, so a clean shutdown logs no ERROR); a panic is ours (500).
    pub fn from_join(context: &str, err: &tokio::task::JoinError) -> Self {
        if err.is_cancelled() {
            tracing::debug!(context, "a blocking task was cancelled: the hub is shutting down");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the hub is shutting down; retry once it is back",
            );
        }
        Self::internal(context, err)
    }

    /// Maps an I/O error from writing uploaded bytes: a full disk is the
    /// caller's business (507), anything else is ours (500).
    pub fn from_write(context: &str, err: &std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::StorageFull || err.raw_os_error() == Some(libc::EDQUOT) {
            tracing::error!(context, "hub storage is full");
            return Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                "the hub's storage is full; nothing was stored. Free space on the hub and retry",
            );
        }
        Self::internal(context, err)
    }
}

/// How much of a refusal the audit log keeps.
const AUDIT_REASON_CHARS: usize = 300;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The audit log's row for a refused call says why, as the caller saw it.
        let why: String = format!("{}: {}", self.code, self.message).chars().take(AUDIT_REASON_CHARS).collect();
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(super::auth::AuditDetail(why));
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Conflict { .. } => Self::conflict(e.to_string()),
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            _ => Self::internal("metadata store", &e),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(e) => e.into(),
            ServiceError::Blob(e) => e.into(),
            ServiceError::Keys(e) => Self::internal("signing keys", &e),
            ServiceError::Join { context, source } => Self::from_join(context, &source),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::ModelNotRegistered { name } => {
                Self::not_found(format!("model {} is not registered; POST /api/v1/models first", quote(&name)))
            }
            RegistryError::VersionExists { name, version, existing } => {
                let same = if existing == version {
                    String::new()
                } else {
                    format!(" ({existing} differs from {version} only in build metadata, which semver does not order)")
                };
                Self::conflict(format!(
                    "model {} already has version {existing}{same}; versions are immutable",
                    quote(&name)
                ))
            }
            RegistryError::TooLarge { what, cap } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what} is larger than this hub's upload limit of {cap} bytes; nothing was stored"),
            ),
            RegistryError::BrokenOff { what, reason } => {
                Self::bad_request(format!("the upload of {what} broke off ({reason}); nothing was stored, retry it"))
            }
            RegistryError::OpenStaging { source } => Self::from_write("opening a staging file", &source),
            RegistryError::Write { source } => Self::from_write("writing an upload", &source),
            RegistryError::InvalidModel { source } => {
                Self::unprocessable("invalid_model", format!("{source}; nothing was stored"))
            }
            RegistryError::Inspect { source } => Self::internal("inspecting an upload", &source),
            RegistryError::InvalidValidationSet { why } => Self::unprocessable("invalid_validation_set", why),
            e @ RegistryError::PublisherSignature { .. } => Self::unprocessable("publisher_signature", e.to_string()),
            e @ RegistryError::PublisherRequired { .. } => {
                Self::unprocessable("publisher_signature_required", e.to_string())
            }
            RegistryError::Service(e) => e.into(),
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match &e {
            BlobError::Io { source, .. } => Self::from_write("blob store", source),
            // The bucket is the hub's dependency, not the client's fault, and
            // may come back: 503, naming what failed; nothing was stored.
            BlobError::S3 { .. } => {
                tracing::error!(error = %e, "the object store failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "blob_store_unavailable",
                    format!("{e}; nothing was stored. Retry once the object store answers"),
                )
            }
            _ => Self::internal("blob store", &e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = if status == StatusCode::UNSUPPORTED_MEDIA_TYPE { "unsupported_media_type" } else { "invalid_json" };
        Self::new(
            status,
            code,
            format!("{}; send a JSON object with Content-Type: application/json", clip_message(&r.body_text())),
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query string: {}", clip_message(&r.body_text())))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::bad_request(format!("invalid path: {}", clip_message(&r.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: RegistryError) -> (u16, &'static str, String) {
        let e = ApiError::from(e);
        (e.status.as_u16(), e.code, e.message)
    }

    #[test]
    fn registry_refusals_keep_their_statuses_codes_and_messages() {
        assert_eq!(
            answer(RegistryError::ModelNotRegistered { name: "m".into() }),
            (404, "not_found", r#"model "m" is not registered; POST /api/v1/models first"#.into())
        );
        assert_eq!(
            answer(RegistryError::VersionExists {
                name: "m".into(),
                version: "1.0.0".into(),
                existing: "1.0.0".into()
            }),
            (409, "conflict", r#"model "m" already has version 1.0.0; versions are immutable"#.into())
        );
        let (status, code, message) = answer(RegistryError::VersionExists {
            name: "m".into(),
            version: "1.0.0+b".into(),
            existing: "1.0.0".into(),
        });
        assert_eq!((status, code), (409, "conflict"));
        assert!(message.contains("(1.0.0 differs from 1.0.0+b only in build metadata"), "{message}");
        assert_eq!(
            answer(RegistryError::TooLarge { what: "the model".into(), cap: 10 }),
            (
                413,
                "too_large",
                "the model is larger than this hub's upload limit of 10 bytes; nothing was stored".into()
            )
        );
        assert_eq!(
            answer(RegistryError::BrokenOff { what: "the model".into(), reason: "reset".into() }),
            (400, "bad_request", "the upload of the model broke off (reset); nothing was stored, retry it".into())
        );
        assert_eq!(
            answer(RegistryError::InvalidValidationSet { why: "labels are odd".into() }),
            (422, "invalid_validation_set", "labels are odd".into())
        );
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(answer(RegistryError::Write { source: full }).0, 507);
    }
}
