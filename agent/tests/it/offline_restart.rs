//! The agent survives its hub: it reconnects and converges after a hub
//! restart, and starts with the hub down on its last verified state.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_hub_restart_the_agent_reconnects_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_dir = tmp.path().join("hub");
    let mut hub = TestHub::start_at(&hub_dir, |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();

    let (rest, grpc) = (hub.rest_addr, hub.grpc_addr);
    hub.stop().await;
    let v = agent.wait_for(WAIT, |v| !v.connected && !v.last_error.is_empty()).await.unwrap();
    assert!(v.last_error.contains(&hub.grpc_url), "{}", v.last_error);

    // The same hub comes back on the same ports, and something changed meanwhile.
    let hub = TestHub::start_at(&hub_dir, |c| {
        c.listen = rest;
        c.grpc_listen = Some(grpc);
    })
    .await;
    hub.deploy("digits", "2.0.0", "*").await;
    let v = agent.wait_for(WAIT, |v| v.connected && active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    assert!(v.refused_states.is_empty(), "{v:?}");
    // Connected again: the error from while the hub was away is not shown as current.
    assert_eq!(v.last_error, "", "{v:?}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hub_down_the_agent_serves_its_last_verified_state() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "*").await;
    let token = hub.enroll("edge-1", &[("site", "a")]).await;
    let key = hub.public_key().await;
    let config = agent_config(&tmp.path().join("a"), &hub, "edge-1", &token, &key, "");
    let agent = sentinel_agent::start(config.clone()).await.unwrap();
    let before = agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    agent.shutdown().await;
    hub.stop().await;

    // Power comes back; the hub does not.
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.view();
    assert!(!v.connected);
    assert_eq!(v.revision, before.revision, "the last verified state was loaded from disk");
    let site_a = std::collections::BTreeMap::from([("site".to_owned(), "a".to_owned())]);
    assert_eq!(v.labels, Some(site_a), "the labels the hub assigned come with it");
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"));
    let v = agent.wait_for(WAIT, |v| v.applied_revision == before.revision).await.unwrap();
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"));
    assert!(tmp.path().join("a/state/models").join(sha256_hex(&model_bytes(V1))).is_file());
    let v = agent.wait_for(WAIT, |v| !v.last_error.is_empty()).await.unwrap();
    assert!(!v.connected, "{v:?}");
    // The error names the URL it could not reach, and why.
    assert!(v.last_error.contains(&hub.grpc_url), "{}", v.last_error);
    assert!(v.last_error.to_lowercase().contains("refused"), "{}", v.last_error);
    agent.shutdown().await;
}
