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
    let tmp = tempfile::tempdir().unwrap();
    let Some((url, kek)) = backend::shared_database(tmp.path()).await else {
        eprintln!(
            "SKIPPED replicas::two_replicas_share_registry_devices_and_keys: needs the PostgreSQL rig \
             (SENTINEL_TEST_POSTGRES); .ci/test runs it in its PostgreSQL half"
        );
        return;
    };
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

/// `sentinel-hub` as its own process (so it can be killed with SIGKILL) on
/// the shared database and blob store: the child and its REST URL.
fn spawn_replica(
    data: &std::path::Path,
    url: &str,
    kek: &std::path::Path,
    blobs: &std::path::Path,
) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(sentinel_testkit::bins::bin("sentinel-hub"))
        .args(["--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--database", url, "--blobs", &format!("file://{}", blobs.display())])
        .arg("--key-encryption-key-file")
        .arg(kek)
        .args(["--heartbeat-secs", "2"])
        .arg("--worker")
        .arg(worker_bin())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the replica exited before listening").unwrap();
        if let Some(u) = line.strip_prefix("sentinel-hub listening on ") {
            break u.to_owned();
        }
    };
    // Keep reading stdout so the replica never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_fail_over_when_their_replica_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((url, kek)) = backend::shared_database(tmp.path()).await else {
        eprintln!(
            "SKIPPED replicas::twenty_agents_fail_over_when_their_replica_is_killed: needs the PostgreSQL rig \
             (SENTINEL_TEST_POSTGRES); .ci/test runs it in its PostgreSQL half"
        );
        return;
    };
    let blobs = tmp.path().join("blobs");
    sentinel_hub::install_crypto_provider();
    let (mut a, a_url) = spawn_replica(&tmp.path().join("a"), &url, &kek, &blobs);
    let admin = std::fs::read_to_string(tmp.path().join("a/admin.token")).unwrap().trim().to_owned();
    let (mut b, b_url) = spawn_replica(&tmp.path().join("b"), &url, &kek, &blobs);
    let http = reqwest::Client::new();
    let post = async |base: &str, path: &str, body: Value| -> Value {
        let r = http.post(format!("{base}{path}")).bearer_auth(&admin).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().await.unwrap()
    };
    let get = async |base: &str, path: &str| -> Value {
        http.get(format!("{base}{path}")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap()
    };
    let keys = get(&a_url, "/api/v1/keys").await;
    let key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();

    // Twenty agents, every one listing A first: A holds all twenty streams.
    let mut agents = Vec::new();
    for i in 0..20 {
        let id = format!("edge-{i}");
        let token = post(&a_url, "/api/v1/devices", json!({"id": id, "labels": {"site": "a"}})).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let dir = tmp.path().join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("device.token"), token).unwrap();
        let text = format!(
            "device_id = \"{id}\"\nhub_url = [\"{a_url}\", \"{b_url}\"]\ntoken_file = \"device.token\"\n\
             pinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n\
             [sync]\nbackoff_initial_ms = 50\nbackoff_cap_secs = 1\nheartbeat_secs = 2\n"
        );
        std::fs::write(dir.join("agent.toml"), &text).unwrap();
        let config = sentinel_agent::AgentConfig::load(&dir.join("agent.toml"), &test_env()).unwrap();
        agents.push(sentinel_agent::start(config).await.unwrap());
    }
    for agent in &agents {
        agent.wait_for(WAIT, |v| v.connected && v.applied_revision > 0).await.unwrap();
    }
    // Acknowledged through A: a model and a deployment (to no device here).
    post(&a_url, "/api/v1/models", json!({"name": "digits"})).await;
    let r = http
        .post(format!("{a_url}/api/v1/models/digits/versions?version=1.0.0"))
        .bearer_auth(&admin)
        .body(model_bytes(V1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let d1 =
        post(&a_url, "/api/v1/models/digits/deploy", json!({"version": "1.0.0", "target": "site=elsewhere"})).await;

    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();

    // What A acknowledged is there, through B; a deploy through B moves the
    // fleet on, and every agent reaches it on B.
    let listed = get(&b_url, "/api/v1/deployments?state=active").await;
    assert_eq!(listed["deployments"][0]["id"], d1["id"], "the acknowledged deployment survived A: {listed}");
    post(&b_url, "/api/v1/models/digits/deploy", json!({"version": "1.0.0", "target": "site=nowhere"})).await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let revision: i64 = db.query_one("SELECT revision FROM fleet", &[]).await.unwrap().get(0);
    let revision = u64::try_from(revision).unwrap();
    for (i, agent) in agents.iter().enumerate() {
        agent
            .wait_for(WAIT, |v| v.connected && v.applied_revision == revision)
            .await
            .unwrap_or_else(|v| panic!("edge-{i} did not converge on revision {revision} through B: {v:?}"));
    }
    for i in 0..20 {
        let d = get(&b_url, &format!("/api/v1/devices/edge-{i}")).await;
        assert_eq!(d["connected"], true, "edge-{i} streams from B now: {d}");
    }
    for agent in agents {
        agent.shutdown().await;
    }
    b.kill().unwrap();
    b.wait().unwrap();
}
