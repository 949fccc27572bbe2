//! One device's stream on paused tokio time: heartbeats at the interval, the
//! state re-signed once it is half-way to expiry, and a removed device's
//! stream ended at once. No listener and no agent: the fleet service over a
//! real SQLite store, read from the receiving end the gRPC adapter streams.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;

use super::*;
use crate::config::HubConfig;
use crate::inspect::Inspector;
use crate::keys::Keyring;
use crate::service::{HubState, Parts};
use crate::store::{LocalBlobStore, SqliteStore};

const HEARTBEAT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

fn hub_state(dir: &std::path::Path) -> SharedState {
    let mut config = HubConfig::new(dir);
    config.heartbeat = HEARTBEAT;
    config.state_ttl = TTL;
    // The fleet inspects no upload: any existing file stands in for the
    // worker binary, which is never run here.
    config.inspect.worker = Some(std::env::current_exe().unwrap());
    HubState::new(Parts {
        meta: Arc::new(SqliteStore::open(&dir.join("hub.db")).unwrap()),
        blobs: Arc::new(LocalBlobStore::open(dir.join("blobs")).unwrap()),
        keys: Keyring::open_or_create(&dir.join("keys")).unwrap(),
        metrics: crate::service::metrics::HubMetrics::new().unwrap(),
        inspector: Inspector::new(config.inspect.clone(), dir.join("inspect")).unwrap(),
        connections: sentinel_net::Connections::new(config.connections.clone()),
        replicas: None,
        config,
    })
}

fn device(id: &str) -> Target {
    Target { device_id: id.into(), labels: Default::default(), hardware: vec!["x86_64".into()] }
}

/// What one message is: the revision of a state, or a heartbeat.
#[derive(Debug, PartialEq)]
enum Seen {
    State { revision: u64 },
    Heartbeat,
}

/// The next message and tokio's time when it arrived, from the start.
async fn next(rx: &mut mpsc::Receiver<Result<HubMessage, StreamError>>, start: Instant) -> (Duration, Seen) {
    let m = rx.recv().await.expect("the stream is open").expect("not an error");
    let seen = match m.kind.expect("a kind") {
        hub_message::Kind::State(signed) => {
            let state = pb::DesiredState::decode(signed.state.as_slice()).unwrap();
            assert_eq!(
                state.expires_at_unix_ms - state.issued_at_unix_ms,
                i64::try_from(TTL.as_millis()).unwrap(),
                "valid for the TTL"
            );
            Seen::State { revision: state.revision }
        }
        hub_message::Kind::Heartbeat(_) => Seen::Heartbeat,
    };
    (start.elapsed(), seen)
}

/// A hub state in a temp dir with device `d1` subscribed, its first message
/// read: the current state, at once.
struct Subscribed {
    _dir: tempfile::TempDir,
    state: SharedState,
    start: Instant,
    rx: mpsc::Receiver<Result<HubMessage, StreamError>>,
    /// The revision of the first state.
    revision: u64,
}

async fn subscribed() -> Subscribed {
    let dir = tempfile::tempdir().unwrap();
    let state = hub_state(dir.path());
    let start = Instant::now();
    let mut rx = Fleet::subscribe(&state, device("d1")).await.unwrap();
    let (at, first) = next(&mut rx, start).await;
    let Seen::State { revision } = first else { panic!("{first:?}: the current state comes first") };
    assert_eq!(at, Duration::ZERO, "the current state at once");
    Subscribed { _dir: dir, state, start, rx, revision }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_at_the_interval_and_the_state_re_signed_half_way_to_expiry() {
    let Subscribed { _dir, state, start, mut rx, revision } = subscribed().await;
    let mut seen = Vec::new();
    for _ in 0..9 {
        let (at, m) = next(&mut rx, start).await;
        seen.push((at.as_secs(), m));
    }
    let state_at = |s: u64| (s, Seen::State { revision });
    let beat_at = |s: u64| (s, Seen::Heartbeat);
    assert_eq!(
        seen,
        [
            beat_at(10),
            beat_at(20),
            // 30 s of a 60 s TTL: re-signed at the same revision, before that tick's heartbeat.
            state_at(30),
            beat_at(30),
            beat_at(40),
            beat_at(50),
            state_at(60),
            beat_at(60),
            beat_at(70),
        ]
    );
    assert_eq!(state.fleet().connected_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_published_revision_postpones_the_re_signing() {
    let Subscribed { _dir, state, start, mut rx, revision: first } = subscribed().await;
    assert_eq!(next(&mut rx, start).await, (Duration::from_secs(10), Seen::Heartbeat));
    // A deployment change at 10 s sends a new state, valid from then on.
    let d = crate::store::NewDeployment {
        model: "m".into(),
        version: "1.0.0".into(),
        target: "site=elsewhere".into(),
        kind: crate::store::DeploymentKind::Deploy,
        created_by: "t".into(),
        replaces: None,
        policy: None,
        halt_fraction: 0.2,
        halt_count: None,
        waves: Vec::new(),
    };
    state.metadata().insert_deployment(&d, crate::now_ms()).unwrap();
    let revision = Fleet::publish(&state).await.unwrap();
    assert_eq!(revision, first + 1, "the deployment bumped the revision once");
    assert_eq!(Fleet::publish(&state).await.unwrap(), revision, "a second publish of it sends nothing");
    assert_eq!(next(&mut rx, start).await, (Duration::from_secs(10), Seen::State { revision }));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next(&mut rx, start).await);
    }
    let secs = Duration::from_secs;
    assert_eq!(
        seen,
        [
            (secs(20), Seen::Heartbeat),
            (secs(30), Seen::Heartbeat),
            // Half-way from 10 s, not from the first state.
            (secs(40), Seen::State { revision }),
            (secs(40), Seen::Heartbeat),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_device_is_told_so_and_its_stream_ends_at_once() {
    let Subscribed { _dir, state, start, mut rx, .. } = subscribed().await;
    state.fleet().disconnect("d1");
    assert_eq!(rx.recv().await.unwrap().unwrap_err(), StreamError::Removed);
    assert!(rx.recv().await.is_none(), "the stream is closed");
    assert_eq!(start.elapsed(), Duration::ZERO, "before the next heartbeat");
    assert_eq!(state.fleet().connected_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_publish_of_the_revision_a_stream_subscribed_at_sends_it_nothing() {
    // A replica publishes at start (its notice connection says "resync");
    // a device that subscribed just before already has that revision.
    let Subscribed { _dir, state, start, mut rx, revision } = subscribed().await;
    assert_eq!(Fleet::publish(&state).await.unwrap(), revision);
    assert_eq!(state.fleet().pushes.load(Ordering::Relaxed), 1, "only the state sent at subscribe");
    assert_eq!(next(&mut rx, start).await, (HEARTBEAT, Seen::Heartbeat), "no second copy of the state");
}
