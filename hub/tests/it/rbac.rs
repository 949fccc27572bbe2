//! The whole access-control matrix: every endpoint against no token, a wrong
//! token, a revoked token, each role, and a device's token. The OpenAPI
//! document is checked against the same list, so every endpoint it tests is
//! documented with the security it enforces, and every documented endpoint
//! is tested.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use reqwest::{Method, Response};
use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Need {
    Public,
    Viewer,
    Publisher,
    Deployer,
    Admin,
    /// A viewer, or a device whose desired state names the version.
    Fetch,
    /// A ticket from `POST /api/v1/events/ticket`: no bearer token, whatever
    /// its role, opens the event stream by itself.
    Ticket,
}

#[derive(Clone, Copy)]
enum Body {
    None,
    Json(fn() -> Value),
    Model,
}

/// Callers without a valid token: none, a made-up one, a revoked one.
const NO_VALID_TOKEN: [&str; 3] = ["no token", "wrong token", "revoked token"];

/// The status `who` is refused with, or `None` if the call gets past the
/// access check (any status but 401 and 403).
fn refusal(who: &str, need: Need) -> Option<u16> {
    let served = match need {
        Need::Public => true,
        Need::Ticket => false,
        _ if NO_VALID_TOKEN.contains(&who) => false,
        Need::Viewer => who != "device",
        Need::Fetch => true,
        Need::Publisher => matches!(who, "publisher" | "admin"),
        Need::Deployer => matches!(who, "deployer" | "admin"),
        Need::Admin => who == "admin",
    };
    let unauthenticated = need == Need::Ticket || NO_VALID_TOKEN.contains(&who);
    (!served).then_some(if unauthenticated { 401 } else { 403 })
}

/// Every endpoint, with a path that exists once `hub_with_a_deployment` ran.
fn matrix() -> Vec<(Method, &'static str, Need, Body)> {
    vec![
        (Method::GET, "/healthz", Need::Public, Body::None),
        (Method::GET, "/readyz", Need::Public, Body::None),
        (Method::GET, "/api/v1/keys", Need::Public, Body::None),
        (Method::GET, "/api/v1/openapi.json", Need::Public, Body::None),
        (Method::GET, "/api/v1/whoami", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/events/ticket", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/events/stream", Need::Ticket, Body::None),
        (Method::GET, "/api/v1/models", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/manifest", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/artifact", Need::Fetch, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/validation/inputs", Need::Fetch, Body::None),
        (Method::GET, "/api/v1/models/m/versions/1.0.0/signature", Need::Fetch, Body::None),
        (Method::GET, "/api/v1/publishers", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/publishers", Need::Admin, Body::Json(|| json!({"name": "p", "public_key": "x"}))),
        (Method::DELETE, "/api/v1/publishers/no-such-publisher", Need::Admin, Body::None),
        (Method::GET, "/api/v1/deployments", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/deployments/1", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/deployments/1/telemetry", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/models", Need::Publisher, Body::Json(|| json!({"name": "n"}))),
        (Method::PUT, "/api/v1/models/m", Need::Publisher, Body::Json(|| json!({"description": "d"}))),
        (Method::POST, "/api/v1/models/m/versions?version=2.0.0", Need::Publisher, Body::Model),
        (Method::PUT, "/api/v1/models/m/versions/1.0.0", Need::Publisher, Body::Json(|| json!({"tags": ["t"]}))),
        (
            Method::POST,
            "/api/v1/models/m/deploy",
            Need::Deployer,
            Body::Json(|| json!({"version": "1.0.0", "target": "*"})),
        ),
        (Method::POST, "/api/v1/models/m/rollback", Need::Deployer, Body::Json(|| json!({"version": "1.0.0"}))),
        (Method::GET, "/api/v1/tokens", Need::Admin, Body::None),
        (Method::POST, "/api/v1/tokens", Need::Admin, Body::Json(|| json!({"role": "viewer"}))),
        (Method::DELETE, "/api/v1/tokens/9999", Need::Admin, Body::None),
        (Method::POST, "/api/v1/keys/rotate", Need::Admin, Body::None),
        (Method::GET, "/api/v1/audit", Need::Admin, Body::None),
        (Method::DELETE, "/api/v1/models/no-such-model", Need::Admin, Body::None),
        (Method::GET, "/api/v1/devices", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/devices/no-such-device", Need::Viewer, Body::None),
        (Method::GET, "/api/v1/devices/no-such-device/telemetry", Need::Viewer, Body::None),
        (Method::POST, "/api/v1/devices", Need::Admin, Body::Json(|| json!({"id": "d"}))),
        (Method::DELETE, "/api/v1/devices/no-such-device", Need::Admin, Body::None),
    ]
}

/// A hub with model `m` 1.0.0 deployed to every device.
async fn hub_with_a_deployment() -> TestHub {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let r = hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "*"})).await;
    assert_eq!(r.status(), 201);
    hub
}

/// Everyone who may knock, by name, with the bearer token they send: no
/// token, a made-up one, a revoked admin token, a token of each role, and
/// the token of an enrolled device (which the deployment targets).
async fn principals(hub: &TestHub) -> Vec<(&'static str, Option<String>)> {
    let r = hub.post_json("/api/v1/tokens", &hub.admin, json!({"role": "admin", "name": "revoked"})).await;
    assert_eq!(r.status(), 201);
    let revoked: Value = r.json().await.unwrap();
    let r = hub.req(Method::DELETE, &format!("/api/v1/tokens/{}", revoked["id"]), Some(&hub.admin)).send().await;
    assert_eq!(r.unwrap().status(), 204);
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "rbac-device"})).await;
    assert_eq!(r.status(), 201);
    let device: Value = r.json().await.unwrap();

    let mut principals = vec![
        ("no token", None),
        ("wrong token", Some("snt_not-a-real-token".to_owned())),
        ("revoked token", Some(revoked["token"].as_str().unwrap().to_owned())),
        ("admin", Some(hub.admin.clone())),
    ];
    for role in ["viewer", "publisher", "deployer"] {
        principals.push((role, Some(hub.token(role).await)));
    }
    principals.push(("device", Some(device["token"].as_str().unwrap().to_owned())));
    principals
}

#[tokio::test]
async fn every_endpoint_against_every_role() {
    let hub = hub_with_a_deployment().await;
    let principals = principals(&hub).await;
    let matrix = matrix();

    let mut checked = 0;
    for (method, path, need, body) in &matrix {
        for (who, token) in &principals {
            let mut r = hub.req(method.clone(), path, token.as_deref());
            r = match body {
                Body::None => r,
                Body::Json(f) => r.json(&f()),
                Body::Model => r.header("content-type", "application/octet-stream").body(model_bytes(V1)),
            };
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            match refusal(who, *need) {
                None => assert!(
                    status != 401 && status != 403,
                    "{who} may {method} {path}, got {status}: {}",
                    r.text().await.unwrap()
                ),
                Some(401) => {
                    let msg = expect_error(r, 401).await;
                    assert!(!msg.is_empty(), "{method} {path} with {who}");
                }
                Some(refused) => {
                    let msg = expect_error(r, refused).await;
                    assert!(msg.contains(who), "{refused} names the caller's role: {msg}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, matrix.len() * 8);

    // Denials are audited, attributed to the token that tried.
    let audit: Value = hub.get("/api/v1/audit?limit=500", &hub.admin).await.json().await.unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["actor"] == "test-viewer" && e["outcome"] == "denied" && e["status"] == 403));
    assert!(entries.iter().any(|e| e["actor"] == "anonymous" && e["status"] == 401));
}

/// Reads the first server-sent event of `stream`: its name and JSON data.
async fn first_event(stream: &mut Response) -> (String, Value) {
    let mut seen = String::new();
    let read = async {
        while !seen.contains("\n\n") {
            let chunk = stream.chunk().await.unwrap().unwrap_or_else(|| panic!("the stream ended: {seen}"));
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.unwrap_or_else(|_| panic!("no event in 30 s: {seen}"));
    let event = &seen[..seen.find("\n\n").unwrap()];
    let field = |name: &str| event.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_owned();
    (field("event: "), serde_json::from_str(&field("data: ")).unwrap())
}

/// The event stream from the side the matrix cannot show: who gets a ticket,
/// and that a ticket opens one stream, as the token it was issued to.
#[tokio::test]
async fn a_ticket_opens_one_stream_as_the_token_that_asked_for_it() {
    let hub = hub_with_a_deployment().await;
    let mut opened = Vec::new();
    for (who, token) in principals(&hub).await {
        let r = hub.req(Method::POST, "/api/v1/events/ticket", token.as_deref()).send().await.unwrap();
        if let Some(refused) = refusal(who, Need::Viewer) {
            expect_error(r, refused).await;
            continue;
        }
        assert_eq!(r.status(), 200, "{who} asks for a ticket");
        let ticket = r.json::<Value>().await.unwrap()["ticket"].as_str().unwrap().to_owned();
        let me: Value = hub.get("/api/v1/whoami", token.as_deref().unwrap()).await.json().await.unwrap();

        // Opened without an Authorization header, as a browser's EventSource does.
        let url = format!("/api/v1/events/stream?ticket={ticket}");
        let mut stream = hub.req(Method::GET, &url, None).send().await.unwrap();
        assert_eq!(stream.status(), 200, "{who}'s ticket opens the stream");
        let (event, hello) = first_event(&mut stream).await;
        assert_eq!(event, "hello");
        assert_eq!((&hello["name"], &hello["role"]), (&me["name"], &me["role"]), "the stream is {who}'s");
        let again = hub.req(Method::GET, &url, token.as_deref()).send().await.unwrap();
        expect_error(again, 401).await;
        opened.push(who);
    }
    assert_eq!(opened, ["admin", "viewer", "publisher", "deployer"]);
}

/// True if `path` is an instance of the OpenAPI path `template`.
fn instance_of(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

#[tokio::test]
async fn the_openapi_document_lists_every_endpoint_with_its_security() {
    let hub = TestHub::start().await;
    let r = hub.req(Method::GET, "/api/v1/openapi.json", None).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let spec: Value = r.json().await.unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let mut untested: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();

    for (method, path, need, _) in matrix() {
        let path = path.split('?').next().unwrap();
        let templates: Vec<&String> = paths.keys().filter(|t| instance_of(t, path)).collect();
        let [template] = templates[..] else { panic!("{method} {path} is one documented path: {templates:?}") };
        let op = &paths[template][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {template} is documented");
        untested.remove(&(method.to_string(), template.clone()));
        let security = &op["security"];
        match need {
            Need::Public => assert!(security.is_null(), "{method} {template} is public: {security}"),
            Need::Ticket => {
                assert!(security.is_null(), "{method} {template} takes no bearer token: {security}");
                let params = op["parameters"].as_array().unwrap();
                let ticket = params.iter().find(|p| p["name"] == "ticket").unwrap();
                assert_eq!((&ticket["in"], &ticket["required"]), (&json!("query"), &json!(true)), "{ticket}");
            }
            _ => assert_eq!(security, &json!([{"bearer": []}]), "{method} {template} needs a token"),
        }
    }
    assert!(untested.is_empty(), "documented but missing from the access matrix: {untested:?}");

    // The web interface's endpoints, in detail: bodies and refusals.
    let schema = |path: &str, method: &str, status: &str, content: &str| {
        paths[path][method]["responses"][status]["content"][content]["schema"].clone()
    };
    let body = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let app_json = "application/json";
    assert_eq!(schema("/api/v1/whoami", "get", "200", app_json), body("WhoAmI"));
    assert_eq!(schema("/api/v1/events/ticket", "post", "200", app_json), body("TicketOut"));
    for (path, method, status) in [
        ("/api/v1/whoami", "get", "401"),
        ("/api/v1/whoami", "get", "403"),
        ("/api/v1/events/ticket", "post", "401"),
        ("/api/v1/events/ticket", "post", "403"),
        ("/api/v1/events/ticket", "post", "429"),
        ("/api/v1/events/stream", "get", "400"),
        ("/api/v1/events/stream", "get", "401"),
    ] {
        assert_eq!(schema(path, method, status, app_json), body("ErrorBody"), "{method} {path} {status}");
    }
    // Each event as it arrives (OpenAPI 3.1: `schema` describes one event).
    assert_eq!(schema("/api/v1/events/stream", "get", "200", "text/event-stream"), body("SseEvent"));
    let described = paths["/api/v1/events/stream"]["get"]["responses"]["200"]["description"].as_str().unwrap();
    for (event, data) in [("hello", "Hello"), ("change", "Change"), ("heartbeat", "Heartbeat"), ("expired", "Expired")]
    {
        assert!(described.contains(&format!("`{event}`")), "the stream's {event} event is described: {described}");
        assert!(spec["components"]["schemas"][data].is_object(), "the {event} event's data {data} is documented");
    }
}
