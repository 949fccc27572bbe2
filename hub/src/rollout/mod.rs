//! Health watching on the hub: rollout policies, where each deployment
//! stands on its devices, and halting a deployment too many devices gave up on.
//!
//! Devices judge a new version themselves (their rollout policy says how)
//! and roll back locally; the hub watches the fleet as a whole. When a
//! report changes a device's state for an active deployment, the hub
//! recomputes that deployment's rollup and, past its halt thresholds, halts
//! it: the deployment becomes `halted` with a reason, the version it
//! replaced is deployed again (a `rollback` deployment by `hub`, or nothing
//! when there was no earlier version), and every connected device gets its
//! new desired state.
//!
//! # Layout
//! - [`policy`]: the rollout policy and halt thresholds, and their validation.
//! - [`rollup`]: the per-device states of a deployment and the halt rule.
//! - [`waves`]: staged rollouts, a percentage of the fleet at a time.

pub mod policy;
pub mod rollup;
pub mod waves;

use std::collections::BTreeSet;

use sentinel_proto::pb;

pub use policy::{DEFAULT_HALT_FRACTION, PolicyError, RolloutPolicy, validate_halt};
pub use rollup::{Rollup, rollup};

use crate::api::{ApiError, SharedState};
use crate::store::{AuditEntry, DeploymentRecord, HaltOutcome, NewDeployment};

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
            && d.state != "halted"
    })
}

/// Deployments whose state on a device differs between its previous report
/// and `new`: those are the ones worth re-checking.
pub fn changed_deployments(old: Option<&serde_json::Value>, new: &[pb::ModelStatus]) -> BTreeSet<i64> {
    let old = rollup::reported_models(old);
    new.iter()
        .filter(|m| m.deployment_id > 0)
        .filter(|m| {
            let now = (m.deployment_id, rollup::deployment_state(&m.state));
            old.iter().find(|o| o.name == m.name).map(|o| (o.deployment_id, rollup::deployment_state(&o.state)))
                != Some(now)
        })
        .map(|m| m.deployment_id)
        .collect()
}

/// Re-checks the deployments a device's report changed; halts those past
/// their thresholds. Failures are logged: the report itself is stored, and
/// the next report checks again.
pub async fn watch_report(state: &SharedState, device: &str, old: Option<&serde_json::Value>, new: &[pb::ModelStatus]) {
    for id in changed_deployments(old, new) {
        if let Err(e) = check_deployment(state, id).await {
            tracing::error!(device, deployment = id, error = %e.message, "checking the deployment's health failed");
        }
    }
}

/// What a halt did, for logs and callers.
#[derive(Debug, Clone)]
pub struct Halt {
    pub deployment: DeploymentRecord,
    pub reason: String,
    /// The deployment that brings the previous version back, if any.
    pub restored: Option<DeploymentRecord>,
}

/// Halts deployment `id` if it is active and past its thresholds, then
/// publishes the fleet's new desired state; else widens a staged rollout
/// whose current wave is done ([`widen`]). A deployment is halted at most
/// once, however many reports race here: the store only halts an active one.
pub async fn check_deployment(state: &SharedState, id: i64) -> Result<Option<Halt>, ApiError> {
    enum Checked {
        Nothing,
        Halted(Box<Halt>),
        Staged(Box<DeploymentRecord>),
    }
    let checked = state
        .meta(move |m| {
            let Some(d) = m.get_deployment(id)? else { return Ok(Checked::Nothing) };
            if d.state != "active" {
                return Ok(Checked::Nothing);
            }
            let r = rollup(&d, &m.list_devices()?, &m.deployment_devices(d.id)?);
            let Some(reason) = rollup::halt_reason(&d, &r) else {
                return Ok(if d.waves.is_empty() { Checked::Nothing } else { Checked::Staged(Box::new(d)) });
            };
            let history = m.list_deployments(Some(&d.model), None, u32::MAX, 0)?.0;
            let mut previous = None;
            for earlier in earlier_deployments(&history, &d) {
                // A version deleted since cannot come back.
                if m.get_version(&d.model, &earlier.version)?.is_some() {
                    previous = Some(earlier.version.clone());
                    break;
                }
            }
            let restore = previous.map(|version| NewDeployment {
                model: d.model.clone(),
                version,
                target: d.target.clone(),
                kind: "rollback".into(),
                created_by: "hub".into(),
                replaces: Some(d.id),
                // The previous version ran before; it goes back with the
                // agent's default policy and halt thresholds.
                policy: None,
                halt_fraction: DEFAULT_HALT_FRACTION,
                halt_count: None,
                // Everyone goes back at once.
                waves: Vec::new(),
            });
            let now = crate::now_ms();
            let HaltOutcome::Halted { restored } = m.halt_deployment(d.id, &reason, restore.as_ref(), now)? else {
                return Ok(Checked::Nothing);
            };
            let back = match &restored {
                Some(r) => format!("; {} {} is back on [{}] (deployment {})", r.model, r.version, r.target, r.id),
                None => format!("; no earlier version: {} is removed from [{}]", d.model, d.target),
            };
            m.append_audit(&AuditEntry {
                id: 0,
                at_ms: now,
                actor: "hub".into(),
                role: "system".into(),
                action: format!("HALT deployment {}", d.id),
                status: 200,
                outcome: "ok".into(),
                detail: format!("{} {}: {reason}{back}", d.model, d.version),
            })?;
            Ok(Checked::Halted(Box::new(Halt { deployment: d, reason, restored: restored.map(|r| *r) })))
        })
        .await?;
    let halt = match checked {
        Checked::Nothing => None,
        Checked::Halted(h) => Some(*h),
        Checked::Staged(d) => {
            widen(state, *d).await?;
            None
        }
    };
    if let Some(h) = &halt {
        state.metrics.deployment_halts.inc();
        tracing::warn!(
            deployment = h.deployment.id,
            model = %h.deployment.model,
            version = %h.deployment.version,
            restored = ?h.restored.as_ref().map(|r| &r.version),
            reason = %h.reason,
            "deployment halted"
        );
        crate::api::push_to_fleet(state).await;
    }
    Ok(halt)
}

/// Widens staged deployment `d` while its current wave is done (a wave that
/// reaches no device is done at once), records each step in the audit log
/// and publishes the fleet's new desired state. Returns the deployment as
/// it now stands.
pub async fn widen(state: &SharedState, d: DeploymentRecord) -> Result<DeploymentRecord, ApiError> {
    let (d, widened) = state
        .meta(move |m| {
            let mut d = d;
            let mut widened = false;
            loop {
                if d.state != "active" || usize::try_from(d.wave + 1).map_or(true, |next| next >= d.waves.len()) {
                    return Ok((d, widened));
                }
                let r = rollup(&d, &m.list_devices()?, &m.deployment_devices(d.id)?);
                if !r.wave_done() {
                    return Ok((d, widened));
                }
                let now = crate::now_ms();
                let Some(next) = m.advance_wave(d.id, d.wave, now)? else { return Ok((d, widened)) };
                let percent = waves::current_percent(&next.waves, next.wave);
                m.append_audit(&AuditEntry {
                    id: 0,
                    at_ms: now,
                    actor: "hub".into(),
                    role: "system".into(),
                    action: format!("WIDEN deployment {}", next.id),
                    status: 200,
                    outcome: "ok".into(),
                    detail: format!(
                        "{} {} on [{}]: {} of {} devices in the {}% wave serve it; widening to {percent}%",
                        next.model,
                        next.version,
                        next.target,
                        r.counts.get("serving").copied().unwrap_or(0),
                        r.targeted,
                        r.wave_percent
                    ),
                })?;
                d = next;
                widened = true;
            }
        })
        .await?;
    if widened {
        tracing::info!(deployment = d.id, percent = waves::current_percent(&d.waves, d.wave), "deployment widened");
        crate::api::push_to_fleet(state).await;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
