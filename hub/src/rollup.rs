//! Where a deployment stands on each device it targets, from the devices'
//! last reports, and whether that is bad enough to halt it.
//!
//! Pure functions over stored records: the caller reads them in one go.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sentinel_proto::pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::records::{DeploymentDevice, DeploymentRecord, DeploymentState, DeviceRecord, DeviceState};
use crate::rollout::waves;
use crate::selector::Selector;
use crate::targeting::target_of;

/// One targeted device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceRollout {
    pub device: String,
    /// One of `pending`, `downloading`, `validating`, `canary`, `serving`, `rolled_back`, `failed`.
    #[schema(value_type = String)]
    pub state: DeviceState,
    /// The version the device reports for this deployment (absent while pending).
    pub version: Option<String>,
    /// The device's reason, e.g. why it rolled back.
    pub detail: String,
    /// When this state began: the hub's receipt of the first report of it
    /// (later reports of the same state leave it).
    pub updated_ms: Option<i64>,
}

/// A deployment across the devices it targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rollup {
    /// Devices the deployment's selector matches and its current wave
    /// reaches (all of them without waves).
    pub targeted: u64,
    /// The percentage of matching devices the current wave reaches.
    pub wave_percent: u8,
    /// Matching devices outside the current wave: they keep the version
    /// this deployment replaces until it widens to them.
    pub waiting: u64,
    /// Devices per state; every state is present.
    pub counts: BTreeMap<String, u64>,
    /// Sorted by device id.
    pub devices: Vec<DeviceRollout>,
}

impl Rollup {
    /// Devices that rolled back or failed.
    pub fn bad(&self) -> u64 {
        let bad = |s: &str| s.parse::<DeviceState>().is_ok_and(DeviceState::is_bad);
        self.counts.iter().filter(|(s, _)| bad(s)).map(|(_, n)| n).sum()
    }

    /// Whether every device of the current wave serves the version (also
    /// when the wave reaches no device yet): time to widen.
    pub fn wave_done(&self) -> bool {
        self.counts.get(DeviceState::Serving.as_str()).copied().unwrap_or(0) == self.targeted
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

/// Where `d` stands on each device it targets: the device's last reported
/// state for this deployment (`reported`, from
/// [`DeviceStore::deployment_devices`](crate::store::DeviceStore::deployment_devices)),
/// or `pending` if it never reported one. The states stay after devices move
/// on, so a halted or superseded deployment shows how far it got. Once `d`
/// is no longer active, devices enrolled after it ended are not counted.
pub fn rollup(d: &DeploymentRecord, devices: &[DeviceRecord], reported: &[DeploymentDevice]) -> Rollup {
    let mut counts: BTreeMap<String, u64> = DeviceState::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect();
    let mut out = Vec::new();
    // A selector that no longer parses (stored by an older hub) targets no
    // one, as in the fleet.
    let wave_percent = waves::current_percent(&d.waves, d.wave);
    let Ok(selector) = Selector::parse(&d.target) else {
        return Rollup { targeted: 0, wave_percent, waiting: 0, counts, devices: out };
    };
    let ended = d.state != DeploymentState::Active;
    let mut waiting = 0;
    // By device: the rollup runs on every report that changes a state, over fleets of thousands.
    let reported: HashMap<&str, &DeploymentDevice> = reported.iter().map(|r| (r.device_id.as_str(), r)).collect();
    for device in devices.iter().filter(|dev| targets(&selector, dev)) {
        let status = reported.get(device.id.as_str()).copied();
        if ended && status.is_none() && device.created_at_ms > d.updated_at_ms {
            continue;
        }
        if status.is_none() && !waves::in_wave(d.id, &d.waves, d.wave, &device.id) {
            waiting += 1;
            continue;
        }
        let row = match status {
            Some(r) => DeviceRollout {
                device: device.id.clone(),
                state: DeviceState::from_agent(&r.state),
                version: Some(r.version.clone()),
                detail: r.detail.clone(),
                updated_ms: Some(r.updated_ms),
            },
            None => DeviceRollout {
                device: device.id.clone(),
                state: DeviceState::Pending,
                version: None,
                detail: String::new(),
                updated_ms: None,
            },
        };
        *counts.entry(row.state.as_str().to_owned()).or_default() += 1;
        out.push(row);
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Rollup { targeted: u64::try_from(out.len()).unwrap_or(u64::MAX), wave_percent, waiting, counts, devices: out }
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
        .filter(|dev| dev.state.is_bad())
        .map(|dev| if dev.detail.is_empty() { dev.device.clone() } else { format!("{}: {}", dev.device, dev.detail) })
        .collect();
    Some(format!("{why}: {}", devices.join("; ")))
}

/// Earlier deployments of another version to the same target, newest
/// first: the candidates to go back to. Halted versions are never chosen.
/// `history` is newest first.
pub fn earlier_deployments<'a>(
    history: &'a [DeploymentRecord],
    current: &'a DeploymentRecord,
) -> impl Iterator<Item = &'a DeploymentRecord> + 'a {
    history.iter().filter(move |d| {
        d.model == current.model
            && d.target == current.target
            && d.id < current.id
            && d.version != current.version
            && d.state != DeploymentState::Halted
    })
}

/// Deployments whose state on a device differs between its previous report
/// and `new`: those are the ones worth re-checking.
pub fn changed_deployments(old: Option<&serde_json::Value>, new: &[pb::ModelStatus]) -> BTreeSet<i64> {
    let old = reported_models(old);
    new.iter()
        .filter(|m| m.deployment_id > 0)
        .filter(|m| {
            let now = (m.deployment_id, DeviceState::from_agent(&m.state));
            old.iter().find(|o| o.name == m.name).map(|o| (o.deployment_id, DeviceState::from_agent(&o.state)))
                != Some(now)
        })
        .map(|m| m.deployment_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::DeploymentKind;

    fn device(id: &str, site: &str, created_at_ms: i64) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            labels: [("site".to_owned(), site.to_owned())].into(),
            hardware: vec![],
            agent_version: String::new(),
            created_at_ms,
            created_by: "t".into(),
            last_seen_ms: None,
            hello: None,
            report: None,
            report_at_ms: None,
        }
    }

    fn reported(device: &str, state: &str) -> DeploymentDevice {
        DeploymentDevice {
            device_id: device.into(),
            version: "2.0.0".into(),
            state: state.into(),
            detail: format!("why {state}"),
            updated_ms: 7,
        }
    }

    fn deployment(halt_fraction: f64, halt_count: Option<u32>) -> DeploymentRecord {
        DeploymentRecord {
            id: 2,
            model: "m".into(),
            version: "2.0.0".into(),
            target: "site=a".into(),
            kind: DeploymentKind::Deploy,
            state: DeploymentState::Active,
            created_by: "t".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            replaces: None,
            policy: None,
            halt_fraction,
            halt_count,
            halt_reason: None,
            waves: Vec::new(),
            wave: 0,
        }
    }

    #[test]
    fn counts_targeted_devices_by_state() {
        let devices: Vec<DeviceRecord> = [("a", "a"), ("b", "a"), ("c", "a"), ("d", "a"), ("e", "b")]
            .iter()
            .map(|(id, site)| device(id, site, 0))
            .collect();
        let states = [reported("a", "shadow"), reported("b", "refused"), reported("e", "failed")];
        let r = rollup(&deployment(0.2, None), &devices, &states);
        assert_eq!(r.targeted, 4, "e is at another site");
        assert_eq!(r.counts["canary"], 1);
        assert_eq!(r.counts["failed"], 1);
        assert_eq!(r.counts["pending"], 2, "no state reported for this deployment: pending");
        assert_eq!((r.devices[1].detail.as_str(), r.devices[1].updated_ms), ("why refused", Some(7)));
        assert_eq!(r.devices[2].version, None);
    }

    #[test]
    fn an_ended_deployment_keeps_its_states_and_ignores_later_devices() {
        let mut d = deployment(0.2, None);
        d.state = DeploymentState::Halted;
        d.updated_at_ms = 100;
        let devices = vec![device("a", "a", 10), device("b", "a", 20), device("late", "a", 200)];
        let r = rollup(&d, &devices, &[reported("a", "rolled_back")]);
        assert_eq!(r.targeted, 2, "late was enrolled after the halt: {r:?}");
        assert_eq!((r.counts["rolled_back"], r.counts["pending"]), (1, 1));
        d.state = DeploymentState::Active;
        assert_eq!(rollup(&d, &devices, &[]).targeted, 3, "an active deployment targets newcomers");
    }

    #[test]
    fn halts_strictly_above_the_fraction_or_at_the_count() {
        let devices: Vec<DeviceRecord> = (0..5).map(|i| device(&format!("d{i}"), "a", 0)).collect();
        let mut states: Vec<DeploymentDevice> = (0..5).map(|i| reported(&format!("d{i}"), "serving")).collect();
        states[0].state = "rolled_back".into();
        states[0].detail = "why rolled_back".into();
        let d = deployment(0.2, None);
        assert_eq!(halt_reason(&d, &rollup(&d, &devices, &states)), None, "1 of 5 is not above 20%");
        let with_count = deployment(0.2, Some(1));
        let why = halt_reason(&with_count, &rollup(&with_count, &devices, &states)).expect("halt_count 1");
        assert!(why.contains("halt_count 1") && why.contains("d0: why rolled_back"), "{why}");
        states[3].state = "failed".into();
        let why = halt_reason(&d, &rollup(&d, &devices, &states)).expect("2 of 5 is above 20%");
        assert!(why.starts_with("2 of 5 devices rolled back or failed (40% > 20%): d0: why rolled_back"), "{why}");
    }

    fn status(name: &str, state: &str, deployment_id: i64) -> pb::ModelStatus {
        pb::ModelStatus {
            name: name.into(),
            version: "1.0.0".into(),
            state: state.into(),
            detail: String::new(),
            deployment_id,
        }
    }

    #[test]
    fn only_changed_states_are_rechecked() {
        let old = serde_json::json!({"device_id": "d", "applied_revision": 1, "events": [], "sent_at_unix_ms": 0,
            "agent_version": "", "models": [
                {"name": "a", "version": "1.0.0", "state": "canary", "detail": "", "deployment_id": 4},
                {"name": "b", "version": "1.0.0", "state": "serving", "detail": "", "deployment_id": 5}]});
        let new = [status("a", "shadow", 4), status("b", "rolled_back", 5), status("c", "pending", 6)];
        let changed: Vec<i64> = changed_deployments(Some(&old), &new).into_iter().collect();
        assert_eq!(changed, [5, 6], "shadow and canary are the same deployment state");
        assert!(
            changed_deployments(None, &[status("a", "failed", 0)]).is_empty(),
            "no deployment id, nothing to check"
        );
    }
}
