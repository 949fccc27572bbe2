//! Automatic local rollback with a real hub, a real agent, real confined
//! workers and the shared digits models. Policies come from the agent's
//! config defaults here (the hub-set policy is tested in `fleet_halt.rs`).
//!
//! No test depends on this machine's speed: decisions wait for sample
//! counts, bake times are a second, and the latency policy compares the new
//! slot with the old one in the same run (v3 does ~460x v1's compute).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sentinel_agent::AgentHandle;
use sentinel_agent::supervisor::SlotState as WorkerState;
use serde_json::{Value, json};

const DEGRADED: &str = "digits/digits_mlp_v2_degraded.onnx";
const SLOW: &str = "digits/digits_mlp_v3_slow.onnx";

/// Phases bake for one second (zero means "the 30 s default"), so sample
/// counts decide; the standby is watched for one second after full
/// promotion (the shortest a policy can ask for).
const BASE: &str = "[rollout]\nbake_seconds = 1\nstandby_bake_seconds = 1\n";

async fn agent_on_v1(tmp: &std::path::Path, rollout: &str) -> (TestHub, AgentHandle) {
    let hub = TestHub::start_at(&tmp.join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let agent =
        start_agent_with(&tmp.join("agent"), &hub, "edge-1", &[("site", "a")], &format!("{BASE}{rollout}")).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    (hub, agent)
}

/// Deploys to the one test device with fleet halting off (1 of 1 devices
/// rolled back is not above a fraction of 1.0), so the device's own
/// decisions are what the test sees.
async fn deploy_without_halt(hub: &TestHub, version: &str) {
    hub.admin_post(
        "/api/v1/models/digits/deploy",
        json!({"version": version, "target": "site=a", "halt_fraction": 1.0}),
    )
    .await;
}

/// Waits for the model's status to be `state` and returns its detail.
async fn wait_status(agent: &AgentHandle, state: &str) -> String {
    let v = match agent.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == state)).await {
        Ok(v) => v,
        Err(v) => {
            let events = agent.recent_events(20).unwrap();
            panic!("never reached {state}: {:?}; events: {events:#?}", status(&v, "digits"))
        }
    };
    status(&v, "digits").unwrap().2
}

/// Feedback accuracy of one slot's window in rollout evidence.
fn accuracy(w: &Value) -> f64 {
    w["feedback_correct"].as_f64().unwrap() / w["feedback_total"].as_f64().unwrap()
}

/// The hub hears of the rollback with the reason and its typed evidence.
async fn reported_rollback(hub: &TestHub) -> Value {
    let dev =
        hub.wait_device("edge-1", |d| d["events"].as_array().unwrap().iter().any(|e| e["kind"] == "rolled_back")).await;
    let event = dev["events"].as_array().unwrap().iter().find(|e| e["kind"] == "rolled_back").unwrap().clone();
    let reason = event["reason"].as_str().unwrap();
    assert!(!reason.contains(" | ") && !reason.contains('{'), "the reason is for people, no data appended: {reason}");
    let snapshot = event["evidence"].clone();
    eprintln!(
        "rollback {}: detected after {} samples / {} ms; switch {} us",
        snapshot["kind"], snapshot["detected_after_samples"], snapshot["detected_after_ms"], snapshot["switch_us"]
    );
    assert_eq!(dev["models"][0]["state"], "rolled_back", "{dev:#}");
    snapshot
}

/// An agent with no `[rollout]` section serving 1.0.0, and a deployment of
/// `version` with only `phases` in its policy: every other field is the
/// default (halting off, so the device's own decision is what is seen).
async fn deploy_with_only_phases(hub: &TestHub, version: &str, phases: &[&str]) {
    let body = json!({"version": version, "target": "site=a", "halt_fraction": 1.0, "policy": {"phases": phases}});
    hub.admin_post("/api/v1/models/digits/deploy", body).await;
}

/// Issue 12: `shadow,canary:10,full` and nothing else ran on 0 samples and
/// 0 s, so a much slower version was promoted on its first shadow sample.
/// With the per-phase defaults (100 samples) the default 1.5x ratio sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_version_is_rolled_back_with_only_phases_given() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = serving_v1(tmp.path()).await;
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 2).start();
    hub.push("digits", "2.0.0", SLOW, "").await;
    deploy_with_only_phases(&hub, "2.0.0", &["shadow", "canary:10", "full"]).await;
    let detail = wait_status(&agent, "rolled_back").await;
    let seen = load.stop().await;
    assert!(detail.contains("p95 latency"), "{detail}");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    assert!(seen.iter().all(|s| s.served_by("1.0.0")), "caught in shadow: 2.0.0 never answered a client");
    let snapshot = reported_rollback(&hub).await;
    assert_eq!(snapshot["kind"], "latency");
    assert!(
        snapshot["candidate"]["requests"].as_u64().unwrap() >= 100,
        "judged on the default 100 samples: {snapshot}"
    );
    assert_eq!(active(&agent.view(), "digits").as_deref(), Some("1.0.0"));
    agent.shutdown().await;
}

/// Issue 12: `full` and feedback on every request never rolled back a
/// version far below its declared accuracy. The declared accuracy (here
/// 0.97, for the 0.60-accurate degraded model) minus the validation
/// tolerance is now the floor, in `full` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_below_its_declared_accuracy_is_rolled_back_in_full_on_feedback() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = serving_v1(tmp.path()).await;
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 2).with_feedback().start();
    hub.push("digits", "2.0.0", DEGRADED, "&accuracy=0.97").await;
    deploy_with_only_phases(&hub, "2.0.0", &["full"]).await;
    let detail = wait_status(&agent, "rolled_back").await;
    let seen = load.stop().await;
    assert!(detail.contains("feedback accuracy") && detail.contains("95.0% minimum"), "{detail}");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    assert!(seen.iter().any(|s| s.served_by("2.0.0")), "in full, 2.0.0 answered");
    let snapshot = reported_rollback(&hub).await;
    assert_eq!(snapshot["kind"], "accuracy");
    assert!(accuracy(&snapshot["candidate"]) < 0.9, "{snapshot}");
    assert_eq!(active(&agent.view(), "digits").as_deref(), Some("1.0.0"));
    // The rolled-back slot's last window still reaches the hub: every answer
    // 2.0.0 gave is in its series, none lost with the slot.
    let on_v2 = seen.iter().filter(|s| s.served_by("2.0.0")).count() as u64;
    let path = "/api/v1/devices/edge-1/telemetry?version=2.0.0";
    eventually("every answer of 2.0.0 in the hub's series", WAIT, async || {
        let v = hub.admin_get(path).await;
        (sentinel_testkit::telemetry::total(&v, "2.0.0", "/requests") == on_v2).then_some(())
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_less_accurate_version_is_rolled_back_on_feedback_and_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = "phases = [\"canary:50\", \"full\"]\nmin_samples = 60\nmin_accuracy_samples = 60\n\
                  max_accuracy_drop = 0.1\nmax_latency_ratio = 50.0\n";
    let (hub, agent) = agent_on_v1(tmp.path(), policy).await;
    let spec = LoadSpec::digits(agent.inference_addr.unwrap(), 2).with_feedback();
    let rolled_back = spec.mark.clone();
    let load = spec.start();
    hub.push("digits", "2.0.0", DEGRADED, "").await;
    deploy_without_halt(&hub, "2.0.0").await;
    let detail = wait_status(&agent, "rolled_back").await;
    rolled_back.store(true, Ordering::Relaxed);
    let v = agent.view();
    // Let every client send a few more requests after the rollback.
    let served_then = agent.route("digits").unwrap().active.clone().unwrap();
    let start = served_then.requests.load(Ordering::Relaxed);
    eventually("20 more requests served after the rollback", WAIT, async || {
        (served_then.requests.load(Ordering::Relaxed) >= start + 20).then_some(())
    })
    .await;
    let seen = load.stop().await;

    assert!(detail.contains("accuracy") && detail.contains("feedback"), "{detail}");
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"));
    assert!(failures(&seen).is_empty(), "requests failed during the rollback: {:?}", failures(&seen));
    assert!(seen.iter().any(|s| s.served_by("2.0.0")), "the canary served part of the traffic");
    assert!(seen.iter().filter(|s| s.after_mark).all(|s| s.served_by("1.0.0")), "no 2.0.0 after the rollback");
    let snapshot = reported_rollback(&hub).await;
    assert_eq!(snapshot["kind"], "accuracy_drop");
    assert!(accuracy(&snapshot["candidate"]) < 0.8, "{snapshot}");
    assert!(accuracy(&snapshot["baseline"]) > 0.9, "{snapshot}");
    let route = agent.route("digits").unwrap();
    assert!(route.candidate.is_none(), "the bad worker is stopped");

    // Rejected locally: a restart with the same desired state does not retry it.
    let config = agent.config().clone();
    agent.shutdown().await;
    let agent = sentinel_agent::start(config).await.unwrap();
    let v = agent.wait_for(WAIT, |v| v.connected && v.applied_revision > 0).await.unwrap();
    assert_eq!(active(&v, "digits").as_deref(), Some("1.0.0"));
    assert_eq!(status(&v, "digits").unwrap().0, "rolled_back", "{:?}", status(&v, "digits"));
    assert!(agent.route("digits").unwrap().candidate.is_none(), "2.0.0 was not loaded again");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_version_is_rolled_back_for_latency() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = "phases = [\"canary:50\", \"full\"]\nmin_samples = 40\nmax_latency_ratio = 3.0\n";
    let (hub, agent) = agent_on_v1(tmp.path(), policy).await;
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 2).start();
    hub.push("digits", "2.0.0", SLOW, "").await;
    deploy_without_halt(&hub, "2.0.0").await;
    let detail = wait_status(&agent, "rolled_back").await;
    let seen = load.stop().await;
    assert!(detail.contains("p95 latency"), "{detail}");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    let snapshot = reported_rollback(&hub).await;
    assert_eq!(snapshot["kind"], "latency");
    assert_eq!(active(&agent.view(), "digits").as_deref(), Some("1.0.0"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_model_re_pushed_is_promoted_through_every_phase() {
    let tmp = tempfile::tempdir().unwrap();
    // Latency is not this test's subject: the p95s of two real workers on a
    // shared machine would decide on the machine's noise. The ratio decision
    // is unit-tested in `rollout::decision`; here the bound is the largest
    // the hub accepts, so only accuracy and agreement can stop the rollout.
    let policy = "phases = [\"shadow\", \"canary:50\", \"full\"]\nmin_samples = 100\nmin_accuracy_samples = 40\n\
                  max_accuracy_drop = 0.1\nmin_shadow_agreement = 0.95\nmax_latency_ratio = 1000.0\n";
    let (hub, agent) = agent_on_v1(tmp.path(), policy).await;
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 2).with_feedback().start();
    hub.push("digits", "1.0.1", V1, "").await;
    deploy_without_halt(&hub, "1.0.1").await;
    // Traffic goes on until the standby bake is over too.
    let dev = hub
        .wait_device("edge-1", |d| d["events"].as_array().unwrap().iter().any(|e| e["kind"] == "rollout_complete"))
        .await;
    let seen = load.stop().await;
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    let v = agent.view();
    assert_eq!(status(&v, "digits").unwrap().0, "serving");
    let m = v.models.iter().find(|m| m.name == "digits").unwrap();
    assert_eq!((m.active_version.as_deref(), m.standby_version.as_deref()), (Some("1.0.1"), Some("1.0.0")));
    let phases: Vec<&str> = dev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rollout_phase")
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(phases.iter().any(|p| p.contains("canary")) && phases.iter().any(|p| p.contains("serving")), "{phases:?}");
    assert!(!dev["events"].as_array().unwrap().iter().any(|e| e["kind"] == "rolled_back"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_disagrees_with_the_active_slot_is_rolled_back_and_never_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = "phases = [\"shadow\", \"full\"]\nmin_samples = 40\nmin_accuracy_samples = 40\n\
                  min_shadow_agreement = 0.9\nmax_latency_ratio = 50.0\n";
    let (hub, agent) = agent_on_v1(tmp.path(), policy).await;
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 2).start();
    hub.push("digits", "2.0.0", DEGRADED, "").await;
    deploy_without_halt(&hub, "2.0.0").await;
    let detail = wait_status(&agent, "rolled_back").await;
    let seen = load.stop().await;
    assert!(detail.contains("agreement"), "{detail}");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    assert!(seen.iter().all(|s| s.served_by("1.0.0")), "only the active slot answers in shadow mode");
    assert_eq!(reported_rollback(&hub).await["kind"], "agreement");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_crashing_is_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough samples needed that only the crashes can decide.
    let policy = "phases = [\"canary:50\", \"full\"]\nmin_samples = 1000000\nmax_restarts = 2\n";
    let (hub, agent) = agent_on_v1(tmp.path(), policy).await;
    hub.push("digits", "2.0.0", DEGRADED, "").await;
    deploy_without_halt(&hub, "2.0.0").await;
    wait_status(&agent, "canary").await;
    let candidate = agent.route("digits").unwrap().candidate.clone().unwrap();
    let deadline = Instant::now() + WAIT;
    while status(&agent.view(), "digits").unwrap().0 != "rolled_back" {
        let running = candidate.worker.members().find_map(|m| match m.state() {
            WorkerState::Running { pid, .. } => Some((m, pid)),
            _ => None,
        });
        if let Some((member, pid)) = running {
            // SAFETY: SIGKILL to a worker process this test's agent started.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL);
            }
            // The next kill only once the supervisor has replaced this worker.
            let mut rx = member.subscribe();
            let _ = tokio::time::timeout(
                WAIT,
                rx.wait_for(|s| !matches!(s, WorkerState::Running { pid: p, .. } if *p == pid)),
            )
            .await;
        }
        assert!(Instant::now() < deadline, "never rolled back: {:?}", status(&agent.view(), "digits"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let detail = status(&agent.view(), "digits").unwrap().2;
    assert!(detail.contains("restart"), "{detail}");
    assert_eq!(reported_rollback(&hub).await["kind"], "restarts");
    assert_eq!(active(&agent.view(), "digits").as_deref(), Some("1.0.0"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_from_the_hub_swaps_the_warm_standby_back_without_reloading_it() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", DEGRADED, "").await;
    // Promoted at once, and 1.0.0 stays warm for an hour.
    let extra = "[rollout]\nstandby_bake_seconds = 3600\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    serve_2_over_warm_1(&hub, &agent).await;
    let warm = worker_pid(agent.route("digits").unwrap().standby.as_ref().unwrap()).expect("the standby's worker runs");

    let spec = LoadSpec::digits(agent.inference_addr.unwrap(), 2);
    let back = spec.mark.clone();
    let load = spec.start();
    let restored = hub.admin_post("/api/v1/models/digits/rollback", json!({})).await["id"].as_i64().unwrap();
    agent
        .wait_for(WAIT, |v| {
            v.models.iter().any(|m| {
                m.active_version.as_deref() == Some("1.0.0")
                    && m.status.as_str() == "serving"
                    && m.status_deployment == Some(restored)
            })
        })
        .await
        .unwrap();
    back.store(true, Ordering::Relaxed);
    let route = agent.route("digits").unwrap();
    assert_eq!(
        worker_pid(route.active.as_ref().unwrap()),
        Some(warm),
        "the warm standby serves again: nothing reloaded"
    );
    assert!(route.standby.is_none() && route.candidate.is_none(), "2.0.0 was stopped");
    drop(route);
    let seen = load.stop().await;
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    assert!(seen.iter().all(|s| !s.after_mark || s.served_by("1.0.0")), "only 1.0.0 answers after the swap");

    let events = agent.recent_events(100).unwrap();
    let rolled =
        events.iter().find(|e| e.kind.as_str() == "rolled_back" && e.version == "2.0.0").expect("a rolled_back event");
    assert!(rolled.reason.contains("names 1.0.0 again") && !rolled.reason.contains('{'), "{rolled:?}");
    assert_eq!(rolled.evidence.as_ref().map(|e| e.kind.as_str()), Some("hub"), "{rolled:?}");
    assert!(
        !events.iter().any(|e| e.kind.as_str() == "model_installed" && e.version == "1.0.0" && e.id > rolled.id),
        "1.0.0 was not installed again: {events:?}"
    );
    agent.shutdown().await;
}
