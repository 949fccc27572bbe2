//! The two-key model on a device: an agent that pins a publisher runs only
//! models whose OpenSSF model-signing bundle verifies with that publisher's
//! key, checked on the device itself. A version the hub signed but no pinned
//! publisher did is refused (`publisher_signature`), and so is one a
//! publisher the hub trusts (but this device does not) signed; the previous
//! version keeps serving. Bundles are made by `model_signing` itself.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_testkit::signing::{keypair, sign};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_pins_a_publisher_refuses_what_only_the_hub_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    let team = keypair(tmp.path(), "ml-team");
    let intruder = keypair(tmp.path(), "intruder");
    // The hub trusts both publishers; the device pins only the team.
    for (name, key) in [("ml-team", &team), ("intruder", &intruder)] {
        let pem = std::fs::read_to_string(&key.public).unwrap();
        hub.admin_post("/api/v1/publishers", json!({"name": name, "public_key": pem})).await;
    }
    let (v1, v2) = (model_path(V1), model_path(V2));
    let signed =
        |model: &std::path::Path, key, out: &str| std::fs::read(sign(model, key, &tmp.path().join(out))).unwrap();
    hub.register("digits").await;
    let r = hub.upload_signed("digits", "1.0.0", model_bytes(V1), signed(&v1, &team, "v1.sig")).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Hub-signed only: what a stolen hub key, or a push that skipped the
    // pipeline, looks like.
    hub.push("digits", "2.0.0", V2, "").await;
    // Signed by a publisher the hub accepts but this device does not pin.
    let r = hub.upload_signed("digits", "3.0.0", model_bytes(V2), signed(&v2, &intruder, "v3.sig")).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let pin = format!(
        "[[pinned_publishers]]\nname = \"ml-team\"\nkey_file = \"{}\"\n",
        team.public.display().to_string().replace('\\', "\\\\")
    );
    // `pinned_publishers` is a top-level array of tables: it goes before the
    // `[sync]` table the helper appends.
    let agent = start_agent_with(&tmp.path().join("a"), &hub, "edge-1", &[], &pin).await;
    hub.deploy("digits", "1.0.0", "*").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();

    let reasons: [(&str, &[&str]); 2] = [
        ("2.0.0", &["carries no publisher signature; this device pins publisher ml-team (key "]),
        ("3.0.0", &["no known publisher key matches the bundle's key hint", "the hub names its signer intruder (key "]),
    ];
    for (version, whys) in reasons {
        // Halting off: with one device, its refusal would halt the deployment
        // and the hub would restore 1.0.0 before this test reads the refusal.
        hub.admin_post(
            "/api/v1/models/digits/deploy",
            json!({"version": version, "target": "*", "halt_fraction": 1.0}),
        )
        .await;
        let v = agent
            .wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "refused" && s.1 == version))
            .await
            .unwrap();
        let (_, _, detail) = status(&v, "digits").unwrap();
        assert!(detail.starts_with("publisher_signature: "), "{detail}");
        for why in whys {
            assert!(detail.contains(why), "{version}: {detail}");
        }
        println!("{version} refused on the device: {detail}");
        assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"), "the previous version keeps serving");
        // Refused before the model was downloaded.
        assert!(!tmp.path().join("a/state/models").join(sha256_hex(&model_bytes(V2))).exists());
        // The hub learns why.
        hub.wait_device("edge-1", |d| {
            d["events"].as_array().unwrap().iter().any(|e| {
                e["kind"] == "download_refused"
                    && e["version"] == version
                    && e["reason"].as_str().unwrap().starts_with("publisher_signature")
            })
        })
        .await;
    }
    // Signed by the pinned publisher: installed.
    let r = hub.upload_signed("digits", "4.0.0", model_bytes(V2), signed(&v2, &team, "v4.sig")).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    hub.admin_post("/api/v1/models/digits/deploy", json!({"version": "4.0.0", "target": "*", "halt_fraction": 1.0}))
        .await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("4.0.0")).await.unwrap();
    agent.shutdown().await;
}
