//! The agent's `/metrics` listener after real traffic: counters move with
//! the right labels, histograms are there, and every name follows the
//! Prometheus conventions.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;

use common::*;
use serde_json::json;

async fn scrape(agent: &sentinel_agent::AgentHandle) -> String {
    let r = reqwest::get(format!("http://{}/metrics", agent.metrics_addr.unwrap())).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    r.text().await.unwrap()
}

/// The value of the sample `name{labels}` (labels sorted as the encoder writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic_rollbacks_and_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    let extra = "[rollout]\nstandby_bake_seconds = 3600\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    agent.wait_for(WAIT, |v| v.connected).await.unwrap();

    let http = reqwest::Client::new();
    let url = format!("http://{}/v2/models/digits/infer", agent.inference_addr.unwrap());
    let ok = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64]}]});
    for _ in 0..5 {
        assert_eq!(http.post(&url).json(&ok).send().await.unwrap().status(), 200);
    }
    let bad = json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.5; 63]}]});
    assert_eq!(http.post(&url).json(&bad).send().await.unwrap().status(), 400);

    let text = scrape(&agent).await;
    let v1 = "model=\"digits\",slot=\"blue\",version=\"1.0.0\"";
    // Label order in the exposition is alphabetical.
    let by_outcome = |o: &str| {
        format!(
            "sentinel_agent_inference_requests_total{{model=\"digits\",outcome=\"{o}\",slot=\"blue\",version=\"1.0.0\"}}"
        )
    };
    assert_eq!(sample(&text, &by_outcome("ok")), Some(5.0), "{text}");
    assert_eq!(sample(&text, &by_outcome("bad_input")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &format!("sentinel_agent_inference_duration_seconds_count{{{v1}}}")), Some(6.0));
    assert_eq!(sample(&text, &format!("sentinel_agent_model_compute_seconds_count{{{v1}}}")), Some(5.0));
    assert!(sample(&text, &format!("sentinel_agent_model_compute_seconds_sum{{{v1}}}")).unwrap() > 0.0);
    assert!(text.contains(&format!("sentinel_agent_inference_duration_seconds_bucket{{{v1},le=\"+Inf\"}} 6")));
    assert_eq!(sample(&text, "sentinel_agent_hub_connected"), Some(1.0));
    assert_eq!(sample(&text, "sentinel_agent_build_info{version=\"0.1.0\"}"), Some(1.0));
    assert_eq!(sample(&text, "sentinel_agent_download_bytes_total"), Some(model_bytes(V1).len() as f64));
    assert!(
        sample(&text, &format!("sentinel_agent_worker_resident_bytes{{{v1},worker=\"0\"}}")).unwrap() > 1e6,
        "{text}"
    );

    // v2, then an operator rollback: counted by reason.
    hub.deploy("digits", "2.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| v.models.iter().any(|m| m.standby_version.as_deref() == Some("1.0.0"))).await.unwrap();
    // Through the control socket, as `sentinel-agent rollback digits` does.
    let socket = agent.control_socket.clone();
    let done = tokio::task::spawn_blocking(move || sentinel_agent::cli::rollback(&socket, "digits")).await.unwrap();
    assert_eq!(done.unwrap(), "digits: 2.0.0 rolled back; 1.0.0 is active again");
    let text = scrape(&agent).await;
    assert_eq!(sample(&text, "sentinel_agent_rollbacks_total{model=\"digits\",reason=\"operator\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "sentinel_agent_download_bytes_total"),
        Some((model_bytes(V1).len() + model_bytes(V2).len()) as f64)
    );
    // The rolled-back worker is gone from the resident-memory gauge.
    assert!(!text.contains("sentinel_agent_worker_resident_bytes{model=\"digits\",slot=\"green\""), "{text}");

    // Conventions: one prefix, counters end in _total, histograms in _seconds,
    // gauges in a base unit or as a 0/1 state, every family with help text.
    let mut types = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        types.insert(name.to_owned(), kind.to_owned());
    }
    for (name, kind) in &types {
        assert!(name.starts_with("sentinel_agent_"), "{name}");
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help");
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "{name}"),
            "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
            "gauge" => {
                assert!(name.ends_with("_bytes") || name.ends_with("_info") || name.ends_with("_connected"), "{name}")
            }
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    for name in [
        "sentinel_agent_inference_requests_total",
        "sentinel_agent_inference_duration_seconds",
        "sentinel_agent_model_compute_seconds",
        "sentinel_agent_rollbacks_total",
        "sentinel_agent_download_bytes_total",
        "sentinel_agent_hub_connected",
        "sentinel_agent_worker_resident_bytes",
        "sentinel_agent_build_info",
    ] {
        assert!(types.contains_key(name), "{name} missing: {types:?}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_download_counts_as_a_failed_download_and_a_failed_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    // One flipped byte in the hub's copy: the signed manifest no longer matches.
    let blob = hub.blob_path(&sha256_hex(&model_bytes(V1)));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    hub.deploy("digits", "1.0.0", "*").await;
    agent.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "refused")).await.unwrap();

    let text = scrape(&agent).await;
    // At least the first attempt; a re-delivered desired state may retry the
    // download before the scrape, and each attempt counts under both names.
    let failed = sample(&text, "sentinel_agent_download_failures_total{kind=\"hash_mismatch\"}");
    assert!(failed.is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(sample(&text, "sentinel_agent_verification_failures_total{kind=\"hash_mismatch\"}"), failed, "{text}");
    // Only verified downloads count as downloaded bytes.
    assert_eq!(sample(&text, "sentinel_agent_download_bytes_total"), Some(0.0));
    agent.shutdown().await;
}
