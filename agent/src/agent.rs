//! The composition root: [`start`] wires the agent's parts together and
//! [`AgentHandle`] is what it hands back. Nothing in the crate imports this
//! module.
//!
//! - [`crate::sync`] keeps a `watch` of the latest verified desired state.
//! - [`crate::apply`] makes the device match it.
//! - [`crate::report`] tells the hub what the device runs and what happened.
//! - The adapters ([`crate::control`], [`crate::inference_api`],
//!   [`crate::metrics::endpoint`]) serve the shared [`crate::state::Shared`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sentinel_proto::verify_state;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::rollout::controller::Rollouts;
use crate::serving::{Route, Serving};
use crate::state::Shared;
pub use crate::state::{AgentError, AgentView};
use crate::store::{Event, EventKind, Store, StoreError};
use crate::transport::http_client;
use crate::util::error_chain;

/// A running agent. Dropping it does not stop it; call [`AgentHandle::shutdown`].
#[derive(Debug)]
pub struct AgentHandle {
    shared: Arc<Shared>,
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

    /// The configuration the agent runs with (to start it again after a
    /// shutdown, as a restart would).
    pub fn config(&self) -> &AgentConfig {
        &self.shared.config
    }

    /// A snapshot of `model`'s slots: what serves, what stands by warm, what
    /// is being tried. `None` when the agent has never loaded the model.
    pub fn route(&self, model: &str) -> Option<Arc<Route>> {
        self.shared.serving.model(model).map(|m| m.route())
    }

    /// The newest `limit` events of the local journal, newest first.
    pub fn recent_events(&self, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.shared.store.recent_events(limit)
    }

    /// The newest event of `kind` in the local journal.
    pub fn last_event(&self, kind: EventKind) -> Result<Option<Event>, StoreError> {
        self.shared.store.last_event(kind)
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

/// Starts the agent: loads the last verified state (so the device serves it
/// even with the hub unreachable), then syncs, applies and reports.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    let store = Store::open(&config.state_dir)?;
    let (view_tx, view_rx) = watch::channel(AgentView::default());
    let hubs = crate::transport::Hubs::new(&config)?;
    let http = http_client(&config)?;
    let metrics = Arc::new(crate::metrics::AgentMetrics::new());
    let serving = Serving::with_metrics(config.serving.clone(), config.state_dir.join("workers"), metrics);
    let shared = Arc::new(Shared::new(config, hubs, store, serving, view_tx));
    let trusted = shared.config.trusted.clone();
    shared.serving.restore(&shared.store, |sha| {
        let signed = match shared.store.manifest(sha) {
            Ok(signed) => signed?,
            Err(e) => {
                tracing::error!(sha256 = sha, error = %error_chain(&e), "reading a stored manifest failed");
                return None;
            }
        };
        sentinel_proto::verify_manifest(&signed, &trusted).ok()
    });
    shared.refresh_models();
    let listeners = crate::inference_api::bind(&shared.config.serving).await?;
    let inference_addr = listeners.tcp_addr();
    let metrics_listener = crate::metrics::endpoint::bind(shared.config.serving.metrics_listen.as_deref()).await?;
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
    // The controller owns the rollouts: the apply loop starts and supersedes
    // them, the control socket rolls them back.
    let rollouts = Arc::new(Rollouts::default());
    tasks.spawn(crate::sync::run(shared.clone(), states_tx, stop_rx.clone()));
    tasks.spawn(crate::apply::run(shared.clone(), rollouts.clone(), http, states_rx, stop_rx.clone()));
    tasks.spawn(crate::report::run(shared.clone(), stop_rx.clone()));
    tasks.spawn(crate::util::trim_heap(crate::util::TRIM_EVERY, stop_rx.clone()));
    // One connection budget for the inference API and metrics listeners.
    let connections = sentinel_net::Connections::new(shared.config.serving.connection_limits());
    if let Some(l) = metrics_listener {
        tasks.spawn(crate::metrics::endpoint::serve(l, shared.clone(), connections.clone(), stop_rx.clone()));
    }
    tasks.spawn(crate::control::serve(control, shared.clone(), rollouts, stop_rx.clone()));
    for server in listeners.serve(shared.clone(), &connections, stop_rx) {
        tasks.spawn(server);
    }
    Ok(AgentHandle { shared, inference_addr, metrics_addr, control_socket, view: view_rx, stop, tasks })
}
