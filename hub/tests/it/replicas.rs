//! Hub replicas on one PostgreSQL database deciding once: ten devices on
//! two replicas report `rolled_back` at the same moment, and the deployment
//! is halted once, audited once, and the previous version restored once.
//!
//! Needs the PostgreSQL rig (`SENTINEL_TEST_POSTGRES`, set by `.ci/test` in
//! its PostgreSQL half); without it the test says it skipped.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::rollout::{ACCURACY, Device, deploy, deployment, halt_audits, models, push};
use crate::common::*;
use sentinel_hub::HubConfig;
use sentinel_hub::config::{BlobsUrl, DatabaseUrl};
use sentinel_testkit::backend;

/// Two replicas on a fresh database, a shared blob directory and one
/// key-encryption key, both with the first admin token.
pub(crate) async fn replicas(tmp: &std::path::Path) -> Option<(TestHub, TestHub)> {
    let rig = backend::postgres()?;
    let url = backend::fresh_database(&rig).await;
    let kek = tmp.join("kek");
    backend::write_kek(&kek);
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
