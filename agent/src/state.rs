//! The agent's shared state: what its tasks (sync, apply, report, the
//! rollout controller) and adapters (control socket, inference API,
//! `/metrics`) read and change, and the view it shows of itself.
//!
//! [`Shared`] keeps its signalling private: the loops change the view and ask
//! for a report through the narrow methods below.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use sentinel_proto::VerifiedState;
use tokio::sync::{Notify, watch};

use crate::config::AgentConfig;
use crate::serving::Serving;
use crate::store::{EventKind, ModelRow, ModelStatus, Store, StoreError};
use crate::transport::TransportError;

/// Failures starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("opening the state dir")]
    Store(#[from] StoreError),
    #[error("setting up the connection to the hub")]
    Connect(#[from] TransportError),
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
            .filter(|m| m.status != ModelStatus::Removed)
            .map(|m| {
                let active = m.active_version.as_deref().unwrap_or("nothing");
                if m.status == ModelStatus::Serving && m.active_version.as_deref() == Some(m.status_version.as_str()) {
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
    /// The hub replicas, and which one the agent talks to now.
    pub hubs: crate::transport::Hubs,
    pub store: Store,
    pub serving: Serving,
    view: watch::Sender<AgentView>,
    report_now: Notify,
    heartbeat: Mutex<Duration>,
}

impl Shared {
    /// The state of a starting agent; `view` is what its handle watches.
    pub(crate) fn new(
        config: AgentConfig,
        hubs: crate::transport::Hubs,
        store: Store,
        serving: Serving,
        view: watch::Sender<AgentView>,
    ) -> Self {
        let heartbeat = Mutex::new(config.heartbeat);
        Shared { config, hubs, store, serving, view, report_now: Notify::new(), heartbeat }
    }

    pub fn heartbeat(&self) -> Duration {
        *self.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_connected(&self) {
        self.view.send_modify(|v| {
            v.connected = true;
            v.since_ms = crate::util::now_ms();
            // Stale once connected: the log keeps it.
            v.last_error.clear();
        });
        self.report_now.notify_one();
    }

    pub fn set_disconnected(&self, reason: &str) {
        self.view.send_modify(|v| {
            if v.connected {
                v.since_ms = crate::util::now_ms();
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
        self.event(EventKind::StateRefused, "", "", &format!("{kind}: {reason}"));
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

    /// Records a model's status, about `deployment` when it is one
    /// deployment's version. A failed write is logged: the status is what
    /// reports and `status` show, and serving goes on without it.
    pub(crate) fn set_status(
        &self,
        model: &str,
        status: ModelStatus,
        version: &str,
        detail: &str,
        deployment: Option<i64>,
    ) {
        let saved = match deployment {
            Some(d) => self.store.set_deployment_status(model, status, version, detail, d),
            None => self.store.set_status(model, status, version, detail),
        };
        if let Err(e) = saved {
            tracing::error!(error = %crate::util::error_chain(&e), "saving the model status failed");
        }
    }

    pub(crate) fn event(&self, kind: EventKind, model: &str, version: &str, reason: &str) {
        self.event_with(kind, model, version, reason, None);
    }

    /// Logs an event with a rollout decision's evidence.
    pub(crate) fn event_with(
        &self,
        kind: EventKind,
        model: &str,
        version: &str,
        reason: &str,
        evidence: Option<&sentinel_proto::pb::RolloutEvidence>,
    ) {
        if let Err(e) = self.store.event_with(kind, model, version, reason, evidence) {
            tracing::error!(error = %e, kind = kind.as_str(), "logging an event failed");
        }
    }

    /// Asks the report loop for a report now.
    pub(crate) fn report_soon(&self) {
        self.report_now.notify_one();
    }

    /// Resolves when a report was asked for (see [`Shared::report_soon`]).
    pub(crate) async fn report_asked(&self) {
        self.report_now.notified().await;
    }

    /// The hub's heartbeat interval, from its last acknowledgement.
    pub(crate) fn set_heartbeat(&self, every: Duration) {
        *self.heartbeat.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = every;
    }

    /// The apply loop finished with `revision`.
    pub(crate) fn applied(&self, revision: u64) {
        self.view.send_modify(|view| view.applied_revision = revision);
        self.report_now.notify_one();
    }

    /// A download resumed from byte `from`.
    pub(crate) fn download_resumed(&self, from: u64) {
        self.view.send_modify(|v| v.downloads_resumed_from.push(from));
    }

    /// Re-reads the models' rows into the view.
    pub(crate) fn refresh_models(&self) {
        match self.store.models() {
            Ok(models) => self.view.send_modify(|v| v.models = models),
            Err(e) => tracing::error!(error = %e, "reading model state failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelRow;

    fn row(name: &str, active: Option<&str>, status: ModelStatus, status_version: &str) -> ModelRow {
        ModelRow {
            name: name.into(),
            active_version: active.map(Into::into),
            active_sha256: None,
            active_deployment: None,
            standby_version: None,
            standby_sha256: None,
            status,
            status_version: status_version.into(),
            detail: String::new(),
            status_deployment: None,
        }
    }

    #[test]
    fn the_status_line_names_the_hub_and_what_each_model_serves() {
        let mut v = AgentView::default();
        assert_eq!(v.status_line(), "hub not connected yet; no models");
        v.connected = true;
        v.models = vec![
            row("digits", Some("1.0.0"), ModelStatus::RolledBack, "2.0.0"),
            row("text", Some("3.1.0"), ModelStatus::Serving, "3.1.0"),
            row("gone", None, ModelStatus::Removed, "1.0.0"),
            row("new", None, ModelStatus::Downloading, "0.1.0"),
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
