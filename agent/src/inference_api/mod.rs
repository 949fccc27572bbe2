//! The local inference API: the Open Inference Protocol (KServe v2) over
//! HTTP, so existing clients (e.g. `tritonclient[http]`) work unmodified.
//!
//! - `GET /v2`, `/v2/health/live`, `/v2/health/ready`
//! - `GET /v2/models/{name}[/versions/{v}]` and `.../ready`
//! - `POST /v2/models/{name}[/versions/{v}]/infer`: JSON tensors, or the
//!   binary tensor data extension (`Inference-Header-Content-Length`).
//!
//! Every inference response names the version (and slot) that served it.
//! Bad input gets a 400 with `{"error": "..."}` saying what was wrong; the
//! worker keeps running. By default the API binds to loopback only; a unix
//! socket can be added or used instead.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::ServingSettings;
use crate::serving::{Loaded, ServeError, TensorInfo};
use crate::state::{AgentError, Shared};
use crate::supervisor::SlotState as WorkerState;
use sentinel_worker_protocol::frame::{DType, Element, Tensor};

pub mod admission;
pub mod decode;

use admission::{Admission, Busy, Reservation};
pub use decode::{DecodeError, DecodeLimits, DecodedRequest, InputError, decode_request};

/// The header that splits a binary-extension body into JSON and tensor bytes.
const HEADER_LENGTH: &str = "inference-header-content-length";
/// Response header naming the version that served a request.
pub const VERSION_HEADER: &str = "x-sentinel-model-version";

/// Bound listeners of the API, before serving.
#[derive(Debug)]
pub struct Listeners {
    tcp: Option<tokio::net::TcpListener>,
    unix: Option<tokio::net::UnixListener>,
}

/// Binds the configured TCP address and unix socket.
pub async fn bind(settings: &ServingSettings) -> Result<Listeners, AgentError> {
    let tcp = match &settings.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen { addr: addr.clone(), source })?,
        ),
        None => None,
    };
    let unix = match &settings.unix_socket {
        Some(path) => {
            // A socket file left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            Some(
                tokio::net::UnixListener::bind(path)
                    .map_err(|source| AgentError::Listen { addr: path.display().to_string(), source })?,
            )
        }
        None => None,
    };
    Ok(Listeners { tcp, unix })
}

type Server = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Listeners {
    /// The bound TCP address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// One server future per listener, each under `connections`' limits;
    /// each ends when `stop` turns true.
    pub fn serve(
        self,
        shared: Arc<Shared>,
        connections: &sentinel_net::Connections,
        stop: watch::Receiver<bool>,
    ) -> Vec<Server> {
        let app = router(shared);
        let mut servers: Vec<Server> = Vec::new();
        let stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Some(tcp) = self.tcp {
            use axum::serve::ListenerExt as _;
            // Without TCP_NODELAY, small responses on keep-alive connections
            // can wait ~40 ms for the peer's delayed ACK.
            let listener = tcp.tap_io(|s| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::warn!(error = %e, "setting TCP_NODELAY failed");
                }
            });
            let (app, stop, connections) = (app.clone(), stop.clone(), connections.clone());
            servers.push(Box::pin(async move {
                connections.serve("inference", listener, None, app, stopped(stop)).await;
            }));
        }
        if let Some(unix) = self.unix {
            let connections = connections.clone();
            servers.push(Box::pin(async move {
                connections.serve("inference-unix", unix, None, app, stopped(stop)).await;
            }));
        }
        servers
    }
}

/// What every v2 handler shares: the agent, the in-flight budget and the
/// decoding limits.
#[derive(Debug, Clone)]
struct Api {
    shared: Arc<Shared>,
    admission: Admission,
    limits: DecodeLimits,
}

/// The v2 routes over the agent's models.
pub fn router(shared: Arc<Shared>) -> Router {
    let settings = &shared.config.serving;
    let limit = settings.max_body_bytes;
    let api = Api {
        admission: Admission::new(settings.max_inflight_bytes),
        limits: DecodeLimits { max_body_bytes: limit, ..DecodeLimits::default() },
        shared,
    };
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}", get(version_metadata))
        .route("/v2/models/{name}/versions/{version}/ready", get(version_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
        .route("/v2/models/{name}/feedback", post(feedback))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(api)
}

/// An error response in the protocol's shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn serve_error(e: &ServeError) -> Response {
    let status = match e {
        ServeError::UnknownModel(_) | ServeError::UnknownVersion { .. } => StatusCode::NOT_FOUND,
        ServeError::NotReady(_) | ServeError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ServeError::BadInput(_) => StatusCode::BAD_REQUEST,
    };
    // Names in the path are the client's: quoted back clipped.
    error(status, decode::clip(&e.to_string()))
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(json!({
        "name": "sentinel-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

fn slot_ready(slot: &Loaded) -> bool {
    matches!(slot.worker.state(), WorkerState::Running { .. })
}

/// Ready when every model has an active slot with a running worker.
async fn server_ready(State(Api { shared, .. }): State<Api>) -> StatusCode {
    let all = shared.serving.models().iter().all(|m| m.route().active.as_deref().is_some_and(slot_ready));
    if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

fn ready_status(shared: &Shared, name: &str, version: Option<&str>) -> Response {
    match shared.serving.pick(name, version) {
        Ok(slot) if slot_ready(&slot) => StatusCode::OK.into_response(),
        Ok(slot) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{name} {}: worker not running", slot.version)),
        Err(e) => serve_error(&e),
    }
}

async fn model_ready(State(Api { shared, .. }): State<Api>, Path(name): Path<String>) -> Response {
    ready_status(&shared, &name, None)
}

async fn version_ready(
    State(Api { shared, .. }): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready_status(&shared, &name, Some(&version))
}

fn datatype(d: DType) -> &'static str {
    decode::datatype_name(d)
}

/// An output's elements as JSON: f16 and bf16 widened to numbers, BOOL as
/// booleans, BYTES as strings (the engines' strings are UTF-8; anything else
/// would be shown with replacement characters, never dropped silently).
fn json_data(t: &Tensor) -> Value {
    fn values<T: Element + serde::Serialize>(t: &Tensor) -> Value {
        json!(t.values::<T>().unwrap_or_default())
    }
    fn widened<T: Element>(t: &Tensor, f: impl Fn(T) -> f32) -> Value {
        json!(t.values::<T>().unwrap_or_default().into_iter().map(f).collect::<Vec<f32>>())
    }
    match t.dtype {
        DType::F32 => values::<f32>(t),
        DType::F64 => values::<f64>(t),
        DType::F16 => widened(t, half::f16::to_f32),
        DType::BF16 => widened(t, half::bf16::to_f32),
        DType::I8 => values::<i8>(t),
        DType::U8 => values::<u8>(t),
        DType::I16 => values::<i16>(t),
        DType::U16 => values::<u16>(t),
        DType::I32 => values::<i32>(t),
        DType::U32 => values::<u32>(t),
        DType::I64 => values::<i64>(t),
        DType::U64 => values::<u64>(t),
        DType::Bool => values::<bool>(t),
        DType::String => {
            json!(t.strings().unwrap_or_default().into_iter().map(String::from_utf8_lossy).collect::<Vec<_>>())
        }
    }
}

fn tensor_metadata(t: &TensorInfo) -> Value {
    let shape: Vec<i64> = t.declared.iter().map(|d| d.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1)).collect();
    json!({ "name": t.name, "datatype": datatype(t.dtype), "shape": shape })
}

/// An input as it is served: its fixed shape, with `-1` only for a batch dim
/// requests may vary.
fn input_metadata(t: &TensorInfo) -> Value {
    let shape: Vec<i64> = t
        .fixed
        .iter()
        .enumerate()
        .map(|(i, &n)| if i == 0 && t.batched() { -1 } else { i64::try_from(n).unwrap_or(-1) })
        .collect();
    json!({ "name": t.name, "datatype": datatype(t.dtype), "shape": shape })
}

fn metadata(shared: &Shared, name: &str, version: Option<&str>) -> Response {
    let slot = match shared.serving.pick(name, version) {
        Ok(s) => s,
        Err(e) => return serve_error(&e),
    };
    let route = shared.serving.model(name).map(|m| m.route());
    let versions: Vec<String> = route
        .iter()
        .flat_map(|r| [r.active.as_ref(), r.standby.as_ref()])
        .flatten()
        .map(|l| l.version.clone())
        .collect();
    axum::Json(json!({
        "name": name,
        "versions": versions,
        "platform": "onnx",
        // Which engine serves the version this request would reach, and in
        // how many workers (extensions; v2 clients ignore unknown fields).
        "engine": slot.worker.engine().name(),
        "workers": slot.worker.size(),
        // Triton's name for it; null when requests run as they come.
        "dynamic_batching": slot.batcher.as_ref().map(|b| json!({
            "max_batch_size": b.max_samples(),
            "max_queue_delay_us": u64::try_from(b.delay().as_micros()).unwrap_or(u64::MAX),
        })),
        "inputs": slot.inputs.iter().map(input_metadata).collect::<Vec<_>>(),
        "outputs": slot.outputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn model_metadata(State(Api { shared, .. }): State<Api>, Path(name): Path<String>) -> Response {
    metadata(&shared, &name, None)
}

async fn version_metadata(
    State(Api { shared, .. }): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&shared, &name, Some(&version))
}

/// Ground truth for an earlier request (a Sentinel extension to the protocol).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    /// The `id` of the inference response.
    id: String,
    /// The true class.
    label: i64,
}

/// `POST /v2/models/{name}/feedback` `{"id": "...", "label": 3}`: scores the
/// slot that answered request `id` (its window's feedback accuracy feeds the
/// rollout decisions). 404 when the id is unknown or no longer remembered.
async fn feedback(
    State(Api { shared, limits, .. }): State<Api>,
    Path(name): Path<String>,
    body: Result<axum::Json<FeedbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(axum::Json(r)) => r,
        Err(e) => return bad(format!("feedback body: {}", e.body_text())),
    };
    if req.id.len() > limits.max_id_bytes {
        return bad(format!("request id is {} bytes; at most {} are allowed", req.id.len(), limits.max_id_bytes));
    }
    match shared.serving.feedback(&name, &req.id, req.label) {
        Some(f) => axum::Json(json!({
            "id": req.id,
            "model_version": f.version,
            "predicted": f.predicted,
            "correct": f.correct,
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no remembered request `{}` for model `{}`", req.id, decode::clip(&name)),
        ),
    }
}

async fn infer(State(api): State<Api>, Path(name): Path<String>, headers: HeaderMap, body: Body) -> Response {
    run_infer(&api, &name, None, &headers, body).await.unwrap_or_else(|r| r)
}

async fn infer_version(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(&api, &name, Some(&version), &headers, body).await.unwrap_or_else(|r| r)
}

/// Bytes of an oversize body read on (and dropped) before answering, so a
/// client still sending sees the 400 instead of a reset connection.
const DRAIN_CAP: usize = 64 << 20;

/// Reads a request body up to `limit` bytes, holding its size in the
/// in-flight budget: a `Content-Length` is reserved whole before reading, a
/// chunked body chunk by chunk. A longer body is a 400 saying so; a body
/// that does not fit the budget is a 503 with `Retry-After`. Both are
/// drained first (up to [`DRAIN_CAP`]) without being kept.
async fn read_limited(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    admission: &Admission,
) -> Result<(Bytes, Reservation), Response> {
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut held = admission.reservation();
    let mut buf = Vec::new();
    let mut refused = None;
    if let Some(n) = announced.filter(|n| *n <= limit) {
        match held.grow(n) {
            Ok(()) => buf.reserve_exact(n),
            Err(e) => refused = Some(e),
        }
    }
    let mut stream = body.into_data_stream();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("reading the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if refused.is_none() && total <= limit {
            if total > held.bytes()
                && let Err(e) = held.grow(total - held.bytes())
            {
                refused = Some(e);
                buf = Vec::new();
                continue;
            }
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_CAP {
            break;
        }
    }
    // A refused body is read and dropped chunk by chunk (nothing is held),
    // so the client sees the 503 rather than a reset connection.
    if let Some(e) = refused {
        return Err(busy(&e));
    }
    if total > limit {
        let at_least = if total > DRAIN_CAP { "at least " } else { "" };
        return Err(bad(format!("request body of {at_least}{total} bytes is over the limit of {limit} bytes")));
    }
    Ok((Bytes::from(buf), held))
}

/// 503 with `Retry-After`: the in-flight budget is spent.
fn busy(e: &Busy) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

async fn run_infer(
    api: &Api,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let (body, _held) = read_limited(body, headers, api.limits.max_body_bytes, &api.admission).await?;
    let header_length = match headers.get(HEADER_LENGTH) {
        Some(v) => Some(v.to_str().map_err(|_| bad(format!("{HEADER_LENGTH} must be a byte count")))?),
        None => None,
    };
    let req = decode_request(body, header_length, &api.limits).map_err(|e| bad(e.to_string()))?;
    let served = api.shared.serving.infer(name, version, req.inputs, req.id).await.map_err(|e| serve_error(&e))?;

    let all_binary = req.binary_output;
    let wanted: Vec<(usize, bool)> = match &req.outputs {
        None => (0..served.outputs.len()).map(|i| (i, all_binary)).collect(),
        Some(list) => {
            let mut v = Vec::with_capacity(list.len());
            for o in list {
                let i = served.output_names.iter().position(|n| *n == o.name).ok_or_else(|| {
                    bad(format!(
                        "unknown output `{}`; the model has [{}]",
                        decode::clip(&o.name),
                        served.output_names.join(", ")
                    ))
                })?;
                v.push((i, o.binary.unwrap_or(all_binary)));
            }
            v
        }
    };
    let mut outputs = Vec::with_capacity(wanted.len());
    let mut tail: Vec<u8> = Vec::new();
    for (i, as_binary) in wanted {
        let (Some(t), Some(name)) = (served.outputs.get(i), served.output_names.get(i)) else { continue };
        let mut o = json!({ "name": name, "datatype": datatype(t.dtype), "shape": t.shape });
        if as_binary {
            o["parameters"] = json!({ "binary_data_size": t.data.len() });
            tail.extend_from_slice(&t.data);
        } else {
            o["data"] = json_data(t);
        }
        outputs.push(o);
    }
    let mut response = json!({
        "model_name": name,
        "model_version": served.version,
        "outputs": outputs,
        "parameters": { "sentinel_slot": served.color.as_str() },
    });
    // The id to quote in feedback: the client's, or one the agent made up.
    response["id"] = json!(served.id);
    let text = serde_json::to_vec(&response).unwrap_or_default();
    let version_value = HeaderValue::from_str(&served.version).unwrap_or(HeaderValue::from_static("unknown"));
    if tail.is_empty() {
        Ok((
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (header::HeaderName::from_static(VERSION_HEADER), version_value),
            ],
            text,
        )
            .into_response())
    } else {
        let head_len = HeaderValue::from(text.len());
        let mut body = text;
        body.extend_from_slice(&tail);
        Ok((
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
                (header::HeaderName::from_static(HEADER_LENGTH), head_len),
                (header::HeaderName::from_static(VERSION_HEADER), version_value),
            ],
            body,
        )
            .into_response())
    }
}
