//! Rollout policies, per-device deployment status, and the hub halting a
//! deployment too many devices rolled back or failed, with simulated devices
//! speaking real gRPC to a real hub.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::*;
use prost::Message as _;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{
    AgentEvent, AgentReport, DesiredState, Hello, HubMessage, ModelManifest, ModelStatus, ReportAck, RolloutEvidence,
    hub_message,
};
use serde_json::{Value, json};
use tonic::Streaming;
use tonic::transport::Channel;

pub(crate) const ACCURACY: &str = "accuracy 0.61 below the 0.90 minimum (feedback)";

/// A device as the hub sees it: its token, a gRPC client, its stream.
pub(crate) struct Device {
    pub(crate) id: String,
    token: String,
    client: AgentSyncClient<Channel>,
    stream: Option<Streaming<HubMessage>>,
}

impl Device {
    pub(crate) async fn enroll(hub: &TestHub, id: &str, site: &str) -> Self {
        let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": id, "labels": {"site": site}})).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
        let channel = Channel::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
        Self { id: id.to_owned(), token, client: AgentSyncClient::new(channel), stream: None }
    }

    /// The same device (its token) talking to another hub.
    pub(crate) async fn move_to(&mut self, hub: &TestHub) {
        let channel = Channel::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
        self.client = AgentSyncClient::new(channel);
        self.stream = None;
    }

    fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
        req
    }

    pub(crate) async fn subscribe(&mut self) {
        let hello = Hello {
            device_id: self.id.clone(),
            hardware: vec!["x86_64".into()],
            agent_version: "test".into(),
            ..Hello::default()
        };
        let req = self.authed(hello);
        self.stream = Some(self.client.subscribe(req).await.unwrap().into_inner());
    }

    /// The next desired state on the stream (heartbeats skipped). The
    /// timeout only turns a hang into a failure; it never paces the test.
    pub(crate) async fn next_state(&mut self) -> DesiredState {
        let stream = self.stream.as_mut().expect("subscribed");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("a message within 20 s")
                .unwrap()
                .expect("the stream is open");
            if let Some(hub_message::Kind::State(signed)) = msg.kind {
                return DesiredState::decode(&signed.state[..]).unwrap();
            }
        }
    }

    /// Skips states until one satisfies `pred`.
    async fn state_where(&mut self, pred: impl Fn(&DesiredState) -> bool) -> DesiredState {
        loop {
            let s = self.next_state().await;
            if pred(&s) {
                return s;
            }
        }
    }

    pub(crate) async fn report(&mut self, version: &str, state: &str, detail: &str, deployment_id: i64) {
        let events = if state == "rolled_back" {
            vec![AgentEvent {
                at_unix_ms: 1,
                kind: "rolled_back".into(),
                model: "digits".into(),
                version: version.into(),
                reason: detail.into(),
                evidence: Some(RolloutEvidence { kind: "latency".into(), switch_us: 42, ..RolloutEvidence::default() }),
            }]
        } else {
            vec![]
        };
        let report = AgentReport {
            device_id: self.id.clone(),
            applied_revision: 1,
            models: vec![ModelStatus {
                name: "digits".into(),
                version: version.into(),
                state: state.into(),
                detail: detail.into(),
                deployment_id,
            }],
            events,
            sent_at_unix_ms: 1,
            agent_version: "test".into(),
            ..AgentReport::default()
        };
        let req = self.authed(report);
        self.client.report(req).await.unwrap();
    }

    /// Sends `report` as this device; the hub's answer.
    pub(crate) async fn send(&mut self, mut report: AgentReport) -> Result<ReportAck, tonic::Status> {
        report.device_id.clone_from(&self.id);
        let req = self.authed(report);
        self.client.report(req).await.map(tonic::Response::into_inner)
    }
}

/// Models of a desired state as (version, deployment id).
pub(crate) fn models(s: &DesiredState) -> Vec<(String, i64)> {
    s.models
        .iter()
        .map(|m| {
            let manifest = ModelManifest::decode(&m.manifest.as_ref().unwrap().manifest[..]).unwrap();
            (manifest.version, m.deployment_id)
        })
        .collect()
}

/// Registers `digits` and pushes each of `versions`.
pub(crate) async fn push(hub: &TestHub, versions: &[&str]) {
    hub.register("digits").await;
    for v in versions {
        hub.push_v1("digits", v).await;
    }
}

pub(crate) async fn deploy(hub: &TestHub, body: Value) -> Value {
    let r = hub.post_json("/api/v1/models/digits/deploy", &hub.admin, body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

pub(crate) async fn deployment(hub: &TestHub, id: i64) -> Value {
    let r = hub.get(&format!("/api/v1/deployments/{id}"), &hub.admin).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub(crate) async fn halt_audits(hub: &TestHub) -> Vec<Value> {
    let v: Value = hub.get("/api/v1/audit?limit=500", &hub.admin).await.json().await.unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("HALT deployment"))
        .cloned()
        .collect()
}

/// digits 1.0.0 active on site=a, five subscribed devices there, then 2.0.0
/// deployed with `extra` fields. Returns the two deployment ids.
async fn fleet_on_v2(hub: &TestHub, extra: Value) -> (i64, i64, Vec<Device>) {
    push(hub, &["1.0.0", "2.0.0", "3.0.0"]).await;
    let d1 = deploy(hub, json!({"version": "1.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    let mut devices = Vec::new();
    for i in 1..=5 {
        let mut d = Device::enroll(hub, &format!("edge-{i}"), "a").await;
        d.subscribe().await;
        devices.push(d);
    }
    let mut body = json!({"version": "2.0.0", "target": "site=a"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let d2 = deploy(hub, body).await["id"].as_i64().unwrap();
    for d in &mut devices {
        d.state_where(|s| models(s) == [("2.0.0".to_owned(), d2)]).await;
    }
    (d1, d2, devices)
}

/// digits 1.0.0 active on site=a with twenty subscribed devices, then 2.0.0
/// deployed there in waves `[25, 100]` with `extra` fields. Returns both
/// deployment ids, the devices, and which of them the first wave reaches,
/// once each device has the state that deploy published.
async fn fleet_in_waves(hub: &TestHub, extra: Value) -> (i64, i64, Vec<Device>, Vec<bool>) {
    push(hub, &["1.0.0", "2.0.0"]).await;
    let d1 = deploy(hub, json!({"version": "1.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    let mut devices = Vec::new();
    for i in 1..=20 {
        let mut d = Device::enroll(hub, &format!("edge-{i}"), "a").await;
        d.subscribe().await;
        d.state_where(|s| models(s) == [("1.0.0".to_owned(), d1)]).await;
        devices.push(d);
    }
    let mut body = json!({"version": "2.0.0", "target": "site=a", "waves": [25, 100]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let v = deploy(hub, body).await;
    let d2 = v["id"].as_i64().unwrap();
    assert_eq!((v["waves"].clone(), v["wave"].clone()), (json!([25, 100]), json!(0)), "{v}");
    let first: Vec<bool> =
        devices.iter().map(|d| sentinel_hub::rollout::waves::in_wave(d2, &[25, 100], 0, &d.id)).collect();
    let n = first.iter().filter(|x| **x).count();
    assert!(n > 0 && n < 20, "the first wave should reach some of the 20 devices, not {n}");
    // Every device gets the deploy's revision: the first wave with 2.0.0,
    // the others still with 1.0.0.
    let one = first.iter().position(|x| *x).unwrap();
    let revision = devices[one].state_where(|s| models(s) == [("2.0.0".to_owned(), d2)]).await.revision;
    for (k, (d, in_first)) in devices.iter_mut().zip(&first).enumerate() {
        if k == one {
            continue;
        }
        let s = d.state_where(|s| s.revision >= revision).await;
        let want = if *in_first { ("2.0.0".to_owned(), d2) } else { ("1.0.0".to_owned(), d1) };
        assert_eq!(models(&s), [want], "{} (first wave: {in_first})", d.id);
    }
    (d1, d2, devices, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_rollout_widens_once_its_first_wave_serves() {
    let hub = TestHub::start().await;
    let (d1, d2, mut devices, first) = fleet_in_waves(&hub, json!({})).await;
    let n = first.iter().filter(|x| **x).count();
    let status = &deployment(&hub, d2).await["status"];
    assert_eq!((status["targeted"].as_u64(), status["waiting"].as_u64()), (Some(n as u64), Some(20 - n as u64)));
    assert_eq!(status["wave_percent"], 25);

    let wave: Vec<usize> = (0..20).filter(|i| first[*i]).collect();
    for (k, i) in wave.iter().enumerate() {
        assert_eq!(deployment(&hub, d2).await["wave"], 0, "{k} of {n} serve: not yet");
        devices[*i].report("2.0.0", "serving", "", d2).await;
    }
    let v = deployment(&hub, d2).await;
    assert_eq!(v["wave"], 1, "the whole first wave serves: widened to 100%: {v}");
    assert_eq!(v["status"]["waiting"], 0);
    assert_eq!(deployment(&hub, d1).await["state"], "superseded", "the last wave replaces 1.0.0");
    for d in &mut devices {
        d.state_where(|s| models(s) == [("2.0.0".to_owned(), d2)]).await;
    }
    let audit: Value = hub.get("/api/v1/audit?limit=500", &hub.admin).await.json().await.unwrap();
    let widen: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == format!("WIDEN deployment {d2}"))
        .collect();
    assert_eq!(widen.len(), 1, "{audit}");
    assert!(widen[0]["detail"].as_str().unwrap().contains(&format!("{n} of {n} devices in the 25% wave")), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_first_wave_halts_before_the_rest_of_the_fleet_sees_the_version() {
    let hub = TestHub::start().await;
    let (_d1, d2, mut devices, first) = fleet_in_waves(&hub, json!({"halt_count": 1})).await;
    let i = first.iter().position(|x| *x).unwrap();
    devices[i].report("2.0.0", "rolled_back", ACCURACY, d2).await;
    let v = deployment(&hub, d2).await;
    assert_eq!(v["state"], "halted", "{v}");
    assert_eq!(v["status"]["counts"]["rolled_back"], 1);
    assert_eq!(v["wave"], 0, "it never widened");
    let list: Value = hub.get("/api/v1/deployments?state=active", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 1, "only the restored deployment is active: {list}");
    let restored = &list["deployments"][0];
    assert_eq!((restored["version"].as_str(), restored["kind"].as_str()), (Some("1.0.0"), Some("rollback")));
    let restored = restored["id"].as_i64().unwrap();
    for d in &mut devices {
        d.state_where(|s| models(s) == [("1.0.0".to_owned(), restored)]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_naming_the_field() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0"]).await;
    for (extra, field) in [
        (json!({"policy": {"phases": ["canary:0", "full"]}}), "policy.phases[0]"),
        (json!({"policy": {"phases": ["shadow", "canary:100"]}}), "policy.phases[1]"),
        (json!({"policy": {"phases": ["full", "canary:10"]}}), "policy.phases[0]"),
        (json!({"policy": {"phases": ["blue-green"]}}), "policy.phases[0]"),
        (json!({"policy": {"max_error_rate": 1.5}}), "policy.max_error_rate"),
        (json!({"policy": {"min_accuracy": -0.1}}), "policy.min_accuracy"),
        (json!({"policy": {"max_accuracy_drop": 2}}), "policy.max_accuracy_drop"),
        (json!({"policy": {"min_shadow_agreement": 1.01}}), "policy.min_shadow_agreement"),
        (json!({"policy": {"max_latency_ratio": 0}}), "policy.max_latency_ratio"),
        (json!({"halt_fraction": 1.5}), "halt_fraction"),
        (json!({"halt_count": 0}), "halt_count"),
        (json!({"policy": {"bake_seconds": -1}}), "bake_seconds"),
        (json!({"policy": {"bake_secs": 10}}), "bake_secs"),
        (json!({"waves": [0, 100]}), "waves[0]"),
        (json!({"waves": [50, 20, 100]}), "waves[1]"),
        (json!({"waves": [10, 50]}), "waves[1]"),
        (json!({"waves": [10, 300]}), "waves"),
    ] {
        let mut body = json!({"version": "1.0.0", "target": "*"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = hub.post_json("/api/v1/models/digits/deploy", &hub.admin, body).await;
        let msg = expect_error(r, 422).await;
        assert!(msg.contains(field), "{extra}: {msg:?} should name {field}");
    }
    let list: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 0, "nothing was deployed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_reaches_the_subscribed_device() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0"]).await;
    let mut dev = Device::enroll(&hub, "edge-1", "a").await;
    dev.subscribe().await;
    assert!(dev.next_state().await.models.is_empty());
    let policy = json!({
        "phases": ["shadow", "canary:10", "full"], "bake_seconds": 60, "min_samples": 200,
        "max_latency_ratio": 1.5, "latency_slo_ms": 25.0, "max_error_rate": 0.01, "min_accuracy": 0.9,
        "max_accuracy_drop": 0.02, "min_shadow_agreement": 0.95, "standby_bake_seconds": 300,
        "min_accuracy_samples": 50, "max_restarts": 3
    });
    let d = deploy(&hub, json!({"version": "1.0.0", "target": "site=a", "policy": policy, "halt_count": 4})).await;
    assert_eq!(d["policy"], policy);
    assert_eq!(d["halt_fraction"], 0.2);
    assert_eq!(d["halt_count"], 4);

    let state = dev.state_where(|s| !s.models.is_empty()).await;
    let p = state.models[0].policy.clone().expect("the assignment carries the policy");
    assert_eq!(p.phases, ["shadow", "canary:10", "full"]);
    assert_eq!((p.bake_seconds, p.min_samples, p.standby_bake_seconds, p.min_accuracy_samples), (60, 200, 300, 50));
    assert_eq!((p.max_latency_ratio, p.latency_slo_ms, p.max_error_rate), (1.5, 25.0, 0.01));
    assert_eq!((p.min_accuracy, p.max_accuracy_drop, p.min_shadow_agreement), (0.9, 0.02, 0.95));
    assert_eq!(p.max_restarts, 3);

    let id = d["id"].as_i64().unwrap();
    let shown = deployment(&hub, id).await;
    assert_eq!(shown["policy"], policy);
    let list: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["deployments"][0]["policy"], policy);
    assert_eq!(list["deployments"][0]["halt_count"], 4);

    let spec: Value = hub.get("/api/v1/openapi.json", &hub.admin).await.json().await.unwrap();
    for schema in ["RolloutPolicy", "Rollup", "DeviceRollout"] {
        assert!(spec["components"]["schemas"][schema].is_object(), "{schema} is documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollup_counts_each_targeted_device_by_state() {
    let hub = TestHub::start().await;
    let (d1, d2, mut devices) = fleet_on_v2(&hub, json!({})).await;
    let mut elsewhere = Device::enroll(&hub, "edge-b", "b").await;
    elsewhere.report("2.0.0", "failed", "not targeted", d2).await;

    devices[0].report("2.0.0", "downloading", "", d2).await;
    devices[1].report("2.0.0", "shadow", "agreement 0.99", d2).await;
    devices[2].report("2.0.0", "serving", "", d2).await;
    devices[3].report("2.0.0", "refused", "signature by an unknown key", d2).await;
    // Still on the old deployment: pending for the new one.
    devices[4].report("1.0.0", "serving", "", d1).await;

    let v = deployment(&hub, d2).await;
    assert_eq!(v["state"], "active", "1 failed of 5 is not above 20%");
    let status = &v["status"];
    assert_eq!(status["targeted"], 5);
    assert_eq!(
        status["counts"],
        json!({"pending": 1, "downloading": 1, "validating": 0, "canary": 1, "serving": 1, "rolled_back": 0, "failed": 1})
    );
    let rows = status["devices"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[3]["device"], "edge-4");
    assert_eq!(rows[3]["state"], "failed");
    assert_eq!(rows[3]["version"], "2.0.0");
    assert_eq!(rows[3]["detail"], "signature by an unknown key");
    assert!(rows[3]["updated_ms"].as_i64().unwrap() > 0);
    assert_eq!(rows[4]["state"], "pending");
    assert!(rows[4]["version"].is_null());

    // The old deployment's own rollup counts edge-5 (it is superseded, so
    // no report halts it).
    assert_eq!(deployment(&hub, d1).await["status"]["counts"]["serving"], 1);
}

/// Issue 17: a superseded deployment showed its device "downloading 2.0.0"
/// forever (the agent reported the new download under the deployment it
/// was leaving), and "updated" moved with every heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_deployment_keeps_its_own_version_state_and_updated_is_the_last_change() {
    let hub = TestHub::start().await;
    let (d1, d2, mut devices) = fleet_on_v2(&hub, json!({})).await;
    let row = |v: &Value| v["status"]["devices"][0].clone();
    devices[0].report("1.0.0", "serving", "", d1).await;
    let first = row(&deployment(&hub, d1).await);
    assert_eq!((first["state"].as_str(), first["version"].as_str()), (Some("serving"), Some("1.0.0")));
    let since = first["updated_ms"].as_i64().unwrap();

    // A later report of the same state does not move "updated".
    while sentinel_hub::now_ms() <= since {
        tokio::task::yield_now().await;
    }
    devices[0].report("1.0.0", "serving", "", d1).await;
    assert_eq!(row(&deployment(&hub, d1).await)["updated_ms"], since, "the state did not change");

    // The new version's download reported under the old deployment is not
    // the old deployment's state: d1 keeps "serving 1.0.0".
    devices[0].report("2.0.0", "downloading", "", d1).await;
    let kept = row(&deployment(&hub, d1).await);
    assert_eq!((kept["state"].as_str(), kept["version"].as_str()), (Some("serving"), Some("1.0.0")), "{kept}");
    // Under its own deployment it counts, and a change of state moves "updated".
    devices[0].report("2.0.0", "downloading", "", d2).await;
    let new = row(&deployment(&hub, d2).await);
    assert_eq!(new["state"], "downloading");
    while sentinel_hub::now_ms() <= new["updated_ms"].as_i64().unwrap() {
        tokio::task::yield_now().await;
    }
    devices[0].report("2.0.0", "serving", "", d2).await;
    let served = row(&deployment(&hub, d2).await);
    assert_eq!(served["state"], "serving");
    assert!(served["updated_ms"].as_i64() > new["updated_ms"].as_i64(), "{served} after {new}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_five_bad_devices_halt_and_every_device_returns_to_the_previous_version() {
    let hub = TestHub::start().await;
    let (_d1, d2, mut devices) = fleet_on_v2(&hub, json!({"policy": {"min_accuracy": 0.9}})).await;

    devices[0].report("2.0.0", "rolled_back", ACCURACY, d2).await;
    devices[1].report("2.0.0", "serving", "", d2).await;
    let v = deployment(&hub, d2).await;
    assert_eq!(v["state"], "active", "1 of 5 (20%) is not above 20%");
    assert!(halt_audits(&hub).await.is_empty());

    devices[2].report("2.0.0", "failed", "worker crashed 3 times", d2).await;
    let v = deployment(&hub, d2).await;
    assert_eq!(v["state"], "halted", "2 of 5 (40%) is above 20%: {v}");
    let reason = v["halt_reason"].as_str().unwrap();
    assert!(reason.starts_with("2 of 5 devices rolled back or failed (40% > 20%)"), "{reason}");
    assert!(reason.contains(&format!("edge-1: {ACCURACY}")), "{reason}");
    assert!(reason.contains("edge-3: worker crashed 3 times"), "{reason}");

    // The previous version is deployed again, by the hub, and every
    // targeted device's next desired state names it.
    let list: Value = hub.get("/api/v1/deployments?state=active", &hub.admin).await.json().await.unwrap();
    let restored = &list["deployments"][0];
    assert_eq!((restored["version"].as_str(), restored["kind"].as_str()), (Some("1.0.0"), Some("rollback")));
    assert_eq!((restored["created_by"].as_str(), restored["replaces"].as_i64()), (Some("hub"), Some(d2)));
    let restored_id = restored["id"].as_i64().unwrap();
    for d in &mut devices {
        let next = d.next_state().await;
        assert_eq!(models(&next), [("1.0.0".to_owned(), restored_id)], "{}", d.id);
    }

    let audits = halt_audits(&hub).await;
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0]["action"], format!("HALT deployment {d2}"));
    assert_eq!(audits[0]["actor"], "hub");

    // More bad news about a halted deployment halts nothing again.
    devices[3].report("2.0.0", "rolled_back", ACCURACY, d2).await;
    assert_eq!(halt_audits(&hub).await.len(), 1);
    assert_eq!(deployment(&hub, d2).await["halt_reason"], reason);

    // Every device now reports the restored deployment; the halted one
    // keeps each device's last state for it rather than turning pending.
    for d in &mut devices {
        d.report("1.0.0", "serving", "", restored_id).await;
    }
    assert_eq!(deployment(&hub, restored_id).await["status"]["counts"]["serving"], 5);
    assert_eq!(
        deployment(&hub, d2).await["status"]["counts"],
        json!({"pending": 1, "downloading": 0, "validating": 0, "canary": 0, "serving": 1, "rolled_back": 2, "failed": 1})
    );

    // A new deploy works as usual.
    let d3 = deploy(&hub, json!({"version": "3.0.0", "target": "site=a"})).await["id"].as_i64().unwrap();
    assert_eq!(deployment(&hub, d3).await["state"], "active");
    for d in &mut devices {
        d.state_where(|s| models(s) == [("3.0.0".to_owned(), d3)]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_count_halts_below_the_fraction_and_with_no_earlier_version_removes_the_model() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0"]).await;
    let mut devices = Vec::new();
    for i in 1..=5 {
        let mut d = Device::enroll(&hub, &format!("edge-{i}"), "a").await;
        d.subscribe().await;
        d.next_state().await;
        devices.push(d);
    }
    let d = deploy(&hub, json!({"version": "1.0.0", "target": "site=a", "halt_fraction": 1.0, "halt_count": 1})).await;
    let id = d["id"].as_i64().unwrap();
    for dev in &mut devices {
        dev.state_where(|s| !s.models.is_empty()).await;
    }

    devices[4].report("1.0.0", "rolled_back", ACCURACY, id).await;
    let v = deployment(&hub, id).await;
    assert_eq!(v["state"], "halted");
    let reason = v["halt_reason"].as_str().unwrap();
    assert!(reason.starts_with("1 of 5 devices rolled back or failed (halt_count 1)"), "{reason}");
    let list: Value = hub.get("/api/v1/deployments?state=active", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 0, "there was no earlier version to bring back");
    for dev in &mut devices {
        assert!(dev.next_state().await.models.is_empty(), "{} no longer runs digits", dev.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deploys_with_a_policy_file_and_shows_counts_and_the_halt() {
    let hub = TestHub::start().await;
    let (_d1, _d2, mut devices) = fleet_on_v2(&hub, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "phases = [\"shadow\", \"full\"]\nbake_seconds = 30\nmin_accuracy = 0.8\nhalt_fraction = 0.5\n",
    )
    .unwrap();
    let r = sentinel(
        &hub,
        &hub.admin,
        &[
            "--json",
            "model",
            "deploy",
            "digits",
            "3.0.0",
            "--target",
            "site=a",
            "--policy",
            file.to_str().unwrap(),
            "--phases",
            "canary:10,full",
            "--min-accuracy",
            "0.9",
            "--halt-fraction",
            "0.2",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let d: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["policy"], json!({"phases": ["canary:10", "full"], "bake_seconds": 30, "min_accuracy": 0.9}));
    assert_eq!(d["halt_fraction"], 0.2, "the flag overrides the file");
    let id = d["id"].as_i64().unwrap();

    // A bad field is the hub's to refuse, by name.
    let r = sentinel(
        &hub,
        &hub.admin,
        &["model", "deploy", "digits", "3.0.0", "--target", "site=a", "--phases", "canary:0"],
    )
    .await;
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("policy.phases[0]"), "{}", r.stderr);

    devices[0].report("3.0.0", "rolled_back", ACCURACY, id).await;
    devices[1].report("3.0.0", "serving", "", id).await;
    devices[2].report("3.0.0", "rolled_back", "p95 latency 9.1 ms above 1.5x the old 3.0 ms", id).await;
    let r = sentinel(&hub, &hub.admin, &["deployments", "show", &id.to_string()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = &r.stdout;
    assert!(
        out.contains(
            "targeted 5: pending 2, downloading 0, validating 0, canary 0, serving 1, rolled_back 2, failed 0"
        ),
        "{out}"
    );
    assert!(out.contains("state: halted: 2 of 5 devices rolled back or failed (40% > 20%)"), "{out}");
    assert!(out.contains(&format!("edge-1: {ACCURACY}")), "{out}");
    assert!(out.contains("policy: phases canary:10,full; bake_seconds 30; min_accuracy 0.9"), "{out}");
    for dev in ["edge-1", "edge-2", "edge-3", "edge-4", "edge-5"] {
        assert!(out.contains(dev), "one row per device: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_that_cannot_work_are_refused_at_deploy_naming_why() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0"]).await;
    // The same model, declaring no accuracy: no default accuracy floor.
    let r = hub.upload("digits", "2.0.0", model_bytes(V1), "&stage=staging").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for (version, policy, why) in [
        // Comparisons with the old version, which answers nothing in `full`.
        ("1.0.0", json!({"phases": ["full"], "max_accuracy_drop": 0.05}), "policy.max_accuracy_drop"),
        ("1.0.0", json!({"phases": ["full"], "max_latency_ratio": 1.5}), "policy.max_latency_ratio"),
        // Without phases the default is `full` too.
        ("1.0.0", json!({"max_latency_ratio": 2.0}), "policy.max_latency_ratio"),
        // Nothing could roll it back: no latency check, every error
        // accepted, no accuracy floor.
        ("2.0.0", json!({"phases": ["full"], "max_error_rate": 1.0}), "cannot detect anything"),
        ("2.0.0", json!({"phases": ["full"], "max_error_rate": 1.0, "min_accuracy": 0}), "cannot detect anything"),
    ] {
        let body = json!({"version": version, "target": "*", "policy": policy});
        let r = hub.post_json("/api/v1/models/digits/deploy", &hub.admin, body).await;
        let msg = expect_error(r, 422).await;
        assert!(msg.contains(why), "{policy}: {msg:?} should say {why}");
    }
    let list: Value = hub.get("/api/v1/deployments", &hub.admin).await.json().await.unwrap();
    assert_eq!(list["total"], 0, "nothing was deployed");
    // What each check needs makes it usable: the declared accuracy is a
    // floor, a canary phase gives the ratio something to compare with.
    deploy(&hub, json!({"version": "1.0.0", "target": "*", "policy": {"phases": ["full"], "max_error_rate": 1.0}}))
        .await;
    deploy(
        &hub,
        json!({"version": "2.0.0", "target": "*", "policy": {"phases": ["canary:10", "full"], "max_error_rate": 1.0}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_effective_policy_is_printed_before_deploying_and_returned_by_get() {
    let hub = TestHub::start().await;
    push(&hub, &["1.0.0"]).await;
    let r = sentinel(
        &hub,
        &hub.admin,
        &[
            "--json",
            "model",
            "deploy",
            "digits",
            "1.0.0",
            "--target",
            "site=a",
            "--phases",
            "shadow,canary:10,full",
            "--max-latency-ratio",
            "1.5",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // The finding: these phases with a ratio and no counts ran on 0 samples
    // and 0 s. Printed before sending, with every default filled in,
    // including the floor from the declared 0.9694.
    let line = "effective policy: phases shadow,canary:10,full; bake_seconds 30; min_samples 100; \
                max_latency_ratio 1.5; max_error_rate 0.05; min_accuracy 0.9494; standby_bake_seconds 60; \
                min_accuracy_samples 50; max_restarts 3";
    assert!(r.stderr.contains(line), "{}", r.stderr);
    let d: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["policy"], json!({"phases": ["shadow", "canary:10", "full"], "max_latency_ratio": 1.5}));
    let effective = json!({
        "phases": ["shadow", "canary:10", "full"], "bake_seconds": 30, "min_samples": 100,
        "max_latency_ratio": 1.5, "max_error_rate": 0.05, "min_accuracy": 0.9494, "standby_bake_seconds": 60,
        "min_accuracy_samples": 50, "max_restarts": 3
    });
    assert_eq!(d["effective_policy"], effective);
    let id = d["id"].as_i64().unwrap();
    let shown = deployment(&hub, id).await;
    assert_eq!(shown["effective_policy"], effective);
    assert_eq!(shown["policy"], d["policy"], "what was asked stays as asked");

    // No policy at all: the agent's built-in default, `full` on 200 samples,
    // and no latency ratio (nothing to compare with).
    let d = deploy(&hub, json!({"version": "1.0.0", "target": "site=b"})).await;
    let shown = deployment(&hub, d["id"].as_i64().unwrap()).await;
    assert_eq!(
        shown["effective_policy"],
        json!({"phases": ["full"], "bake_seconds": 0, "min_samples": 200, "max_error_rate": 0.05,
               "min_accuracy": 0.9494, "standby_bake_seconds": 60, "min_accuracy_samples": 50, "max_restarts": 3})
    );
    let r = sentinel(&hub, &hub.admin, &["deployments", "show", &id.to_string()]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(&line["effective policy: ".len()..]), "{}", r.stdout);
}
