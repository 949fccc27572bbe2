//! Every endpoint of the registry, exercised on a real hub.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn model_lifecycle_through_every_endpoint() {
    let hub = TestHub::start().await;
    let admin = hub.admin.clone();

    // Health and spec need no token.
    assert_eq!(hub.req(Method::GET, "/healthz", None).send().await.unwrap().status(), 200);
    assert_eq!(hub.req(Method::GET, "/readyz", None).send().await.unwrap().status(), 200);
    let spec: Value = hub.get("/api/v1/openapi.json", &admin).await.json().await.unwrap();
    assert!(spec["paths"]["/api/v1/models/{name}/versions"]["post"].is_object(), "upload is documented");

    // Register, then read back.
    let r = hub
        .post_json("/api/v1/models", &admin, json!({"name": "digits", "description": "MLP", "tags": ["demo"]}))
        .await;
    assert_eq!(r.status(), 201);
    let m: Value = hub.get("/api/v1/models/digits", &admin).await.json().await.unwrap();
    assert_eq!(m["description"], "MLP");
    assert_eq!(m["versions"], json!([]));

    // Upload: the hub computes hash and size and reads the signature itself.
    let v = hub.push_v1("digits", "1.0.0").await;
    assert_eq!(v["sha256"], "a2548c61976d7687ddc92c70b77ef09758699d7fbe11f13f83ef0383075ec0c4");
    assert_eq!(v["size"], 19831);
    assert_eq!(v["stage"], "staging");
    assert_eq!(v["manifest"]["inputs"], json!([{"name": "input", "dtype": "float32", "shape": ["N", 64]}]));
    assert_eq!(v["manifest"]["outputs"][1], json!({"name": "label", "dtype": "int64", "shape": ["N"]}));
    assert_eq!(v["manifest"]["accuracy"], json!({"metric": "top1", "value": 0.9694, "dataset": ""}));
    assert_eq!(v["hardware"], json!(["x86_64", "aarch64"]));
    let r = hub.upload("digits", "2.0.0", model_bytes(V2), "&stage=development").await;
    assert_eq!(r.status(), 201);

    // Versions list newest semver first; show one.
    let vs: Value = hub.get("/api/v1/models/digits/versions", &admin).await.json().await.unwrap();
    let order: Vec<&str> = vs["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(order, ["2.0.0", "1.0.0"]);
    let one: Value = hub.get("/api/v1/models/digits/versions/1.0.0", &admin).await.json().await.unwrap();
    assert_eq!(one["version"], "1.0.0");

    // Edit metadata: model, then version (which re-signs).
    let r = hub
        .req(Method::PUT, "/api/v1/models/digits", Some(&admin))
        .json(&json!({"description": "handwritten digits"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["description"], "handwritten digits");
    let before: Value = hub.get("/api/v1/models/digits/versions/1.0.0/manifest", &admin).await.json().await.unwrap();
    let r = hub
        .req(Method::PUT, "/api/v1/models/digits/versions/1.0.0", Some(&admin))
        .json(&json!({"stage": "production", "hardware": ["x86_64", "aarch64", "jetson-orin"], "tags": ["good"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after: Value = hub.get("/api/v1/models/digits/versions/1.0.0/manifest", &admin).await.json().await.unwrap();
    assert_ne!(before["signature"], after["signature"], "a change re-signs");
    assert_eq!(after["decoded"]["stage"], "production");
    assert_eq!(after["decoded"]["tags"], json!(["good"]));

    // List with filters and pagination.
    hub.register("other").await;
    let list = |q: &'static str| {
        let hub = &hub;
        let admin = admin.clone();
        async move {
            let v: Value = hub.get(&format!("/api/v1/models{q}"), &admin).await.json().await.unwrap();
            let names: Vec<String> =
                v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect();
            (names, v["total"].as_u64().unwrap())
        }
    };
    assert_eq!(list("").await, (vec!["digits".into(), "other".into()], 2));
    assert_eq!(list("?stage=production").await, (vec!["digits".into()], 1));
    assert_eq!(list("?hardware=jetson-orin").await, (vec!["digits".into()], 1));
    assert_eq!(list("?hardware=cuda").await.0, ["digits"], "2.0.0 declares no hardware: it runs anywhere");
    assert_eq!(list("?name=oth").await, (vec!["other".into()], 1));
    assert_eq!(list("?limit=1&offset=1").await, (vec!["other".into()], 2));

    // Deploy, list, show, roll back.
    let d: Value = hub
        .post_json("/api/v1/models/digits/deploy", &admin, json!({"version": "1.0.0", "target": "production"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["target"], "ring=production", "a bare word names the ring");
    assert_eq!(d["state"], "active");
    let d2: Value = hub
        .post_json("/api/v1/models/digits/deploy", &admin, json!({"version": "2.0.0", "target": "ring=production"}))
        .await
        .json()
        .await
        .unwrap();
    let first: Value = hub.get(&format!("/api/v1/deployments/{}", d["id"]), &admin).await.json().await.unwrap();
    assert_eq!(first["state"], "superseded");
    let rb = hub.post_json("/api/v1/models/digits/rollback", &admin, json!({})).await;
    assert_eq!(rb.status(), 201);
    let rb: Value = rb.json().await.unwrap();
    assert_eq!((rb["version"].as_str(), rb["kind"].as_str()), (Some("1.0.0"), Some("rollback")));
    assert_eq!(rb["replaces"], d2["id"]);
    let all: Value = hub.get("/api/v1/deployments?model=digits", &admin).await.json().await.unwrap();
    let states: Vec<&str> =
        all["deployments"].as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["active", "rolled_back", "superseded"]);
    let active: Value = hub.get("/api/v1/deployments?state=active", &admin).await.json().await.unwrap();
    assert_eq!(active["total"], 1);

    // Delete is refused while deployed, allowed with force, and frees the blobs.
    let msg =
        expect_error(hub.req(Method::DELETE, "/api/v1/models/digits", Some(&admin)).send().await.unwrap(), 409).await;
    assert!(msg.contains("deployed"), "{msg}");
    let r = hub.req(Method::DELETE, "/api/v1/models/digits?force=true", Some(&admin)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    expect_error(hub.get("/api/v1/models/digits", &admin).await, 404).await;
    assert_eq!(hub.stored_blobs().await, Vec::<String>::new(), "both model files were freed");
    let cancelled: Value = hub.get("/api/v1/deployments?state=cancelled", &admin).await.json().await.unwrap();
    assert_eq!(cancelled["total"], 1);
    // A model that was never deployed deletes without force.
    let r = hub.req(Method::DELETE, "/api/v1/models/other", Some(&admin)).send().await.unwrap();
    assert_eq!(r.status(), 204);

    // Tokens: create, list (no secrets), revoke, and the revoked token stops working.
    let viewer = hub.token("viewer").await;
    let tokens: Value = hub.get("/api/v1/tokens", &admin).await.json().await.unwrap();
    let text = tokens.to_string();
    assert!(!text.contains(&viewer) && !text.contains(&admin), "secrets are never listed");
    let id = tokens["tokens"].as_array().unwrap().iter().find(|t| t["role"] == "viewer").unwrap()["id"].clone();
    assert_eq!(hub.get("/api/v1/models", &viewer).await.status(), 200);
    let r = hub.req(Method::DELETE, &format!("/api/v1/tokens/{id}"), Some(&admin)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    expect_error(hub.get("/api/v1/models", &viewer).await, 401).await;

    // Keys: public without a token; rotation adds a key and keeps the old one.
    let keys: Value = hub.req(Method::GET, "/api/v1/keys", None).send().await.unwrap().json().await.unwrap();
    let old = keys["active_key_id"].as_str().unwrap().to_owned();
    let rotated: Value = hub.post_json("/api/v1/keys/rotate", &admin, json!({})).await.json().await.unwrap();
    assert_ne!(rotated["active_key_id"], old.as_str());
    assert_eq!(rotated["keys"].as_array().unwrap().len(), 2);

    // The audit log saw every mutating call, with who and outcome.
    let audit: Value = hub.get("/api/v1/audit?limit=500", &admin).await.json().await.unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let find = |action: &str, status: u64| {
        entries.iter().any(|e| e["action"] == action && e["status"] == status && e["actor"] == "admin")
    };
    assert!(find("POST /api/v1/models/digits/versions", 201));
    assert!(find("DELETE /api/v1/models/digits", 409));
    assert!(find("POST /api/v1/keys/rotate", 200));
    assert!(entries.iter().all(|e| e["action"].as_str().unwrap().starts_with(['P', 'D'])), "reads are not audited");
    let upload = entries.iter().find(|e| e["action"] == "POST /api/v1/models/digits/versions").unwrap();
    assert!(upload["detail"].as_str().unwrap().contains("sha256="), "{upload}");
}

#[tokio::test]
async fn a_validation_set_is_stored_signed_and_downloadable() {
    let hub = TestHub::start().await;
    hub.register("digits").await;
    let x = model_bytes("data/digits_test_x.bin");
    let y = model_bytes("data/digits_test_y.bin");
    let form = reqwest::multipart::Form::new()
        .part("model", reqwest::multipart::Part::bytes(model_bytes(V1)).file_name("m.onnx"))
        .part("validation_inputs", reqwest::multipart::Part::bytes(x.clone()))
        .part("validation_labels", reqwest::multipart::Part::bytes(y.clone()));
    let r = hub
        .req(Method::POST, "/api/v1/models/digits/versions?version=1.0.0&accuracy=0.96", Some(&hub.admin))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["validation"]["count"], 360);
    let got_x =
        hub.get("/api/v1/models/digits/versions/1.0.0/validation/inputs", &hub.admin).await.bytes().await.unwrap();
    let got_y =
        hub.get("/api/v1/models/digits/versions/1.0.0/validation/labels", &hub.admin).await.bytes().await.unwrap();
    assert_eq!((got_x.as_ref(), got_y.as_ref()), (x.as_slice(), y.as_slice()));

    // Inputs that do not match the label count are refused, and nothing is kept.
    let form = reqwest::multipart::Form::new()
        .part("model", reqwest::multipart::Part::bytes(model_bytes(V1)))
        .part("validation_inputs", reqwest::multipart::Part::bytes(x[..x.len() - 4].to_vec()))
        .part("validation_labels", reqwest::multipart::Part::bytes(y));
    let r = hub
        .req(Method::POST, "/api/v1/models/digits/versions?version=1.0.1", Some(&hub.admin))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let msg = expect_error(r, 422).await;
    assert!(msg.contains("360 labels"), "{msg}");
    expect_error(hub.get("/api/v1/models/digits/versions/1.0.1", &hub.admin).await, 404).await;
}

#[tokio::test]
async fn the_real_vision_model_keeps_its_symbolic_dims() {
    let hub = TestHub::start().await;
    hub.register("textcls").await;
    let r = hub.upload("textcls", "2.0.0", model_bytes(VISION), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let shape = &v["manifest"]["inputs"][0]["shape"];
    assert_eq!(shape.as_array().unwrap().len(), 4);
    assert_eq!(shape[1], 3);
    assert!(shape[0].is_string() && shape[2].is_string(), "symbolic dims stay symbolic: {shape}");
}
