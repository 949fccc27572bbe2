//! Deployments as the hub runs them: deploying, rolling back, halting a
//! deployment too many devices gave up on, widening a staged rollout, and
//! watching what devices report.
//!
//! Devices judge a new version themselves (their rollout policy says how)
//! and roll back locally; the hub watches the fleet as a whole. When a
//! report changes a device's state for an active deployment, the hub
//! recomputes that deployment's rollup and, past its halt thresholds, halts
//! it: the deployment becomes `halted` with a reason, the version it
//! replaced is deployed again (a `rollback` deployment by `hub`, or nothing
//! when there was no earlier version), and every connected device gets its
//! new desired state.

use sentinel_proto::pb;

use super::fleet::push_to_fleet;
use super::{ServiceError, SharedState};
use crate::rollout::{DEFAULT_HALT_FRACTION, waves};
use crate::rollup::{Rollup, changed_deployments, earlier_deployments, halt_reason, rollup};
use crate::store::{
    AuditEntry, AuditOutcome, DeploymentKind, DeploymentRecord, DeploymentState, HaltOutcome, NewDeployment,
};

/// Stores a new deployment (superseding what it replaces) and pushes the
/// fleet its new desired state. A staged one whose first wave holds no
/// device yet widens at once. Returns the deployment as it now stands.
pub async fn create(state: &SharedState, new: NewDeployment) -> Result<DeploymentRecord, ServiceError> {
    let d = state.meta(move |m| m.insert_deployment(&new, crate::now_ms())).await?;
    push_to_fleet(state).await;
    if d.waves.is_empty() { Ok(d) } else { widen(state, d).await }
}

/// Deployment `id`, where it stands on each targeted device, and the
/// version's signed manifest (for its declared accuracy); `None` if there is
/// no such deployment.
pub async fn status(
    state: &SharedState,
    id: i64,
) -> Result<Option<(DeploymentRecord, Rollup, Option<Vec<u8>>)>, ServiceError> {
    state
        .meta(move |m| {
            let Some(d) = m.get_deployment(id)? else { return Ok(None) };
            let status = rollup(&d, &m.list_devices()?, &m.deployment_devices(d.id)?);
            let manifest = m.get_version(&d.model, &d.version)?.map(|v| v.manifest);
            Ok(Some((d, status, manifest)))
        })
        .await
}

/// Re-checks the deployments a device's report changed; halts those past
/// their thresholds. Failures are logged: the report itself is stored, and
/// the next report checks again.
pub async fn watch_report(state: &SharedState, device: &str, old: Option<&serde_json::Value>, new: &[pb::ModelStatus]) {
    for id in changed_deployments(old, new) {
        if let Err(e) = check_deployment(state, id).await {
            tracing::error!(device, deployment = id, error = %e, "checking the deployment's health failed");
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
pub async fn check_deployment(state: &SharedState, id: i64) -> Result<Option<Halt>, ServiceError> {
    enum Checked {
        Nothing,
        Halted(Box<Halt>),
        Staged(Box<DeploymentRecord>),
    }
    let checked = state
        .meta(move |m| {
            let Some(d) = m.get_deployment(id)? else { return Ok(Checked::Nothing) };
            if d.state != DeploymentState::Active {
                return Ok(Checked::Nothing);
            }
            let r = rollup(&d, &m.list_devices()?, &m.deployment_devices(d.id)?);
            let Some(reason) = halt_reason(&d, &r) else {
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
                kind: DeploymentKind::Rollback,
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
                outcome: AuditOutcome::Ok,
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
        state.metrics().deployment_halts.inc();
        tracing::warn!(
            deployment = h.deployment.id,
            model = %h.deployment.model,
            version = %h.deployment.version,
            restored = ?h.restored.as_ref().map(|r| &r.version),
            reason = %h.reason,
            "deployment halted"
        );
        push_to_fleet(state).await;
    }
    Ok(halt)
}

/// Widens staged deployment `d` while its current wave is done (a wave that
/// reaches no device is done at once), records each step in the audit log
/// and publishes the fleet's new desired state. Returns the deployment as
/// it now stands.
pub async fn widen(state: &SharedState, d: DeploymentRecord) -> Result<DeploymentRecord, ServiceError> {
    let (d, widened) = state
        .meta(move |m| {
            let mut d = d;
            let mut widened = false;
            loop {
                if d.state != DeploymentState::Active
                    || usize::try_from(d.wave + 1).map_or(true, |next| next >= d.waves.len())
                {
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
                    outcome: AuditOutcome::Ok,
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
        push_to_fleet(state).await;
    }
    Ok(d)
}
