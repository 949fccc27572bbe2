//! Model downloads: whole, by range, with ETag; and the signed manifest
//! checked against the public key the hub serves.
#![allow(clippy::unwrap_used)]

use crate::common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use reqwest::Method;
use sentinel_proto::pb::SignedManifest;
use sentinel_proto::{TrustedKeys, verify_manifest};
use serde_json::Value;

#[tokio::test]
async fn range_requests_return_exactly_the_requested_bytes() {
    let hub = TestHub::start().await;
    hub.register("slow").await;
    let bytes = model_bytes(V3);
    let r = hub.upload("slow", "1.0.0", bytes.clone(), "").await;
    assert_eq!(r.status(), 201);
    let sha: String = r.json::<Value>().await.unwrap()["sha256"].as_str().unwrap().to_owned();
    let path = "/api/v1/models/slow/versions/1.0.0/artifact";

    let whole = hub.get(path, &hub.admin).await;
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), bytes.as_slice());

    let len = bytes.len();
    for (range, start, end) in [
        ("bytes=0-0".to_owned(), 0, 0),
        ("bytes=1000-1999".to_owned(), 1000, 1999),
        (format!("bytes={}-", len / 2), len / 2, len - 1),
        ("bytes=-100".to_owned(), len - 100, len - 1),
        (format!("bytes={}-{}", len - 10, len + 1000), len - 10, len - 1),
    ] {
        let r = hub.req(Method::GET, path, Some(&hub.admin)).header("range", &range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(r.headers()["content-range"], format!("bytes {start}-{end}/{len}").as_str(), "{range}");
        let body = r.bytes().await.unwrap();
        assert_eq!(body.as_ref(), &bytes[start..=end], "{range}");
    }

    let r = hub.req(Method::GET, path, Some(&hub.admin)).header("range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], format!("bytes */{len}").as_str());

    // A matching ETag: not modified. A stale If-Range: the whole file.
    let r = hub
        .req(Method::GET, path, Some(&hub.admin))
        .header("if-none-match", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = hub
        .req(Method::GET, path, Some(&hub.admin))
        .header("range", "bytes=0-9")
        .header("if-range", "\"some-other-version\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = hub
        .req(Method::GET, path, Some(&hub.admin))
        .header("range", "bytes=0-9")
        .header("if-range", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);

    // What was downloaded hashes to the ETag.
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_eq!(hex::encode(digest.as_ref()), sha);
}

async fn trusted_from_hub(hub: &TestHub) -> TrustedKeys {
    let keys: Value = hub.req(Method::GET, "/api/v1/keys", None).send().await.unwrap().json().await.unwrap();
    let mut trusted = TrustedKeys::new();
    for k in keys["keys"].as_array().unwrap() {
        let id = trusted.add_base64(k["public_key"].as_str().unwrap()).unwrap();
        assert_eq!(id, k["key_id"].as_str().unwrap(), "the key id derives from the key");
    }
    trusted
}

async fn signed_manifest(hub: &TestHub, name: &str, version: &str) -> SignedManifest {
    let m: Value =
        hub.get(&format!("/api/v1/models/{name}/versions/{version}/manifest"), &hub.admin).await.json().await.unwrap();
    SignedManifest {
        manifest: B64.decode(m["manifest"].as_str().unwrap()).unwrap(),
        signature: B64.decode(m["signature"].as_str().unwrap()).unwrap(),
        key_id: m["key_id"].as_str().unwrap().to_owned(),
    }
}

#[tokio::test]
async fn the_manifest_verifies_with_the_served_key_and_fails_on_any_changed_byte() {
    let hub = TestHub::start().await;
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let trusted = trusted_from_hub(&hub).await;
    let signed = signed_manifest(&hub, "digits", "1.0.0").await;
    let m = verify_manifest(&signed, &trusted).unwrap();
    assert_eq!((m.name.as_str(), m.version.as_str(), m.size), ("digits", "1.0.0", 19831));

    for i in 0..signed.manifest.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = signed.clone();
            bad.manifest[i] ^= bit;
            assert!(verify_manifest(&bad, &trusted).is_err(), "manifest byte {i} bit {bit:#x}");
        }
    }
    for i in 0..signed.signature.len() {
        let mut bad = signed.clone();
        bad.signature[i] ^= 0x01;
        assert!(verify_manifest(&bad, &trusted).is_err(), "signature byte {i}");
    }
    // A device that pinned another hub's key refuses it.
    let other = TestHub::start().await;
    assert!(verify_manifest(&signed, &trusted_from_hub(&other).await).is_err());

    // After rotation, old manifests still verify and edits are signed by the new key.
    let r = hub.post_json("/api/v1/keys/rotate", &hub.admin, serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    let trusted = trusted_from_hub(&hub).await;
    verify_manifest(&signed, &trusted).unwrap();
    let r = hub
        .req(Method::PUT, "/api/v1/models/digits/versions/1.0.0", Some(&hub.admin))
        .json(&serde_json::json!({"stage": "production"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let resigned = signed_manifest(&hub, "digits", "1.0.0").await;
    assert_ne!(resigned.key_id, signed.key_id);
    assert_eq!(verify_manifest(&resigned, &trusted).unwrap().stage(), sentinel_proto::pb::Stage::Production);
}
