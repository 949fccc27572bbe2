//! Device telemetry, kept: five real agents serve a rollout with real
//! traffic and ground truth; the hub's series, per device and per
//! deployment, hold exactly what each agent answered.
//!
//! Time is accelerated, not slept through: the hub's fine buckets are one
//! second wide (a minute by default) and agents report every two seconds, so
//! the test's half a minute or so is as many buckets as half an hour would be.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use sentinel_agent::AgentHandle;
use sentinel_proto::telemetry::RELATIVE_ERROR;
use sentinel_testkit::digits::{Digits, digit_request};
use serde_json::{Value, json};

/// What the test saw one device answer with one version.
#[derive(Debug, Default, Clone, PartialEq)]
struct Tally {
    requests: u64,
    feedback: u64,
    correct: u64,
    /// The slowest round trip the client saw, milliseconds.
    slowest_ms: f64,
}

/// Sends one digit to `agent` with its true label as feedback; counts the
/// answer under the version that gave it, as the agent said in its answers.
async fn one(http: &reqwest::Client, agent: &AgentHandle, sample: usize, tally: &mut BTreeMap<String, Tally>) {
    let base = format!("http://{}/v2/models/digits", agent.inference_addr.unwrap());
    let sent = Instant::now();
    let r = http.post(format!("{base}/infer")).json(&digit_request(sample)).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let answer: Value = r.json().await.unwrap();
    let took = sent.elapsed().as_secs_f64() * 1e3;
    let f = json!({"id": answer["id"], "label": Digits::get().label(sample)});
    let fed: Value = http.post(format!("{base}/feedback")).json(&f).send().await.unwrap().json().await.unwrap();
    let t = tally.entry(answer["model_version"].as_str().unwrap().to_owned()).or_default();
    t.requests += 1;
    t.feedback += 1;
    t.correct += u64::from(fed["correct"] == true);
    t.slowest_ms = t.slowest_ms.max(took);
}

/// Sums of one version's points in a series answer, and how many points.
fn sums(v: &Value, version: &str) -> (Tally, u64) {
    use sentinel_testkit::telemetry::{points, total};
    let t = Tally {
        requests: total(v, version, "/requests"),
        feedback: total(v, version, "/feedback/total"),
        correct: total(v, version, "/feedback/correct"),
        slowest_ms: 0.0,
    };
    (t, points(v, version).count() as u64)
}

/// The largest of one percentile over a version's points, milliseconds.
fn max_of(v: &Value, version: &str, what: &str, q: &str) -> f64 {
    sentinel_testkit::telemetry::points(v, version).filter_map(|p| p[what][q].as_f64()).fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_on_five_agents_reads_back_per_device_and_per_deployment_as_the_agents_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| c.telemetry.fine_bucket = Duration::from_secs(1)).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    let mut agents = Vec::new();
    for n in 1..=5 {
        let id = format!("edge-{n}");
        agents.push((id.clone(), start_agent(&tmp.path().join(&id), &hub, &id, &[("fleet", "f")]).await));
    }
    hub.deploy("digits", "1.0.0", "fleet=f").await;
    for (_, a) in &agents {
        a.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
    let mut tallies: Vec<BTreeMap<String, Tally>> = vec![BTreeMap::new(); agents.len()];
    // Different traffic per device, so a mix-up between devices shows.
    for (n, (_, a)) in agents.iter().enumerate() {
        for i in 0..10 * (n + 1) {
            one(&http, a, i, &mut tallies[n]).await;
        }
    }

    // The rollout: half the traffic to 2.0.0, then all of it.
    let policy = json!({"phases": ["canary:50", "full"], "min_samples": 20, "min_accuracy_samples": 20,
                        "bake_seconds": 1, "standby_bake_seconds": 1, "max_accuracy_drop": 0.9,
                        "max_latency_ratio": 100.0});
    let d = hub
        .admin_post("/api/v1/models/digits/deploy", json!({"version": "2.0.0", "target": "fleet=f", "policy": policy}))
        .await;
    let id = d["id"].as_i64().unwrap_or_else(|| panic!("{d}"));
    for (n, (_, a)) in agents.iter().enumerate() {
        a.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "canary")).await.unwrap();
        let mut i = 1000;
        while active(&a.view(), "digits").as_deref() != Some("2.0.0") {
            assert!(i < 20_000, "edge-{} never promoted 2.0.0: {:?}", n + 1, status(&a.view(), "digits"));
            one(&http, a, i, &mut tallies[n]).await;
            i += 1;
        }
        for j in 0..20 {
            one(&http, a, 30_000 + j, &mut tallies[n]).await;
        }
    }

    // Each device's series holds exactly what that device answered, version
    // by version, once its windows have all been reported.
    let empty = Tally::default();
    for (n, (device, _)) in agents.iter().enumerate() {
        for version in ["1.0.0", "2.0.0"] {
            let want = tallies[n].get(version).unwrap_or(&empty);
            assert!(want.requests > 0, "{device} answered with {version}");
            let day_ago = sentinel_hub::now_ms() - 86_400_000;
            let path = format!("/api/v1/devices/{device}/telemetry?from_ms={day_ago}&resolution=coarse");
            let fine_path = format!("/api/v1/devices/{device}/telemetry");
            let v = eventually(&format!("{device} {version}: the hub has every window"), WAIT, async || {
                let v = hub.admin_get(&fine_path).await;
                let (got, _) = sums(&v, version);
                (got.requests == want.requests && got.feedback == want.feedback).then_some(v)
            })
            .await;
            let (got, points) = sums(&v, version);
            assert_eq!(
                (got.requests, got.feedback, got.correct),
                (want.requests, want.feedback, want.correct),
                "{device} {version}"
            );
            assert!(points >= 1, "{device} {version}: {v}");
            // The coarse series agrees with the fine one.
            let (coarse, _) = sums(&hub.admin_get(&path).await, version);
            assert_eq!(coarse.requests, want.requests, "{device} {version}: coarse");
            // The agent times a request inside the round trip the client saw.
            let p99 = max_of(&v, version, "latency_ms", "p99");
            assert!(
                p99 > 0.0 && p99 <= want.slowest_ms * (1.0 + RELATIVE_ERROR),
                "{device} {version}: p99 {p99} ms, slowest {} ms",
                want.slowest_ms
            );
            let compute = max_of(&v, version, "compute_ms", "p95");
            assert!(
                compute > 0.0 && compute <= p99 * (1.0 + RELATIVE_ERROR),
                "{device} {version}: compute {compute} ms in {p99} ms"
            );
        }
    }

    // The deployment's series: both versions, summed over its five devices.
    let v = hub.admin_get(&format!("/api/v1/deployments/{id}/telemetry")).await;
    assert_eq!(v["devices"], 5, "{v}");
    for version in ["1.0.0", "2.0.0"] {
        let (got, _) = sums(&v, version);
        let want: u64 = tallies.iter().filter_map(|t| t.get(version)).map(|t| t.requests).sum();
        let correct: u64 = tallies.iter().filter_map(|t| t.get(version)).map(|t| t.correct).sum();
        assert_eq!((got.requests, got.correct), (want, correct), "{version} over the fleet");
    }
    let most = v["series"].as_array().unwrap().iter().find(|s| s["version"] == "2.0.0").unwrap()["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["devices"].as_u64().unwrap())
        .max();
    assert_eq!(most, Some(5), "a bucket where all five served 2.0.0: {v}");
    let states = v["states"].as_array().unwrap();
    assert_eq!(states.last().unwrap()["counts"], json!({"serving": 5}), "{v}");
    assert!(states.iter().any(|s| s["counts"].get("canary").is_some()), "the canary phase shows: {v}");
    for (_, a) in agents {
        a.shutdown().await;
    }
}
