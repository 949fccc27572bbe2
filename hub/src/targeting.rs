//! Which devices a deployment reaches and what each device should run:
//! the rule the fleet pushes by and the rollups count by.
//!
//! Pure functions over records; the caller reads them from the store.

use std::collections::BTreeMap;

use sentinel_proto::pb;

use crate::records::{DeploymentRecord, DeviceRecord, VersionRecord};
use crate::selector::Selector;

/// What the hub knows of a device while it is connected.
#[derive(Debug, Clone)]
pub struct Target {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub hardware: Vec<String>,
}

/// A model version a device should run, with the deployment that put it there.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub deployment: DeploymentRecord,
    pub version: VersionRecord,
}

/// Looks a version up by model and version.
pub type VersionLookup<'a, E> = dyn FnMut(&str, &str) -> Result<Option<VersionRecord>, E> + 'a;

/// The assignments for a device: for each model, the newest active
/// deployment whose selector matches the device and whose current wave
/// reaches it (a staged rollout leaves the others on the deployment it
/// replaces, which stays active until the last wave).
pub fn assignments_for<E>(
    active: &[DeploymentRecord],
    versions: &mut VersionLookup<'_, E>,
    target: &Target,
) -> Result<Vec<Assignment>, E> {
    let mut chosen: BTreeMap<&str, &DeploymentRecord> = BTreeMap::new();
    for d in active {
        let Ok(sel) = Selector::parse(&d.target) else { continue };
        if !sel.matches(&target.labels, &target.hardware)
            || !crate::rollout::waves::in_wave(d.id, &d.waves, d.wave, &target.device_id)
        {
            continue;
        }
        match chosen.get(d.model.as_str()) {
            Some(existing) if existing.id > d.id => {}
            _ => {
                chosen.insert(&d.model, d);
            }
        }
    }
    let mut out = Vec::with_capacity(chosen.len());
    for d in chosen.into_values() {
        if let Some(v) = versions(&d.model, &d.version)? {
            out.push(Assignment { deployment: d.clone(), version: v });
        }
    }
    Ok(out)
}

/// Effective targeting facts: labels set at enrolment win over what the
/// device says about itself; hardware comes from the device.
pub fn target_of(device: &DeviceRecord, hello: Option<&pb::Hello>) -> Target {
    let mut labels = device.labels.clone();
    let mut hardware = device.hardware.clone();
    if let Some(h) = hello {
        for (k, v) in &h.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        hardware = h.hardware.clone();
    }
    Target { device_id: device.id.clone(), labels, hardware }
}
