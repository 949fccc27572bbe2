//! The whole access-control matrix: every endpoint against no token, a wrong
//! token, and each role.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Need {
    Public,
    Viewer,
    Publisher,
    Deployer,
    Admin,
}

#[derive(Clone, Copy)]
enum Body {
    None,
    Json(fn() -> Value),
    Model,
}

fn allowed(role: &str, need: Need) -> bool {
    match need {
        Need::Public | Need::Viewer => true,
        Need::Publisher => matches!(role, "publisher" | "admin"),
        Need::Deployer => matches!(role, "deployer" | "admin"),
        Need::Admin => role == "admin",
    }
}

#[tokio::test]
async fn every_endpoint_against_every_role() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let r = hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0"})).await;
    assert_eq!(r.status(), 201);

    let matrix: &[(Method, &str, Need, Body)] = &[
        (Method::GET, "/api/v1/keys", Need::Public, Body::None),
        (Method::GET, "/api/v1/openapi.json", Need::Public, Body::None),
        (Method::GET, "/api/v1/models", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/manifest", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/artifact", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/deployments", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/deployments/1", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/models", Need::Publisher, Body::Json(|| json!({"name": "n"}))),
        (Method::PUT, "/api/v1/models/m", Need::Publisher, Body::Json(|| json!({"description": "d"}))),
        (Method::POST, "/api/v1/models/m/versions?version=2.0.0", Need::Publisher, Body::Model),
        (Method::PUT, "/api/v1/models/m/versions/1.0.0", Need::Publisher, Body::Json(|| json!({"tags": ["t"]}))),
        (Method::POST, "/api/v1/models/m/deploy", Need::Deployer, Body::Json(|| json!({"version": "1.0.0"}))),
        (Method::POST, "/api/v1/models/m/rollback", Need::Deployer, Body::Json(|| json!({"version": "1.0.0"}))),
        (Method::GET, "/api/v1/tokens", Need::Admin, Body::None),
        (Method::POST, "/api/v1/tokens", Need::Admin, Body::Json(|| json!({"role": "viewer"}))),
        (Method::DELETE, "/api/v1/tokens/9999", Need::Admin, Body::None),
        (Method::POST, "/api/v1/keys/rotate", Need::Admin, Body::None),
        (Method::GET, "/api/v1/audit", Need::Admin, Body::None),
        (Method::DELETE, "/api/v1/models/no-such-model", Need::Admin, Body::None),
        (Method::GET, "/api/v1/devices", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/devices/no-such-device", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/devices", Need::Admin, Body::Json(|| json!({"id": "d"}))),
        (Method::DELETE, "/api/v1/devices/no-such-device", Need::Admin, Body::None),
    ];

    let mut tokens = vec![("admin".to_owned(), hub.admin.clone())];
    for role in ["viewer", "publisher", "deployer"] {
        tokens.push((role.to_owned(), hub.token(role).await));
    }

    let mut checked = 0;
    for (method, path, need, body) in matrix {
        let send = |token: Option<String>| {
            let mut r = hub.req(method.clone(), path, token.as_deref());
            r = match body {
                Body::None => r,
                Body::Json(f) => r.json(&f()),
                Body::Model => r.header("content-type", "application/octet-stream").body(model_bytes(V1)),
            };
            r.send()
        };
        // No token and a wrong token.
        for token in [None, Some("snt_not-a-real-token".to_owned())] {
            let r = send(token.clone()).await.unwrap();
            if *need == Need::Public {
                assert!(r.status().is_success(), "{method} {path} is public, got {}", r.status());
            } else {
                let msg = expect_error(r, 401).await;
                assert!(!msg.is_empty(), "{method} {path} without a valid token");
            }
            checked += 1;
        }
        for (role, token) in &tokens {
            let r = send(Some(token.clone())).await.unwrap();
            let status = r.status().as_u16();
            if allowed(role, *need) {
                assert!(
                    status != 401 && status != 403,
                    "{role} may {method} {path}, got {status}: {}",
                    r.text().await.unwrap()
                );
            } else {
                let msg = expect_error(r, 403).await;
                assert!(msg.contains(role), "403 names the caller's role: {msg}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, matrix.len() * 6);

    // Denials are audited, attributed to the token that tried.
    let audit: Value = hub.get("/api/v1/audit?limit=500", &hub.admin).await.json().await.unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["actor"] == "test-viewer" && e["outcome"] == "denied" && e["status"] == 403));
    assert!(entries.iter().any(|e| e["actor"] == "anonymous" && e["status"] == 401));
}
