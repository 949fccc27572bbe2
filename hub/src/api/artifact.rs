//! Model bytes: `GET .../versions/{version}/artifact` and the validation set.
//!
//! Supports a single HTTP byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`),
//! which is what resuming downloaders send, and an ETag equal to the
//! quoted SHA-256, honoured by `If-None-Match` and `If-Range`. Multi-range
//! requests get the whole body, as RFC 9110 allows.

use std::io::{Seek as _, SeekFrom};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;

use super::versions::load_version;
use super::{ApiError, ApiPath, Caller, SharedState};
use crate::store::BlobBody;

/// A byte range, inclusive at both ends, already checked against the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Result of reading a `Range` header against a body of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send everything.
    Full,
    Partial(ByteRange),
    /// A well-formed range that lies outside the body: 416.
    Unsatisfiable,
}

/// Parses a `Range` header value for a body of `len` bytes.
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.split_once('-') else { return RangeRequest::Full };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, true) => return RangeRequest::Full,
        // Suffix: the last n bytes.
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) if len == 0 => return if n > 0 { RangeRequest::Unsatisfiable } else { RangeRequest::Full },
            Ok(n) => ByteRange { start: len.saturating_sub(n), end: len - 1 },
            Err(_) => return RangeRequest::Full,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else { return RangeRequest::Full };
            let end = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e.min(len.saturating_sub(1)),
                    _ => return RangeRequest::Full,
                }
            };
            if start >= len {
                return RangeRequest::Unsatisfiable;
            }
            ByteRange { start, end }
        }
    };
    RangeRequest::Partial(parsed)
}

fn etag_matches(header_value: Option<&HeaderValue>, etag: &str) -> bool {
    header_value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag))
}

/// How long a presigned download URL stays valid: long enough for a slow
/// link to start, short enough that a leaked one soon stops working.
const PRESIGNED_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves the blob `sha256` honouring Range, If-None-Match and If-Range.
pub async fn serve_blob(state: &SharedState, sha256: String, headers: &HeaderMap) -> Result<Response, ApiError> {
    let etag = format!("\"{sha256}\"");
    let sha = sha256.clone();
    let blob = state.blobs(move |b| b.open(&sha)).await?.ok_or_else(|| {
        ApiError::internal("serving a blob", &std::io::Error::other(format!("blob {sha256} is missing")))
    })?;
    let len = blob.len;
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| ApiError::internal("etag", &e))?;
    if etag_matches(headers.get(header::IF_NONE_MATCH), &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    // Straight from the bucket when asked: the device checks size, digest
    // and signature whoever serves the bytes, so the store is not trusted.
    if let (BlobBody::Object(object), true) = (&blob.body, state.config().artifact_redirect) {
        let url = object.presigned(PRESIGNED_FOR).await?;
        return Ok((StatusCode::FOUND, [(header::LOCATION, url)], [(header::ETAG, etag_value)]).into_response());
    }
    // If-Range with a different validator means the client's partial copy is
    // stale: send the whole current body.
    let range_allowed = match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| v.trim() == etag),
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) if range_allowed => parse_range(v, len),
        _ => RangeRequest::Full,
    };
    let mut builder = Response::builder()
        .header(header::ETAG, etag_value)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CACHE_CONTROL, "private, max-age=31536000, immutable");
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial(r) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {}-{}/{len}", r.start, r.end));
            (StatusCode::PARTIAL_CONTENT, r.start, r.end - r.start + 1)
        }
        RangeRequest::Unsatisfiable => {
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response());
        }
    };
    let body = match blob.body {
        BlobBody::File(mut file) => {
            if start > 0 {
                file.seek(SeekFrom::Start(start)).map_err(|e| ApiError::internal("seeking a blob", &e))?;
            }
            let reader = tokio::fs::File::from_std(file).take(count);
            Body::from_stream(ReaderStream::with_capacity(reader, 256 * 1024))
        }
        BlobBody::Object(object) => Body::from_stream(object.stream(start, count)),
    };
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .body(body)
        .map_err(|e| ApiError::internal("building a response", &e))
}

/// Download a version's ONNX file. Supports `Range`; the ETag is the SHA-256.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/artifact", params(super::openapi::VersionPath), security(("bearer" = [])),
    responses((status = 200, description = "the whole file"), (status = 206, description = "the requested range"),
        (status = 302, description = "with --artifact-redirect on an S3 blob store: Location is a presigned URL on the bucket, valid 5 minutes"),
        (status = 416, description = "range outside the file"), (status = 404, body = super::error::ErrorBody),
        (status = 503, description = "the object store does not answer", body = super::error::ErrorBody)))]
pub async fn model(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let v = load_version(&state, &name, &version).await?;
    super::devices::device_may_fetch(&state, &caller, &name, &version).await?;
    serve_blob(&state, v.sha256, &headers).await
}

/// Download a version's validation set: `inputs` or `labels`.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/validation/{part}", params(super::openapi::ValidationPath), security(("bearer" = [])),
    responses((status = 200, description = "raw little-endian tensor bytes"),
        (status = 302, description = "with --artifact-redirect on an S3 blob store: Location is a presigned URL on the bucket, valid 5 minutes"),
        (status = 404, body = super::error::ErrorBody),
        (status = 503, description = "the object store does not answer", body = super::error::ErrorBody)))]
pub async fn validation(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version, part)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve_named(&state, &caller, &name, &version, &headers, |m| {
        let set = m.validation.ok_or_else(|| ApiError::not_found(format!("{name} {version} has no validation set")))?;
        match part.as_str() {
            "inputs" => Ok(set.inputs.sha256),
            "labels" => Ok(set.labels.sha256),
            _ => Err(ApiError::not_found("validation parts are `inputs` and `labels`")),
        }
    })
    .await
}

/// Serves the blob `pick` finds in a version's manifest, to a caller who may
/// fetch the version.
async fn serve_named(
    state: &SharedState,
    caller: &Caller,
    name: &str,
    version: &str,
    headers: &HeaderMap,
    pick: impl FnOnce(sentinel_proto::ManifestView) -> Result<String, ApiError>,
) -> Result<Response, ApiError> {
    let v = load_version(state, name, version).await?;
    super::devices::device_may_fetch(state, caller, name, version).await?;
    let sha = pick(super::versions::VersionOut::from_record(&v)?.manifest)?;
    serve_blob(state, sha, headers).await
}

/// Download the publisher's signature bundle (OpenSSF model-signing) the
/// version was pushed with, exactly as pushed. Devices that pin publishers
/// verify it themselves.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/signature", params(super::openapi::VersionPath), security(("bearer" = [])),
    responses((status = 200, description = "the Sigstore bundle (JSON)"),
        (status = 302, description = "with --artifact-redirect on an S3 blob store: Location is a presigned URL on the bucket, valid 5 minutes"),
        (status = 404, description = "no such version, or it was pushed without a publisher signature", body = super::error::ErrorBody),
        (status = 503, description = "the object store does not answer", body = super::error::ErrorBody)))]
pub async fn signature(
    State(state): State<SharedState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve_named(&state, &caller, &name, &version, &headers, |m| {
        let publisher = m
            .publisher
            .ok_or_else(|| ApiError::not_found(format!("{name} {version} was pushed without a publisher signature")))?;
        Ok(publisher.bundle.sha256)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), partial(0, 9));
        assert_eq!(parse_range("bytes=50-", 100), partial(50, 99));
        assert_eq!(parse_range("bytes=-10", 100), partial(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), partial(0, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), partial(90, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=x-1", 100), RangeRequest::Full);
    }
}
