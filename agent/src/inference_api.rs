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

use crate::agent::{AgentError, Shared};
use crate::config::ServingSettings;
use crate::serving::{Loaded, ServeError, TensorInfo};
use crate::supervisor::SlotState as WorkerState;
use crate::worker::protocol::{DType, Tensor};

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

    /// One server future per listener; each ends when `stop` turns true.
    pub fn serve(self, shared: Arc<Shared>, stop: watch::Receiver<bool>) -> Vec<Server> {
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
            let (app, stop) = (app.clone(), stop.clone());
            servers.push(Box::pin(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped(stop)).await {
                    tracing::error!(error = %e, "inference API (tcp) stopped");
                }
            }));
        }
        if let Some(unix) = self.unix {
            servers.push(Box::pin(async move {
                if let Err(e) = axum::serve(unix, app).with_graceful_shutdown(stopped(stop)).await {
                    tracing::error!(error = %e, "inference API (unix) stopped");
                }
            }));
        }
        servers
    }
}

/// The v2 routes over the agent's models.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.serving.max_body_bytes;
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
        .with_state(shared)
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
    error(status, e.to_string())
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
async fn server_ready(State(shared): State<Arc<Shared>>) -> StatusCode {
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

async fn model_ready(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    ready_status(&shared, &name, None)
}

async fn version_ready(State(shared): State<Arc<Shared>>, Path((name, version)): Path<(String, String)>) -> Response {
    ready_status(&shared, &name, Some(&version))
}

fn datatype(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::I64 => "INT64",
    }
}

fn tensor_metadata(t: &TensorInfo) -> Value {
    let shape: Vec<i64> = t.declared.iter().map(|d| d.and_then(|n| i64::try_from(n).ok()).unwrap_or(-1)).collect();
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
        "inputs": slot.inputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
        "outputs": slot.outputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn model_metadata(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    metadata(&shared, &name, None)
}

async fn version_metadata(
    State(shared): State<Arc<Shared>>,
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
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Result<axum::Json<FeedbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(axum::Json(r)) => r,
        Err(e) => return bad(format!("feedback body: {}", e.body_text())),
    };
    match shared.serving.feedback(&name, &req.id, req.label) {
        Some(f) => axum::Json(json!({
            "id": req.id,
            "model_version": f.version,
            "predicted": f.predicted,
            "correct": f.correct,
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no remembered request `{}` for model `{name}`", req.id)),
    }
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<RequestInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

fn param_bool(p: Option<&serde_json::Map<String, Value>>, key: &str) -> Option<bool> {
    p.and_then(|p| p.get(key)).and_then(Value::as_bool)
}

async fn infer(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(&shared, &name, None, &headers, body).await.unwrap_or_else(|r| r)
}

async fn infer_version(
    State(shared): State<Arc<Shared>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(&shared, &name, Some(&version), &headers, body).await.unwrap_or_else(|r| r)
}

/// Bytes of an oversize body read on (and dropped) before answering, so a
/// client still sending sees the 400 instead of a reset connection.
const DRAIN_CAP: usize = 64 << 20;

/// Reads a request body up to `limit` bytes. A longer body is an error
/// saying so; it is drained first (up to [`DRAIN_CAP`]).
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, String> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading the request body: {e}"))?;
        total += chunk.len();
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_CAP {
            break;
        }
    }
    if total > limit {
        let at_least = if total > DRAIN_CAP { "at least " } else { "" };
        return Err(format!("request body of {at_least}{total} bytes is over the limit of {limit} bytes"));
    }
    Ok(Bytes::from(buf))
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

async fn run_infer(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let body = read_limited(body, shared.config.serving.max_body_bytes).await.map_err(bad)?;
    let (head, mut binary) = match headers.get(HEADER_LENGTH) {
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| bad(format!("{HEADER_LENGTH} must be a byte count")))?;
            if n > body.len() {
                return Err(bad(format!("{HEADER_LENGTH} is {n}, but the body has only {} bytes", body.len())));
            }
            (body.slice(..n), body.slice(n..))
        }
        None => (body.clone(), Bytes::new()),
    };
    let req: InferRequest = serde_json::from_slice(&head).map_err(|e| bad(format!("request JSON: {e}")))?;
    let mut named = Vec::with_capacity(req.inputs.len());
    for input in &req.inputs {
        named.push((input.name.clone(), decode_input(input, &mut binary).map_err(bad)?));
    }
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary tensor data are not claimed by any input", binary.len())));
    }
    let served = shared.serving.infer(name, version, named, req.id.clone()).await.map_err(|e| serve_error(&e))?;

    let all_binary = param_bool(req.parameters.as_ref(), "binary_data_output").unwrap_or(false);
    let wanted: Vec<(usize, bool)> = match &req.outputs {
        None => (0..served.outputs.len()).map(|i| (i, all_binary)).collect(),
        Some(list) => {
            let mut v = Vec::with_capacity(list.len());
            for o in list {
                let i = served.output_names.iter().position(|n| *n == o.name).ok_or_else(|| {
                    bad(format!("unknown output `{}`; the model has [{}]", o.name, served.output_names.join(", ")))
                })?;
                v.push((i, param_bool(o.parameters.as_ref(), "binary_data").unwrap_or(all_binary)));
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
            o["data"] = match t.dtype {
                DType::F32 => json!(t.to_f32().unwrap_or_default()),
                DType::I64 => json!(t.to_i64().unwrap_or_default()),
            };
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

/// Builds one input tensor from JSON data or the next binary chunk.
fn decode_input(input: &RequestInput, binary: &mut Bytes) -> Result<Tensor, String> {
    let dtype = match input.datatype.as_str() {
        "FP32" => DType::F32,
        "INT64" => DType::I64,
        other => return Err(format!("input `{}`: datatype {other} is not supported (FP32, INT64)", input.name)),
    };
    let shape = input
        .shape
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| format!("input `{}`: negative dim {d} in shape", input.name)))
        .collect::<Result<Vec<usize>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| format!("input `{}`: shape {:?} is too large", input.name, input.shape))?;
    let binary_size = input.parameters.as_ref().and_then(|p| p.get("binary_data_size")).map(|v| v.as_u64());
    let data = match (binary_size, &input.data) {
        (Some(Some(n)), None) => {
            let n = usize::try_from(n).map_err(|_| format!("input `{}`: binary_data_size too large", input.name))?;
            if n > binary.len() {
                return Err(format!(
                    "input `{}`: binary_data_size {n} exceeds the {} bytes left",
                    input.name,
                    binary.len()
                ));
            }
            binary.split_to(n).to_vec()
        }
        (Some(_), _) => {
            return Err(format!("input `{}`: give either data or a binary_data_size, not both", input.name));
        }
        (None, Some(data)) => {
            let mut flat = Vec::with_capacity(count);
            flatten(data, &mut flat);
            let mut bytes = Vec::with_capacity(count * dtype.size());
            for (i, v) in flat.iter().enumerate() {
                match dtype {
                    DType::F32 => {
                        let x =
                            v.as_f64().ok_or_else(|| format!("input `{}`: element {i} is not a number", input.name))?;
                        #[allow(clippy::cast_possible_truncation)] // FP32 is what the client declared
                        bytes.extend_from_slice(&(x as f32).to_le_bytes());
                    }
                    DType::I64 => {
                        let x = v
                            .as_i64()
                            .ok_or_else(|| format!("input `{}`: element {i} is not an integer", input.name))?;
                        bytes.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
            bytes
        }
        (None, None) => return Err(format!("input `{}` has no data", input.name)),
    };
    if data.len() != count * dtype.size() {
        return Err(format!(
            "input `{}`: shape {:?} needs {count} elements, got {}",
            input.name,
            shape,
            data.len() / dtype.size()
        ));
    }
    Ok(Tensor { dtype, shape, data })
}

/// Row-major flattening of nested JSON arrays (the protocol allows both forms).
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str) -> RequestInput {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn json_and_binary_inputs_decode_to_the_same_tensor() {
        let nested = input(r#"{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}"#);
        let t = decode_input(&nested, &mut Bytes::new()).unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
        let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bin = Bytes::from(raw);
        let b = input(r#"{"name":"x","shape":[2,2],"datatype":"FP32","parameters":{"binary_data_size":16}}"#);
        assert_eq!(decode_input(&b, &mut bin).unwrap(), t);
        assert!(bin.is_empty());
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let cases = [
            (r#"{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}"#, "needs 3 elements, got 2"),
            (r#"{"name":"x","shape":[1],"datatype":"FP16","data":[1]}"#, "FP16 is not supported"),
            (r#"{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}"#, "negative dim"),
            (r#"{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}"#, "not an integer"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}"#, "not a number"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32"}"#, "no data"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}"#, "exceeds"),
        ];
        for (text, want) in cases {
            let err = decode_input(&input(text), &mut Bytes::new()).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
