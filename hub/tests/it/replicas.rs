//! Hub replicas on one PostgreSQL database deciding once: ten devices on
//! two replicas report `rolled_back` at the same moment, and the deployment
//! is halted once, audited once, and the previous version restored once.
//!
//! Needs the PostgreSQL rig (`SENTINEL_TEST_POSTGRES`, set by `.ci/test` in
//! its PostgreSQL half); without it the test says it skipped.
#![allow(clippy::unwrap_used)]

use reqwest::Method;
use serde_json::{Value, json};

use super::rollout::{ACCURACY, Device, deploy, deployment, halt_audits, models, push};
use crate::common::*;
use sentinel_hub::HubConfig;
use sentinel_hub::config::{BlobsUrl, DatabaseUrl};
use sentinel_testkit::backend;
use sentinel_testkit::wait::WAIT;

/// Two replicas on a fresh database, a shared blob directory and one
/// key-encryption key, both with the first admin token.
pub(crate) async fn replicas(tmp: &std::path::Path) -> Option<(TestHub, TestHub)> {
    let (url, kek) = backend::shared_database(tmp).await?;
    let s3 = backend::s3();
    let blobs = match &s3 {
        Some(rig) => BlobsUrl::S3 { bucket: rig.bucket.clone(), prefix: backend::fresh_prefix() },
        None => BlobsUrl::File(tmp.join("blobs")),
    };
    let shared = |c: &mut HubConfig| {
        c.database = Some(DatabaseUrl::Postgres(url.clone()));
        c.blobs = Some(blobs.clone());
        if let Some(rig) = &s3 {
            c.s3 = rig.settings();
        }
        c.key_encryption_key_file = Some(kek.clone());
    };
    let a = TestHub::start_at(&tmp.join("a"), shared).await;
    let mut b = TestHub::start_at(&tmp.join("b"), shared).await;
    assert!(b.admin.is_empty(), "the second replica found the first one's token");
    b.admin = a.admin.clone();
    Some((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reports_on_two_replicas_at_once_halt_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((a, b)) = replicas(tmp.path()).await else {
        eprintln!("SKIPPED replicas::ten_reports_on_two_replicas_at_once_halt_exactly_once: needs the PostgreSQL rig");
        return;
    };
    push(&a, &["1.0.0", "2.0.0"]).await;
    deploy(&b, json!({"version": "1.0.0", "target": "site=a"})).await;
    let mut devices = Vec::new();
    for i in 0..10 {
        let hub = if i % 2 == 0 { &a } else { &b };
        let mut d = Device::enroll(hub, &format!("edge-{i}"), "a").await;
        d.subscribe().await;
        d.next_state().await;
        devices.push(d);
    }
    // The web change feed crosses replicas: B's shows a report made on A.
    let mut feed = b.state.events().changes();
    feed.borrow_and_update();
    devices[0].report("1.0.0", "serving", "", 1).await;
    // (The borrow `wait_for` returns is dropped at once: held, it would
    // block B's every change notice.)
    let seen = tokio::time::timeout(WAIT, feed.wait_for(|c| c.subject == "edge-0")).await.is_ok_and(|r| r.is_ok());
    assert!(seen, "B's change feed never named edge-0, which reported on A");

    let d2 = deploy(&a, json!({"version": "2.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    // Every device, on either replica, gets the new state.
    for d in &mut devices {
        let s = d.next_state().await;
        assert_eq!(models(&s), [("2.0.0".to_owned(), d2)], "{}", d.id);
    }

    // All ten at once, half through each replica: far past the 20% threshold.
    futures_util::future::join_all(devices.iter_mut().map(|d| d.report("2.0.0", "rolled_back", ACCURACY, d2))).await;

    let v = deployment(&a, d2).await;
    assert_eq!(v["state"], "halted", "{v}");
    for hub in [&a, &b] {
        assert_eq!(halt_audits(hub).await.len(), 1, "one halt in the audit log");
    }
    let list: Value = b.get("/api/v1/deployments?state=active", &b.admin).await.json().await.unwrap();
    let active = list["deployments"].as_array().unwrap();
    assert_eq!(active.len(), 1, "one restore: {list}");
    assert_eq!((active[0]["version"].as_str(), active[0]["replaces"].as_i64()), (Some("1.0.0"), Some(d2)));
    let all: Value = a.get("/api/v1/deployments?limit=100", &a.admin).await.json().await.unwrap();
    let rollbacks = all["deployments"].as_array().unwrap().iter().filter(|d| d["kind"] == "rollback").count();
    assert_eq!(rollbacks, 1, "one fleet-wide restore");
    // Every device, on either replica, is told to go back.
    let restored = active[0]["id"].as_i64().unwrap();
    for d in &mut devices {
        loop {
            let s = d.next_state().await;
            if models(&s) == [("1.0.0".to_owned(), restored)] {
                break;
            }
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The signed manifest `GET .../manifest` serves.
async fn signed(hub: &TestHub, version: &str) -> sentinel_proto::pb::SignedManifest {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let m: Value =
        hub.get(&format!("/api/v1/models/digits/versions/{version}/manifest"), &hub.admin).await.json().await.unwrap();
    sentinel_proto::pb::SignedManifest {
        manifest: b64.decode(m["manifest"].as_str().unwrap()).unwrap(),
        signature: b64.decode(m["signature"].as_str().unwrap()).unwrap(),
        key_id: m["key_id"].as_str().unwrap().to_owned(),
    }
}

/// `sentinel-hub migrate` from `data`'s hub.db: exit code, stdout, stderr.
fn migrate(data: &std::path::Path, to: &str, blobs: &str, kek: &std::path::Path) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"));
    cmd.args(["migrate", "--from", &format!("sqlite://{}", data.join("hub.db").display()), "--to", to])
        .args(["--blobs-to", blobs])
        .arg("--key-encryption-key-file")
        .arg(kek)
        .env("RUST_LOG", "warn");
    if let Some(rig) = backend::s3() {
        cmd.env("AWS_ENDPOINT_URL", &rig.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &rig.key)
            .env("AWS_SECRET_ACCESS_KEY", &rig.secret);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_an_embedded_hub_and_its_signatures_still_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((url, kek)) = backend::shared_database(tmp.path()).await else {
        eprintln!(
            "SKIPPED replicas::migrate_moves_an_embedded_hub_and_its_signatures_still_verify: needs the PostgreSQL rig"
        );
        return;
    };
    // An embedded hub, whatever the suite's back end: SQLite and local disk.
    let data = tmp.path().join("embedded");
    let embedded = |c: &mut HubConfig| {
        c.database = Some(DatabaseUrl::Sqlite(data.join("hub.db")));
        c.blobs = Some(BlobsUrl::File(data.join("blobs")));
    };
    let mut old = TestHub::start_at(&data, embedded).await;
    push(&old, &["1.0.0"]).await;
    old.admin_post("/api/v1/keys/rotate", json!({})).await;
    old.push("digits", "2.0.0", V2, "").await;
    let d = deploy(&old, json!({"version": "2.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    let mut device = Device::enroll(&old, "edge-1", "a").await;
    // Telemetry, to be moved too.
    let now = sentinel_hub::now_ms();
    let window = sentinel_proto::pb::SlotWindow {
        model: "digits".into(),
        version: "1.0.0".into(),
        seq: 1,
        start_unix_ms: now - 1000,
        end_unix_ms: now,
        requests: 12,
        ..Default::default()
    };
    let report = sentinel_proto::pb::AgentReport {
        windows: vec![window],
        telemetry_run: 1,
        sent_at_unix_ms: now,
        ..Default::default()
    };
    assert!(device.send(report).await.unwrap().refused_windows.is_empty());
    let telemetry = old.admin_get("/api/v1/devices/edge-1/telemetry").await["series"].clone();
    assert_eq!(telemetry[0]["points"][0]["requests"], 12);
    let keys: Value = old.admin_get("/api/v1/keys").await;
    let mut pinned = sentinel_proto::TrustedKeys::new();
    for k in keys["keys"].as_array().unwrap() {
        pinned.add_base64(k["public_key"].as_str().unwrap()).unwrap();
    }
    let before = [signed(&old, "1.0.0").await, signed(&old, "2.0.0").await];
    assert_ne!(before[0].key_id, before[1].key_id, "two keys signed them");
    // A publisher key, and a model that requires it.
    let publisher = sentinel_testkit::signing::keypair(tmp.path(), "pipeline");
    let pem = std::fs::read_to_string(&publisher.public).unwrap();
    let added = old.admin_post("/api/v1/publishers", json!({"name": "pipeline", "public_key": pem})).await;
    let r = old.req(Method::PUT, "/api/v1/models/digits", Some(&old.admin)).json(&json!({"require_publisher": true}));
    assert_eq!(r.send().await.unwrap().status(), 200);
    old.stop().await;

    let (blobs_to, target_blobs) = match backend::s3() {
        Some(r) => {
            let prefix = backend::fresh_prefix();
            (format!("s3://{}/{}", r.bucket, prefix), BlobsUrl::S3 { bucket: r.bucket.clone(), prefix })
        }
        None => {
            let dir = tmp.path().join("shared-blobs");
            (format!("file://{}", dir.display()), BlobsUrl::File(dir))
        }
    };

    // A blob whose bytes changed is refused by name, and nothing is migrated.
    let v2 = data.join("blobs/sha256").join(sha256_hex(&model_bytes(V2)));
    let good = std::fs::read(&v2).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&v2, &bad).unwrap();
    let (code, _, err) = migrate(&data, &url, &blobs_to, &kek);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("blob {} in the source store has changed", v2.file_name().unwrap().to_string_lossy())),
        "{err}"
    );
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows: i64 = db.query_one("SELECT COUNT(*) FROM models", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0, "an interrupted migration leaves the target's tables empty");

    // Repaired, the re-run completes; a third run is refused.
    std::fs::write(&v2, &good).unwrap();
    let (code, out, err) = migrate(&data, &url, &blobs_to, &kek);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("versions\t2") && out.contains("deployments\t1") && out.contains("signing_keys\t2"), "{out}");
    let (code, _, err) = migrate(&data, &url, &blobs_to, &kek);
    assert_eq!(code, 1);
    assert!(err.contains("already holds a registry") && err.contains("--force"), "{err}");

    // The migrated hub: same tokens, same deployment, same bytes, and
    // signatures that verify with the keys devices pinned before.
    let new = TestHub::start_at(&tmp.path().join("replica"), |c| {
        c.database = Some(DatabaseUrl::Postgres(url.clone()));
        c.blobs = Some(target_blobs.clone());
        if let Some(r) = backend::s3() {
            c.s3 = r.settings();
        }
        c.key_encryption_key_file = Some(kek.clone());
    })
    .await;
    let mut new = new;
    assert!(new.admin.is_empty(), "the migrated token table has the first admin token");
    new.admin = old.admin.clone();
    for (version, file, was) in [("1.0.0", V1, &before[0]), ("2.0.0", V2, &before[1])] {
        let now = signed(&new, version).await;
        assert_eq!(&now, was, "{version}: the same signed manifest");
        let m = sentinel_proto::verify_manifest(&now, &pinned).unwrap();
        let r = new.get(&format!("/api/v1/models/digits/versions/{version}/artifact"), &new.admin).await;
        let bytes = r.bytes().await.unwrap();
        assert_eq!(bytes.as_ref(), model_bytes(file).as_slice());
        assert_eq!(m.sha256, sha256_hex(&bytes), "{version}");
    }
    assert_eq!(deployment(&new, d).await["state"], "active");
    // The device's token still opens its stream, and its state is new to it.
    device.move_to(&new).await;
    device.subscribe().await;
    let state = device.next_state().await;
    assert_eq!(models(&state), [("2.0.0".to_owned(), d)]);
    let keys: Value = new.admin_get("/api/v1/keys").await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "both keys moved");
    let publishers = new.admin_get("/api/v1/publishers").await;
    assert_eq!(publishers["publishers"].as_array().unwrap().as_slice(), [added], "the publisher key moved");
    assert_eq!(new.admin_get("/api/v1/models/digits").await["require_publisher"], true);
    let moved = new.admin_get("/api/v1/devices/edge-1/telemetry").await["series"].clone();
    assert_eq!(moved, telemetry, "the telemetry moved");
}

#[tokio::test]
async fn init_prints_the_first_admin_token_once() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((url, kek)) = backend::shared_database(tmp.path()).await else {
        eprintln!("SKIPPED replicas::init_prints_the_first_admin_token_once: needs the PostgreSQL rig");
        return;
    };
    let init = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
            .args(["init", "--database", &url, "--key-encryption-key-file"])
            .arg(&kek)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, token, err) = init();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(token.lines().count(), 1, "one line: the token ({token:?})");
    let (code, again, err) = init();
    assert_eq!((code, again.as_str()), (Some(0), ""), "{err}");
    assert!(err.contains("already has tokens"), "{err}");
    // A replica on that database makes no token of its own, and takes this one.
    let mut hub = TestHub::start_at(&tmp.path().join("replica"), |c| {
        c.database = Some(DatabaseUrl::Postgres(url.clone()));
        c.key_encryption_key_file = Some(kek.clone());
    })
    .await;
    assert!(hub.admin.is_empty() && !tmp.path().join("replica/admin.token").exists());
    hub.admin = token;
    hub.admin_get("/api/v1/tokens").await;
    // A bad key-encryption key file is a usage error, named: readable by
    // others, then the wrong length.
    let short = tmp.path().join("short");
    std::fs::write(&short, b"short").unwrap();
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
            .args(["init", "--database", &url, "--key-encryption-key-file"])
            .arg(&short)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("readable by others"), "{err}");
    std::fs::set_permissions(&short, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, err) = run();
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("5 bytes; expected 32 raw bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_completed_on_two_replicas_at_once_widens_once() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((a, b)) = replicas(tmp.path()).await else {
        eprintln!("SKIPPED replicas::a_wave_completed_on_two_replicas_at_once_widens_once: needs the PostgreSQL rig");
        return;
    };
    push(&a, &["1.0.0", "2.0.0"]).await;
    let d1 = deploy(&a, json!({"version": "1.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    let mut devices = Vec::new();
    for i in 0..20 {
        let hub = if i % 2 == 0 { &a } else { &b };
        let mut d = Device::enroll(hub, &format!("edge-{i}"), "a").await;
        d.subscribe().await;
        loop {
            if models(&d.next_state().await) == [("1.0.0".to_owned(), d1)] {
                break;
            }
        }
        devices.push(d);
    }
    let d2 =
        deploy(&b, json!({"version": "2.0.0", "target": "site=a", "waves": [50, 100]})).await["id"].as_i64().unwrap();
    let first: Vec<usize> =
        (0..20).filter(|i| sentinel_hub::rollout::waves::in_wave(d2, &[50, 75, 100], 0, &devices[*i].id)).collect();
    assert!(first.iter().any(|i| i % 2 == 0) && first.iter().any(|i| i % 2 == 1), "the wave spans both replicas");
    // The whole first wave reports at once, through both replicas.
    let mut in_wave: Vec<&mut Device> =
        devices.iter_mut().enumerate().filter(|(i, _)| first.contains(i)).map(|(_, d)| d).collect();
    futures_util::future::join_all(in_wave.iter_mut().map(|d| d.report("2.0.0", "serving", "", d2))).await;
    let v = deployment(&a, d2).await;
    assert_eq!(v["wave"], 1, "widened once, to 75%, not past it: {v}");
    let audit: Value = b.get("/api/v1/audit?limit=500", &b.admin).await.json().await.unwrap();
    let widen =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == format!("WIDEN deployment {d2}")).count();
    assert_eq!(widen, 1, "one widening, however many replicas saw the wave done: {audit}");
    // Every device of the 75% wave, on either replica, is told to run 2.0.0.
    for (i, d) in devices.iter_mut().enumerate() {
        if !sentinel_hub::rollout::waves::in_wave(d2, &[50, 75, 100], 1, &d.id) {
            continue;
        }
        loop {
            if models(&d.next_state().await) == [("2.0.0".to_owned(), d2)] {
                break;
            }
        }
        assert!(i < 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_widen_and_halt_each_deployment_once() {
    use sentinel_hub::store::{DeploymentKind, DeploymentStore as _, HaltOutcome, NewDeployment, PostgresStore};
    let Some(rig) = backend::postgres() else {
        eprintln!("SKIPPED replicas::racing_replicas_widen_and_halt_each_deployment_once: needs the PostgreSQL rig");
        return;
    };
    let url = backend::fresh_database(&rig).await;
    let stores: Vec<std::sync::Arc<PostgresStore>> =
        ["a", "b"].iter().map(|r| std::sync::Arc::new(PostgresStore::open(&url, r, None).unwrap())).collect();
    let new = |target: String| NewDeployment {
        model: "m".into(),
        version: "1.0.0".into(),
        target,
        kind: DeploymentKind::Deploy,
        created_by: "t".into(),
        replaces: None,
        policy: None,
        halt_fraction: 0.2,
        halt_count: None,
        waves: vec![25, 50, 100],
    };
    let ids: Vec<i64> =
        (0..20).map(|i| stores[0].insert_deployment(&new(format!("site={i}")), 1).unwrap().id).collect();
    let expected = ids.clone();
    // Two replicas' stores, released together by a barrier, each widen
    // every deployment from wave 0 and then halt it.
    let (widened, halted) = tokio::task::spawn_blocking(move || {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let runs: Vec<_> = stores
            .into_iter()
            .map(|store| {
                let (barrier, ids) = (barrier.clone(), ids.clone());
                std::thread::spawn(move || {
                    let (mut widened, mut halted) = (Vec::new(), Vec::new());
                    for id in ids {
                        barrier.wait();
                        if store.advance_wave(id, 0, 2).unwrap().is_some() {
                            widened.push(id);
                        }
                        barrier.wait();
                        if matches!(store.halt_deployment(id, "bad", None, 3).unwrap(), HaltOutcome::Halted { .. }) {
                            halted.push(id);
                        }
                    }
                    (widened, halted)
                })
            })
            .collect();
        let mut all = (Vec::new(), Vec::new());
        for r in runs {
            let (w, h) = r.join().unwrap();
            all.0.extend(w);
            all.1.extend(h);
        }
        all
    })
    .await
    .unwrap();
    let (mut widened, mut halted) = (widened, halted);
    widened.sort();
    halted.sort();
    assert_eq!(widened, expected, "each deployment widened by exactly one replica");
    assert_eq!(halted, expected, "each deployment halted by exactly one replica");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let past: i64 = db.query_one("SELECT COUNT(*) FROM deployments WHERE wave <> 1", &[]).await.unwrap().get(0);
    assert_eq!(past, 0, "no deployment skipped a wave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified() {
    let (Some(rig), Ok(ca)) = (backend::postgres(), std::env::var("SENTINEL_TEST_POSTGRES_CA")) else {
        eprintln!("SKIPPED replicas::tls_to_the_database_is_verified: needs the PostgreSQL rig and its CA");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let plain = backend::fresh_database(&rig).await;
    let name = plain.rsplit_once('/').unwrap().1.split('?').next().unwrap().to_owned();
    let url = plain.replace("sslmode=disable", "sslmode=require");
    assert_ne!(url, plain, "the rig's URL says sslmode=disable");
    let kek = tmp.path().join("kek");
    backend::write_kek(&kek);
    let tls = |ca: Option<std::path::PathBuf>| {
        let (url, kek) = (url.clone(), kek.clone());
        move |c: &mut HubConfig| {
            c.database = Some(DatabaseUrl::Postgres(url));
            c.database_ca_file = ca;
            c.key_encryption_key_file = Some(kek);
        }
    };

    // Without the database's CA: refused at start, naming the certificate.
    let mut config = HubConfig::new(tmp.path().join("untrusting"));
    tls(None)(&mut config);
    let err = sentinel_hub::Hub::open(config).unwrap_err();
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(chain.contains("certificate"), "{chain}");

    // Trusting it: the hub works, and every connection it holds is TLS.
    let hub = TestHub::start_at(&tmp.path().join("hub"), tls(Some(ca.into()))).await;
    hub.admin_get("/api/v1/models").await;
    let (db, conn) = tokio_postgres::connect(&rig, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let count = async |ssl: bool| -> i64 {
        db.query_one(
            "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1 AND s.ssl = $2",
            &[&name, &ssl],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert!(count(true).await > 0, "the hub's connections use TLS");
    assert_eq!(count(false).await, 0, "and none is plain text");
}
