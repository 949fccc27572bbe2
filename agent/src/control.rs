//! The control socket: how `sentinel-agent status`, `models` and `rollback`
//! talk to the running agent, locally, never over the network.
//!
//! HTTP/1.1 on a unix socket, `<runtime_dir>/control.sock`, mode 0600 in a
//! 0700 directory: only the agent's user (and root) can connect, so the
//! routes need no token.
//!
//! - `GET /status`: [`Status`], everything `sentinel-agent status` shows.
//! - `GET /models`: [`ModelLine`]s, one per model.
//! - `POST /rollback/{model}`: an operator rollback
//!   ([`crate::rollout::controller::Rollouts::rollback_now`]); `{"message"}` on
//!   success, `{"error"}` with 404 (unknown model) or 409 (nothing to roll
//!   back to).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::rollout::controller::{OPERATOR, Rollouts};
use crate::serving::{CandidateMode, Loaded, Route};
use crate::slots::Color;
use crate::state::{AgentError, Shared};
use crate::store::{self, EventKind};
use crate::supervisor::SlotState as WorkerState;

/// Everything `sentinel-agent status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub agent_version: String,
    pub device_id: String,
    /// The labels the hub targets this device by (enrolment labels first),
    /// from the last verified desired state; before the first one, the
    /// labels of the config file.
    pub labels: BTreeMap<String, String>,
    /// `hub` or `config`: where `labels` come from.
    #[serde(default)]
    pub labels_from: String,
    pub hub: HubLink,
    /// Revision of the last verified desired state, and the one applied.
    pub revision: u64,
    pub applied_revision: u64,
    pub models: Vec<ModelStatus>,
    pub last_rollback: Option<RollbackInfo>,
    pub disk: DiskUse,
}

/// The subscription to the hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubLink {
    pub grpc_url: String,
    pub connected: bool,
    /// When the link last went up or down (Unix ms; 0 if never).
    pub since_ms: i64,
    pub last_error: String,
}

/// One model and its two slots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelStatus {
    pub name: String,
    /// The agent's status of the model (serving, canary, rolled_back, ...).
    pub status: String,
    pub status_version: String,
    pub detail: String,
    /// Blue, then green.
    pub slots: Vec<SlotStatus>,
}

/// One slot: its committed state, traffic and live figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotStatus {
    pub color: String,
    pub version: Option<String>,
    /// empty, loading, validating, canary, active, standby or failed.
    pub state: String,
    /// Why the slot failed, if it did.
    pub reason: String,
    /// Percentage of requests this slot answers.
    pub traffic_percent: u8,
    /// Whether it gets a mirror of every request (shadow phase).
    pub mirror: bool,
    /// Live figures over the rollout window; `None` when no worker is loaded.
    pub metrics: Option<serde_json::Value>,
    pub worker: Option<WorkerStatus>,
}

impl SlotStatus {
    /// `100%`, `10%`, `mirror` or `-`.
    pub fn traffic(&self) -> String {
        match (self.mirror, self.traffic_percent) {
            (true, _) => "mirror".to_owned(),
            (false, 0) => "-".to_owned(),
            (false, p) => format!("{p}%"),
        }
    }
}

/// The slot's worker processes, taken together: the slot is running while
/// any of them serves, and failed when one gave up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// starting, running or failed.
    pub state: String,
    /// The inference engine: tract or ort.
    #[serde(default)]
    pub engine: String,
    /// The first running worker's process id.
    pub pid: Option<u32>,
    /// Resident memory of all the slot's workers together.
    pub rss_bytes: Option<u64>,
    /// The address-space limit of all the slot's workers together (each
    /// worker has `serving.memory_limit_mib`).
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// Whether every running worker is confined.
    pub confined: bool,
    /// Why the worker runs without its seccomp sandbox (e.g. seccomp ENOSYS), or why it failed.
    pub reason: Option<String>,
    /// Restarts over all the slot's workers.
    pub restarts: u64,
    /// Each worker of the slot's pool.
    #[serde(default)]
    pub workers: Vec<PoolWorkerStatus>,
}

/// One worker of a slot's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolWorkerStatus {
    /// starting, running or failed.
    pub state: String,
    pub pid: Option<u32>,
    pub rss_bytes: Option<u64>,
    pub confined: bool,
    pub reason: Option<String>,
    pub restarts: u64,
    /// Requests running on it now.
    pub in_flight: usize,
    /// Requests it answered, over its restarts.
    #[serde(default)]
    pub answered: u64,
}

/// The newest `rolled_back` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackInfo {
    pub at_ms: i64,
    pub model: String,
    pub version: String,
    pub reason: String,
}

/// Bytes the store holds on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskUse {
    pub state_dir: String,
    pub models_bytes: u64,
    pub database_bytes: u64,
}

/// One line of `sentinel-agent models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelLine {
    pub name: String,
    pub active: Option<String>,
    pub standby: Option<String>,
    pub status: String,
    pub status_version: String,
    pub detail: String,
}

/// Binds the control socket: creates the runtime dir (0700), refuses to
/// take the socket over from an agent that still answers on it, and
/// restricts the socket to the agent's user (0600).
pub fn bind(config: &AgentConfig) -> Result<tokio::net::UnixListener, AgentError> {
    let path = config.control_socket();
    let failed = |source: std::io::Error| AgentError::Listen { addr: path.display().to_string(), source };
    std::fs::create_dir_all(&config.runtime_dir).map_err(failed)?;
    std::fs::set_permissions(&config.runtime_dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent answers on this control socket",
            )));
        }
        // Left by an agent that is gone.
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(failed)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

/// What the control routes reach: the agent's state and its rollouts.
#[derive(Debug, Clone)]
struct Control {
    shared: Arc<Shared>,
    rollouts: Arc<Rollouts>,
}

/// Serves the control routes until `stop` turns true, then removes the socket.
pub async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    rollouts: Arc<Rollouts>,
    mut stop: watch::Receiver<bool>,
) {
    let path = shared.config.control_socket();
    let app = Router::new()
        .route("/status", get(status))
        .route("/models", get(models))
        .route("/rollback/{model}", post(rollback))
        .with_state(Control { shared, rollouts });
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::error!(error = %e, "control socket stopped");
    }
    let _ = std::fs::remove_file(path);
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn status(State(Control { shared, .. }): State<Control>) -> Response {
    match build_status(&shared).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "building the status failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "reading the agent's state failed; see its log")
        }
    }
}

async fn models(State(Control { shared, .. }): State<Control>) -> Response {
    match shared.store.models() {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|m| ModelLine {
                    name: m.name,
                    active: m.active_version,
                    standby: m.standby_version,
                    status: m.status.as_str().to_owned(),
                    status_version: m.status_version,
                    detail: m.detail,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => {
            tracing::error!(error = %crate::util::error_chain(&e), "listing models failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "reading the agent's state failed; see its log")
        }
    }
}

/// The reason the hub and the event log get for a rollback from the CLI.
pub const OPERATOR_REASON: &str = "operator rollback";

async fn rollback(State(Control { shared, rollouts }): State<Control>, UrlPath(model): UrlPath<String>) -> Response {
    if shared.serving.model(&model).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no model `{model}` on this device (see `sentinel-agent models`)"),
        );
    }
    match rollouts.rollback_now(&shared, &model, OPERATOR, OPERATOR_REASON).await {
        Ok(message) => Json(json!({ "message": message })).into_response(),
        Err(reason) => error(StatusCode::CONFLICT, reason.to_string()),
    }
}

/// Assembles [`Status`] from the view, the store and the live slots.
pub async fn build_status(shared: &Shared) -> Result<Status, crate::store::StoreError> {
    let view = shared.view();
    let now = Instant::now();
    let mut models = Vec::new();
    for row in shared.store.models()?.into_iter().filter(|m| m.status != store::ModelStatus::Removed) {
        let route = shared.serving.model(&row.name).map_or_else(|| Arc::new(Route::default()), |ms| ms.route());
        // The committed slot pair, read from the store: an install holds the
        // in-memory pair for the whole load and validation, and status must
        // answer meanwhile (showing `loading` or `validating`).
        let slots = shared.store.load_slots(&row.name)?;
        let mut out = Vec::new();
        for color in [Color::Blue, Color::Green] {
            let slot = slots.as_ref().map(|s| s.get(color).clone());
            let loaded = [&route.active, &route.standby, &route.candidate]
                .into_iter()
                .flatten()
                .find(|l| l.color == color)
                .cloned();
            let (traffic_percent, mirror) = traffic(&route, color);
            let state = slot.as_ref().map(|s| s.state);
            out.push(SlotStatus {
                color: color.as_str().to_owned(),
                version: slot.as_ref().and_then(|s| s.version.clone()),
                state: state.map_or_else(|| "empty".to_owned(), |s| slot_state_name(s).to_owned()),
                reason: slot.map(|s| s.reason).unwrap_or_default(),
                traffic_percent,
                mirror,
                metrics: loaded.as_ref().map(|l| crate::rollout::controller::metrics_json(&l.metrics(now))),
                worker: match &loaded {
                    Some(l) => Some(worker_status(l, shared.serving.settings().memory_limit_bytes).await),
                    None => None,
                },
            });
        }
        models.push(ModelStatus {
            name: row.name,
            status: row.status.as_str().to_owned(),
            status_version: row.status_version,
            detail: row.detail,
            slots: out,
        });
    }
    let last_rollback = shared.store.last_event(EventKind::RolledBack)?.map(|e| RollbackInfo {
        at_ms: e.at_ms,
        model: e.model,
        version: e.version,
        // The event carries `reason | metrics snapshot`; the reason is what people read.
        reason: e.reason.clone(),
    });
    let state_dir = &shared.config.state_dir;
    let database_bytes = ["agent.db", "agent.db-wal", "agent.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(state_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    Ok(Status {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        device_id: shared.config.device_id.clone(),
        labels: view.labels.clone().unwrap_or_else(|| shared.config.labels.clone()),
        labels_from: if view.labels.is_some() { "hub" } else { "config" }.to_owned(),
        hub: HubLink {
            grpc_url: shared.hubs.grpc_url().to_owned(),
            connected: view.connected,
            since_ms: view.since_ms,
            last_error: view.last_error,
        },
        revision: view.revision,
        applied_revision: view.applied_revision,
        models,
        last_rollback,
        disk: DiskUse {
            state_dir: state_dir.display().to_string(),
            models_bytes: dir_bytes(shared.store.models_dir()),
            database_bytes,
        },
    })
}

fn slot_state_name(s: crate::slots::SlotState) -> &'static str {
    use crate::slots::SlotState::*;
    match s {
        Empty => "empty",
        Loading => "loading",
        Validating => "validating",
        Canary => "canary",
        Active => "active",
        Standby => "standby",
        Failed => "failed",
    }
}

/// The share of requests the slot of `color` answers, and whether it gets a mirror.
fn traffic(route: &Route, color: Color) -> (u8, bool) {
    let is = |l: &Option<Arc<Loaded>>| l.as_ref().is_some_and(|l| l.color == color);
    let canary = match route.mode {
        CandidateMode::Canary(p) if route.candidate.is_some() => p.min(100),
        _ => 0,
    };
    if is(&route.active) {
        (100 - canary, false)
    } else if is(&route.candidate) {
        (canary, route.mode == CandidateMode::Shadow)
    } else {
        (0, false)
    }
}

/// A worker state as status words: state, pid, confined, reason.
fn state_words(state: WorkerState, last_failure: Option<String>) -> (&'static str, Option<u32>, bool, Option<String>) {
    match state {
        WorkerState::Starting { .. } => ("starting", None, false, last_failure),
        WorkerState::Running { pid, confined, unconfined_reason } => {
            ("running", Some(pid), confined, unconfined_reason)
        }
        WorkerState::Failed(reason) => ("failed", None, false, Some(reason)),
    }
}

async fn worker_status(l: &Loaded, memory_limit: Option<u64>) -> WorkerStatus {
    let workers: Vec<PoolWorkerStatus> = l
        .worker
        .workers()
        .await
        .into_iter()
        .map(|w| {
            let (state, pid, confined, reason) = state_words(w.state, w.last_failure);
            PoolWorkerStatus {
                state: state.to_owned(),
                pid,
                rss_bytes: w.rss_bytes,
                confined,
                reason,
                restarts: w.restarts,
                in_flight: w.in_flight,
                answered: w.answered,
            }
        })
        .collect();
    let (state, pid, confined, reason) = state_words(l.worker.state(), l.worker.last_failure());
    let rss = workers.iter().filter_map(|w| w.rss_bytes).fold(None, |sum: Option<u64>, r| Some(sum.unwrap_or(0) + r));
    WorkerStatus {
        state: state.to_owned(),
        engine: l.worker.engine().name().to_owned(),
        pid,
        rss_bytes: rss,
        memory_limit_bytes: memory_limit.map(|m| m.saturating_mul(workers.len() as u64)),
        confined,
        reason,
        restarts: l.worker.restarts(),
        workers,
    }
}

/// Total size of the regular files under `dir` (model files and partial downloads).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some(if m.is_dir() { dir_bytes(&e.path()) } else { m.len() })
        })
        .sum()
}
