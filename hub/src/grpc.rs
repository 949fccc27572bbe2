//! The `AgentSync` gRPC service: device streams and reports.
//!
//! Devices authenticate with their enrolment token in the `authorization`
//! metadata. A token names exactly one device: asking for another device's
//! stream, or reporting as another device, is refused.
//!
//! A report that changes a device's state for a deployment makes the hub
//! re-check that deployment's health ([`crate::service::deployments`]).

use std::pin::Pin;

use futures_util::{Stream, StreamExt as _};
use sentinel_proto::pb::agent_sync_server::{AgentSync, AgentSyncServer};
use sentinel_proto::pb::{AgentReport, Hello, HubMessage, ReportAck};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::hash_token;
use crate::service::SharedState;
use crate::service::fleet::{Fleet, StreamError};
use crate::store::{DeviceEvent, DeviceRecord};
use crate::targeting::target_of;

/// The service, over the hub's shared state.
#[derive(Debug, Clone)]
pub struct SyncService {
    state: SharedState,
}

impl SyncService {
    pub fn new(state: SharedState) -> AgentSyncServer<Self> {
        AgentSyncServer::new(Self { state })
    }

    async fn authenticate<T>(&self, req: &Request<T>, claimed: &str) -> Result<DeviceRecord, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <device token>` metadata"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <device token>`"))?;
        let hash = hash_token(token);
        let device = self
            .state
            .meta(move |m| m.device_by_token(&hash))
            .await
            .map_err(|_| Status::unavailable("the hub cannot check tokens right now"))?
            .ok_or_else(|| {
                Status::unauthenticated("the device token is not known to this hub (enrol the device first)")
            })?;
        if device.id != claimed {
            tracing::warn!(token_device = %device.id, claimed, "device token used for another device");
            return Err(Status::permission_denied(format!(
                "this token belongs to device {:?}; it cannot act as {claimed:?}",
                device.id
            )));
        }
        Ok(device)
    }
}

type HubStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSync for SyncService {
    type SubscribeStream = HubStream;

    async fn subscribe(&self, req: Request<Hello>) -> Result<Response<HubStream>, Status> {
        let claimed = req.get_ref().device_id.clone();
        let device = self.authenticate(&req, &claimed).await?;
        let mut hello = req.into_inner();
        let mut labels = std::mem::take(&mut hello.labels).into_iter().collect();
        ring_label(&device.id, &mut labels);
        hello.labels = labels.into_iter().collect();
        let target = target_of(&device, Some(&hello));
        let hello_json = serde_json::to_value(&hello).unwrap_or_default();
        let (id, hw, ver) = (device.id.clone(), hello.hardware.clone(), hello.agent_version.clone());
        self.state
            .meta(move |m| m.record_hello(&id, &hello_json, &hw, &ver, crate::now_ms()))
            .await
            .map_err(|_| Status::unavailable("the hub cannot record the device right now"))?;
        let rx = Fleet::subscribe(&self.state, target).await.map_err(status)?;
        crate::service::replicas::device_changed(&self.state, &device.id);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| m.map_err(status)))))
    }

    async fn report(&self, req: Request<AgentReport>) -> Result<Response<ReportAck>, Status> {
        let claimed = req.get_ref().device_id.clone();
        let device = self.authenticate(&req, &claimed).await?;
        let mut report = req.into_inner();
        let events: Vec<DeviceEvent> = report
            .events
            .drain(..)
            .map(|e| DeviceEvent {
                at_ms: e.at_unix_ms,
                kind: e.kind,
                model: e.model,
                version: e.version,
                reason: e.reason,
                evidence: e.evidence.and_then(|x| serde_json::to_value(x).ok()),
            })
            .collect();
        for e in events.iter().filter(|e| e.kind.contains("refused") || e.kind.contains("failed")) {
            tracing::warn!(device = %device.id, kind = %e.kind, model = %e.model, version = %e.version, reason = %e.reason, "device reports");
        }
        // Telemetry goes to its own table, not into the stored report.
        let now = crate::now_ms();
        let retention = self.state.config().telemetry;
        let (windows, refused_windows) =
            crate::telemetry::accept(&std::mem::take(&mut report.windows), report.sent_at_unix_ms, now, &retention);
        for why in &refused_windows {
            tracing::warn!(device = %device.id, reason = %why, "telemetry window refused");
        }
        let json = serde_json::to_value(&report).unwrap_or_default();
        let (id, run) = (device.id.clone(), report.telemetry_run);
        let added = self
            .state
            .meta(move |m| {
                m.record_report(&id, &json, &events, now)?;
                let n = m.record_telemetry(&id, run, &windows, &retention)?;
                // Windows come in sequence order, so those added are the last `n`.
                let mut windows = windows;
                Ok(windows.split_off(windows.len().saturating_sub(n)))
            })
            .await
            .map_err(|_| Status::unavailable("the hub cannot record the report right now"))?;
        let metrics = self.state.metrics();
        metrics.device_reports.inc();
        metrics.telemetry_windows(&added, refused_windows.len());
        // After the report is stored, so the rollup sees it. Halting happens
        // before the answer: a device that reports a rollback gets the
        // fleet's reaction on its stream without waiting for another report.
        crate::service::deployments::watch_report(&self.state, &device.id, device.report.as_ref(), &report.models)
            .await;
        crate::service::replicas::device_changed(&self.state, &device.id);
        let interval = u64::try_from(self.state.config().heartbeat.as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(ReportAck { heartbeat_interval_ms: interval, refused_windows }))
    }
}

/// Reads a reported `stage` label, the old name of `ring`, as `ring`, and
/// logs that the device's config should say `ring`. Beside a `ring` of its
/// own it is left as it is, a label no selector names any more.
fn ring_label(device: &str, labels: &mut std::collections::BTreeMap<String, String>) {
    use crate::selector::{DEPRECATED_RING, RING, RingLabel, rename_deprecated_label};
    match rename_deprecated_label(labels) {
        RingLabel::Unchanged => {}
        RingLabel::Renamed => tracing::warn!(
            device,
            "the agent reports the label `{DEPRECATED_RING}`, now `{RING}`: read as `{RING}`; rename it in the \
             agent config's [labels] (`{DEPRECATED_RING}` is accepted until the next release)"
        ),
        RingLabel::Both => tracing::warn!(
            device,
            "the agent reports both `{RING}` and `{DEPRECATED_RING}`, the old name of `{RING}`, which selectors no \
             longer name: remove `{DEPRECATED_RING}` from the agent config's [labels]"
        ),
    }
}

/// The gRPC status of a fleet stream error.
fn status(e: StreamError) -> Status {
    let message = e.to_string();
    match e {
        StreamError::ComputePanicked | StreamError::NoState => Status::internal(message),
        StreamError::Unavailable => Status::unavailable(message),
        StreamError::Closed => Status::cancelled(message),
        StreamError::Removed => Status::permission_denied(message),
    }
}
