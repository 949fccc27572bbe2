//! A model whose bytes were changed on the hub's disk is refused by hash,
//! reported to the hub, and the previous version keeps serving.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_on_the_hub_is_refused_and_the_old_model_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    hub.deploy("digits", "1.0.0", "*").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();

    // Someone with access to the hub's disk flips one byte of v2.
    let blob = hub.blob_path(&sha256_hex(&model_bytes(V2)));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();

    // Halting off: with one device, its refusal would halt the deployment and
    // the hub would restore 1.0.0 before this test reads the refusal there.
    hub.admin_post(
        "/api/v1/models/digits/deploy",
        serde_json::json!({"version": "2.0.0", "target": "*", "halt_fraction": 1.0}),
    )
    .await;
    let v = agent.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "refused")).await.unwrap();
    let (_, version, detail) = status(&v, "digits").unwrap();
    assert_eq!(version, "2.0.0");
    assert!(detail.starts_with("hash_mismatch"), "{detail}");
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"), "the previous version keeps serving");
    let models = tmp.path().join("a/state/models");
    assert!(!models.join(sha256_hex(&model_bytes(V2))).exists());
    assert!(
        std::fs::read_dir(&models).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".partial"))
    );

    // The hub learns why.
    let dev = hub
        .wait_device("edge-1", |d| {
            d["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "download_refused" && e["reason"].as_str().unwrap().contains("hash_mismatch"))
        })
        .await;
    assert_eq!(dev["models"][0]["state"], "refused");
    agent.shutdown().await;
}
