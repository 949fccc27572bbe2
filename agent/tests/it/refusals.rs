//! Desired states and models the agent must refuse: a key it does not pin,
//! a replayed older revision, an expired state, and a model built for other
//! hardware. Each refusal is logged, reported to the hub, and changes nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::agent_sync_server::{AgentSync, AgentSyncServer};
use sentinel_proto::pb::{AgentReport, Hello, HubMessage, ReportAck, SignedDesiredState, hub_message};
use tokio::sync::Mutex;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_signed_by_an_unpinned_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    let other = TestHub::start_at(&tmp.path().join("other"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let token = hub.enroll("edge-1", &[]).await;
    // The device pins another hub's key.
    let config = agent_config(&tmp.path().join("a"), &hub, "edge-1", &token, &other.public_key().await, "");
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| !v.refused_states.is_empty()).await.unwrap();
    assert_eq!(v.refused_states[0], "unknown_key");
    assert!(v.models.is_empty() && v.revision == 0, "nothing was applied: {v:?}");
    hub.wait_device("edge-1", |d| {
        d["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "state_refused" && e["reason"].as_str().unwrap().starts_with("unknown_key"))
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A hub whose states expire the moment they are issued: what a device
    // sees when an attacker holds back a state until it is stale.
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| c.state_ttl = Duration::ZERO).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    let v = agent.wait_for(WAIT, |v| !v.refused_states.is_empty()).await.unwrap();
    assert_eq!(v.refused_states[0], "expired");
    assert!(v.models.is_empty());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_for_other_hardware_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "&hardware=riscv64-only").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    let v = agent.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "refused")).await.unwrap();
    let detail = status(&v, "digits").unwrap().2;
    assert!(detail.starts_with("wrong_hardware"), "{detail}");
    assert!(std::fs::read_dir(tmp.path().join("a/state/models")).unwrap().next().is_none(), "nothing was downloaded");
    agent.shutdown().await;
}

/// An attacker between hub and device: replays states it recorded.
struct Replayer {
    states: Arc<Mutex<Vec<SignedDesiredState>>>,
}

#[tonic::async_trait]
impl AgentSync for Replayer {
    type SubscribeStream = ReceiverStream<Result<HubMessage, tonic::Status>>;

    async fn subscribe(
        &self,
        _req: tonic::Request<Hello>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for s in self.states.lock().await.drain(..) {
            tx.send(Ok(HubMessage { kind: Some(hub_message::Kind::State(s)) })).await.unwrap();
        }
        // Keep the stream open as a real hub would.
        tokio::spawn(async move { tx.closed().await });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, _req: tonic::Request<AgentReport>) -> Result<tonic::Response<ReportAck>, tonic::Status> {
        Ok(tonic::Response::new(ReportAck { heartbeat_interval_ms: 2000, refused_windows: Vec::new() }))
    }
}

/// The first state message the real hub sends `device`.
async fn record_state(hub: &TestHub, device: &str, token: &str) -> SignedDesiredState {
    let mut client = AgentSyncClient::connect(hub.grpc_url.clone()).await.unwrap();
    let mut req = tonic::Request::new(Hello { device_id: device.into(), ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    loop {
        if let Some(hub_message::Kind::State(s)) = stream.message().await.unwrap().unwrap().kind {
            return s;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_older_revision_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    let token = hub.enroll("edge-1", &[]).await;
    hub.deploy("digits", "1.0.0", "*").await;
    let old = record_state(&hub, "edge-1", &token).await;
    hub.deploy("digits", "2.0.0", "*").await;
    let new = record_state(&hub, "edge-1", &token).await;

    // The attacker serves the new state, then the old one again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let states = Arc::new(Mutex::new(vec![new, old]));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentSyncServer::new(Replayer { states }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let key = hub.public_key().await;
    let mut config = agent_config(&tmp.path().join("a"), &hub, "edge-1", &token, &key, "");
    let rest = config.hub_url().to_owned();
    config.set_hub(&rest, &format!("http://{addr}"));
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| !v.refused_states.is_empty()).await.unwrap();
    assert_eq!(v.refused_states, ["replayed"]);
    // The newer state stands: the device runs 2.0.0, not the replayed 1.0.0.
    let v = agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    assert!(v.models.iter().all(|m| m.active_version.as_deref() != Some("1.0.0")));
    agent.shutdown().await;
}
