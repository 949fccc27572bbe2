//! Where a deployment stands on each device it targets, from the devices'
//! last reports, and whether that is bad enough to halt it.
//!
//! Pure functions over stored records: the caller reads them in one go.

use std::collections::BTreeMap;

use sentinel_proto::pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::fleet::target_of;
use crate::selector::Selector;
use crate::store::{DeploymentRecord, DeviceRecord};

/// The states of a deployment on one device, in rollout order.
pub const STATES: [&str; 7] = ["pending", "downloading", "validating", "canary", "serving", "rolled_back", "failed"];

/// Maps what an agent reports to a deployment state. `shadow` counts as
/// `canary` (the version is trying out), `refused` as `failed`; anything
/// else (e.g. `removed`, or a state a newer agent invents) as `pending`.
pub fn deployment_state(agent_state: &str) -> &'static str {
    match agent_state {
        "downloading" => "downloading",
        "validating" => "validating",
        "canary" | "shadow" => "canary",
        "serving" => "serving",
        "rolled_back" => "rolled_back",
        "failed" | "refused" => "failed",
        _ => "pending",
    }
}

/// Whether a state counts against the deployment.
pub fn is_bad(state: &str) -> bool {
    matches!(state, "rolled_back" | "failed")
}

/// One targeted device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceRollout {
    pub device: String,
    /// One of `pending`, `downloading`, `validating`, `canary`, `serving`, `rolled_back`, `failed`.
    pub state: String,
    /// The version the device reports for this deployment (absent while pending).
    pub version: Option<String>,
    /// The device's reason, e.g. why it rolled back.
    pub detail: String,
    /// When the hub received the report this state comes from.
    pub updated_ms: Option<i64>,
}

/// A deployment across the devices it targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rollup {
    /// Devices the deployment's selector matches.
    pub targeted: u64,
    /// Devices per state; every state is present.
    pub counts: BTreeMap<String, u64>,
    /// Sorted by device id.
    pub devices: Vec<DeviceRollout>,
}

impl Rollup {
    /// Devices that rolled back or failed.
    pub fn bad(&self) -> u64 {
        self.counts.iter().filter(|(s, _)| is_bad(s)).map(|(_, n)| n).sum()
    }
}

/// The model statuses of a stored report.
pub fn reported_models(report: Option<&serde_json::Value>) -> Vec<pb::ModelStatus> {
    report.and_then(|r| serde_json::from_value::<pb::AgentReport>(r.clone()).ok()).map(|r| r.models).unwrap_or_default()
}

/// Whether `d` targets `device`, by the rule the fleet uses: enrolment
/// labels (over self-reported ones) and the hardware of the last hello.
pub fn targets(selector: &Selector, device: &DeviceRecord) -> bool {
    let hello = device.hello.as_ref().and_then(|h| serde_json::from_value::<pb::Hello>(h.clone()).ok());
    let t = target_of(device, hello.as_ref());
    selector.matches(&t.labels, &t.hardware)
}

/// Where `d` stands on each device it targets. A device's state is that of
/// its last report for the model when the report is about this deployment,
/// else `pending`.
pub fn rollup(d: &DeploymentRecord, devices: &[DeviceRecord]) -> Rollup {
    let mut counts: BTreeMap<String, u64> = STATES.iter().map(|s| ((*s).to_owned(), 0)).collect();
    let mut out = Vec::new();
    // A selector that no longer parses (stored by an older hub) targets no
    // one, as in the fleet.
    let Ok(selector) = Selector::parse(&d.target) else {
        return Rollup { targeted: 0, counts, devices: out };
    };
    for device in devices.iter().filter(|dev| targets(&selector, dev)) {
        let status =
            reported_models(device.report.as_ref()).into_iter().find(|m| m.name == d.model && m.deployment_id == d.id);
        let row = match status {
            Some(m) => DeviceRollout {
                device: device.id.clone(),
                state: deployment_state(&m.state).to_owned(),
                version: Some(m.version),
                detail: m.detail,
                updated_ms: device.report_at_ms,
            },
            None => DeviceRollout {
                device: device.id.clone(),
                state: "pending".into(),
                version: None,
                detail: String::new(),
                updated_ms: None,
            },
        };
        *counts.entry(row.state.clone()).or_default() += 1;
        out.push(row);
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Rollup { targeted: u64::try_from(out.len()).unwrap_or(u64::MAX), counts, devices: out }
}

/// Why `d` must halt given `r`, or `None` while it may go on. It halts when
/// the share of devices that rolled back or failed is strictly above
/// `halt_fraction`, or when their number reaches `halt_count`.
pub fn halt_reason(d: &DeploymentRecord, r: &Rollup) -> Option<String> {
    let bad = r.bad();
    if bad == 0 || r.targeted == 0 {
        return None;
    }
    let share = bad as f64 / r.targeted as f64;
    let why = if share > d.halt_fraction {
        format!(
            "{bad} of {} devices rolled back or failed ({:.0}% > {:.0}%)",
            r.targeted,
            share * 100.0,
            d.halt_fraction * 100.0
        )
    } else if let Some(count) = d.halt_count.filter(|c| bad >= u64::from(*c)) {
        format!("{bad} of {} devices rolled back or failed (halt_count {count})", r.targeted)
    } else {
        return None;
    };
    let devices: Vec<String> = r
        .devices
        .iter()
        .filter(|dev| is_bad(&dev.state))
        .map(|dev| if dev.detail.is_empty() { dev.device.clone() } else { format!("{}: {}", dev.device, dev.detail) })
        .collect();
    Some(format!("{why}: {}", devices.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, site: &str, report: Option<serde_json::Value>) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            labels: [("site".to_owned(), site.to_owned())].into(),
            hardware: vec![],
            agent_version: String::new(),
            created_at_ms: 0,
            created_by: "t".into(),
            last_seen_ms: None,
            hello: None,
            report,
            report_at_ms: Some(7),
        }
    }

    fn status(state: &str, deployment_id: i64) -> serde_json::Value {
        serde_json::json!({"device_id": "x", "applied_revision": 1, "events": [], "sent_at_unix_ms": 0,
            "agent_version": "", "models": [{"name": "m", "version": "2.0.0", "state": state,
            "detail": format!("why {state}"), "deployment_id": deployment_id}]})
    }

    fn deployment(halt_fraction: f64, halt_count: Option<u32>) -> DeploymentRecord {
        DeploymentRecord {
            id: 2,
            model: "m".into(),
            version: "2.0.0".into(),
            target: "site=a".into(),
            kind: "deploy".into(),
            state: "active".into(),
            created_by: "t".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            replaces: None,
            policy: None,
            halt_fraction,
            halt_count,
            halt_reason: None,
        }
    }

    #[test]
    fn counts_targeted_devices_by_state() {
        let devices = vec![
            device("a", "a", Some(status("shadow", 2))),
            device("b", "a", Some(status("refused", 2))),
            device("c", "a", Some(status("serving", 1))),
            device("d", "a", None),
            device("e", "b", Some(status("failed", 2))),
        ];
        let r = rollup(&deployment(0.2, None), &devices);
        assert_eq!(r.targeted, 4);
        assert_eq!(r.counts["canary"], 1);
        assert_eq!(r.counts["failed"], 1);
        assert_eq!(r.counts["pending"], 2, "a report about another deployment is pending for this one");
        assert_eq!(r.devices[1].detail, "why refused");
        assert_eq!(r.devices[2].version, None);
    }

    #[test]
    fn halts_strictly_above_the_fraction_or_at_the_count() {
        let mut devices: Vec<DeviceRecord> =
            (0..5).map(|i| device(&format!("d{i}"), "a", Some(status("serving", 2)))).collect();
        devices[0].report = Some(status("rolled_back", 2));
        let d = deployment(0.2, None);
        assert_eq!(halt_reason(&d, &rollup(&d, &devices)), None, "1 of 5 is not above 20%");
        let with_count = deployment(0.2, Some(1));
        let why = halt_reason(&with_count, &rollup(&with_count, &devices)).expect("halt_count 1");
        assert!(why.contains("halt_count 1") && why.contains("d0: why rolled_back"), "{why}");
        devices[3].report = Some(status("failed", 2));
        let why = halt_reason(&d, &rollup(&d, &devices)).expect("2 of 5 is above 20%");
        assert!(why.starts_with("2 of 5 devices rolled back or failed (40% > 20%): d0: why rolled_back"), "{why}");
    }
}
