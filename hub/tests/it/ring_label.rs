//! The device-label key `ring` (deployment rings), formerly `stage`: a bare
//! target word means `ring=WORD`, and the old key is still read as `ring`
//! for one release, with a warning, wherever it arrives: a target, an
//! enrolment label, a label an agent reports.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use prost::Message as _;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{DesiredState, Hello, HubMessage, hub_message};
use serde_json::{Value, json};
use tonic::Streaming;

use crate::common::*;

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}

/// The first desired state on a new stream of device `id`, whose agent
/// reports `labels`.
async fn first_state(hub: &TestHub, id: &str, token: &str, labels: &[(&str, &str)]) -> DesiredState {
    let channel = tonic::transport::Channel::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
    let hello = Hello {
        device_id: id.into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        hardware: vec!["x86_64".into()],
        agent_version: "test".into(),
        ..Hello::default()
    };
    let mut req = tonic::Request::new(hello);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream: Streaming<HubMessage> = AgentSyncClient::new(channel).subscribe(req).await.unwrap().into_inner();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a message within 60 s")
            .unwrap()
            .expect("the stream is open");
        if let Some(hub_message::Kind::State(signed)) = msg.kind {
            return DesiredState::decode(&signed.state[..]).unwrap();
        }
    }
}

#[tokio::test]
async fn a_bare_word_targets_the_ring_and_the_old_key_is_read_as_ring_with_a_warning() {
    let hub = TestHub::start().await;
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;

    // Enrolment: `stage` is stored as `ring`, and the answer says so.
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "old", "labels": {"stage": "production"}})).await;
    assert_eq!(r.status(), 201);
    let old: Value = r.json().await.unwrap();
    assert_eq!(old["labels"], json!({"ring": "production"}), "{old}");
    let warning = old["warnings"][0].as_str().unwrap();
    assert!(warning.contains("labels uses the label key `stage`, which is now `ring`"), "{warning}");
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "new", "labels": {"ring": "production"}})).await;
    let new: Value = r.json().await.unwrap();
    assert!(new.get("warnings").is_none(), "no warning for `ring`: {new}");
    let msg = expect_error(
        hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "both", "labels": {"ring": "a", "stage": "b"}}))
            .await,
        422,
    )
    .await;
    assert!(msg.contains("labels give both `ring` and its old name `stage`"), "{msg}");

    // Targets: a bare word is `ring=WORD`; `stage=WORD` reads the same, with a warning.
    let d = hub.deploy("digits", "1.0.0", "production").await;
    assert_eq!(d["target"], "ring=production");
    assert!(d.get("warnings").is_none(), "{d}");
    let d2 = hub.deploy("digits", "1.0.0", "stage=production").await;
    assert_eq!(d2["target"], "ring=production");
    let warning = d2["warnings"][0].as_str().unwrap();
    assert!(warning.contains("target \"stage=production\" uses the label key `stage`"), "{warning}");
    let first = hub.admin_get(&format!("/api/v1/deployments/{}", d["id"])).await;
    assert_eq!(first["state"], "superseded", "the same target: the second deploy supersedes the first");
    let msg = expect_error(
        hub.post_json(
            "/api/v1/models/digits/deploy",
            &hub.admin,
            json!({"version": "1.0.0", "target": "stage=a,ring=b"}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains(r#"selector names "ring" ("stage" is its old name) twice"#), "{msg}");
    let rb = hub.post_json("/api/v1/models/digits/rollback", &hub.admin, json!({"target": "stage=production"})).await;
    // Nothing earlier to roll back to: but the old key found the deployment.
    let msg = expect_error(rb, 409).await;
    assert!(msg.contains("no earlier version of digits was deployed to [ring=production]"), "{msg}");

    // Both devices enrolled with the ring get the version.
    for id in ["old", "new"] {
        let device = hub.admin_get(&format!("/api/v1/devices/{id}")).await;
        assert_eq!(device["desired"][0]["deployment_id"], d2["id"], "{device}");
    }
}

/// An agent whose config still reports `stage` has it read as `ring`: the
/// hub targets it by `ring`, and says so in the labels of its signed state.
#[tokio::test]
async fn a_reported_stage_label_is_read_as_ring() {
    let hub = TestHub::start().await;
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let d = hub.deploy("digits", "1.0.0", "canary").await;
    let token = hub.enroll("edge-1", &[("site", "a")]).await;
    let state = first_state(&hub, "edge-1", &token, &[("stage", "canary")]).await;
    let labels: Vec<(&str, &str)> = state.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(labels, [("ring", "canary"), ("site", "a")]);
    assert_eq!(state.models.len(), 1, "the ring=canary deployment reaches it: {state:?}");
    assert_eq!(state.models[0].deployment_id, d["id"].as_i64().unwrap());
    // Reported beside a `ring`, it is left as it is and no selector names it.
    let token = hub.enroll("edge-2", &[]).await;
    let state = first_state(&hub, "edge-2", &token, &[("ring", "blue"), ("stage", "canary")]).await;
    assert!(state.models.is_empty(), "{state:?}");
    assert_eq!(state.labels.get("ring").map(String::as_str), Some("blue"));
}

#[tokio::test]
async fn the_cli_prints_the_deprecation_and_shows_the_ring() {
    let hub = TestHub::start().await;
    let admin = hub.admin.as_str();
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let r = sentinel(&hub, admin, &["device", "enroll", "edge-1", "--labels", "site=a,stage=production"]).await;
    ok(&r);
    assert!(r.stdout.trim().starts_with("snt_") && !r.stdout.contains("warning"), "{}", r.stdout);
    assert!(r.stderr.contains("warning: labels uses the label key `stage`, which is now `ring`"), "{}", r.stderr);
    let r = sentinel(&hub, admin, &["model", "deploy", "digits", "1.0.0", "--target", "stage=production"]).await;
    ok(&r);
    assert!(r.stdout.contains("ring=production"), "{}", r.stdout);
    assert!(r.stdout.contains("warning: target \"stage=production\" uses the label key `stage`"), "{}", r.stdout);
    let r = sentinel(&hub, admin, &["device", "list"]).await;
    ok(&r);
    assert!(r.stdout.contains("ring=production,site=a"), "{}", r.stdout);
}
