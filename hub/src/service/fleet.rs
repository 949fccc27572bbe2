//! The connected fleet: who is subscribed, what each device should run, and
//! pushing it to them.
//!
//! Desired state is level-triggered: every message carries the device's whole
//! set of model assignments, so a device that missed messages converges on
//! the next one. Every deployment change bumps one fleet-wide revision
//! (stored durably) and pushes a freshly signed state to every connected
//! device. Publishing is serialised so a device never receives revisions out
//! of order.
//!
//! Each subscriber gets one task that sends heartbeats, re-signs its state
//! before it expires, and notices at once when the stream goes away.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sentinel_proto::pb::{
    self, DesiredState, HubMessage, ModelAssignment, SignedDesiredState, SignedManifest, hub_message,
};
use sentinel_proto::sign_state;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::events::ChangeKind;
use super::{ServiceError, SharedState};
use crate::store::{FleetSnapshot, VersionRecord};
use crate::targeting::{Target, assignments_for};

/// Messages queued per stream before the hub waits on a slow device.
const STREAM_BUFFER: usize = 8;

/// Devices whose states are signed in one blocking task before sending.
const PUBLISH_CHUNK: usize = 64;

#[derive(Debug)]
struct Subscriber {
    conn: u64,
    target: Target,
    tx: mpsc::Sender<Result<HubMessage, StreamError>>,
    connected_at_ms: i64,
    /// When the last state sent is half-way to its expiry: its stream task
    /// re-signs it at the first heartbeat after. On tokio's clock, so tests
    /// can run it on paused time.
    renew_at: Instant,
    /// Tells the stream's task to end it now (the device was removed).
    kick: std::sync::Arc<tokio::sync::Notify>,
    /// The revision of the last state sent on this stream: a publish of a
    /// revision the stream already has sends it nothing.
    revision: u64,
}

/// Connected devices and the publishing lock.
#[derive(Debug)]
pub struct Fleet {
    subscribers: Mutex<HashMap<String, Subscriber>>,
    next_conn: AtomicU64,
    publish: tokio::sync::Mutex<()>,
    /// Desired-state messages sent, for metrics and benchmarks.
    pub pushes: AtomicU64,
    /// Flipped at shutdown: every stream ends, so graceful shutdown completes.
    closing: tokio::sync::watch::Sender<bool>,
}

/// One device's connection, as listed by the devices API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Connection {
    pub connected_at_ms: i64,
}

/// Computes and signs the desired state of each target from `snapshot`.
fn compute_states(
    state: &SharedState,
    snapshot: &FleetSnapshot,
    targets: &[Target],
) -> Vec<(String, SignedDesiredState)> {
    let versions: HashMap<(&str, &str), &VersionRecord> =
        snapshot.versions.iter().map(|v| ((v.model.as_str(), v.version.as_str()), v)).collect();
    let mut lookup = |model: &str, version: &str| -> Result<Option<VersionRecord>, std::convert::Infallible> {
        Ok(versions.get(&(model, version)).map(|v| (*v).clone()))
    };
    let signer = state.keyring().active();
    let base = state.public_url();
    let now = crate::now_ms();
    let expires = now + i64::try_from(state.config().state_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let Ok(assignments) = assignments_for(&snapshot.active, &mut lookup, t);
        let models = assignments
            .into_iter()
            .map(|a| {
                let v = &a.version;
                let url = format!("{base}/api/v1/models/{}/versions/{}", v.model, v.version);
                ModelAssignment {
                    manifest: Some(SignedManifest {
                        manifest: v.manifest.clone(),
                        signature: v.signature.clone(),
                        key_id: v.key_id.clone(),
                    }),
                    artifact_url: format!("{url}/artifact"),
                    policy: a.deployment.policy.as_ref().map(crate::rollout::RolloutPolicy::to_proto),
                    deployment_id: a.deployment.id,
                    validation_inputs_url: format!("{url}/validation/inputs"),
                    validation_labels_url: format!("{url}/validation/labels"),
                    publisher_signature_url: format!("{url}/signature"),
                }
            })
            .collect();
        let desired = DesiredState {
            device_id: t.device_id.clone(),
            revision: snapshot.revision,
            issued_at_unix_ms: now,
            expires_at_unix_ms: expires,
            models,
            labels: t.labels.clone(),
        };
        out.push((t.device_id.clone(), sign_state(&signer, &desired)));
    }
    out
}

/// The fleet snapshot, read on a blocking thread. When it names an active
/// key other than this hub's (another replica rotated it), the keyring is
/// reloaded first, so the state is signed by the key the fleet moved to.
async fn snapshot(state: &SharedState) -> Result<std::sync::Arc<FleetSnapshot>, ServiceError> {
    let snap = state.meta(|m| m.fleet_snapshot()).await?;
    if let Some(id) = &snap.active_key
        && state.keyring().active().key_id() != id
    {
        super::replicas::reload_keys(state).await?;
    }
    Ok(std::sync::Arc::new(snap))
}

/// When a state signed now is half-way to its expiry.
fn renew_at(state: &SharedState) -> Instant {
    Instant::now() + state.config().state_ttl / 2
}

fn state_message(signed: SignedDesiredState) -> HubMessage {
    HubMessage { kind: Some(hub_message::Kind::State(signed)) }
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            subscribers: Mutex::default(),
            next_conn: AtomicU64::new(0),
            publish: tokio::sync::Mutex::default(),
            pushes: AtomicU64::new(0),
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

/// Why a device's stream was refused or ended. The gRPC adapter gives each
/// its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("computing the desired state failed")]
    ComputePanicked,
    #[error("the hub cannot compute the desired state right now")]
    Unavailable,
    #[error("no state computed")]
    NoState,
    #[error("stream closed")]
    Closed,
    #[error("this device was removed from the hub")]
    Removed,
}

impl Fleet {
    /// Registers a new stream for `target` and sends it the current state.
    /// Returns the receiving end, which the gRPC adapter streams to the device.
    pub async fn subscribe(
        state: &SharedState,
        target: Target,
    ) -> Result<mpsc::Receiver<Result<HubMessage, StreamError>>, StreamError> {
        let fleet = state.fleet();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let conn = fleet.next_conn.fetch_add(1, Ordering::Relaxed);
        let kick = std::sync::Arc::new(tokio::sync::Notify::new());
        {
            let _publishing = fleet.publish.lock().await;
            let snap = snapshot(state).await.map_err(|e| {
                tracing::error!(error = %e, "computing the desired state failed");
                StreamError::Unavailable
            })?;
            let revision = snap.revision;
            let st = state.clone();
            let targets = vec![target.clone()];
            let computed = tokio::task::spawn_blocking(move || compute_states(&st, &snap, &targets))
                .await
                .map_err(|_| StreamError::ComputePanicked)?;
            let Some((_, signed)) = computed.into_iter().next() else {
                return Err(StreamError::NoState);
            };
            tx.send(Ok(state_message(signed))).await.map_err(|_| StreamError::Closed)?;
            fleet.pushes.fetch_add(1, Ordering::Relaxed);
            let mut subs = fleet.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(old) = subs.insert(
                target.device_id.clone(),
                Subscriber {
                    conn,
                    target: target.clone(),
                    tx: tx.clone(),
                    connected_at_ms: crate::now_ms(),
                    renew_at: renew_at(state),
                    kick: kick.clone(),
                    revision,
                },
            ) {
                tracing::info!(device = %target.device_id, old_conn = old.conn, "device reconnected; the older stream is replaced");
            }
        }
        tracing::info!(device = %target.device_id, conn, "device subscribed");
        tokio::spawn(watch_stream(state.clone(), target.device_id, conn, tx, kick));
        Ok(rx)
    }

    fn unregister(&self, device_id: &str, conn: u64) {
        let mut subs = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if subs.get(device_id).is_some_and(|s| s.conn == conn) {
            subs.remove(device_id);
            tracing::info!(device = %device_id, conn, "device stream closed");
        }
    }

    /// Whether a device has a live stream, and since when.
    pub fn connection(&self, device_id: &str) -> Option<Connection> {
        let subs = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        subs.get(device_id).map(|s| Connection { connected_at_ms: s.connected_at_ms })
    }

    /// Ends every stream (at shutdown): devices see the stream close and reconnect.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    pub fn connected_count(&self) -> usize {
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Ends a device's stream now (after it was removed): its task sends the
    /// device an error and drops the last sender, so the stream closes at
    /// once rather than at the next heartbeat.
    pub fn disconnect(&self, device_id: &str) {
        let gone = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(device_id);
        if let Some(sub) = gone {
            // `notify_one` keeps a permit, so a task not yet waiting still sees it.
            sub.kick.notify_one();
        }
    }

    /// Pushes every connected device its state at the fleet's current
    /// revision, skipping streams that already have it. Call after any
    /// change to deployments (the change bumped the revision), or when
    /// another replica says it made one. Returns the revision.
    pub async fn publish(state: &SharedState) -> Result<u64, ServiceError> {
        let fleet = state.fleet();
        let _publishing = fleet.publish.lock().await;
        let snap = snapshot(state).await?;
        let revision = snap.revision;
        // Streams subscribed at this revision or later have it already.
        let senders: Vec<(Target, mpsc::Sender<Result<HubMessage, StreamError>>)> = {
            let subs = fleet.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            subs.values().filter(|s| s.revision < revision).map(|s| (s.target.clone(), s.tx.clone())).collect()
        };
        if senders.is_empty() {
            return Ok(revision);
        }
        let joined = |source| ServiceError::Join { context: "publish task", source };
        // Sign and send in chunks, so the first devices get the new state
        // while the hub is still signing for the rest.
        let mut sent = 0usize;
        for chunk in senders.chunks(PUBLISH_CHUNK) {
            let (st, snap) = (state.clone(), snap.clone());
            let targets: Vec<Target> = chunk.iter().map(|(t, _)| t.clone()).collect();
            let computed =
                tokio::task::spawn_blocking(move || compute_states(&st, &snap, &targets)).await.map_err(joined)?;
            for ((_, tx), (device, signed)) in chunk.iter().zip(computed) {
                if tx.send(Ok(state_message(signed))).await.is_ok() {
                    sent += 1;
                    fleet.pushes.fetch_add(1, Ordering::Relaxed);
                    let mut subs = fleet.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(s) = subs.get_mut(&device) {
                        s.renew_at = renew_at(state);
                        s.revision = revision;
                    }
                }
            }
        }
        tracing::info!(revision, sent, "published desired state");
        Ok(revision)
    }

    /// Re-signs one device's state at the current revision (its content is
    /// unchanged), to renew its expiry.
    async fn refresh(state: &SharedState, device_id: &str, conn: u64) {
        let fleet = state.fleet();
        let _publishing = fleet.publish.lock().await;
        let (target, tx) = {
            let subs = fleet.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match subs.get(device_id) {
                Some(s) if s.conn == conn => (s.target.clone(), s.tx.clone()),
                _ => return,
            }
        };
        let Ok(snap) = snapshot(state).await else { return };
        let st = state.clone();
        let computed = tokio::task::spawn_blocking(move || compute_states(&st, &snap, &[target])).await;
        if let Ok(mut v) = computed
            && let Some((_, signed)) = v.pop()
            && tx.send(Ok(state_message(signed))).await.is_ok()
        {
            fleet.pushes.fetch_add(1, Ordering::Relaxed);
            let mut subs = fleet.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = subs.get_mut(device_id) {
                s.renew_at = renew_at(state);
            }
        }
    }

    fn renew_at(&self, device_id: &str, conn: u64) -> Option<Instant> {
        let subs = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        subs.get(device_id).filter(|s| s.conn == conn).map(|s| s.renew_at)
    }
}

/// One per stream: heartbeats, state renewal, and noticing the end.
async fn watch_stream(
    state: SharedState,
    device_id: String,
    conn: u64,
    tx: mpsc::Sender<Result<HubMessage, StreamError>>,
    kick: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut tick = tokio::time::interval(state.config().heartbeat);
    tick.tick().await; // the first tick is immediate; the state was just sent
    let mut closing = state.fleet().closing.subscribe();
    loop {
        tokio::select! {
            () = tx.closed() => break,
            () = kick.notified() => {
                // Best effort: a full buffer means the device is not reading,
                // and dropping the sender ends the stream all the same.
                let _ = tx.try_send(Err(StreamError::Removed));
                tracing::info!(device = %device_id, conn, "device removed; its stream is closed");
                return;
            }
            () = async { let _ = closing.wait_for(|c| *c).await; } => break,
            _ = tick.tick() => {
                let Some(renew) = state.fleet().renew_at(&device_id, conn) else { break };
                if Instant::now() >= renew {
                    Fleet::refresh(&state, &device_id, conn).await;
                }
                let beat = HubMessage { kind: Some(hub_message::Kind::Heartbeat(pb::Heartbeat { sent_at_unix_ms: crate::now_ms() })) };
                if tx.send(Ok(beat)).await.is_err() {
                    break;
                }
            }
        }
    }
    state.fleet().unregister(&device_id, conn);
    let id = device_id.clone();
    if let Err(e) = state.meta(move |m| m.touch_device(&id, crate::now_ms())).await {
        tracing::warn!(device = %device_id, error = %e, "recording when the device was last seen failed");
    }
}

/// Pushes the new desired state to every connected device after a change
/// to deployments, and tells the change feed. A failure is logged, not
/// returned: the change is stored, and devices get it on their next connection.
pub async fn push_to_fleet(state: &SharedState) {
    if let Err(e) = Fleet::publish(state).await {
        tracing::error!(error = %e, "pushing the desired state failed; devices will get it when they reconnect");
    }
    state.events().notify(ChangeKind::Deployments, "");
}

#[cfg(test)]
mod tests;
