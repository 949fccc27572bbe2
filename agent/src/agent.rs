//! The running agent: wiring of sync, apply and report.
//!
//! - [`crate::sync`] keeps a `watch` of the latest verified desired state.
//! - The apply loop makes the device match it: for each model, refuse it if
//!   the hardware does not fit, download and verify what is missing, and
//!   switch the active version in one committed step. A failure leaves the
//!   previous version active.
//! - The report loop sends the hub what the device runs and what happened,
//!   at every change and every heartbeat.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentEvent, AgentReport, ModelAssignment, ModelManifest, ModelStatus};
use sentinel_proto::{VerifiedState, verify_state};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::AgentConfig;
use crate::download::{self, Wanted};
use crate::serving::{Install, Serving, ValidationSet};
use crate::store::{ModelRow, Store, StoreError};
use crate::sync::error_chain;

/// Failures starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("opening the state dir")]
    Store(#[from] StoreError),
    #[error("setting up the connection to the hub: {0}")]
    Connect(String),
    #[error("binding a listener (inference API, metrics or control socket) on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the agent shows of itself: for status commands and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentView {
    pub connected: bool,
    pub since_ms: i64,
    /// Why the link to the hub last went down; cleared when it comes up.
    pub last_error: String,
    /// The labels the hub targets this device by, from the last verified
    /// desired state (None before the first).
    pub labels: Option<BTreeMap<String, String>>,
    /// Revision of the last verified desired state.
    pub revision: u64,
    /// Revision the apply loop has finished with.
    pub applied_revision: u64,
    pub models: Vec<ModelRow>,
    /// Kinds of refused desired states, in order (e.g. "replayed").
    pub refused_states: Vec<String>,
    pub downloads_resumed_from: Vec<u64>,
}

impl AgentView {
    /// One line for systemd's `STATUS=` (`systemctl status` shows it): the
    /// hub connection and what each model serves, e.g.
    /// `hub connected; digits 1.0.0 (2.0.0 rolled_back)`.
    pub fn status_line(&self) -> String {
        let hub = if self.connected {
            "hub connected".to_owned()
        } else if self.last_error.is_empty() {
            "hub not connected yet".to_owned()
        } else {
            format!("hub unreachable ({})", clip(&self.last_error, 80))
        };
        let models: Vec<String> = self
            .models
            .iter()
            .filter(|m| m.status != "removed")
            .map(|m| {
                let active = m.active_version.as_deref().unwrap_or("nothing");
                if m.status == "serving" && m.active_version.as_deref() == Some(m.status_version.as_str()) {
                    format!("{} {active}", m.name)
                } else {
                    format!("{} {active} ({} {})", m.name, m.status_version, m.status)
                }
            })
            .collect();
        let models = if models.is_empty() { "no models".to_owned() } else { models.join(", ") };
        clip(&format!("{hub}; {models}"), 240)
    }
}

/// `s` cut to at most `max` characters, marked with `...` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub struct Shared {
    pub config: AgentConfig,
    pub store: Store,
    pub serving: Serving,
    view: watch::Sender<AgentView>,
    report_now: Notify,
    heartbeat: Mutex<Duration>,
}

impl Shared {
    pub fn heartbeat(&self) -> Duration {
        *self.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_connected(&self) {
        self.view.send_modify(|v| {
            v.connected = true;
            v.since_ms = crate::now_ms();
            // Stale once connected: the log keeps it.
            v.last_error.clear();
        });
        self.report_now.notify_one();
    }

    pub fn set_disconnected(&self, reason: &str) {
        self.view.send_modify(|v| {
            if v.connected {
                v.since_ms = crate::now_ms();
            }
            v.connected = false;
            v.last_error = reason.to_owned();
        });
    }

    /// A desired state verified (from the hub or, at start, from disk).
    pub(crate) fn verified_state(&self, v: &VerifiedState) {
        self.view.send_modify(|view| {
            view.revision = view.revision.max(v.state.revision);
            view.labels = Some(v.state.labels.clone());
        });
    }

    /// Records a refused desired state: logged, an event for the hub, and visible in the view.
    pub fn refused_state(&self, kind: &str, reason: &str) {
        self.event("state_refused", "", "", &format!("{kind}: {reason}"));
        self.serving.metrics().verification_failed(kind);
        self.view.send_modify(|v| v.refused_states.push(kind.to_owned()));
        self.report_now.notify_one();
    }

    /// The current view.
    pub fn view(&self) -> AgentView {
        self.view.borrow().clone()
    }

    /// Revision the apply loop last finished with.
    pub fn applied_revision(&self) -> u64 {
        let v = self.view.borrow();
        v.applied_revision.max(v.revision)
    }

    /// Model state changed: refresh the view and report soon.
    pub fn changed(&self) {
        self.refresh_models();
        self.report_now.notify_one();
    }

    pub(crate) fn event(&self, kind: &str, model: &str, version: &str, reason: &str) {
        if let Err(e) = self.store.event(kind, model, version, reason) {
            tracing::error!(error = %e, kind, "logging an event failed");
        }
    }

    fn refresh_models(&self) {
        match self.store.models() {
            Ok(models) => self.view.send_modify(|v| v.models = models),
            Err(e) => tracing::error!(error = %e, "reading model state failed"),
        }
    }
}

/// A running agent. Dropping it does not stop it; call [`AgentHandle::shutdown`].
#[derive(Debug)]
pub struct AgentHandle {
    pub shared: Arc<Shared>,
    /// Where the KServe v2 inference API listens on TCP, if enabled.
    pub inference_addr: Option<SocketAddr>,
    /// Where `/metrics` is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The control socket `sentinel-agent status` talks to.
    pub control_socket: PathBuf,
    view: watch::Receiver<AgentView>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl AgentHandle {
    /// The current view.
    pub fn view(&self) -> AgentView {
        self.view.borrow().clone()
    }

    /// Every change of the view, from the current one on.
    pub fn subscribe(&self) -> watch::Receiver<AgentView> {
        self.view.clone()
    }

    /// Waits until the view satisfies `pred`, or `limit` passes (then returns
    /// the last view as an error, for the test's message).
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&AgentView) -> bool) -> Result<AgentView, AgentView> {
        let mut rx = self.view.clone();
        match tokio::time::timeout(limit, rx.wait_for(|v| pred(v))).await {
            Ok(Ok(v)) => Ok(v.clone()),
            _ => Err(self.view()),
        }
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn endpoint(config: &AgentConfig, url: &str) -> Result<Endpoint, AgentError> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| AgentError::Connect(format!("grpc_url {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(config.heartbeat)
        .keep_alive_timeout(config.heartbeat * 2);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &config.ca_pem {
            Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        ep = ep.tls_config(tls).map_err(|e| AgentError::Connect(e.to_string()))?;
    }
    Ok(ep)
}

/// An HTTP client for downloads that trusts the configured CA.
pub fn http_client(config: &AgentConfig) -> Result<reqwest::Client, AgentError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .user_agent(concat!("sentinel-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &config.ca_pem {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| AgentError::Connect(format!("ca_file: {e}")))?;
        b = b.tls_certs_only(certs);
    }
    b.build().map_err(|e| AgentError::Connect(e.to_string()))
}

/// Starts the agent: loads the last verified state (so the device serves it
/// even with the hub unreachable), then syncs, applies and reports.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    let store = Store::open(&config.state_dir)?;
    let (view_tx, view_rx) = watch::channel(AgentView::default());
    let heartbeat = Mutex::new(config.heartbeat);
    let channel: Channel = endpoint(&config, &config.grpc_url)?.connect_lazy();
    let http = http_client(&config)?;
    let metrics = Arc::new(crate::metrics::AgentMetrics::new());
    let serving = Serving::with_metrics(config.serving.clone(), config.state_dir.join("workers"), metrics);
    let shared = Arc::new(Shared { config, store, serving, view: view_tx, report_now: Notify::new(), heartbeat });
    let trusted = shared.config.trusted.clone();
    shared.serving.restore(&shared.store, |sha| {
        let signed = shared.store.manifest(sha).ok().flatten()?;
        sentinel_proto::verify_manifest(&signed, &trusted).ok()
    });
    shared.refresh_models();
    let listeners = crate::inference_api::bind(&shared.config.serving).await?;
    let inference_addr = listeners.tcp_addr();
    let metrics_listener = crate::metrics::bind(shared.config.serving.metrics_listen.as_deref()).await?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let control = crate::control::bind(&shared.config)?;
    // No other agent answers on the control socket now, so worker dirs of
    // other processes are leftovers of a crash.
    let work_dir = shared.config.state_dir.join("workers");
    match crate::supervisor::process::remove_stale_work_dirs(&work_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, dir = %work_dir.display(), "removed worker dirs left by a crash"),
        Err(e) => tracing::warn!(error = %e, dir = %work_dir.display(), "removing stale worker dirs failed"),
    }
    let control_socket = shared.config.control_socket();

    // The last verified state, re-verified from disk (signature and device
    // only: it was current when stored, and the device keeps serving it).
    let initial = match shared.store.desired()? {
        Some((revision, signed)) => {
            match verify_state(&signed, &shared.config.trusted, &shared.config.device_id, 0, i64::MIN) {
                Ok(v) => {
                    tracing::info!(revision, "loaded the last verified desired state");
                    shared.verified_state(&v);
                    Some(Arc::new(v))
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "the stored desired state does not verify; ignoring it");
                    None
                }
            }
        }
        None => None,
    };
    let (states_tx, states_rx) = watch::channel(initial);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::sync::run(shared.clone(), channel.clone(), states_tx, stop_rx.clone()));
    tasks.spawn(apply_loop(shared.clone(), http, states_rx, stop_rx.clone()));
    tasks.spawn(report_loop(shared.clone(), channel, stop_rx.clone()));
    // One connection budget for the inference API and metrics listeners.
    let connections = sentinel_net::Connections::new(shared.config.serving.connection_limits());
    if let Some(l) = metrics_listener {
        tasks.spawn(crate::metrics::serve(l, shared.clone(), connections.clone(), stop_rx.clone()));
    }
    tasks.spawn(crate::control::serve(control, shared.clone(), stop_rx.clone()));
    for server in listeners.serve(shared.clone(), &connections, stop_rx) {
        tasks.spawn(server);
    }
    Ok(AgentHandle { shared, inference_addr, metrics_addr, control_socket, view: view_rx, stop, tasks })
}

async fn apply_loop(
    shared: Arc<Shared>,
    http: reqwest::Client,
    mut states: watch::Receiver<Option<Arc<VerifiedState>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = states.borrow_and_update().clone();
        if let Some(v) = current {
            // `view.revision` was set when the state was verified (Shared::verified_state).
            apply(&shared, &http, &v).await;
            shared.view.send_modify(|view| view.applied_revision = v.state.revision);
            shared.report_now.notify_one();
        }
        tokio::select! {
            r = states.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Makes the device match one verified state.
async fn apply(shared: &Arc<Shared>, http: &reqwest::Client, v: &VerifiedState) {
    let config = &shared.config;
    let mut wanted_files = HashSet::new();
    for (assignment, m) in v.state.models.iter().zip(&v.manifests) {
        wanted_files.insert(m.sha256.clone());
        if let Some(set) = &m.validation {
            wanted_files
                .extend([set.inputs.as_ref(), set.labels.as_ref()].into_iter().flatten().map(|b| b.sha256.clone()));
        }
        // A rollout of another version is superseded by this state.
        if let Some(ms) = shared.serving.model(&m.name) {
            let running = ms.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            match running {
                Some(task) if task.sha256 == m.sha256 && task.version == m.version && !task.is_finished() => {
                    *ms.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
                    continue;
                }
                Some(task) => task.cancel().await,
                None => {}
            }
        }
        if let Ok(Some((revision, reason))) = shared.store.rejected(&m.name, &m.sha256, &m.version)
            && revision >= v.state.revision
        {
            tracing::info!(model = %m.name, version = %m.version, revision, "rolled back here at this revision; not retried");
            let _ = shared.store.set_deployment_status(
                &m.name,
                "rolled_back",
                &m.version,
                &reason,
                assignment.deployment_id,
            );
            continue;
        }
        // The version this device keeps warm as standby (the hub halted or
        // rolled back the active one): swap back at once instead of loading
        // it again. Then it is the active version, and handled as such below.
        let standby_is_it = shared.serving.model(&m.name).is_some_and(|ms| {
            let route = ms.route();
            route.active.is_some()
                && route.standby.as_ref().is_some_and(|s| s.sha256 == m.sha256 && s.version == m.version)
        });
        if standby_is_it {
            let reason =
                format!("the hub's desired state names {} again (deployment {})", m.version, assignment.deployment_id);
            match crate::rollout::controller::rollback_now(shared, &m.name, crate::rollout::controller::HUB, &reason)
                .await
            {
                Ok(done) => tracing::info!(model = %m.name, %done, "standby restored for the hub"),
                Err(e) => tracing::warn!(model = %m.name, error = %e, "no instant swap; loading the version instead"),
            }
        }
        let current = shared.store.model(&m.name).ok().flatten();
        let serving_it = shared
            .serving
            .model(&m.name)
            .and_then(|ms| ms.route().active.as_ref().map(|a| a.sha256 == m.sha256 && a.version == m.version))
            .unwrap_or(false);
        if serving_it && current.as_ref().and_then(|c| c.active_sha256.as_deref()) == Some(m.sha256.as_str()) {
            if current.as_ref().is_some_and(|c| c.status != "serving") {
                let _ =
                    shared.store.set_deployment_status(&m.name, "serving", &m.version, "", assignment.deployment_id);
            }
            continue;
        }
        let policy = match crate::rollout::controller::policy_from(assignment.policy.as_ref(), &shared.config.rollout) {
            Ok(p) => crate::rollout::controller::with_declared_floor(
                p,
                m.accuracy.as_ref().map(|a| a.value),
                config.serving.validation_tolerance,
            ),
            Err(reason) => {
                refuse(shared, &m.name, &m.version, "refused", "policy_invalid", &reason, assignment.deployment_id);
                continue;
            }
        };
        if !m.hardware.is_empty() && !m.hardware.iter().any(|h| config.hardware.contains(h)) {
            let reason = format!(
                "wrong hardware: {} {} runs on [{}], this device is [{}]",
                m.name,
                m.version,
                m.hardware.join(", "),
                config.hardware.join(", ")
            );
            tracing::warn!(%reason, "model refused");
            refuse(
                shared,
                &m.name,
                &m.version,
                "refused",
                "download_refused",
                &format!("wrong_hardware: {reason}"),
                assignment.deployment_id,
            );
            continue;
        }
        let Some(files) = download_version(shared, http, assignment, m).await else { continue };
        if let Some(signed) = &assignment.manifest
            && let Err(e) = shared.store.save_manifest(signed)
        {
            refuse(shared, &m.name, &m.version, "failed", "model_failed", &error_chain(&e), assignment.deployment_id);
            continue;
        }
        let _ = shared.store.set_deployment_status(&m.name, "validating", &m.version, "", assignment.deployment_id);
        shared.refresh_models();
        shared.report_now.notify_one();
        let install = Install {
            manifest: m,
            deployment_id: assignment.deployment_id,
            model_path: files.model,
            validation: files.validation,
            policy: policy.clone(),
        };
        match shared.serving.install(&shared.store, install).await {
            Ok(installed) => {
                let measured = installed.accuracy.map(|a| format!("; validation accuracy {a:.4}")).unwrap_or_default();
                let next = if installed.promoted { "now serving" } else { "rollout started" };
                shared.event(
                    "model_installed",
                    &m.name,
                    &m.version,
                    &format!("sha256 {} verified, loaded and validated{measured}; {next}", m.sha256),
                );
                let has_standby =
                    shared.serving.model(&m.name).is_some_and(|ms| ms.route().standby.is_some() || !installed.promoted);
                match shared.serving.model(&m.name) {
                    Some(ms) if has_standby => {
                        crate::rollout::controller::spawn(shared.clone(), ms, installed.loaded, policy, installed.phase)
                    }
                    _ => {
                        let _ = shared.store.set_deployment_status(
                            &m.name,
                            "serving",
                            &m.version,
                            "",
                            assignment.deployment_id,
                        );
                    }
                }
            }
            Err(e) => {
                tracing::warn!(model = %m.name, version = %m.version, error = %e, "version not installed; the previous version keeps serving");
                refuse(shared, &m.name, &m.version, "failed", e.kind(), &e.to_string(), assignment.deployment_id);
            }
        }
        shared.refresh_models();
    }
    // Models no longer wanted on this device.
    let names: HashSet<&str> = v.manifests.iter().map(|m| m.name.as_str()).collect();
    if let Ok(models) = shared.store.models() {
        for m in models.iter().filter(|m| !names.contains(m.name.as_str()) && m.status != "removed") {
            if let Some(ms) = shared.serving.model(&m.name) {
                let task = ms.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                if let Some(task) = task {
                    task.cancel().await;
                }
            }
            shared.serving.remove(&m.name);
            let _ = shared.store.set_status(
                &m.name,
                "removed",
                m.active_version.as_deref().unwrap_or(""),
                "no longer in the desired state",
            );
        }
    }
    match shared.store.gc(&wanted_files) {
        Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed unneeded model files"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "model file cleanup failed"),
    }
    shared.refresh_models();
}

/// The verified files of one version.
struct VersionFiles {
    model: PathBuf,
    validation: Option<ValidationSet>,
}

/// Downloads and verifies a version's model file and its validation set.
/// On failure the refusal is recorded and `None` returned.
async fn download_version(
    shared: &Arc<Shared>,
    http: &reqwest::Client,
    assignment: &ModelAssignment,
    m: &ModelManifest,
) -> Option<VersionFiles> {
    let config = &shared.config;
    let _ = shared.store.set_status(&m.name, "downloading", &m.version, "");
    shared.refresh_models();
    shared.report_now.notify_one();
    shared.event("download_started", &m.name, &m.version, &assignment.artifact_url);
    let fetch = |url: String, sha256: String, size: u64| async move {
        let wanted = Wanted { url: &url, token: &config.token, sha256: &sha256, size };
        let fetched = download::fetch(http, shared.store.models_dir(), &wanted, config.download_attempts, |from| {
            shared.view.send_modify(|v| v.downloads_resumed_from.push(from));
            shared.event(
                "download_resumed",
                &m.name,
                &m.version,
                &format!("{url}: resuming from byte {from} of {size}"),
            );
        })
        .await;
        if let Ok((_, outcome)) = &fetched {
            shared.serving.metrics().download_bytes.inc_by(outcome.bytes_transferred);
        }
        fetched
    };
    let failed = |e: download::FetchError| {
        shared.serving.metrics().download_failed(e.kind());
        let reason = format!("{}: {}", e.kind(), error_chain(&e));
        tracing::warn!(model = %m.name, version = %m.version, %reason, "download refused; the previous version keeps serving");
        let status = if matches!(e, download::FetchError::GaveUp { .. } | download::FetchError::NoSpace { .. }) {
            "failed"
        } else {
            "refused"
        };
        refuse(shared, &m.name, &m.version, status, "download_refused", &reason, assignment.deployment_id);
    };
    let (model, outcome) = match fetch(assignment.artifact_url.clone(), m.sha256.clone(), m.size).await {
        Ok(r) => r,
        Err(e) => {
            failed(e);
            return None;
        }
    };
    tracing::info!(model = %m.name, version = %m.version, bytes = outcome.bytes_transferred, resumed = ?outcome.resumed_from, "model downloaded and verified");
    let set = m.validation.as_ref().and_then(|s| Some((s.inputs.as_ref()?, s.labels.as_ref()?)));
    let validation = match set {
        Some((inputs, labels)) if !assignment.validation_inputs_url.is_empty() => {
            let x = match fetch(assignment.validation_inputs_url.clone(), inputs.sha256.clone(), inputs.size).await {
                Ok((p, _)) => p,
                Err(e) => {
                    failed(e);
                    return None;
                }
            };
            let y = match fetch(assignment.validation_labels_url.clone(), labels.sha256.clone(), labels.size).await {
                Ok((p, _)) => p,
                Err(e) => {
                    failed(e);
                    return None;
                }
            };
            match (std::fs::read(&x), std::fs::read(&y)) {
                (Ok(inputs), Ok(labels)) => Some(ValidationSet {
                    inputs,
                    labels: labels
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                }),
                (Err(e), _) | (_, Err(e)) => {
                    refuse(
                        shared,
                        &m.name,
                        &m.version,
                        "failed",
                        "model_failed",
                        &format!("reading the validation set: {e}"),
                        assignment.deployment_id,
                    );
                    return None;
                }
            }
        }
        _ => None,
    };
    Some(VersionFiles { model, validation })
}

fn refuse(shared: &Shared, model: &str, version: &str, status: &str, kind: &str, reason: &str, deployment: i64) {
    let _ = shared.store.set_deployment_status(model, status, version, reason, deployment);
    shared.event(kind, model, version, reason);
    shared.refresh_models();
}

async fn report_loop(shared: Arc<Shared>, channel: Channel, mut stop: watch::Receiver<bool>) {
    let mut client = AgentSyncClient::new(channel);
    loop {
        let beat = shared.heartbeat();
        tokio::select! {
            () = shared.report_now.notified() => {}
            () = tokio::time::sleep(beat) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = report_once(&shared, &mut client).await {
            tracing::debug!(error = %e, "report not delivered; will retry");
        }
    }
}

async fn report_once(shared: &Shared, client: &mut AgentSyncClient<Channel>) -> Result<(), String> {
    let events = shared.store.unreported_events(500).map_err(|e| e.to_string())?;
    let models = shared.store.models().map_err(|e| e.to_string())?;
    let view = shared.view.borrow().clone();
    let report = AgentReport {
        device_id: shared.config.device_id.clone(),
        applied_revision: view.applied_revision,
        models: models
            .iter()
            .map(|m| ModelStatus {
                name: m.name.clone(),
                version: if m.status == "serving" {
                    m.active_version.clone().unwrap_or_default()
                } else {
                    m.status_version.clone()
                },
                state: m.status.clone(),
                detail: m.detail.clone(),
                deployment_id: m.status_deployment.or(m.active_deployment).unwrap_or(0),
            })
            .collect(),
        events: events
            .iter()
            .map(|e| AgentEvent {
                at_unix_ms: e.at_ms,
                kind: e.kind.clone(),
                model: e.model.clone(),
                version: e.version.clone(),
                reason: e.reason.clone(),
            })
            .collect(),
        sent_at_unix_ms: crate::now_ms(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut req = tonic::Request::new(report);
    let auth = format!("Bearer {}", shared.config.token).parse().map_err(|_| "token is not ASCII".to_owned())?;
    req.metadata_mut().insert("authorization", auth);
    let ack = client
        .report(req)
        .await
        .map_err(|s| format!("report to {} failed: {}", shared.config.grpc_url, crate::sync::status_text(&s)))?
        .into_inner();
    if let Some(last) = events.last() {
        shared.store.mark_reported(last.id).map_err(|e| e.to_string())?;
    }
    if ack.heartbeat_interval_ms > 0 {
        *shared.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Duration::from_millis(ack.heartbeat_interval_ms);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelRow;

    fn row(name: &str, active: Option<&str>, status: &str, status_version: &str) -> ModelRow {
        ModelRow {
            name: name.into(),
            active_version: active.map(Into::into),
            status: status.into(),
            status_version: status_version.into(),
            ..ModelRow::default()
        }
    }

    #[test]
    fn the_status_line_names_the_hub_and_what_each_model_serves() {
        let mut v = AgentView::default();
        assert_eq!(v.status_line(), "hub not connected yet; no models");
        v.connected = true;
        v.models = vec![
            row("digits", Some("1.0.0"), "rolled_back", "2.0.0"),
            row("text", Some("3.1.0"), "serving", "3.1.0"),
            row("gone", None, "removed", "1.0.0"),
            row("new", None, "downloading", "0.1.0"),
        ];
        assert_eq!(
            v.status_line(),
            "hub connected; digits 1.0.0 (2.0.0 rolled_back), text 3.1.0, new nothing (0.1.0 downloading)"
        );
        v.connected = false;
        v.last_error = "x".repeat(500);
        v.models.clear();
        let line = v.status_line();
        assert!(line.starts_with("hub unreachable (xxx") && line.contains("...)"), "{line}");
        assert!(line.chars().count() < 120, "{line}");
    }
}
