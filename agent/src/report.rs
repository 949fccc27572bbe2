//! The report loop: sends the hub what the device runs and what happened,
//! at every change and every heartbeat.

use std::sync::Arc;
use std::time::Duration;

use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentEvent, AgentReport, ModelStatus};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::state::Shared;
use crate::store;
use crate::transport::status_text;

/// Why one report did not reach the hub (logged; the loop retries).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("token is not ASCII")]
    Token(#[source] tonic::metadata::errors::InvalidMetadataValue),
    /// The hub refused or the call broke. The status is shown in the message
    /// (as `transport::status_text` words it) rather than as a source, so the log line
    /// names it once.
    #[error("report to {url} failed: {}", status_text(status))]
    Rpc { url: String, status: tonic::Status },
}

/// Reports at every change and every heartbeat until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let beat = shared.heartbeat();
        tokio::select! {
            () = shared.report_asked() => {}
            () = tokio::time::sleep(beat) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // To the replica the stream is on now.
        let mut client = AgentSyncClient::new(shared.hubs.channel());
        if let Err(e) = report_once(&shared, &mut client).await {
            tracing::debug!(error = %e, "report not delivered; will retry");
        }
    }
}

async fn report_once(shared: &Shared, client: &mut AgentSyncClient<Channel>) -> Result<(), ReportError> {
    let events = shared.store.unreported_events(500)?;
    let models = shared.store.models()?;
    let view = shared.view();
    let report = AgentReport {
        device_id: shared.config.device_id.clone(),
        applied_revision: view.applied_revision,
        models: models
            .iter()
            .map(|m| ModelStatus {
                name: m.name.clone(),
                version: if m.status == store::ModelStatus::Serving {
                    m.active_version.clone().unwrap_or_default()
                } else {
                    m.status_version.clone()
                },
                state: m.status.as_str().to_owned(),
                detail: m.detail.clone(),
                deployment_id: m.status_deployment.or(m.active_deployment).unwrap_or(0),
            })
            .collect(),
        events: events
            .iter()
            .map(|e| AgentEvent {
                at_unix_ms: e.at_ms,
                kind: e.kind.as_str().to_owned(),
                model: e.model.clone(),
                version: e.version.clone(),
                reason: e.reason.clone(),
            })
            .collect(),
        sent_at_unix_ms: crate::util::now_ms(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut req = tonic::Request::new(report);
    let auth = format!("Bearer {}", shared.config.token).parse().map_err(ReportError::Token)?;
    req.metadata_mut().insert("authorization", auth);
    let ack = client
        .report(req)
        .await
        .map_err(|status| ReportError::Rpc { url: shared.hubs.grpc_url().to_owned(), status })?
        .into_inner();
    if let Some(last) = events.last() {
        shared.store.mark_reported(last.id)?;
    }
    if ack.heartbeat_interval_ms > 0 {
        shared.set_heartbeat(Duration::from_millis(ack.heartbeat_interval_ms));
    }
    Ok(())
}
