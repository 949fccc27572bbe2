//! The apply loop: makes the device match the latest verified desired
//! state. For each model it refuses it if the hardware does not fit,
//! downloads and verifies what is missing, and switches the active version in
//! one committed step. A failure leaves the previous version active.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use sentinel_proto::VerifiedState;
use sentinel_proto::pb::{ModelAssignment, ModelManifest};
use sentinel_proto::publisher::{BundleError, MAX_BUNDLE_BYTES, PublisherKey, Verified, short_key_id, verify_bundle};
use tokio::sync::watch;

use crate::download::{self, Wanted};
use crate::rollout::controller::{HUB, Rollouts};
use crate::serving::{Install, ValidationSet};
use crate::state::Shared;
use crate::store::{EventKind, ModelStatus};
use crate::util::error_chain;

/// Applies every new verified state until `stop` turns true.
pub async fn run(
    shared: Arc<Shared>,
    rollouts: Arc<Rollouts>,
    http: reqwest::Client,
    mut states: watch::Receiver<Option<Arc<VerifiedState>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = states.borrow_and_update().clone();
        if let Some(v) = current {
            // `view.revision` was set when the state was verified (Shared::verified_state).
            apply(&shared, &rollouts, &http, &v).await;
            shared.applied(v.state.revision);
        }
        tokio::select! {
            r = states.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Makes the device match one verified state.
async fn apply(shared: &Arc<Shared>, rollouts: &Rollouts, http: &reqwest::Client, v: &VerifiedState) {
    let config = &shared.config;
    let mut wanted_files = HashSet::new();
    for (assignment, m) in v.state.models.iter().zip(&v.manifests) {
        wanted_files.insert(m.sha256.clone());
        if let Some(set) = &m.validation {
            wanted_files
                .extend([set.inputs.as_ref(), set.labels.as_ref()].into_iter().flatten().map(|b| b.sha256.clone()));
        }
        // A rollout of another version is superseded by this state.
        if rollouts.keep_or_cancel(&m.name, &m.sha256, &m.version).await {
            continue;
        }
        if let Ok(Some((revision, reason))) = shared.store.rejected(&m.name, &m.sha256, &m.version)
            && revision >= v.state.revision
        {
            tracing::info!(model = %m.name, version = %m.version, revision, "rolled back here at this revision; not retried");
            shared.set_status(&m.name, ModelStatus::RolledBack, &m.version, &reason, Some(assignment.deployment_id));
            continue;
        }
        // The version this device keeps warm as standby (the hub halted or
        // rolled back the active one): swap back at once instead of loading
        // it again. Then it is the active version, and handled as such below.
        let standby_is_it = shared.serving.model(&m.name).is_some_and(|ms| {
            let route = ms.route();
            route.active.is_some()
                && route.standby.as_ref().is_some_and(|s| s.sha256 == m.sha256 && s.version == m.version)
        });
        if standby_is_it {
            let reason =
                format!("the hub's desired state names {} again (deployment {})", m.version, assignment.deployment_id);
            match rollouts.rollback_now(shared, &m.name, HUB, &reason).await {
                Ok(done) => tracing::info!(model = %m.name, %done, "standby restored for the hub"),
                Err(e) => tracing::warn!(model = %m.name, error = %e, "no instant swap; loading the version instead"),
            }
        }
        let current = shared.store.model(&m.name).ok().flatten();
        let serving_it = shared
            .serving
            .model(&m.name)
            .and_then(|ms| ms.route().active.as_ref().map(|a| a.sha256 == m.sha256 && a.version == m.version))
            .unwrap_or(false);
        if serving_it && current.as_ref().and_then(|c| c.active_sha256.as_deref()) == Some(m.sha256.as_str()) {
            // Already serving it: a new deployment of this version (a
            // re-deploy, or a rollback to it) is served here at once, so say
            // so under that deployment now rather than at some later change.
            let stale = current.as_ref().is_some_and(|c| {
                c.status != ModelStatus::Serving || c.status_deployment != Some(assignment.deployment_id)
            });
            if stale {
                shared.set_status(&m.name, ModelStatus::Serving, &m.version, "", Some(assignment.deployment_id));
                shared.report_soon();
            }
            continue;
        }
        let policy = match crate::rollout::policy::policy_from(assignment.policy.as_ref(), &shared.config.rollout) {
            Ok(p) => crate::rollout::policy::with_declared_floor(
                p,
                m.accuracy.as_ref().map(|a| a.value),
                config.serving.validation_tolerance,
            ),
            Err(reason) => {
                refuse(
                    shared,
                    &m.name,
                    &m.version,
                    ModelStatus::Refused,
                    EventKind::PolicyInvalid,
                    &reason.to_string(),
                    assignment.deployment_id,
                );
                continue;
            }
        };
        if !m.hardware.is_empty() && !m.hardware.iter().any(|h| config.hardware.contains(h)) {
            let reason = format!(
                "wrong hardware: {} {} runs on [{}], this device is [{}]",
                m.name,
                m.version,
                m.hardware.join(", "),
                config.hardware.join(", ")
            );
            tracing::warn!(%reason, "model refused");
            refuse_download(shared, m, &format!("wrong_hardware: {reason}"), assignment.deployment_id);
            continue;
        }
        let Some(files) = download_version(shared, http, assignment, m).await else { continue };
        if let Some(signed) = &assignment.manifest
            && let Err(e) = shared.store.save_manifest(signed)
        {
            refuse(
                shared,
                &m.name,
                &m.version,
                ModelStatus::Failed,
                EventKind::ModelFailed,
                &error_chain(&e),
                assignment.deployment_id,
            );
            continue;
        }
        let detail = if shared.serving.builds_engine(&m.name, &m.sha256) { BUILDING_ENGINE } else { "" };
        shared.set_status(&m.name, ModelStatus::Validating, &m.version, detail, Some(assignment.deployment_id));
        shared.refresh_models();
        shared.report_soon();
        let install = Install {
            manifest: m,
            deployment_id: assignment.deployment_id,
            model_path: files.model,
            validation: files.validation,
            policy: policy.clone(),
        };
        match shared.serving.install(&shared.store, install).await {
            Ok(installed) => {
                let measured = installed.accuracy.map(|a| format!("; validation accuracy {a:.4}")).unwrap_or_default();
                let next = if installed.promoted { "now serving" } else { "rollout started" };
                shared.event(
                    EventKind::ModelInstalled,
                    &m.name,
                    &m.version,
                    &format!("sha256 {} verified, loaded and validated{measured}; {next}", m.sha256),
                );
                let has_standby =
                    shared.serving.model(&m.name).is_some_and(|ms| ms.route().standby.is_some() || !installed.promoted);
                match shared.serving.model(&m.name) {
                    Some(ms) if has_standby => {
                        rollouts.spawn(shared.clone(), ms, installed.loaded, policy, installed.phase)
                    }
                    _ => {
                        shared.set_status(
                            &m.name,
                            ModelStatus::Serving,
                            &m.version,
                            "",
                            Some(assignment.deployment_id),
                        );
                    }
                }
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(model = %m.name, version = %m.version, error = %reason, "version not installed; the previous version keeps serving");
                refuse(shared, &m.name, &m.version, ModelStatus::Failed, e.kind(), &reason, assignment.deployment_id);
            }
        }
        shared.refresh_models();
    }
    // Models no longer wanted on this device.
    let names: HashSet<&str> = v.manifests.iter().map(|m| m.name.as_str()).collect();
    if let Ok(models) = shared.store.models() {
        for m in models.iter().filter(|m| !names.contains(m.name.as_str()) && m.status != ModelStatus::Removed) {
            rollouts.cancel(&m.name).await;
            shared.serving.remove(&m.name);
            shared.set_status(
                &m.name,
                ModelStatus::Removed,
                m.active_version.as_deref().unwrap_or(""),
                "no longer in the desired state",
                None,
            );
        }
    }
    match shared.store.gc(&wanted_files) {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(?removed, "removed unneeded model files");
            shared.serving.forget_engines(&removed);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "model file cleanup failed"),
    }
    shared.refresh_models();
}

/// The status detail of a version whose TensorRT engine is being built.
pub const BUILDING_ENGINE: &str =
    "building engine: TensorRT builds it on the first load of this model file on this device (minutes on a Jetson)";

/// The verified files of one version.
struct VersionFiles {
    model: PathBuf,
    validation: Option<ValidationSet>,
}

/// Downloads and verifies a version's model file and its validation set.
/// On failure the refusal is recorded and `None` returned.
async fn download_version(
    shared: &Arc<Shared>,
    http: &reqwest::Client,
    assignment: &ModelAssignment,
    m: &ModelManifest,
) -> Option<VersionFiles> {
    let config = &shared.config;
    // Under the deployment that asked for it: reported under the one the
    // device is leaving, it would read as that deployment's state.
    shared.set_status(&m.name, ModelStatus::Downloading, &m.version, "", Some(assignment.deployment_id));
    shared.refresh_models();
    shared.report_soon();
    let fetch = |url: String, sha256: String, size: u64| async move {
        let wanted = Wanted { url: &url, token: &config.token, sha256: &sha256, size };
        let fetched = download::fetch(http, shared.store.models_dir(), &wanted, config.download_attempts, |from| {
            shared.download_resumed(from);
            shared.event(
                EventKind::DownloadResumed,
                &m.name,
                &m.version,
                &format!("{url}: resuming from byte {from} of {size}"),
            );
        })
        .await;
        if let Ok((_, outcome)) = &fetched {
            shared.serving.metrics().download_bytes.inc_by(outcome.bytes_transferred);
        }
        fetched
    };
    let failed = |e: download::FetchError| {
        shared.serving.metrics().download_failed(e.kind());
        let reason = format!("{}: {}", e.kind(), error_chain(&e));
        tracing::warn!(model = %m.name, version = %m.version, %reason, "download refused; the previous version keeps serving");
        let status = if matches!(e, download::FetchError::GaveUp { .. } | download::FetchError::NoSpace { .. }) {
            ModelStatus::Failed
        } else {
            ModelStatus::Refused
        };
        refuse(shared, &m.name, &m.version, status, EventKind::DownloadRefused, &reason, assignment.deployment_id);
    };
    // The publisher's signature first: it is small, and a model this
    // device would refuse is not worth downloading.
    if !config.publishers.is_empty() {
        let checked = match m.publisher.as_ref().and_then(|p| p.bundle.as_ref()) {
            None => Err(format!(
                "{} {} carries no publisher signature; this device pins {}",
                m.name,
                m.version,
                pinned_names(&config.publishers)
            )),
            Some(b) if b.size > MAX_BUNDLE_BYTES as u64 => {
                Err(format!("the manifest names a {}-byte bundle; at most {MAX_BUNDLE_BYTES} are read", b.size))
            }
            Some(b) => {
                match fetch(shared.hubs.on_current(&assignment.publisher_signature_url), b.sha256.clone(), b.size).await
                {
                    Err(e) => {
                        failed(e);
                        return None;
                    }
                    Ok((path, _)) => std::fs::read(&path)
                        .map_err(|e| format!("reading the bundle: {e}"))
                        .and_then(|bundle| verify_on_device(m, &bundle, &config.publishers)),
                }
            }
        };
        match checked {
            Ok(v) => {
                // `pinned_as` is this device's name for the key; `publisher` the hub's.
                tracing::info!(
                    model = %m.name,
                    version = %m.version,
                    pinned_as = %v.publisher,
                    publisher = m.publisher.as_ref().map_or("", |p| p.name.as_str()),
                    key_id = %v.key_id,
                    "publisher signature verified on the device"
                );
            }
            Err(why) => {
                shared.serving.metrics().verification_failed(PUBLISHER_SIGNATURE);
                let reason = format!("{PUBLISHER_SIGNATURE}: {why}");
                tracing::warn!(model = %m.name, version = %m.version, %reason, "model refused; the previous version keeps serving");
                refuse_download(shared, m, &reason, assignment.deployment_id);
                return None;
            }
        }
    }
    shared.event(EventKind::DownloadStarted, &m.name, &m.version, &assignment.artifact_url);
    let (model, outcome) = match fetch(shared.hubs.on_current(&assignment.artifact_url), m.sha256.clone(), m.size).await
    {
        Ok(r) => r,
        Err(e) => {
            failed(e);
            return None;
        }
    };
    tracing::info!(model = %m.name, version = %m.version, bytes = outcome.bytes_transferred, resumed = ?outcome.resumed_from, "model downloaded and verified");
    let set = m.validation.as_ref().and_then(|s| Some((s.inputs.as_ref()?, s.labels.as_ref()?)));
    let validation = match set {
        Some((inputs, labels)) if !assignment.validation_inputs_url.is_empty() => {
            let x = match fetch(
                shared.hubs.on_current(&assignment.validation_inputs_url),
                inputs.sha256.clone(),
                inputs.size,
            )
            .await
            {
                Ok((p, _)) => p,
                Err(e) => {
                    failed(e);
                    return None;
                }
            };
            let y = match fetch(
                shared.hubs.on_current(&assignment.validation_labels_url),
                labels.sha256.clone(),
                labels.size,
            )
            .await
            {
                Ok((p, _)) => p,
                Err(e) => {
                    failed(e);
                    return None;
                }
            };
            match (std::fs::read(&x), std::fs::read(&y)) {
                (Ok(inputs), Ok(labels)) => Some(ValidationSet {
                    inputs,
                    labels: labels
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                }),
                (Err(e), _) | (_, Err(e)) => {
                    refuse(
                        shared,
                        &m.name,
                        &m.version,
                        ModelStatus::Failed,
                        EventKind::ModelFailed,
                        &format!("reading the validation set: {e}"),
                        assignment.deployment_id,
                    );
                    return None;
                }
            }
        }
        _ => None,
    };
    Some(VersionFiles { model, validation })
}

/// The refusal kind of a model whose publisher signature does not verify on
/// the device (or that has none, on a device that pins publishers).
pub const PUBLISHER_SIGNATURE: &str = "publisher_signature";

/// `publisher a (key 0123...)`, `publishers a (...), b (...)` for the refusal text.
fn pinned_names(keys: &[PublisherKey]) -> String {
    let names: Vec<String> = keys.iter().map(PublisherKey::label).collect();
    format!("publisher{} {}", if names.len() == 1 { "" } else { "s" }, names.join(", "))
}

/// Verifies `m`'s publisher bundle with this device's pinned keys. A key
/// the device does not know is refused naming the signer the hub names and
/// the keys pinned here.
fn verify_on_device(m: &ModelManifest, bundle: &[u8], pinned: &[PublisherKey]) -> Result<Verified, String> {
    verify_bundle(bundle, pinned, &m.sha256).map_err(|e| match e {
        BundleError::UnknownKey { .. } | BundleError::BadSignature { .. } => format!(
            "{e}: the hub names its signer {} (key {}); this device pins {}",
            m.publisher.as_ref().map_or("?", |p| p.name.as_str()),
            m.publisher.as_ref().map_or("?", |p| short_key_id(&p.key_id)),
            pinned_names(pinned)
        ),
        other => other.to_string(),
    })
}

/// A version this device will not download (`reason` starts with its kind).
fn refuse_download(shared: &Shared, m: &ModelManifest, reason: &str, deployment: i64) {
    refuse(shared, &m.name, &m.version, ModelStatus::Refused, EventKind::DownloadRefused, reason, deployment);
}

fn refuse(
    shared: &Shared,
    model: &str,
    version: &str,
    status: ModelStatus,
    kind: EventKind,
    reason: &str,
    deployment: i64,
) {
    shared.set_status(model, status, version, reason, Some(deployment));
    shared.event(kind, model, version, reason);
    shared.refresh_models();
}
