//! Device telemetry kept by the hub: windows from real gRPC reports become
//! per-device and per-deployment series, each window once; bad windows are
//! refused with why; old buckets are pruned; `/metrics` stays per version.
#![allow(clippy::unwrap_used)]

use crate::common;
use crate::rollout::{Device, push};

use std::time::Duration;

use common::*;
use sentinel_proto::pb::{AgentReport, LatencySketch, ModelStatus, SlotWindow};
use sentinel_proto::telemetry::{RELATIVE_ERROR, Sketch};
use sentinel_testkit::wait::{WAIT, eventually};
use serde_json::Value;

fn sketch(ms: &[f64]) -> LatencySketch {
    let mut s = Sketch::new();
    for v in ms {
        s.record(Duration::from_secs_f64(v / 1e3));
    }
    s.to_pb()
}

/// A window of `requests` answered at `latency_ms` each (cycled), with
/// `errors` of them failed, ending `age_ms` before the report is sent.
fn window(version: &str, seq: u64, latency_ms: &[f64], errors: u64, now: i64, age_ms: i64) -> SlotWindow {
    let answered: Vec<f64> = latency_ms.to_vec();
    SlotWindow {
        model: "digits".into(),
        version: version.into(),
        slot: "blue".into(),
        role: "active".into(),
        seq,
        start_unix_ms: now - age_ms - 15_000,
        end_unix_ms: now - age_ms,
        requests: answered.len() as u64 + errors,
        errors,
        latency: Some(sketch(&answered)),
        compute: Some(sketch(&answered.iter().map(|v| v / 2.0).collect::<Vec<_>>())),
        feedback_correct: 3,
        feedback_total: 4,
        validation_accuracy: 0.95,
        validation_samples: 200,
        rss_bytes: 50 << 20,
        ..SlotWindow::default()
    }
}

fn report(run: u64, windows: Vec<SlotWindow>, now: i64) -> AgentReport {
    AgentReport { telemetry_run: run, windows, sent_at_unix_ms: now, ..AgentReport::default() }
}

async fn series(hub: &TestHub, path: &str) -> Value {
    let r = hub.get(path, &hub.admin).await;
    assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// Sums a count over every point of one version's series.
fn total(v: &Value, version: &str, field: &str) -> u64 {
    sentinel_testkit::telemetry::total(v, version, &format!("/{field}"))
}

#[tokio::test]
async fn reported_windows_become_series_once_each_and_bad_ones_are_refused_with_why() {
    let hub = TestHub::start().await;
    let mut dev = Device::enroll(&hub, "edge-1", "a").await;
    let now = sentinel_hub::now_ms();
    let first =
        report(7, vec![window("1.0.0", 1, &[2.0, 4.0, 6.0], 1, now, 0), window("1.0.0", 2, &[8.0], 0, now, 0)], now);
    let ack = dev.send(first.clone()).await.unwrap();
    assert!(ack.refused_windows.is_empty(), "{:?}", ack.refused_windows);

    let path = "/api/v1/devices/edge-1/telemetry";
    let v = series(&hub, path).await;
    assert_eq!(v["resolution"], "fine", "an hour is served at the fine resolution: {v}");
    assert_eq!(v["bucket_ms"], 60_000);
    assert_eq!((total(&v, "1.0.0", "requests"), total(&v, "1.0.0", "errors")), (5, 1));
    let point = &v["series"][0]["points"][0];
    assert_eq!(point["devices"], 1);
    assert_eq!(point["feedback"]["correct"], 6);
    assert_eq!(point["feedback"]["accuracy"], 0.75);
    assert_eq!(point["validation"]["samples"], 200);
    assert_eq!(point["rss_max_bytes"], 50 << 20);
    let p99 = point["latency_ms"]["p99"].as_f64().unwrap();
    assert!((p99 - 8.0).abs() <= 8.0 * RELATIVE_ERROR + 1e-3, "the largest of 2, 4, 6, 8 ms: {p99}");
    assert!(v["combination"].as_str().unwrap().contains("merged"), "says how percentiles combine: {v}");

    // The same report again (its answer was lost, say): nothing added twice.
    dev.send(first).await.unwrap();
    // The next window of that run, and a restarted agent's first window, are added.
    dev.send(report(7, vec![window("1.0.0", 3, &[1.0], 0, now, 0)], now)).await.unwrap();
    dev.send(report(8, vec![window("1.0.0", 1, &[1.0], 0, now, 0)], now)).await.unwrap();
    let v = series(&hub, path).await;
    assert_eq!(total(&v, "1.0.0", "requests"), 7, "each window once: {v}");

    // Each bad window is refused with why; the good one beside it is kept.
    let bad = SlotWindow { errors: 9, ..window("1.0.0", 4, &[1.0], 0, now, 0) };
    let ack = dev.send(report(8, vec![bad, window("1.0.0", 5, &[1.0], 0, now, 0)], now)).await.unwrap();
    assert_eq!(ack.refused_windows.len(), 1, "{:?}", ack.refused_windows);
    assert!(ack.refused_windows[0].contains("9 errors out of 1 requests"), "{:?}", ack.refused_windows);
    assert_eq!(total(&series(&hub, path).await, "1.0.0", "requests"), 8);

    // The hub's own figures: per model and version, never per device.
    let metrics = reqwest::get(format!("{}/metrics", hub.metrics_url)).await.unwrap().text().await.unwrap();
    let line = metrics.lines().find(|l| l.starts_with("sentinel_hub_fleet_requests_total{")).unwrap();
    assert!(line.contains("version=\"1.0.0\"") && line.ends_with(" 8"), "{line}");
    assert!(!metrics.lines().any(|l| l.starts_with("sentinel_hub_fleet") && l.contains("edge-1")), "{metrics}");
    assert!(metrics.contains("sentinel_hub_telemetry_windows_total{outcome=\"refused\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_deployment_combines_its_devices_per_version_and_counts_them_by_state() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0", "2.0.0"]).await;
    let mut a = Device::enroll(&hub, "edge-a", "a").await;
    let mut b = Device::enroll(&hub, "edge-b", "a").await;
    let d = hub.deploy("digits", "2.0.0", "site=a").await;
    let id = d["id"].as_i64().unwrap();
    let now = sentinel_hub::now_ms();
    // Before the deployment both served 1.0.0; then edge-a serves 2.0.0 at
    // 10 ms, edge-b rolls it back after 100 ms answers.
    let status = |state: &str, version: &str| ModelStatus {
        name: "digits".into(),
        version: version.into(),
        state: state.into(),
        deployment_id: id,
        ..ModelStatus::default()
    };
    let send = async |dev: &mut Device, run, windows, state: ModelStatus| {
        let r = AgentReport { models: vec![state], ..report(run, windows, now) };
        assert!(dev.send(r).await.unwrap().refused_windows.is_empty());
    };
    send(&mut a, 1, vec![window("1.0.0", 1, &[1.0; 10], 0, now, 0)], status("downloading", "2.0.0")).await;
    send(&mut b, 1, vec![window("1.0.0", 1, &[1.0; 10], 0, now, 0)], status("downloading", "2.0.0")).await;
    send(&mut a, 1, vec![window("2.0.0", 2, &[10.0; 19], 1, now, 0)], status("serving", "2.0.0")).await;
    send(&mut b, 1, vec![window("2.0.0", 2, &[100.0; 20], 0, now, 0)], status("rolled_back", "2.0.0")).await;

    let v = series(&hub, &format!("/api/v1/deployments/{id}/telemetry")).await;
    assert_eq!(v["model"], "digits");
    assert_eq!(v["devices"], 2);
    assert_eq!((total(&v, "1.0.0", "requests"), total(&v, "2.0.0", "requests")), (20, 40));
    let new = v["series"].as_array().unwrap().iter().find(|s| s["version"] == "2.0.0").unwrap();
    let p = new["points"].as_array().unwrap().last().unwrap();
    assert_eq!(p["devices"], 2);
    assert_eq!(p["error_rate"], 1.0 / 40.0);
    // 39 answers: 19 at 10 ms, 20 at 100 ms. Merged, the median is 100 ms
    // (the 20th), and p50 of a 10 ms device and a 100 ms device is neither
    // average: percentiles are of all requests together.
    let p50 = p["latency_ms"]["p50"].as_f64().unwrap();
    assert!((p50 - 100.0).abs() <= 100.0 * RELATIVE_ERROR + 1e-3, "{p50}");
    let states = v["states"].as_array().unwrap();
    assert_eq!(states.last().unwrap()["counts"], serde_json::json!({"rolled_back": 1, "serving": 1}), "{v}");

    // Bad ranges say what is wrong.
    for (query, status, says) in [
        ("?from_ms=10&to_ms=5", 422, "must be before"),
        ("?resolution=hourly", 422, "fine, coarse or auto"),
        ("?from_ms=0&resolution=fine", 422, "narrow the range"),
        // A deployment's telemetry is of its own model: no model filter.
        ("?model=digits", 400, "model"),
        // The widest range a caller can send: refused, not overflowed.
        ("?from_ms=-9223372036854775808&to_ms=9223372036854775807&resolution=fine", 422, "narrow the range"),
        ("?from_ms=-9223372036854775808&to_ms=-9223372036854775807&resolution=fine", 200, "\"states\""),
        ("?from_ms=9223372036854775806&to_ms=9223372036854775807&resolution=fine", 200, "\"states\""),
        ("?colour=red", 400, "colour"),
    ] {
        let r = hub.get(&format!("/api/v1/deployments/{id}/telemetry{query}"), &hub.admin).await;
        assert_eq!(r.status(), status, "{query}");
        let body = r.text().await.unwrap();
        assert!(body.contains(says), "{query}: {body}");
    }
    assert_eq!(hub.get("/api/v1/deployments/999/telemetry", &hub.admin).await.status(), 404);
    assert_eq!(hub.get("/api/v1/devices/nobody/telemetry", &hub.admin).await.status(), 404);
    let r = hub.get("/api/v1/devices/edge-a/telemetry?from_ms=-9223372036854775808&resolution=fine", &hub.admin).await;
    assert_eq!(r.status(), 422, "{}", r.text().await.unwrap());
    let r = hub.get("/api/v1/devices/edge-a/telemetry?version=", &hub.admin).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("version must be 1 to 256 bytes"));
    let viewer = hub.token("viewer").await;
    assert_eq!(hub.get(&format!("/api/v1/deployments/{id}/telemetry"), &viewer).await.status(), 200);
    assert_eq!(hub.get(&format!("/api/v1/deployments/{id}/telemetry"), "nope").await.status(), 401);
}

#[tokio::test]
async fn buckets_past_their_retention_are_pruned_and_the_coarse_series_keeps_the_total() {
    // Fine buckets of a second kept a minute; coarse of an hour kept a day.
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(tmp.path(), |c| {
        c.telemetry.fine_bucket = Duration::from_secs(1);
        c.telemetry.fine_keep = Duration::from_secs(60);
        c.telemetry.coarse_bucket = Duration::from_secs(3600);
        c.telemetry.coarse_keep = Duration::from_secs(86_400);
    })
    .await;
    let mut dev = Device::enroll(&hub, "edge-1", "a").await;
    let now = sentinel_hub::now_ms();
    // One window that ended 5 minutes before its report (queued through an
    // outage), one fresh; a third older than a day is refused.
    let windows = vec![
        window("1.0.0", 1, &[1.0; 3], 0, now, 5 * 60_000),
        window("1.0.0", 2, &[1.0; 4], 0, now, 0),
        window("1.0.0", 3, &[1.0; 5], 0, now, 2 * 86_400_000),
    ];
    let ack = dev.send(report(1, windows, now)).await.unwrap();
    assert_eq!(ack.refused_windows.len(), 1);
    assert!(ack.refused_windows[0].contains("past the retention"), "{:?}", ack.refused_windows);
    let range = format!("from_ms={}&to_ms={}", now - 600_000, now + 1_000);
    let fine = format!("/api/v1/devices/edge-1/telemetry?{range}&resolution=fine");
    let coarse = format!("/api/v1/devices/edge-1/telemetry?{range}&resolution=coarse");
    // The pruning runs every fine bucket: the 5-minute-old fine bucket goes.
    eventually("the old fine bucket is pruned", WAIT, async || {
        let v = series(&hub, &fine).await;
        (total(&v, "1.0.0", "requests") == 4).then_some(())
    })
    .await;
    assert_eq!(total(&series(&hub, &coarse).await, "1.0.0", "requests"), 7, "the coarse series keeps both");
}
