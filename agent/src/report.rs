//! The report loop: sends the hub what the device runs and what happened,
//! at every change and every heartbeat, with each slot's telemetry window.
//!
//! Telemetry windows wait in a bounded queue until the hub acknowledges a
//! report that carried them; while the hub is away they pile up, and past
//! [`MAX_PENDING_WINDOWS`] the oldest folds into the next one of the same
//! version, so counts survive an outage with coarser timing.

use std::collections::VecDeque;
use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::time::Duration;

use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentEvent, AgentReport, ModelStatus, SlotWindow};
use sentinel_proto::telemetry::merge_windows;
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

/// Windows kept for the hub at most: an hour of one slot at 15 s heartbeats.
pub const MAX_PENDING_WINDOWS: usize = 240;

/// Telemetry windows cut but not yet acknowledged.
#[derive(Debug)]
struct Pending {
    /// Random per process; the hub applies each (run, seq) once.
    run: u64,
    next_seq: u64,
    windows: VecDeque<SlotWindow>,
}

impl Pending {
    fn new() -> Self {
        let run = std::collections::hash_map::RandomState::new().hash_one(crate::util::now_ms());
        Self { run, next_seq: 1, windows: VecDeque::new() }
    }

    /// Queues `w` with the next sequence number, folding the oldest windows
    /// into later ones of the same version while the queue is over its bound.
    fn push(&mut self, mut w: SlotWindow) {
        w.seq = self.next_seq;
        self.next_seq += 1;
        self.windows.push_back(w);
        while self.windows.len() > MAX_PENDING_WINDOWS {
            let Some(oldest) = self.windows.pop_front() else { break };
            let same = |w: &&mut SlotWindow| w.model == oldest.model && w.version == oldest.version;
            match self.windows.iter_mut().find(same) {
                Some(later) => {
                    // Spans both, under the later window's (larger) sequence number.
                    let mut folded = oldest;
                    merge_windows(&mut folded, later);
                    *later = folded;
                }
                None => {
                    tracing::warn!(model = %oldest.model, version = %oldest.version, "telemetry window dropped: the hub has been unreachable too long")
                }
            }
        }
    }
}

/// Cuts a window from every loaded slot into `pending`, after the last
/// windows of slots that left since the last cut.
async fn cut_windows(shared: &Shared, pending: &mut Pending) {
    for w in shared.serving.take_retired_windows() {
        pending.push(w);
    }
    for ms in shared.serving.models() {
        let route = ms.route();
        let slots = [("active", &route.active), ("candidate", &route.candidate), ("standby", &route.standby)];
        for (role, slot) in slots {
            let Some(slot) = slot else { continue };
            let rss_bytes = slot.worker.workers().await.iter().filter_map(|w| w.rss_bytes).sum();
            pending.push(slot.cut_window(role, rss_bytes));
        }
    }
}

/// Reports at every change and every heartbeat until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut pending = Pending::new();
    loop {
        let beat = shared.heartbeat();
        tokio::select! {
            () = shared.report_asked() => {}
            () = tokio::time::sleep(beat) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // To the replica the stream is on now.
        let mut client = AgentSyncClient::new(shared.hubs.channel());
        cut_windows(&shared, &mut pending).await;
        if let Err(e) = report_once(&shared, &mut client, &mut pending).await {
            tracing::debug!(error = %e, "report not delivered; will retry");
        }
    }
}

async fn report_once(
    shared: &Shared,
    client: &mut AgentSyncClient<Channel>,
    pending: &mut Pending,
) -> Result<(), ReportError> {
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
                evidence: e.evidence.clone(),
            })
            .collect(),
        sent_at_unix_ms: crate::util::now_ms(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        windows: pending.windows.iter().cloned().collect(),
        telemetry_run: pending.run,
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
    pending.windows.clear();
    for why in &ack.refused_windows {
        tracing::warn!(reason = %why, "the hub refused a telemetry window");
    }
    if ack.heartbeat_interval_ms > 0 {
        shared.set_heartbeat(Duration::from_millis(ack.heartbeat_interval_ms));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(version: &str, requests: u64) -> SlotWindow {
        SlotWindow { model: "m".into(), version: version.into(), requests, ..SlotWindow::default() }
    }

    #[test]
    fn past_its_bound_the_queue_folds_the_oldest_window_into_a_later_one_of_its_version() {
        let mut p = Pending::new();
        p.push(window("1.0.0", 5));
        for _ in 0..MAX_PENDING_WINDOWS {
            p.push(window("2.0.0", 1));
        }
        // The 1.0.0 window had no later twin: dropped, with a warning.
        assert_eq!(p.windows.len(), MAX_PENDING_WINDOWS);
        assert!(p.windows.iter().all(|w| w.version == "2.0.0"));
        p.push(window("2.0.0", 1));
        assert_eq!(p.windows.len(), MAX_PENDING_WINDOWS);
        let total: u64 = p.windows.iter().map(|w| w.requests).sum();
        assert_eq!(total, u64::try_from(MAX_PENDING_WINDOWS).expect("small") + 1, "folded, not lost");
        let seqs: Vec<u64> = p.windows.iter().map(|w| w.seq).collect();
        assert!(seqs.windows(2).all(|s| s[0] < s[1]), "sequence numbers stay ascending: {seqs:?}");
    }
}
