//! The hub's Prometheus metrics, scraped from its own listener after real
//! API calls, uploads, a device stream, a report and a halt.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;

use common::*;
use reqwest::Method;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{AgentReport, Hello, ModelStatus};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// One sample line of the text exposition format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

/// Parses `{k="v",...}`, returning the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no `{`")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let key = &rest[..eq];
        if !is_name(key, false) {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(format!("label {key} repeated"));
        }
        rest = &rest[eq + 1 + 1 + end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the whole exposition strictly: every line is a `# HELP`/`# TYPE`
/// comment or `name{labels} value`; every sample belongs to a declared family.
fn parse(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            let (kind, name, rest) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(is_name(name, true), "bad metric name in {line:?}");
            match kind {
                "HELP" => assert!(!rest.is_empty(), "empty help in {line:?}"),
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest), "{line:?}");
                    assert!(types.insert(name.to_owned(), rest.to_owned()).is_none(), "TYPE twice: {line:?}");
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in the exposition");
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(is_name(name, true), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).unwrap_or_else(|e| panic!("{e} in {line:?}"))
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line:?}");
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    samples
}

/// The value of the one sample `name` with exactly `labels`, if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let found: Vec<&Sample> = samples.iter().filter(|s| s.name == name && s.labels == want).collect();
    assert!(found.len() <= 1, "{name}{want:?} appears {} times", found.len());
    found.first().map(|s| s.value)
}

fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

async fn scrape(hub: &TestHub) -> Vec<Sample> {
    let r = hub.client.get(format!("{}/metrics", hub.metrics_url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse(&r.text().await.unwrap())
}

fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn deploy(hub: &TestHub, version: &str) -> i64 {
    let r = hub
        .post_json("/api/v1/models/digits/deploy", &hub.admin, json!({"version": version, "target": "site=a"}))
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_pushes_devices_and_halts() {
    let hub = TestHub::start().await;
    let fresh = scrape(&hub).await;
    assert_eq!(must(&fresh, "sentinel_hub_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(must(&fresh, "sentinel_hub_connected_devices", &[]), 0.0);
    assert_eq!(must(&fresh, "sentinel_hub_model_pushes_total", &[("result", "ok")]), 0.0);
    assert_eq!(must(&fresh, "sentinel_hub_deployments", &[("state", "active")]), 0.0);

    // REST calls: two reads of one model, a 404 on a real route, a 404 no
    // route matches, and a 401.
    hub.register("digits").await;
    for _ in 0..2 {
        assert_eq!(hub.get("/api/v1/models/digits", &hub.admin).await.status(), 200);
    }
    expect_error(hub.get("/api/v1/models/nope", &hub.admin).await, 404).await;
    expect_error(hub.get("/api/v1/no-such-endpoint/x", &hub.admin).await, 404).await;
    expect_error(hub.req(Method::GET, "/api/v1/models", None).send().await.unwrap(), 401).await;
    // `/metrics` lives on its own listener only.
    assert_eq!(hub.get("/metrics", &hub.admin).await.status(), 404);

    // Two pushes accepted, two refused (a duplicate version, a bad query).
    hub.push_v1("digits", "1.0.0").await;
    hub.push_v1("digits", "2.0.0").await;
    expect_error(hub.upload("digits", "1.0.0", model_bytes(V1), "").await, 409).await;
    expect_error(hub.upload("digits", "3.0.0", model_bytes(V1), "&bogus=1").await, 400).await;

    // A device enrols and subscribes; 1.0.0 then 2.0.0 go to its site.
    let d1 = deploy(&hub, "1.0.0").await;
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": "edge-1", "labels": {"site": "a"}})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let channel = Channel::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
    let mut client = AgentSyncClient::new(channel);
    let hello = Hello { device_id: "edge-1".into(), hardware: vec!["x86_64".into()], ..Hello::default() };
    // The subscription is registered before its first message is sent.
    let mut stream = client.subscribe(authed(&token, hello)).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("the first desired state");
    let d2 = deploy(&hub, "2.0.0").await;

    let mid = scrape(&hub).await;
    assert_eq!(must(&mid, "sentinel_hub_connected_devices", &[]), 1.0);
    assert_eq!(must(&mid, "sentinel_hub_deployments", &[("state", "active")]), 1.0);
    assert_eq!(must(&mid, "sentinel_hub_deployments", &[("state", "superseded")]), 1.0);
    let d2s = d2.to_string();
    assert_eq!(must(&mid, "sentinel_hub_deployment_devices", &[("deployment", &d2s), ("state", "pending")]), 1.0);
    assert_eq!(
        value(&mid, "sentinel_hub_deployment_devices", &[("deployment", &d1.to_string()), ("state", "pending")]),
        None,
        "superseded deployments have no per-device series"
    );

    // The device rolls 2.0.0 back: one of one is past the 20% threshold,
    // and the hub halts it before answering the report.
    let report = AgentReport {
        device_id: "edge-1".into(),
        applied_revision: 2,
        models: vec![ModelStatus {
            name: "digits".into(),
            version: "2.0.0".into(),
            state: "rolled_back".into(),
            detail: "accuracy too low".into(),
            deployment_id: d2,
        }],
        ..AgentReport::default()
    };
    client.report(authed(&token, report)).await.unwrap();

    let s = scrape(&hub).await;
    let requests = |route: &str, method: &str, status: &str| {
        value(&s, "sentinel_hub_http_requests_total", &[("route", route), ("method", method), ("status", status)])
    };
    assert_eq!(requests("/api/v1/models/{name}", "GET", "200"), Some(2.0));
    assert_eq!(requests("/api/v1/models/{name}", "GET", "404"), Some(1.0));
    // The unknown API endpoint and `/metrics` asked of the REST port.
    assert_eq!(requests("unmatched", "GET", "404"), Some(2.0));
    assert_eq!(requests("/api/v1/models", "GET", "401"), Some(1.0));
    assert_eq!(requests("/api/v1/models", "POST", "201"), Some(1.0));
    assert_eq!(requests("/api/v1/models/{name}/versions", "POST", "201"), Some(2.0));
    assert_eq!(requests("/api/v1/models/{name}/versions", "POST", "409"), Some(1.0));
    assert_eq!(requests("/api/v1/models/{name}/deploy", "POST", "201"), Some(2.0));
    assert_eq!(requests("/api/v1/devices", "POST", "201"), Some(1.0));
    for sample in s.iter().filter(|x| x.name.starts_with("sentinel_hub_http_")) {
        let route = &sample.labels["route"];
        assert!(route == "unmatched" || route.starts_with('/'), "{sample:?}");
        assert!(
            !route.contains("digits") && !route.contains("nope") && !route.contains("no-such"),
            "raw path: {sample:?}"
        );
    }

    // The latency histogram: buckets up to +Inf equal the count.
    let h = "sentinel_hub_http_request_duration_seconds";
    let route = [("route", "/api/v1/models/{name}"), ("method", "GET")];
    let count = must(&s, &format!("{h}_count"), &route);
    assert_eq!(count, 3.0, "two 200s and one 404");
    assert!(must(&s, &format!("{h}_sum"), &route) > 0.0);
    assert_eq!(must(&s, &format!("{h}_bucket"), &[route[0], route[1], ("le", "+Inf")]), count);
    let buckets: Vec<f64> = s
        .iter()
        .filter(|x| x.name == format!("{h}_bucket") && x.labels["route"] == route[0].1 && x.labels["method"] == "GET")
        .map(|x| x.value)
        .collect();
    assert!(buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative buckets: {buckets:?}");

    assert_eq!(must(&s, "sentinel_hub_model_pushes_total", &[("result", "ok")]), 2.0);
    assert_eq!(must(&s, "sentinel_hub_model_pushes_total", &[("result", "refused")]), 2.0);
    let size = model_bytes(V1).len() as f64;
    assert_eq!(must(&s, "sentinel_hub_model_push_bytes_total", &[]), 2.0 * size);
    assert_eq!(must(&s, "sentinel_hub_device_reports_total", &[]), 1.0);
    assert_eq!(must(&s, "sentinel_hub_deployment_halts_total", &[]), 1.0);
    // d1 superseded, d2 halted, and a hub rollback deployment of 1.0.0 active.
    for (state, n) in [("active", 1.0), ("halted", 1.0), ("superseded", 1.0), ("rolled_back", 0.0), ("cancelled", 0.0)]
    {
        assert_eq!(must(&s, "sentinel_hub_deployments", &[("state", state)]), n, "{state}");
    }
    assert_eq!(must(&s, "sentinel_hub_deployment_devices", &[("deployment", &d2s), ("state", "rolled_back")]), 1.0);
    assert_eq!(must(&s, "sentinel_hub_deployment_devices", &[("deployment", &d2s), ("state", "pending")]), 0.0);
    let live: std::collections::BTreeSet<&str> = s
        .iter()
        .filter(|x| x.name == "sentinel_hub_deployment_devices")
        .map(|x| x.labels["deployment"].as_str())
        .collect();
    assert_eq!(live.len(), 2, "the halted and the restoring deployment: {live:?}");
    assert_eq!(must(&s, "sentinel_hub_connected_devices", &[]), 1.0);

    // A scrape is not an API call: the REST counters did not move.
    let again = scrape(&hub).await;
    let total = |v: &[Sample]| -> f64 {
        v.iter().filter(|x| x.name == "sentinel_hub_http_requests_total").map(|x| x.value).sum()
    };
    assert_eq!(total(&again), total(&s));
}

#[test]
fn the_strict_parser_refuses_malformed_lines() {
    for bad in [
        "# TYPE x counter\nx{a=\"1\" 2\n",
        "# TYPE x counter\nx{a=1} 2\n",
        "# TYPE x counter\nx 2 3 4\n",
        "y 1\n",
        "# TYPE x counter\nx{1a=\"v\"} 1\n",
    ] {
        assert!(std::panic::catch_unwind(|| parse(bad)).is_err(), "accepted {bad:?}");
    }
    let ok = parse("# HELP x a help\n# TYPE x counter\nx{a=\"q\\\"uote\",b=\"\"} 2\n");
    assert_eq!(ok[0].labels["a"], "q\"uote");
}
