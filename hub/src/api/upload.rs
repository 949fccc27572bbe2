//! `POST /api/v1/models/{name}/versions`: the streamed upload of a new version.
//!
//! The body is either the raw ONNX file (`application/octet-stream`, what
//! `curl --data-binary @model.onnx` sends) or `multipart/form-data` with a
//! `model` part and, optionally, a validation set as `validation_inputs` and
//! `validation_labels` parts and the publisher's OpenSSF model-signing
//! bundle as a `signature` part. Version metadata comes in the query string.
//!
//! This module is the HTTP side only: the query string, the multipart parts,
//! the size cap as a status, and reading on past a refusal so the client
//! sees the answer. Receiving, inspecting, signing and committing are the
//! registry service's ([`crate::service::registry`]): each part streams to a
//! staging file while its SHA-256 and size are computed, and only when the
//! model has loaded and every check passed are the blobs committed and the
//! version row written.

use std::collections::BTreeMap;
use std::fmt::Display;

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, body::Bytes};
use futures_util::{Stream, StreamExt as _};
use sentinel_proto::manifest::{AccuracyView, parse_stage};
use sentinel_proto::pb;
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::AuditDetail;
use super::models::check_tags;
use super::versions::{VersionOut, check_accuracy, check_hardware, check_version};
use super::{ApiError, ApiPath, ApiQuery, Caller, SharedState};
use crate::auth::Role;
use crate::service::registry::{self, NewVersion, Received, RegistryError};
use sentinel_proto::publisher::MAX_BUNDLE_BYTES;
use sentinel_proto::quote;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// Semantic version of the new version. Required: there is no default.
    #[param(
        required = true,
        max_length = 128,
        pattern = "^(?:0|[1-9][0-9]{0,15})\\.(?:0|[1-9][0-9]{0,15})\\.(?:0|[1-9][0-9]{0,15})(?:-(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?(?:\\+[0-9A-Za-z-]+(?:\\.[0-9A-Za-z-]+)*)?$"
    )]
    pub version: Option<String>,
    /// development (default), staging, production or archived.
    #[param(value_type = Option<super::openapi::StageName>)]
    pub stage: Option<String>,
    /// Declared accuracy as a fraction, e.g. 0.97.
    #[param(minimum = 0, maximum = 1)]
    pub accuracy: Option<f64>,
    /// Metric of the declared accuracy (default `accuracy`).
    pub metric: Option<String>,
    /// Dataset the accuracy was measured on.
    pub dataset: Option<String>,
    /// Comma-separated hardware tags, e.g. `aarch64,jetson-orin`. None: any hardware.
    #[param(pattern = "^,*(?:[A-Za-z0-9._-]{1,63}(?:,+[A-Za-z0-9._-]{1,63})*)?,*$")]
    pub hardware: Option<String>,
    /// Comma-separated free-form tags.
    #[param(pattern = "^,*(?:[^,\\x00-\\x1f\\x7f-\\x9f]{1,64}(?:,+[^,\\x00-\\x1f\\x7f-\\x9f]{1,64})*)?,*$")]
    pub tags: Option<String>,
    /// Fixed serving shapes for inputs with symbolic dims, `NAME=1,3,640,640`,
    /// several separated by `;` (`sentinel model push --input-shape`, repeatable).
    /// Signed into the manifest; the push-time check and every device use them.
    /// At most 64 inputs of at most 16 dims, each from 1 to 1048576; anything
    /// else (or a name given twice, or no input of the model) is answered 422.
    #[param(
        pattern = "^(?:[^;=\\x00-\\x1f\\x7f-\\x9f]{1,256}=[0-9]+(?:,[0-9]+)*(?:;[^;=\\x00-\\x1f\\x7f-\\x9f]{1,256}=[0-9]+(?:,[0-9]+)*)*)?$"
    )]
    pub input_shapes: Option<String>,
    /// The engine devices will run it with: `tract` (default) or `ort`. The
    /// push-time check uses it; a hub without it skips the check and says so.
    #[param(pattern = "^(?:tract|ort)?$")]
    pub engine: Option<String>,
    /// Register the model too if it does not exist yet, in the same
    /// transaction as the version: a refused push registers nothing.
    pub register: Option<bool>,
    /// The model's description, when `register` registers it.
    #[param(max_length = 1024)]
    pub description: Option<String>,
}

/// Most inputs, and dims per input, an `input_shapes` parameter may name.
const MAX_SERVING_SHAPES: usize = 64;
const MAX_SERVING_DIMS: usize = 16;
/// Largest single dim of a serving shape.
const MAX_SERVING_DIM: u64 = 1 << 20;

/// Parses `NAME=1,3,640,640;NAME2=...` exactly as the OpenAPI pattern states it
/// (no spaces, no signs), bounded before anything is allocated per entry. Every
/// refusal is 422 `input_shapes`: text the pattern admits can still break a
/// bound the pattern cannot state, and one status for both keeps clients simple.
fn parse_input_shapes(text: &str) -> Result<BTreeMap<String, Vec<u64>>, ApiError> {
    let bad = |why: String| ApiError::unprocessable("input_shapes", format!("input_shapes: {why}"));
    if text.is_empty() {
        return Ok(BTreeMap::new());
    }
    // Counted before anything is collected: the query string is the client's.
    let count = text.split(';').count();
    if count > MAX_SERVING_SHAPES {
        return Err(bad(format!("{count} shapes; the limit is {MAX_SERVING_SHAPES}")));
    }
    let mut shapes = BTreeMap::new();
    for entry in text.split(';') {
        let (name, dims) = entry
            .split_once('=')
            .ok_or_else(|| bad(format!("{} is not NAME=D0,D1,... (e.g. x=1,3,640,640)", quote(entry))))?;
        let chars = name.chars().count();
        if !(1..=256).contains(&chars) || name.chars().any(char::is_control) {
            return Err(bad(format!(
                "{} needs an input name of 1 to 256 characters, none of them control characters",
                quote(entry)
            )));
        }
        let rank = dims.split(',').count();
        if rank > MAX_SERVING_DIMS {
            return Err(bad(format!("{} has {rank} dims; the limit is {MAX_SERVING_DIMS}", quote(name))));
        }
        let dims = dims
            .split(',')
            .map(|d| match d.parse::<u64>() {
                Ok(n) if d.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_SERVING_DIM).contains(&n) => Ok(n),
                _ => Err(bad(format!(
                    "{}: dim {} must be a whole number from 1 to {MAX_SERVING_DIM}",
                    quote(name),
                    quote(d)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if shapes.insert(name.to_owned(), dims).is_some() {
            return Err(bad(format!("{} is given twice", quote(name))));
        }
    }
    Ok(shapes)
}

fn split_list(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        // Not trimmed: a space is part of a tag (and not allowed in a
        // hardware tag), as the OpenAPI description's patterns say.
        .map(|s| s.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Streams `body` into a staging blob through the registry. A body refused
/// part-way (too large, a failed write) is read on, up to [`DRAIN_LIMIT`],
/// so the client, still sending, gets the answer instead of a reset connection.
async fn receive<S, E>(state: &SharedState, mut body: S, cap: u64, what: &str) -> Result<Received, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    match registry::receive(state, &mut body, cap, what).await {
        Ok(received) => Ok(received),
        Err(e) => {
            if matches!(e, RegistryError::TooLarge { .. } | RegistryError::Write { .. }) {
                drain(&mut body).await;
            }
            Err(e.into())
        }
    }
}

/// How much of a refused body is read and discarded so that the client sees
/// the error response. Past this the connection is closed on the client.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

async fn drain<S, E>(body: &mut S)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut drained = 0u64;
    while drained < DRAIN_LIMIT {
        match body.next().await {
            Some(Ok(chunk)) => drained += chunk.len() as u64,
            _ => break,
        }
    }
}

/// Upload a new version of a model (streamed).
#[utoipa::path(post, path = "/api/v1/models/{name}/versions", params(super::openapi::ModelPath, UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The ONNX file; or multipart/form-data with parts model, validation_inputs, validation_labels, \
            signature (an OpenSSF model-signing bundle over the model file, at most 64 KiB)"),
    security(("bearer" = [])),
    responses((status = 201, body = VersionOut), (status = 409, body = super::error::ErrorBody),
        (status = 413, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody),
        (status = 503, description = "The object store does not answer; nothing was stored", body = super::error::ErrorBody),
        (status = 507, description = "The hub's storage is full; nothing was stored", body = super::error::ErrorBody)))]
pub async fn upload(
    State(state): State<SharedState>,
    // Taken as results so that a refused query string counts as a refused push.
    caller: Result<Caller, ApiError>,
    path: Result<ApiPath<String>, ApiError>,
    query: Result<ApiQuery<UploadParams>, ApiError>,
    req: Request,
) -> Result<Response, ApiError> {
    // The role check first: a caller without the role gets 403 whatever
    // the query string holds.
    let mut body = Some(req);
    let result = match caller.and_then(|c| c.require(Role::Publisher, "uploading a version").map(|()| c)) {
        Err(e) => Err(e),
        Ok(caller) => match (path, query) {
            (Ok(path), Ok(query)) => receive_version(state.clone(), caller, path, query, &mut body).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    };
    // Refused before its body was read (a duplicate version, a bad query):
    // read it (up to DRAIN_LIMIT, keeping nothing) so a client still sending
    // sees the answer instead of a reset connection.
    if result.is_err()
        && let Some(req) = body.take()
    {
        drain(&mut req.into_body().into_data_stream()).await;
    }
    state.metrics().model_push(result.is_ok());
    result
}

/// The upload itself; [`upload`] counts its outcome.
async fn receive_version(
    state: SharedState,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(p): ApiQuery<UploadParams>,
    body: &mut Option<Request>,
) -> Result<Response, ApiError> {
    caller.require(Role::Publisher, "uploading a version")?;
    let register = p.register.unwrap_or(false);
    if p.description.as_ref().is_some_and(|d| d.chars().count() > 1024) {
        return Err(ApiError::bad_request("description: at most 1024 characters"));
    }
    if register {
        super::models::check_name(&name)?;
    } else {
        super::models::check_lookup_name(&name)?;
    }
    // Every check that needs no body runs before a byte is read.
    let version = p
        .version
        .clone()
        .ok_or_else(|| ApiError::bad_request("a version is required (?version=1.2.0); there is no default version"))?;
    check_version(&version)?;
    let stage =
        parse_stage(p.stage.as_deref().unwrap_or("development")).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hardware = split_list(&p.hardware);
    check_hardware(&hardware)?;
    let tags = split_list(&p.tags);
    check_tags("tag", &tags)?;
    let serving = parse_input_shapes(p.input_shapes.as_deref().unwrap_or_default())?;
    let engine = p.engine.clone().unwrap_or_default();
    if !sentinel_proto::manifest::ENGINES.contains(&engine.as_str()) {
        return Err(ApiError::unprocessable("engine", format!("engine {}: use tract or ort", quote(&engine))));
    }
    let accuracy = match p.accuracy {
        Some(value) => {
            let a = AccuracyView {
                metric: p.metric.clone().unwrap_or_else(|| "accuracy".into()),
                value,
                dataset: p.dataset.clone().unwrap_or_default(),
            };
            check_accuracy(&a)?;
            Some(pb::Accuracy { metric: a.metric, value: a.value, dataset: a.dataset })
        }
        None if p.metric.is_some() || p.dataset.is_some() => {
            return Err(ApiError::unprocessable(
                "invalid_accuracy",
                "metric and dataset describe an accuracy: pass accuracy too",
            ));
        }
        None => None,
    };
    registry::check_new_version(&state, &name, &version, register).await?;
    let cap = state.config().max_upload_bytes;
    // From here on the body is this function's: an oversize one is refused
    // unread, not drained.
    let Some(req) = body.take() else {
        return Err(ApiError::bad_request("the request body was already read"));
    };
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > cap
    {
        return Err(RegistryError::TooLarge { what: "the request body".into(), cap }.into());
    }
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));

    let Parts { model: model_blob, validation, signature } = if is_multipart {
        read_multipart(req, &mut Staging { state: &state, cap }).await?
    } else {
        let model = receive(&state, req.into_body().into_data_stream(), cap, "the model").await?;
        Parts { model, validation: None, signature: None }
    };
    if model_blob.size == 0 {
        return Err(ApiError::bad_request("the model file is empty; send the ONNX file as the request body"));
    }

    let new = NewVersion {
        name: name.clone(),
        version: version.clone(),
        stage,
        hardware,
        tags,
        serving,
        engine,
        accuracy,
        created_by: caller.name.clone(),
        signature,
        register: register.then(|| p.description.clone().unwrap_or_default()),
    };
    let record = registry::register(&state, new, model_blob, validation).await?;

    let location = format!("/api/v1/models/{name}/versions/{version}");
    let mut resp =
        (StatusCode::CREATED, [(header::LOCATION, location)], Json(VersionOut::from_record(&record)?)).into_response();
    resp.extensions_mut()
        .insert(AuditDetail(format!("registered {name} {version} sha256={} size={}", record.sha256, record.size)));
    Ok(resp)
}

/// The parts of an upload: the model, its validation set and its
/// publisher's signature bundle.
#[derive(Debug)]
pub struct Parts<P> {
    pub model: P,
    pub validation: Option<(P, P)>,
    /// Read whole: at most [`MAX_BUNDLE_BYTES`].
    pub signature: Option<Vec<u8>>,
}

/// Where the parts of a multipart upload go: [`read_multipart`] routes them,
/// a sink streams each one somewhere.
pub trait PartSink {
    /// What a received part becomes.
    type Part;
    /// Streams one part to its destination; `what` names it in errors.
    fn receive<S, E>(&mut self, part: S, what: &str) -> impl Future<Output = Result<Self::Part, ApiError>> + Send
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: Display + Send;
}

/// The hub's sink: each part to a staging blob, under the upload cap.
struct Staging<'a> {
    state: &'a SharedState,
    cap: u64,
}

impl PartSink for Staging<'_> {
    type Part = Received;

    fn receive<S, E>(&mut self, part: S, what: &str) -> impl Future<Output = Result<Received, ApiError>> + Send
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: Display + Send,
    {
        receive(self.state, part, self.cap, what)
    }
}

/// Reads a `multipart/form-data` upload body: a `model` part and optionally
/// `validation_inputs` with `validation_labels`, each streamed into `sink`,
/// and a `signature` part, read into memory up to [`MAX_BUNDLE_BYTES`] (413
/// past that). Any other part, a part twice, a missing model, half a
/// validation set or a malformed body is a 400. Public for the multipart
/// fuzz target (`fuzz/`), which drives it with an in-memory sink.
pub async fn read_multipart<P: PartSink>(req: Request, sink: &mut P) -> Result<Parts<P::Part>, ApiError> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {}", e.body_text())))?;
    let (mut model, mut inputs, mut labels, mut signature) = (None, None, None, None);
    let malformed = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    };
    loop {
        let field = form.next_field().await.map_err(malformed)?;
        let Some(mut field) = field else { break };
        let part = field.name().unwrap_or_default().to_owned();
        let slot = match part.as_str() {
            "model" => &mut model,
            "validation_inputs" => &mut inputs,
            "validation_labels" => &mut labels,
            "signature" => {
                if signature.is_some() {
                    return Err(ApiError::bad_request("multipart part \"signature\" appears twice"));
                }
                let mut bundle = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    if bundle.len() + chunk.len() > MAX_BUNDLE_BYTES {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            format!(
                                "the signature part is larger than {MAX_BUNDLE_BYTES} bytes; a model-signing bundle is ~2 KB"
                            ),
                        ));
                    }
                    bundle.extend_from_slice(&chunk);
                }
                signature = Some(bundle);
                continue;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown multipart part {}; expected model, validation_inputs, validation_labels, signature",
                    quote(other)
                )));
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!("multipart part {} appears twice", quote(&part))));
        }
        *slot = Some(sink.receive(Box::pin(field), &format!("part {}", quote(&part))).await?);
    }
    let model = model.ok_or_else(|| ApiError::bad_request("the multipart body has no `model` part"))?;
    let validation = match (inputs, labels) {
        (Some(i), Some(l)) => Some((i, l)),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "a validation set needs both validation_inputs and validation_labels parts",
            ));
        }
    };
    Ok(Parts { model, validation, signature })
}
