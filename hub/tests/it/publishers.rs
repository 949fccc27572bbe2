//! Publisher signatures at the hub: bundles made by OpenSSF's `model_signing`
//! itself, pushed through the real `sentinel` CLI, each accepted or refused
//! with the reason stated, and a refused push leaving nothing behind.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_testkit::signing::{keypair, sign, verify};
use serde_json::{Value, json};

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}

/// A refused push: exit 65 (input refused, the hub's 422) and its reason.
fn refused(r: &Run, reason: &str) {
    assert_eq!(r.code, 65, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the hub answered 422"), "{}", r.stderr);
    assert!(r.stderr.contains(reason), "want {reason:?}: {}", r.stderr);
    println!("refused: {}", r.stderr.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_signing_bundles_are_verified_at_push_and_refused_saying_why() {
    let hub = TestHub::start().await;
    let admin = hub.admin.clone();
    let dir = tempfile::tempdir().unwrap();
    let team = keypair(dir.path(), "ml-team");
    let stranger = keypair(dir.path(), "stranger");
    let (v1, v2) = (model_path(V1), model_path(V2));
    let v1_sig = sign(&v1, &team, &dir.path().join("v1.sig"));
    assert!(verify(&v1, &team, &v1_sig), "model_signing's own verifier accepts its bundle");

    // Registering keys: admin only, PEM EC keys only, each name and key once.
    let publisher = hub.token("publisher").await;
    let team_pub = team.public.to_str().unwrap();
    let r = sentinel(&hub, &publisher, &["publisher", "add", "ml-team", "--key", team_pub]).await;
    assert_eq!(r.code, 77, "{}", r.stderr);
    let r = sentinel(&hub, &admin, &["publisher", "add", "ml-team", "--key", team_pub]).await;
    ok(&r);
    assert!(r.stdout.contains("registered publisher ml-team"), "{}", r.stdout);
    let r = sentinel(&hub, &admin, &["publisher", "add", "again", "--key", team_pub]).await;
    assert_eq!(r.code, 3, "the same key twice is a conflict: {}", r.stderr);
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n").unwrap();
    let r = sentinel(&hub, &admin, &["publisher", "add", "ed", "--key", not_a_key.to_str().unwrap()]).await;
    assert_eq!(r.code, 65, "an Ed25519 key is refused: {}", r.stderr);
    assert!(r.stderr.contains("not an uncompressed EC P-256 or P-384 public key"), "{}", r.stderr);
    let listed = hub.get("/api/v1/publishers", &publisher).await.json::<Value>().await.unwrap();
    assert_eq!(listed["publishers"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["publishers"][0]["algorithm"], "ecdsa-p256-sha256");
    // The key id is model-signing's hint: SHA-256 of the PEM.
    let bundle: Value = serde_json::from_slice(&std::fs::read(&v1_sig).unwrap()).unwrap();
    assert_eq!(listed["publishers"][0]["key_id"], bundle["verificationMaterial"]["publicKey"]["hint"]);

    let push = |file: &std::path::Path, version: &str, sig: Option<&std::path::Path>| {
        let mut args: Vec<String> =
            ["--json", "model", "push", file.to_str().unwrap(), "--name", "digits", "--version", version]
                .map(str::to_owned)
                .to_vec();
        if let Some(s) = sig {
            args.extend(["--signature".to_owned(), s.to_str().unwrap().to_owned()]);
        }
        let (hub, token) = (&hub, publisher.clone());
        async move { sentinel(hub, &token, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    // Good: accepted, the publisher in the hub-signed manifest, the bundle
    // stored beside the model and served back byte for byte.
    let r = push(&v1, "1.0.0", Some(&v1_sig)).await;
    ok(&r);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let p = &v["manifest"]["publisher"];
    assert_eq!(p["name"], "ml-team", "{v}");
    assert_eq!(p["key_id"], bundle["verificationMaterial"]["publicKey"]["hint"]);
    assert_eq!(p["bundle"]["size"], std::fs::metadata(&v1_sig).unwrap().len());
    let served = hub.get("/api/v1/models/digits/versions/1.0.0/signature", &publisher).await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.bytes().await.unwrap().to_vec(), std::fs::read(&v1_sig).unwrap());
    let r =
        sentinel(&hub, &publisher, &["model", "push", v2.to_str().unwrap(), "--name", "digits", "--version", "0.9.0"])
            .await;
    ok(&r);
    let unsigned = hub.get("/api/v1/models/digits/versions/0.9.0/signature", &publisher).await;
    assert_eq!(unsigned.status(), 404, "a version pushed without a signature has none to serve");

    // Tampered model: the signed file with one byte changed.
    let tampered = dir.path().join("tampered.onnx");
    let mut bytes = std::fs::read(&v1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&tampered, &bytes).unwrap();
    refused(&push(&tampered, "1.1.0", Some(&v1_sig)).await, "but this model's sha256 is");
    // Wrong key: signed by a key no admin registered.
    let foreign = sign(&v1, &stranger, &dir.path().join("foreign.sig"));
    refused(&push(&v1, "1.2.0", Some(&foreign)).await, "no known publisher key matches the bundle's key hint");
    // Wrong key under the right hint: the envelope re-signed by a stranger.
    let mut forged: Value = serde_json::from_slice(&std::fs::read(&foreign).unwrap()).unwrap();
    forged["verificationMaterial"] = bundle["verificationMaterial"].clone();
    let forged_path = dir.path().join("forged.sig");
    std::fs::write(&forged_path, serde_json::to_vec(&forged).unwrap()).unwrap();
    refused(&push(&v1, "1.3.0", Some(&forged_path)).await, "the signature does not verify with ml-team");
    // The bundle of another file: a good signature over v2, pushed with v1.
    let v2_sig = sign(&v2, &team, &dir.path().join("v2.sig"));
    refused(&push(&v1, "1.4.0", Some(&v2_sig)).await, "the bundle signs a file with sha256");
    // Not a bundle at all.
    let junk = dir.path().join("junk.sig");
    std::fs::write(&junk, b"not json").unwrap();
    refused(&push(&v1, "1.5.0", Some(&junk)).await, "not a Sigstore bundle");

    // A model that requires a publisher refuses an unsigned push.
    let r = sentinel(&hub, &publisher, &["model", "update", "digits", "--require-publisher", "true"]).await;
    ok(&r);
    assert!(r.stdout.contains("publisher signature: required"), "{}", r.stdout);
    refused(&push(&v2, "2.0.0", None).await, "model digits requires a publisher");
    // The pipeline's own publisher token cannot lift the requirement; an admin can.
    let r = sentinel(&hub, &publisher, &["model", "update", "digits", "--require-publisher", "false"]).await;
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("lifting a model's publisher-signature requirement"), "{}", r.stderr);
    ok(&push(&v2, "2.0.0", Some(&v2_sig)).await);

    // Every refused push left nothing: no version, no stored bundle.
    let model = hub.get("/api/v1/models/digits", &publisher).await.json::<Value>().await.unwrap();
    let versions: Vec<&str> =
        model["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(versions, ["2.0.0", "1.0.0", "0.9.0"]);
    assert_eq!(model["require_publisher"], true);
    let blobs = hub.stored_blobs().await;
    let sha =
        |p: &std::path::Path| hex::encode(ring::digest::digest(&ring::digest::SHA256, &std::fs::read(p).unwrap()));
    for (what, p) in [("foreign", &foreign), ("forged", &forged_path), ("junk", &junk)] {
        assert!(!blobs.contains(&sha(p)), "the refused {what} bundle was not stored");
    }
    assert!(blobs.contains(&sha(&v1_sig)) && blobs.contains(&sha(&v2_sig)));

    // Removing the key: later pushes signed with it are refused; what it
    // signed keeps its manifest.
    let r = sentinel(&hub, &admin, &["publisher", "remove", "ml-team"]).await;
    ok(&r);
    let v3_sig = sign(&v1, &team, &dir.path().join("v3.sig"));
    refused(&push(&v1, "3.0.0", Some(&v3_sig)).await, "there is no publisher key to verify it with");
    let kept = hub.get("/api/v1/models/digits/versions/1.0.0", &publisher).await.json::<Value>().await.unwrap();
    assert_eq!(kept["manifest"]["publisher"]["name"], "ml-team");

    // The audit log names each.
    let audit = hub.admin_get("/api/v1/audit?limit=100").await;
    let details: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["detail"].as_str()).collect();
    assert!(details.iter().any(|d| d.starts_with("registered publisher ml-team key")), "{details:?}");
    assert!(details.contains(&"removed publisher ml-team"), "{details:?}");
    assert!(details.contains(&"model digits now requires a publisher signature"), "{details:?}");
    // Refused pushes say why in the log, as the caller was told.
    assert!(
        details
            .iter()
            .any(|d| d.starts_with("publisher_signature: the publisher signature was refused: the signature")),
        "{details:?}"
    );
    assert!(details.iter().any(|d| d.starts_with("publisher_signature_required: model digits")), "{details:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_requires_publishers_refuses_unsigned_pushes_before_inspecting_them() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(dir.path(), |c| c.require_publisher = true).await;
    hub.register("digits").await;
    let r = hub.upload("digits", "1.0.0", model_bytes(V1), "").await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "publisher_signature_required", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("this hub requires a publisher signature"), "{body}");
    // A bad bundle is answered with its own code.
    let r = hub.upload_signed("digits", "1.0.0", model_bytes(V1), b"{}".to_vec()).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "publisher_signature", "{body}");
    // A signature part over 64 KiB is refused as too large, before parsing.
    let r = hub.upload_signed("digits", "1.0.0", model_bytes(V1), vec![b' '; 64 * 1024 + 1]).await;
    assert_eq!(r.status(), 413);
    let versions = hub.get("/api/v1/models/digits", &hub.admin).await.json::<Value>().await.unwrap();
    assert_eq!(versions["version_count"], 0);
}

/// `model show` (API, CLI) says whether a push needs a publisher signature
/// and who requires it: a hub's `--require-publisher` applies to every model
/// whatever the model's own setting, which keeps its meaning.
#[tokio::test]
async fn model_show_says_who_requires_a_publisher_signature() {
    let dir = tempfile::tempdir().unwrap();
    let strict = TestHub::start_at(dir.path(), |c| c.require_publisher = true).await;
    let plain = TestHub::start().await;
    let requirement = |m: &Value| {
        (
            m["require_publisher"].clone(),
            m["require_publisher_effective"].clone(),
            m["require_publisher_source"].clone(),
        )
    };
    for hub in [&strict, &plain] {
        hub.register("digits").await;
    }
    let show = async |hub: &TestHub| {
        let r = sentinel(hub, &hub.admin, &["model", "show", "digits"]).await;
        ok(&r);
        let line = r.stdout.lines().find(|l| l.starts_with("publisher signature: ")).unwrap().to_owned();
        let json: Value = hub.admin_get("/api/v1/models/digits").await;
        let listed: Value = hub.admin_get("/api/v1/models").await;
        assert_eq!(requirement(&listed["models"][0]), requirement(&json), "list and show agree");
        (line, requirement(&json))
    };

    assert_eq!(
        show(&strict).await,
        (
            "publisher signature: required by the hub (--require-publisher), for every model".to_owned(),
            (json!(false), json!(true), json!("hub"))
        )
    );
    assert_eq!(
        show(&plain).await,
        ("publisher signature: not required".to_owned(), (json!(false), json!(false), Value::Null))
    );
    for hub in [&strict, &plain] {
        let r = sentinel(hub, &hub.admin, &["model", "update", "digits", "--require-publisher", "true"]).await;
        ok(&r);
    }
    assert_eq!(
        show(&strict).await,
        (
            "publisher signature: required by the hub (--require-publisher), and by this model".to_owned(),
            (json!(true), json!(true), json!("hub"))
        )
    );
    assert_eq!(
        show(&plain).await,
        ("publisher signature: required by this model".to_owned(), (json!(true), json!(true), json!("model")))
    );
}
