//! A deploy reaches the agents it targets, and only those, which end up with
//! the verified file; the hub shows what each device runs.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_reaches_only_matching_devices_with_the_verified_file() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "&hardware=x86_64,aarch64").await;
    let a = start_agent(&tmp.path().join("a"), &hub, "edge-a", &[("site", "a")]).await;
    let b = start_agent(&tmp.path().join("b"), &hub, "edge-b", &[("site", "b")]).await;
    // Both connect and receive their (empty) state first.
    for agent in [&a, &b] {
        agent.wait_for(WAIT, |v| v.connected && v.applied_revision > 0).await.unwrap();
    }

    let d = hub.deploy("digits", "1.0.0", "site=a").await;
    let view = a.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let file = tmp.path().join("a/state/models").join(sha256_hex(&model_bytes(V1)));
    assert_eq!(std::fs::read(&file).unwrap(), model_bytes(V1), "the verified file is in the store");
    let rev = view.revision;

    // B saw the same revision, with nothing for it.
    let vb = b.wait_for(WAIT, |v| v.applied_revision >= rev).await.unwrap();
    assert!(vb.models.is_empty(), "{vb:?}");
    assert!(!tmp.path().join("b/state/models").join(sha256_hex(&model_bytes(V1))).exists());

    // The hub shows each device's connection, last-seen time and what it runs.
    let dev = hub.wait_device("edge-a", |v| v["models"][0]["state"] == "serving").await;
    assert_eq!(dev["connected"], true);
    assert!(dev["last_seen_ms"].as_i64().unwrap() > 0);
    assert_eq!(dev["models"][0]["version"], "1.0.0");
    assert_eq!(dev["models"][0]["deployment_id"], d["id"]);
    assert_eq!(dev["desired"][0]["version"], "1.0.0");
    assert!(dev["events"].as_array().unwrap().iter().any(|e| e["kind"] == "model_installed"));
    let list = hub.admin_get("/api/v1/devices").await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 2);
    assert_eq!(list["total"], 2);
    let devb = hub.admin_get("/api/v1/devices/edge-b").await;
    assert_eq!(devb["desired"], serde_json::json!([]));

    // A rollback is a newer state naming the older version.
    hub.push("digits", "2.0.0", V2, "").await;
    hub.deploy("digits", "2.0.0", "site=a").await;
    a.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    hub.admin_post("/api/v1/models/digits/rollback", serde_json::json!({})).await;
    let v = a
        .wait_for(WAIT, |v| {
            v.models.iter().any(|m| m.active_version.as_deref() == Some("1.0.0") && m.status.as_str() == "serving")
        })
        .await
        .unwrap();
    let m = v.models.iter().find(|m| m.name == "digits").unwrap();
    // 1.0.0 was the warm standby: swapped back, and the rolled-back 2.0.0
    // stopped, as in a local rollback.
    assert_eq!(m.standby_version, None, "{m:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Issue 17: a deployment of the version a device already serves (here a
/// second deployment of 1.0.0, as a rollback to it makes) showed the device
/// "pending" until some later change; it is serving at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_of_the_version_a_device_serves_shows_it_serving_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = serving_v1(tmp.path()).await;
    let again = hub.deploy("digits", "1.0.0", "*").await["id"].as_i64().unwrap();
    let row = eventually("the new deployment shows edge-1 serving", WAIT, async || {
        let shown = hub.admin_get(&format!("/api/v1/deployments/{again}")).await;
        Some(shown["status"]["devices"][0].clone()).filter(|d| d["state"] == "serving")
    })
    .await;
    assert_eq!((row["device"].as_str(), row["version"].as_str()), (Some("edge-1"), Some("1.0.0")));
    // Nothing was loaded again: the same version keeps serving.
    let v = agent.view();
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"));
    agent.shutdown().await;
}
