//! Two hub replicas on one PostgreSQL database: they start together on an
//! empty database, serve the same registry, reach each other's devices and
//! sign with the same keys.
//!
//! Needs the PostgreSQL rig (`SENTINEL_TEST_POSTGRES`): `.ci/test` runs this
//! area again in its PostgreSQL half. Without it the test says it skipped.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use prost::Message as _;
use sentinel_hub::HubConfig;
use sentinel_hub::config::{BlobsUrl, DatabaseUrl};
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{DesiredState, Hello, hub_message};
use sentinel_testkit::backend;
use serde_json::{Value, json};

use crate::common;

use common::*;

/// A raw device stream: the signed states a replica sends, undecoded.
async fn next_state_key(
    stream: &mut tonic::Streaming<sentinel_proto::pb::HubMessage>,
    pred: impl Fn(&DesiredState) -> bool,
) -> (DesiredState, String) {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .expect("the stream is open");
        if let Some(hub_message::Kind::State(signed)) = msg.kind {
            let state = DesiredState::decode(&signed.state[..]).unwrap();
            if pred(&state) {
                return (state, signed.key_id);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_registry_devices_and_keys() {
    let Some(rig) = backend::postgres() else {
        eprintln!(
            "SKIPPED replicas::two_replicas_share_registry_devices_and_keys: needs the PostgreSQL rig \
             (SENTINEL_TEST_POSTGRES); .ci/test runs it in its PostgreSQL half"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let url = backend::fresh_database(&rig).await;
    let kek = tmp.path().join("kek");
    backend::write_kek(&kek);
    // One bucket (the rig's, when it runs), else one shared directory. With
    // the bucket, downloads are presigned redirects: the agent below fetches
    // its model straight from the bucket.
    let s3 = backend::s3();
    let blobs = match &s3 {
        Some(rig) => BlobsUrl::S3 { bucket: rig.bucket.clone(), prefix: backend::fresh_prefix() },
        None => BlobsUrl::File(tmp.path().join("blobs")),
    };
    let shared = |c: &mut HubConfig| {
        c.database = Some(DatabaseUrl::Postgres(url.clone()));
        c.blobs = Some(blobs.clone());
        if let Some(rig) = &s3 {
            c.s3 = rig.settings();
            c.artifact_redirect = true;
        }
        c.key_encryption_key_file = Some(kek.clone());
    };

    // Both start at the same moment on the empty database.
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (mut a, mut b) = tokio::join!(TestHub::start_at(&dir_a, shared), TestHub::start_at(&dir_b, shared));
    let tokens: Vec<String> = [&a.admin, &b.admin].into_iter().filter(|t| !t.is_empty()).cloned().collect();
    assert_eq!(tokens.len(), 1, "exactly one replica made the first admin token");
    (a.admin, b.admin) = (tokens[0].clone(), tokens[0].clone());
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let count = async |sql: &str| -> i64 { db.query_one(sql, &[]).await.unwrap().get(0) };
    assert_eq!(count("SELECT COUNT(*) FROM tokens").await, 1);
    assert_eq!(
        count("SELECT COUNT(*) FROM schema_migrations").await,
        count("SELECT COUNT(DISTINCT version) FROM schema_migrations").await,
        "each migration ran once"
    );
    assert_eq!(count("SELECT COUNT(*) FROM signing_keys").await, 1, "one first signing key");
    assert_eq!(a.public_key().await, b.public_key().await, "both sign with it");

    // A push through A is listed and downloadable through B.
    a.push("digits", "1.0.0", V1, "&hardware=x86_64,aarch64").await;
    let listed = b.admin_get("/api/v1/models/digits/versions").await;
    let sha = listed["versions"][0]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha, sha256_hex(&model_bytes(V1)));
    let r = b.get("/api/v1/models/digits/versions/1.0.0/artifact", &b.admin).await;
    assert_eq!(r.status(), 200, "directly, or after the redirect to the bucket");
    assert_eq!(r.bytes().await.unwrap().as_ref(), model_bytes(V1).as_slice());

    // A deploy through B reaches an agent subscribed to A, which serves it.
    let agent = start_agent(&tmp.path().join("agent"), &a, "edge-1", &[("site", "a")]).await;
    agent.wait_for(WAIT, |v| v.connected && v.applied_revision > 0).await.unwrap();
    b.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v2/models/digits/infer"))
        .json(&digit_request(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the agent serves what B deployed: {}", r.text().await.unwrap());

    // A device stream on B; a key rotation through A signs B's next state.
    let token = b.enroll("edge-2", &[("site", "a")]).await;
    let channel = tonic::transport::Channel::from_shared(b.grpc_url.clone()).unwrap().connect().await.unwrap();
    let mut req = tonic::Request::new(Hello {
        device_id: "edge-2".into(),
        hardware: vec!["x86_64".into()],
        agent_version: "test".into(),
        ..Hello::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = AgentSyncClient::new(channel).subscribe(req).await.unwrap().into_inner();
    let (first, old_key) = next_state_key(&mut stream, |_| true).await;
    let rotated: Value = a.admin_post("/api/v1/keys/rotate", json!({})).await;
    let new_key =
        rotated["keys"].as_array().unwrap().iter().find(|k| k["active"] == true).unwrap()["key_id"].as_str().unwrap();
    assert_ne!(new_key, old_key);
    a.push("digits", "2.0.0", V2, "").await;
    a.deploy("digits", "2.0.0", "site=a").await;
    let (next, key) = next_state_key(&mut stream, |s| s.revision > first.revision).await;
    assert_eq!(key, new_key, "B signed the state after A's rotation with the new key");
    assert_eq!(next.models.len(), 1);
    // The agent on A follows too: its pinned keys include only the first
    // key, so it refuses states the new key signed. That is the pinning
    // rule, not a replica fault, so this test stops at B's signature.
    a.stop().await;
    b.stop().await;
}
