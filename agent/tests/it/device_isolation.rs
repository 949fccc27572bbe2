//! A device's token gives it its own desired state and nothing else.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentReport, Hello};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_a_cannot_read_device_b_state_or_models() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("secret", "1.0.0", V1, "").await;
    let token_a = hub.enroll("edge-a", &[("site", "a")]).await;
    let _token_b = hub.enroll("edge-b", &[("site", "b")]).await;
    hub.deploy("secret", "1.0.0", "site=b").await;

    let mut client = AgentSyncClient::connect(hub.grpc_url.clone()).await.unwrap();
    let as_b = |token: &str| {
        let mut req = tonic::Request::new(Hello { device_id: "edge-b".into(), ..Default::default() });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let err = client.subscribe(as_b(&token_a)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("edge-a"), "{}", err.message());
    let err = client.subscribe(as_b("snt_forged")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .subscribe(tonic::Request::new(Hello { device_id: "edge-b".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut report = tonic::Request::new(AgentReport { device_id: "edge-b".into(), ..Default::default() });
    report.metadata_mut().insert("authorization", format!("Bearer {token_a}").parse().unwrap());
    assert_eq!(client.report(report).await.unwrap_err().code(), tonic::Code::PermissionDenied);

    // Nor may A download what only B is told to run, or use the REST API as a viewer.
    let url = format!("{}/api/v1/models/secret/versions/1.0.0/artifact", hub.url);
    let r = hub.client.get(&url).bearer_auth(&token_a).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = hub.client.get(format!("{}/api/v1/models", hub.url)).bearer_auth(&token_a).send().await.unwrap();
    assert_eq!(r.status(), 403, "a device token is no viewer token");
    let r = hub.client.get(format!("{}/api/v1/devices/edge-b", hub.url)).bearer_auth(&token_a).send().await.unwrap();
    assert_eq!(r.status(), 403);

    // A's own state names nothing of B's.
    let agent = start_agent_with_token(&tmp.path().join("a"), &hub, "edge-a", &token_a).await;
    let v = agent.wait_for(WAIT, |v| v.applied_revision > 0).await.unwrap();
    assert!(v.models.is_empty(), "{v:?}");
    agent.shutdown().await;
}

async fn start_agent_with_token(
    dir: &std::path::Path,
    hub: &TestHub,
    device: &str,
    token: &str,
) -> sentinel_agent::AgentHandle {
    let key = hub.public_key().await;
    sentinel_agent::start(agent_config(dir, hub, device, token, &key, "")).await.unwrap()
}
