//! The fleet learns from its devices: five real agents take a deployment
//! whose policy the hub sets; two of them see the new version lose accuracy
//! on their traffic and roll back on their own; 2 of 5 is above the 20%
//! threshold, so the hub halts the deployment and every device, including
//! the three still in canary, returns to the previous version.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_agent::AgentHandle;
use sentinel_agent::store::EventKind;
use serde_json::json;

const DEGRADED: &str = "digits/digits_mlp_v2_degraded.onnx";

/// Sends labelled digits with feedback until the device rolls the model back.
/// The durable `rolled_back` event says so, not the status: once this
/// rollback halts the deployment, the restored version's `serving` can
/// replace `rolled_back` between two requests.
async fn traffic_until_rollback(agent: &AgentHandle, hub: &TestHub, deployment: i64) {
    let load = LoadSpec::digits(agent.inference_addr.unwrap(), 1).with_feedback().start();
    let rolled_back = within(WAIT, async || agent.last_event(EventKind::RolledBack).unwrap()).await;
    let seen = load.stop().await;
    if rolled_back.is_none() {
        let shown = hub.admin_get(&format!("/api/v1/deployments/{deployment}")).await;
        let events = agent.recent_events(20).unwrap();
        panic!(
            "never rolled back after {} requests: {:?}\nevents: {events:#?}\ndeployment: {shown:#}",
            seen.len(),
            status(&agent.view(), "digits")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_five_devices_rolling_back_halt_the_deployment_and_revert_the_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let mut agents = Vec::new();
    for n in 1..=5 {
        let id = format!("edge-{n}");
        agents.push(start_agent(&tmp.path().join(&id), &hub, &id, &[("fleet", "f")]).await);
    }
    hub.deploy("digits", "1.0.0", "fleet=f").await;
    for a in &agents {
        a.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    }

    hub.push("digits", "2.0.0", DEGRADED, "").await;
    let policy = json!({"phases": ["canary:50", "full"], "min_samples": 60, "min_accuracy_samples": 60,
                        "max_accuracy_drop": 0.1, "max_latency_ratio": 50.0});
    let d = hub
        .admin_post(
            "/api/v1/models/digits/deploy",
            json!({"version": "2.0.0", "target": "fleet=f", "policy": policy, "halt_fraction": 0.2}),
        )
        .await;
    let id = d["id"].as_i64().unwrap();
    for a in &agents {
        a.wait_for(WAIT, |v| status(v, "digits").is_some_and(|s| s.0 == "canary")).await.unwrap();
    }
    // Only edge-1 and edge-2 have traffic (with ground truth); the rest hold.
    traffic_until_rollback(&agents[0], &hub, id).await;
    let shown = hub.admin_get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(shown["state"], "active", "1 of 5 is not above 20%: {shown}");
    traffic_until_rollback(&agents[1], &hub, id).await;

    let shown = eventually("the deployment halted", WAIT, async || {
        Some(hub.admin_get(&format!("/api/v1/deployments/{id}")).await).filter(|shown| shown["state"] == "halted")
    })
    .await;
    let reason = shown["halt_reason"].as_str().unwrap();
    assert!(reason.contains("2 of 5") && reason.contains("accuracy"), "{reason}");
    assert_eq!(shown["status"]["targeted"], 5, "{shown}");

    // Every device is back on 1.0.0, the canaries included, and serving it.
    for (n, a) in agents.iter().enumerate() {
        let v = a
            .wait_for(WAIT, |v| {
                active(v, "digits").as_deref() == Some("1.0.0") && status(v, "digits").is_some_and(|s| s.0 == "serving")
            })
            .await
            .unwrap_or_else(|v| panic!("edge-{}: {:?}", n + 1, status(&v, "digits")));
        assert!(v.models.iter().all(|m| m.active_version.as_deref() == Some("1.0.0")));
        let route = a.route("digits").unwrap();
        assert!(route.candidate.is_none(), "edge-{}: the 2.0.0 canary was stopped", n + 1);
        assert_eq!(route.active.as_ref().unwrap().version, "1.0.0");
    }

    // Once every device reports the restored deployment, the halted one
    // still shows how far it got on each: no device falls back to pending.
    let restored = hub.admin_get("/api/v1/deployments?state=active").await["deployments"][0]["id"].as_i64().unwrap();
    eventually("the fleet reporting the restored version", WAIT, async || {
        let r = hub.admin_get(&format!("/api/v1/deployments/{restored}")).await;
        (r["status"]["counts"]["serving"] == 5).then_some(())
    })
    .await;
    let halted = &hub.admin_get(&format!("/api/v1/deployments/{id}")).await["status"];
    assert_eq!(halted["counts"]["rolled_back"], 2, "{halted}");
    assert_eq!(halted["counts"]["pending"], 0, "{halted}");
    for a in agents {
        a.shutdown().await;
    }
}
