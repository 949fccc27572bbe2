//! With a certificate, hub and agent talk TLS on both gRPC and HTTPS, and an
//! agent that does not trust the certificate gets nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_hub::config::TlsFiles;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_download_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let (cert_path, key_path) = (tmp.path().join("hub.crt"), tmp.path().join("hub.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| {
        c.tls = Some(TlsFiles { cert: cert_path.clone(), key: key_path.clone() });
    })
    .await;
    // The harness speaks plain HTTP; use TLS clients for this hub.
    let https = format!("https://localhost:{}", hub.rest_addr.port());
    let grpcs = format!("https://localhost:{}", hub.grpc_addr.port());
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let admin = hub.admin.clone();
    let post = |path: &str, body: serde_json::Value| {
        client.post(format!("{https}{path}")).bearer_auth(&admin).json(&body).send()
    };
    assert!(post("/api/v1/models", serde_json::json!({"name": "digits"})).await.unwrap().status().is_success());
    let r = client
        .post(format!("{https}/api/v1/models/digits/versions?version=1.0.0"))
        .bearer_auth(&admin)
        .body(model_bytes(V1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let keys: serde_json::Value =
        client.get(format!("{https}/api/v1/keys")).send().await.unwrap().json().await.unwrap();
    let key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();
    let dev: serde_json::Value =
        post("/api/v1/devices", serde_json::json!({"id": "edge-1"})).await.unwrap().json().await.unwrap();
    let token = dev["token"].as_str().unwrap().to_owned();
    assert_eq!(
        post("/api/v1/models/digits/deploy", serde_json::json!({"version": "1.0.0", "target": "*"}))
            .await
            .unwrap()
            .status(),
        201
    );

    // Plain HTTP to the TLS port is not served.
    assert!(hub.client.get(format!("{}/healthz", hub.url)).send().await.is_err());

    let dir = tmp.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hub-ca.pem"), cert.cert.pem()).unwrap();
    let mut config = agent_config(&dir, &hub, "edge-1", &token, &key, "ca_file = \"hub-ca.pem\"");
    config.set_hub(&https, &grpcs);
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    assert!(v.connected);
    agent.shutdown().await;

    // An agent that trusts only the system roots cannot connect.
    let other = tmp.path().join("b");
    let mut config = agent_config(&other, &hub, "edge-1", &token, &key, "");
    config.set_hub(&https, &grpcs);
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| !v.last_error.is_empty()).await.unwrap();
    assert!(!v.connected && v.models.is_empty(), "{v:?}");
    agent.shutdown().await;
}
