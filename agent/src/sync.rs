//! The subscription: a long-lived gRPC stream turned into a `watch` of the
//! latest verified desired state.
//!
//! It reconnects forever with jittered exponential backoff (capped, 60 s by
//! default) so a fleet reconnecting after a hub restart spreads out. A
//! stream that stays silent for three heartbeats is taken for dead.
//! Every state is verified before it is stored or published; a refused one
//! is logged, recorded as an event for the hub, and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{Hello, RunningModel, hub_message};
use sentinel_proto::{VerifiedState, verify_state};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::state::Shared;
use crate::store::StoreError;
use crate::transport::status_text;
use crate::util::error_chain;

/// Jittered exponential backoff: the n-th delay is uniform in
/// [d/2, d] where d = min(cap, initial * 2^n).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self { initial, cap, failures: 0 }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.failures.min(20));
        let d = exp.min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// Why a subscription ended. Its message is the view's `last_error` and the
/// log's reason; a hub status is worded by `status_text` inside the message
/// (not as a source) so it is named once.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the device token is not valid ASCII")]
    Token(#[source] tonic::metadata::errors::InvalidMetadataValue),
    #[error("subscribe to {url} refused: {}", status_text(status))]
    Subscribe { url: String, status: tonic::Status },
    #[error("no message from the hub at {url} for {} s", silence.as_secs())]
    Silent { url: String, silence: Duration },
    #[error("stream from {url} broke: {}", status_text(status))]
    Broke { url: String, status: tonic::Status },
}

fn bearer(token: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, SyncError> {
    format!("Bearer {token}").parse().map_err(SyncError::Token)
}

/// Runs the subscription until `shutdown` flips.
pub async fn run(
    shared: Arc<Shared>,
    states: watch::Sender<Option<Arc<VerifiedState>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_cap);
    loop {
        let outcome = tokio::select! {
            r = subscribe_once(&shared, shared.hubs.channel(), &states, &mut backoff) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let reason = match outcome {
            Ok(()) => format!("the hub at {} closed the stream", shared.hubs.grpc_url()),
            Err(e) => e.to_string(),
        };
        shared.set_disconnected(&reason);
        let delay = backoff.next_delay();
        // Replicas: the next one in order, after the same backoff.
        let next = (shared.hubs.len() > 1).then(|| shared.hubs.fail_over().to_owned());
        tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, next = ?next, "hub stream lost");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn subscribe_once(
    shared: &Arc<Shared>,
    channel: Channel,
    states: &watch::Sender<Option<Arc<VerifiedState>>>,
    backoff: &mut Backoff,
) -> Result<(), SyncError> {
    let config = &shared.config;
    let running = shared
        .store
        .models()?
        .into_iter()
        .filter_map(|m| {
            Some(RunningModel { name: m.name, version: m.active_version?, sha256: m.active_sha256.unwrap_or_default() })
        })
        .collect();
    let hello = Hello {
        device_id: config.device_id.clone(),
        labels: config.labels.clone().into_iter().collect(),
        hardware: config.hardware.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        running,
        last_revision: shared.store.last_revision()?,
    };
    let mut req = tonic::Request::new(hello);
    req.metadata_mut().insert("authorization", bearer(&config.token)?);
    let mut client = AgentSyncClient::new(channel);
    let mut stream = client
        .subscribe(req)
        .await
        .map_err(|status| SyncError::Subscribe { url: shared.hubs.grpc_url().to_owned(), status })?
        .into_inner();
    backoff.reset();
    shared.set_connected();
    tracing::info!(device = %config.device_id, "subscribed to the hub");
    let silence = shared.heartbeat() * 3;
    loop {
        let msg = match tokio::time::timeout(silence, stream.message()).await {
            Err(_) => {
                return Err(SyncError::Silent { url: shared.hubs.grpc_url().to_owned(), silence });
            }
            Ok(Err(status)) => return Err(SyncError::Broke { url: shared.hubs.grpc_url().to_owned(), status }),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(m))) => m,
        };
        match msg.kind {
            Some(hub_message::Kind::Heartbeat(_)) | None => {}
            Some(hub_message::Kind::State(signed)) => {
                let last = shared.store.last_revision()?;
                match verify_state(&signed, &config.trusted, &config.device_id, last, crate::util::now_ms()) {
                    Ok(v) => {
                        let revision = v.state.revision;
                        if let Err(e) = shared.store.save_desired(revision, &signed) {
                            tracing::error!(error = %e, "storing the desired state failed");
                            return Err(e.into());
                        }
                        tracing::info!(revision, models = v.state.models.len(), "desired state verified");
                        shared.verified_state(&v);
                        states.send_replace(Some(Arc::new(v)));
                    }
                    Err(e) => {
                        let reason = error_chain(&e);
                        tracing::warn!(kind = e.kind(), %reason, "desired state refused");
                        shared.refused_state(e.kind(), &reason);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..14).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays[10..] {
            assert!(*d >= Duration::from_secs(30) && *d <= Duration::from_secs(60), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        // 1,000 devices at the cap: their delays must not coincide.
        let delays: std::collections::HashSet<u128> = (0..1000)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
                b.next_delay().as_micros()
            })
            .collect();
        assert!(delays.len() > 900, "only {} distinct delays", delays.len());
    }
}
