//! Blue/green serving end to end: a real hub, a real agent, real confined
//! workers, and clients on the agent's KServe v2 API.
//!
//! - A promotion under continuous load drops nothing, and no request sent
//!   after the first new-version response is answered by the old version.
//! - `kill -9` of the active worker under load: the slot restarts, the agent
//!   keeps serving, and the failed requests are few and counted.
//! - A version that fails validation on the device never gets a request, and
//!   the reason reaches the hub.
//! - After an agent restart, the active version is back in its slot and
//!   serves with the hub gone.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::atomic::Ordering;

use common::*;
use sentinel_agent::AgentHandle;
use serde_json::Value;

const DEGRADED: &str = "digits/digits_mlp_v2_degraded.onnx";

/// Waits until the clients have had `n` more responses (requests, not time).
async fn wait_responses(agent: &AgentHandle, model: &str, more: u64) {
    let start = requests_served(agent, model);
    eventually("clients making progress", WAIT, async || (requests_served(agent, model) >= start + more).then_some(()))
        .await;
}

fn requests_served(agent: &AgentHandle, model: &str) -> u64 {
    let Some(r) = agent.route(model) else { return 0 };
    [r.active.as_ref(), r.standby.as_ref()].into_iter().flatten().map(|l| l.requests.load(Ordering::Relaxed)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_under_load_drops_nothing_and_never_goes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = serving_v1(tmp.path()).await;
    let addr = agent.inference_addr.unwrap();
    hub.push("digits", "2.0.0", DEGRADED, "").await;

    let load = LoadSpec::digits(addr, 4).start();
    wait_responses(&agent, "digits", 50).await;
    hub.deploy("digits", "2.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    wait_responses(&agent, "digits", 50).await;
    let seen = load.stop().await;

    let failed: Vec<_> = seen.iter().filter(|s| s.outcome.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), seen.len(), failed.first());
    let version = |s: &Seen| s.outcome.clone().unwrap();
    assert!(seen.iter().all(|s| ["1.0.0", "2.0.0"].contains(&version(s).as_str())));
    let first_v2 = seen.iter().filter(|s| version(s) == "2.0.0").map(|s| s.received).min().unwrap();
    let late_v1: Vec<_> = seen.iter().filter(|s| s.sent > first_v2 && version(s) == "1.0.0").collect();
    assert!(late_v1.is_empty(), "{} requests sent after the switch were served by 1.0.0", late_v1.len());
    assert!(seen.iter().filter(|s| version(s) == "1.0.0").count() >= 50);
    assert!(seen.iter().filter(|s| version(s) == "2.0.0").count() >= 50);

    // The old version stays warm as the standby and still answers by version.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{addr}/v2/models/digits/versions/1.0.0/infer"))
        .json(&digit_request(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["model_version"], "1.0.0");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_serves_four_clients_and_a_killed_worker_fails_only_its_request() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let extra = "[serving]\nworkers = 2\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let load = LoadSpec::digits(addr, 4).start();
    wait_responses(&agent, "digits", 100).await;
    let slot = agent.route("digits").unwrap().active.clone().unwrap();
    let before = slot.worker.workers().await;
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|w| w.answered > 0), "both workers take requests: {before:?}");

    let pids = pool_pids(&slot).await;
    let victim = pids[0].unwrap();
    // SAFETY: SIGKILL to a worker process this test's agent started.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(i32::try_from(victim).unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    eventually("the killed worker was replaced", WAIT, async || {
        let now = pool_pids(&slot).await;
        (now.iter().all(Option::is_some) && !now.contains(&Some(victim))).then_some(())
    })
    .await;
    assert_eq!(pool_pids(&slot).await[1], pids[1], "the other worker kept running");
    wait_responses(&agent, "digits", 50).await;
    let seen = load.stop().await;

    let failed = seen.iter().filter(|s| s.outcome.is_err()).count();
    eprintln!("kill -9 of one of two workers under load: {failed} of {} requests failed", seen.len());
    // A worker runs one request at a time: only that one can fail. Requests
    // queued behind it never reached it, so they run on the other worker.
    assert!(failed <= 1, "{failed} failed: {:?}", seen.iter().find(|s| s.outcome.is_err()));
    assert_eq!(slot.failures.load(Ordering::Relaxed), failed as u64, "the agent counts every failed request");
    assert_eq!(slot.worker.restarts(), 1);
    assert!(seen.last().unwrap().outcome.is_ok());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_validation_on_the_device_never_serves_and_the_hub_hears_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = serving_v1(tmp.path()).await;
    let addr = agent.inference_addr.unwrap();
    // The degraded model claims 0.97 and brings the labelled test set: the
    // device measures about 0.60.
    let form = reqwest::multipart::Form::new()
        .part("model", reqwest::multipart::Part::bytes(model_bytes(DEGRADED)).file_name("m.onnx"))
        .part("validation_inputs", reqwest::multipart::Part::bytes(model_bytes("data/digits_test_x.bin")))
        .part("validation_labels", reqwest::multipart::Part::bytes(model_bytes("data/digits_test_y.bin")));
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/models/digits/versions?version=2.0.0&accuracy=0.97", hub.url))
        .bearer_auth(&hub.admin)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    hub.deploy("digits", "2.0.0", "site=a").await;

    let v = agent.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "failed")).await.unwrap();
    let (_, version, detail) = status(&v, "digits").unwrap();
    assert_eq!(version, "2.0.0");
    assert!(detail.contains("validation failed") && detail.contains("below the declared 0.9700"), "{detail}");
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"), "the old version keeps serving");
    let slot = agent.route("digits").unwrap();
    assert!(slot.candidate.is_none() && slot.active.as_ref().unwrap().version == "1.0.0");
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v2/models/digits/infer"))
        .json(&digit_request(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["model_version"], "1.0.0");
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v2/models/digits/versions/2.0.0/infer"))
        .json(&digit_request(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a failed version is not reachable by version either");

    let dev = hub
        .wait_device("edge-1", |d| d["events"].as_array().unwrap().iter().any(|e| e["kind"] == "validation_failed"))
        .await;
    let event = dev["events"].as_array().unwrap().iter().find(|e| e["kind"] == "validation_failed").unwrap().clone();
    assert!(event["reason"].as_str().unwrap().contains("accuracy 0.6"), "{event}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_active_version_serves_again_without_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut hub, agent) = serving_v1(tmp.path()).await;
    hub.push("digits", "2.0.0", DEGRADED, "").await;
    hub.deploy("digits", "2.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    let config = agent.config().clone();
    agent.shutdown().await;
    hub.stop().await;

    let agent = sentinel_agent::start(config).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v2/models/digits/infer"))
        .json(&digit_request(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model_version"], "2.0.0");
    let route = agent.route("digits").unwrap();
    assert_eq!(route.standby.as_ref().unwrap().version, "1.0.0", "the standby is warm again too");
    assert!(!agent.view().connected);
    agent.shutdown().await;
}
