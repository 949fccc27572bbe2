//! The web interface from the outside: the embedded page and its headers,
//! `whoami`, the ticketed event stream, and a viewer refused by the API.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::*;
use reqwest::{Method, Response, StatusCode, header};
use serde_json::{Value, json};

/// Reads a server-sent event stream until an event named `name` arrives;
/// returns its `data` line, parsed.
async fn next_event(stream: &mut Response, seen: &mut String, name: &str) -> Value {
    let wanted = format!("event: {name}\n");
    let read = async {
        loop {
            if let Some(at) = seen.find(&wanted) {
                let rest = &seen[at + wanted.len()..];
                if let Some(end) = rest.find("\n\n") {
                    let data: String =
                        rest[..end].lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
                    let consumed = at + wanted.len() + end + 2;
                    seen.drain(..consumed);
                    return serde_json::from_str(&data).unwrap();
                }
            }
            let chunk = stream.chunk().await.unwrap().unwrap_or_else(|| panic!("stream ended before {name}: {seen}"));
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("no {name} event in 30 s: {seen}"))
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_with_a_strict_csp() {
    let hub = TestHub::start().await;
    let r = hub.client.get(format!("{}/", hub.url)).send().await.unwrap();
    assert_eq!(r.url().path(), "/ui/", "/ leads to the page");
    assert_eq!(r.status(), 200);
    let html_type = r.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(html_type.starts_with("text/html"), "{html_type}");
    let html = r.text().await.unwrap();
    // No inline script: every script element names a file of this hub.
    assert!(html.matches("<script").count() >= 1);
    for tag in html.split("<script").skip(1) {
        let open = &tag[..tag.find('>').unwrap()];
        assert!(open.contains("src=\"/ui/"), "inline or foreign script: <script{open}>");
    }
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing is loaded from elsewhere");

    for (file, kind) in
        [("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml"), ("", "text/html")]
    {
        let r = hub.client.get(format!("{}/ui/{file}", hub.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "/ui/{file}");
        let h = r.headers().clone();
        assert!(
            h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind),
            "/ui/{file}: {:?}",
            h[header::CONTENT_TYPE]
        );
        let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache", "revalidated on every load");
        let etag = h[header::ETAG].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
        let again =
            hub.client.get(format!("{}/ui/{file}", hub.url)).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "/ui/{file} with its ETag");
        assert!(again.bytes().await.unwrap().is_empty());
    }
    let js = hub.client.get(format!("{}/ui/app.js", hub.url)).send().await.unwrap().text().await.unwrap();
    assert!(js.contains("sessionStorage") && !js.contains("localStorage"), "the token lives in the tab only");
    let missing = hub.client.get(format!("{}/ui/secrets.txt", hub.url)).send().await.unwrap();
    expect_error(missing, 404).await;
}

#[tokio::test]
async fn whoami_names_the_token_and_a_viewer_cannot_deploy() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let viewer = hub.token("viewer").await;

    let me: Value = hub.get("/api/v1/whoami", &viewer).await.json().await.unwrap();
    assert_eq!(me, json!({"name": "test-viewer", "role": "viewer"}));
    let admin: Value = hub.get("/api/v1/whoami", &hub.admin).await.json().await.unwrap();
    assert_eq!(admin["role"], "admin");
    expect_error(hub.req(Method::GET, "/api/v1/whoami", None).send().await.unwrap(), 401).await;

    // What the page would send if someone un-hid the deploy button.
    let r = hub.post_json("/api/v1/models/m/deploy", &viewer, json!({"version": "1.0.0", "target": "*"})).await;
    let msg = expect_error(r, 403).await;
    assert!(msg.contains("viewer"), "{msg}");
    let list: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 0, "nothing was deployed");
}

#[tokio::test]
async fn the_event_stream_needs_a_one_time_ticket_and_announces_deployments() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let viewer = hub.token("viewer").await;
    let stream_url = |ticket: &str| format!("{}/api/v1/events/stream?ticket={ticket}", hub.url);

    // No ticket, a made-up one, and no token to ask for one.
    expect_error(hub.client.get(format!("{}/api/v1/events/stream", hub.url)).send().await.unwrap(), 401).await;
    expect_error(hub.client.get(stream_url("snt_made-up")).send().await.unwrap(), 401).await;
    expect_error(hub.req(Method::POST, "/api/v1/events/ticket", None).send().await.unwrap(), 401).await;
    // The stream does not take the API token in the URL.
    expect_error(hub.client.get(stream_url(&viewer)).send().await.unwrap(), 401).await;

    let issued: Value =
        hub.req(Method::POST, "/api/v1/events/ticket", Some(&viewer)).send().await.unwrap().json().await.unwrap();
    let ticket = issued["ticket"].as_str().unwrap().to_owned();
    let mut stream = hub.client.get(stream_url(&ticket)).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let mut seen = String::new();
    let hello = next_event(&mut stream, &mut seen, "hello").await;
    assert_eq!((hello["name"].as_str(), hello["role"].as_str()), (Some("test-viewer"), Some("viewer")));
    expect_error(hub.client.get(stream_url(&ticket)).send().await.unwrap(), 401).await;

    let r = hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "*"})).await;
    assert_eq!(r.status(), 201);
    let change = next_event(&mut stream, &mut seen, "change").await;
    assert_eq!(change["kind"], "deployments", "{change}");
    assert!(change["seq"].as_u64().unwrap() > hello["seq"].as_u64().unwrap());

    // An open stream does not hold the hub up at shutdown: it ends.
    let mut hub = hub;
    tokio::time::timeout(Duration::from_secs(30), hub.stop()).await.expect("the hub stopped with a stream open");
    let rest =
        tokio::time::timeout(Duration::from_secs(30), async { while let Ok(Some(_)) = stream.chunk().await {} }).await;
    assert!(rest.is_ok(), "the stream ended when the hub stopped");
}

#[tokio::test]
async fn a_revoked_token_opens_no_stream_and_its_open_stream_ends_before_the_next_change() {
    let hub = TestHub::start().await;
    hub.register("m").await;
    hub.push_v1("m", "1.0.0").await;
    let r = hub.post_json("/api/v1/tokens", &hub.admin, json!({"role": "viewer", "name": "soon-gone"})).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let (token, id) = (created["token"].as_str().unwrap().to_owned(), created["id"].as_i64().unwrap());
    let ticket = || async {
        let v: Value =
            hub.req(Method::POST, "/api/v1/events/ticket", Some(&token)).send().await.unwrap().json().await.unwrap();
        v["ticket"].as_str().unwrap().to_owned()
    };
    let stream_url = |ticket: &str| format!("{}/api/v1/events/stream?ticket={ticket}", hub.url);
    let (open, spare) = (ticket().await, ticket().await);
    let mut stream = hub.client.get(stream_url(&open)).send().await.unwrap();
    let mut seen = String::new();
    next_event(&mut stream, &mut seen, "hello").await;

    let r = hub.req(Method::DELETE, &format!("/api/v1/tokens/{id}"), Some(&hub.admin)).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let msg = expect_error(hub.client.get(stream_url(&spare)).send().await.unwrap(), 401).await;
    assert!(msg.contains("revoked"), "{msg}");

    // The next change does not reach the revoked token's stream: it ends.
    let r = hub.post_json("/api/v1/models/m/deploy", &hub.admin, json!({"version": "1.0.0", "target": "*"})).await;
    assert_eq!(r.status(), 201);
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains("event: expired") {
            let chunk = stream.chunk().await.unwrap().unwrap_or_else(|| panic!("ended without `expired`: {seen}"));
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        seen
    })
    .await
    .expect("an `expired` event after the revocation");
    assert!(rest.contains("revoked"), "{rest}");
    assert!(!rest.contains("event: change"), "no change reaches a revoked token: {rest}");
}

#[tokio::test]
async fn one_token_cannot_use_up_the_tickets_of_everyone() {
    let hub = TestHub::start().await;
    let (greedy, other) = (hub.token("viewer").await, hub.token("deployer").await);
    let ask = |token: String| {
        let req = hub.req(Method::POST, "/api/v1/events/ticket", Some(&token));
        async move { req.send().await.unwrap() }
    };
    for _ in 0..sentinel_hub::api::session::MAX_TICKETS_PER_TOKEN {
        assert_eq!(ask(greedy.clone()).await.status(), 200);
    }
    let msg = expect_error(ask(greedy.clone()).await, 429).await;
    assert!(msg.contains("unused event-stream tickets"), "{msg}");
    assert_eq!(ask(other).await.status(), 200, "another token still gets its ticket");
}
