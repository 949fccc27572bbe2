//! The model registry as the hub runs it: receiving an upload's bytes and
//! registering a new version from them.
//!
//! [`receive`] streams one body to a staging blob while its SHA-256 and size
//! are computed, cut off at the cap; nothing is held whole in memory.
//! [`register`] inspects the staged model, builds and signs its manifest and
//! commits: the blobs first, durably, then the row that makes the version
//! exist. A crash at any point leaves either no version or a complete one.
//!
//! What an upload looks like on the wire (query string, multipart parts,
//! draining a refused body) is the REST adapter's business, not this one's.

use std::collections::BTreeMap;
use std::fmt::Display;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use sentinel_proto::manifest::{FORMAT_ONNX, sign_manifest, stage_name};
use sentinel_proto::pb::{self, ModelManifest, dimension::Kind};
use sentinel_proto::publisher::{BundleError, MAX_BUNDLE_BYTES, PublisherKey, verify_bundle};
use tokio::io::AsyncWriteExt as _;

use super::{ServiceError, SharedState};
use crate::inspect::InspectError;
use crate::onnx::dtype_size;
use crate::store::{StagedBlob, VersionRecord};

/// Failures of receiving or registering an upload.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The model is not in the registry; a version needs its model first.
    #[error("model {name} is not registered")]
    ModelNotRegistered { name: String },
    /// The model already has this version, or one that differs from it only
    /// in build metadata (which semver does not order).
    #[error("model {name} already has version {existing}")]
    VersionExists { name: String, version: String, existing: String },
    /// A body went past the upload cap; what was received is discarded.
    #[error("{what} is larger than the upload limit of {cap} bytes")]
    TooLarge { what: String, cap: u64 },
    /// The client's stream of `what` failed before its end.
    #[error("the upload of {what} broke off ({reason})")]
    BrokenOff { what: String, reason: String },
    /// Opening the staging file failed, before a byte was read.
    #[error("opening a staging file")]
    OpenStaging {
        #[source]
        source: std::io::Error,
    },
    /// Writing received bytes to the staging file failed.
    #[error("writing an upload")]
    Write {
        #[source]
        source: std::io::Error,
    },
    /// The upload is not a model this hub will register.
    #[error("the model was refused")]
    InvalidModel {
        #[source]
        source: InspectError,
    },
    /// Inspecting the upload failed for a reason of the hub's own.
    #[error("inspecting an upload")]
    Inspect {
        #[source]
        source: InspectError,
    },
    /// The validation set does not fit the model; `why` says how.
    #[error("{why}")]
    InvalidValidationSet { why: String },
    /// The publisher signature did not verify.
    #[error("the publisher signature was refused: {source}{}", publisher_hint(.source))]
    PublisherSignature {
        #[source]
        source: BundleError,
    },
    /// The model or the hub requires a publisher signature and none came.
    #[error("{why}: push it with the publisher's model-signing bundle (`sentinel model push --signature model.sig`)")]
    PublisherRequired { why: String },
    /// The stores failed.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// What to do about a bundle whose key the hub does not know.
fn publisher_hint(e: &BundleError) -> &'static str {
    match e {
        BundleError::UnknownKey { .. } | BundleError::NoKeys => {
            "; an admin registers the signer's public key with `sentinel publisher add NAME --key PUB.pem` \
             (`sentinel publisher list` shows the key ids registered)"
        }
        _ => "",
    }
}

/// A body that has been streamed to a staging blob.
#[derive(Debug)]
pub struct Received {
    pub staged: StagedBlob,
    pub sha256: String,
    pub size: u64,
}

/// Streams `body` into a staging blob, hashing as it goes, refusing more than
/// `cap` bytes. On `TooLarge` and `Write` the staging blob is already freed
/// when this returns; the rest of `body` is left unread for the caller. Any
/// other error comes before a byte of `body` is read.
pub async fn receive<S, E>(state: &SharedState, body: &mut S, cap: u64, what: &str) -> Result<Received, RegistryError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    let write = |source| RegistryError::Write { source };
    let staged = state.blobs(|b| b.stage()).await?;
    let clone = staged.file().try_clone().map_err(|source| RegistryError::OpenStaging { source })?;
    let mut file = tokio::fs::File::from_std(clone);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| RegistryError::BrokenOff { what: what.to_owned(), reason: e.to_string() })?;
        size += chunk.len() as u64;
        if size > cap {
            return Err(RegistryError::TooLarge { what: what.to_owned(), cap });
        }
        digest.update(&chunk);
        file.write_all(&chunk).await.map_err(write)?;
    }
    file.flush().await.map_err(write)?;
    Ok(Received { staged, sha256: hex::encode(digest.finish().as_ref()), size })
}

/// Refuses a version before its body is read: the model must exist (unless
/// the push `registers` it) and have no version of the same precedence.
pub async fn check_new_version(
    state: &SharedState,
    name: &str,
    version: &str,
    registers: bool,
) -> Result<(), RegistryError> {
    let n = name.to_owned();
    let (model, versions) = state.meta(move |m| Ok((m.get_model(&n)?, m.list_versions(&n)?))).await?;
    if model.is_none() && !registers {
        return Err(RegistryError::ModelNotRegistered { name: name.to_owned() });
    }
    // Semver gives build metadata no precedence: `1.0.0` and `1.0.0+build.5`
    // would coexist in no defined order, so they are the same version here.
    if let Some(existing) = versions.iter().find(|v| same_precedence(&v.version, version)) {
        return Err(RegistryError::VersionExists {
            name: name.to_owned(),
            version: version.to_owned(),
            existing: existing.version.clone(),
        });
    }
    Ok(())
}

/// Whether two semver strings have the same precedence: equal but for build
/// metadata. Strings that do not parse are compared as they are.
fn same_precedence(a: &str, b: &str) -> bool {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b) == std::cmp::Ordering::Equal,
        _ => a == b,
    }
}

/// A version to register, as its publisher described it (already checked).
#[derive(Debug)]
pub struct NewVersion {
    pub name: String,
    pub version: String,
    pub stage: pb::Stage,
    pub hardware: Vec<String>,
    pub tags: Vec<String>,
    /// Fixed serving shapes for inputs with symbolic dims.
    pub serving: BTreeMap<String, Vec<u64>>,
    pub engine: String,
    pub accuracy: Option<pb::Accuracy>,
    /// Who registers it.
    pub created_by: String,
    /// The publisher's model-signing bundle, when the push carried one.
    pub signature: Option<Vec<u8>>,
    /// Register the model too, with this description, if it does not exist
    /// yet (in the version's transaction: a refused push registers nothing).
    pub register: Option<String>,
}

/// Verifies the push's publisher signature (before the model is inspected:
/// it is the cheaper check), or refuses a push that needs one and has none.
/// Returns the manifest entry and the bundle staged as a blob.
async fn check_publisher(
    state: &SharedState,
    model_name: &str,
    model_sha256: &str,
    bundle: Option<Vec<u8>>,
) -> Result<Option<(pb::PublisherSignature, Received)>, RegistryError> {
    let n = model_name.to_owned();
    let (model, publishers) = state.meta(move |m| Ok((m.get_model(&n)?, m.publishers()?))).await?;
    let Some(bundle) = bundle else {
        if state.config().require_publisher {
            return Err(RegistryError::PublisherRequired { why: "this hub requires a publisher signature".into() });
        }
        if model.is_some_and(|m| m.require_publisher) {
            return Err(RegistryError::PublisherRequired {
                why: format!("model {model_name} requires a publisher signature"),
            });
        }
        return Ok(None);
    };
    // Stored keys were checked when they were added; one that no longer
    // parses (edited by hand) is skipped rather than trusted.
    let keys: Vec<PublisherKey> =
        publishers.iter().filter_map(|p| PublisherKey::from_pem(&p.name, p.public_key.as_bytes()).ok()).collect();
    let verified =
        verify_bundle(&bundle, &keys, model_sha256).map_err(|source| RegistryError::PublisherSignature { source })?;
    let cap = MAX_BUNDLE_BYTES as u64;
    let mut body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(bundle))]);
    let staged = receive(state, &mut body, cap, "the signature").await?;
    let entry = pb::PublisherSignature {
        name: verified.publisher,
        key_id: verified.key_id,
        bundle: Some(pb::BlobRef { sha256: staged.sha256.clone(), size: staged.size }),
    };
    Ok(Some((entry, staged)))
}

/// Inspects the staged model, builds and signs its manifest, commits the
/// blobs and then the version row. Returns the stored record.
pub async fn register(
    state: &SharedState,
    new: NewVersion,
    model: Received,
    validation: Option<(Received, Received)>,
) -> Result<VersionRecord, RegistryError> {
    let NewVersion { name, version, stage, hardware, tags, serving, engine, accuracy, created_by, signature, register } =
        new;
    let publisher = check_publisher(state, &name, &model.sha256, signature).await?;
    let inspection = state.inspector().inspect_with(model.staged.path(), &serving, &engine).await.map_err(|e| {
        if e.is_refusal() { RegistryError::InvalidModel { source: e } } else { RegistryError::Inspect { source: e } }
    })?;
    if let Some(why) = &inspection.report.probe_skipped {
        tracing::warn!(model = %name, %version, reason = %why, "accepted without a probe inference");
    }
    let check_skipped = inspection.skipped.clone().unwrap_or_default();
    let signature = inspection.signature;
    let serving_shapes: Vec<pb::ServingShape> = signature
        .inputs
        .iter()
        .filter_map(|t| serving.get(&t.name).map(|d| pb::ServingShape { input: t.name.clone(), dims: d.clone() }))
        .collect();
    let validation_set = match &validation {
        None => None,
        Some((inputs, labels)) => Some(validation_set(&signature.inputs[0], inputs, labels)?),
    };

    let now = crate::now_ms();
    let manifest = ModelManifest {
        name: name.clone(),
        version: version.clone(),
        sha256: model.sha256.clone(),
        size: model.size,
        format: FORMAT_ONNX.into(),
        inputs: signature.inputs,
        outputs: signature.outputs,
        accuracy,
        hardware: hardware.clone(),
        stage: stage as i32,
        created_at_unix_ms: now,
        key_id: String::new(),
        tags,
        validation: validation_set,
        serving_shapes,
        engine,
        check_skipped,
        publisher: publisher.as_ref().map(|(entry, _)| entry.clone()),
    };
    let signed = {
        let signer = state.keyring().active();
        sign_manifest(&signer, &manifest)
    };

    // Blobs first, durable; then the row that makes the version exist.
    let mut extra = Vec::new();
    let mut to_commit = vec![(model.staged, model.sha256.clone())];
    if let Some((inputs, labels)) = validation {
        extra.push(inputs.sha256.clone());
        extra.push(labels.sha256.clone());
        to_commit.push((inputs.staged, inputs.sha256));
        to_commit.push((labels.staged, labels.sha256));
    }
    if let Some((_, bundle)) = publisher {
        extra.push(bundle.sha256.clone());
        to_commit.push((bundle.staged, bundle.sha256));
    }
    state
        .blobs(move |b| {
            for (staged, sha) in to_commit {
                b.commit(staged, &sha)?;
            }
            Ok(())
        })
        .await?;
    let record = VersionRecord {
        model: name.clone(),
        version: version.clone(),
        sha256: model.sha256,
        size: model.size,
        stage: stage_name(stage).to_owned(),
        hardware,
        manifest: signed.manifest,
        signature: signed.signature,
        key_id: signed.key_id,
        created_at_ms: now,
        created_by,
    };
    let stored = record.clone();
    state.meta(move |m| m.insert_version(&stored, &extra, register.as_deref())).await?;
    state.metrics().model_push_bytes.inc_by(record.size);
    tracing::info!(model = %name, %version, sha256 = %record.sha256, size = record.size, "version registered");
    Ok(record)
}

/// The validation set's manifest entry: `labels` a non-empty run of int64
/// values, `inputs` one sample of the model's first input per label.
fn validation_set(
    first: &pb::TensorSpec,
    inputs: &Received,
    labels: &Received,
) -> Result<pb::ValidationSet, RegistryError> {
    let per_sample = sample_bytes(first)?;
    if labels.size == 0 || !labels.size.is_multiple_of(8) {
        return Err(RegistryError::InvalidValidationSet {
            why: format!("validation labels are {} bytes; they must be a non-empty run of int64 values", labels.size),
        });
    }
    let count = labels.size / 8;
    let needed = count.checked_mul(per_sample);
    if needed != Some(inputs.size) {
        return Err(RegistryError::InvalidValidationSet {
            why: format!(
                "validation inputs are {} bytes, but {count} labels need {count} x {per_sample} = {} bytes",
                inputs.size,
                needed.map_or_else(|| "over 2^64".to_owned(), |n| n.to_string())
            ),
        });
    }
    Ok(pb::ValidationSet {
        inputs: Some(pb::BlobRef { sha256: inputs.sha256.clone(), size: inputs.size }),
        labels: Some(pb::BlobRef { sha256: labels.sha256.clone(), size: labels.size }),
        count,
    })
}

/// Bytes of one validation sample of the model's first input: every dim
/// after the batch dim must be fixed.
fn sample_bytes(input: &pb::TensorSpec) -> Result<u64, RegistryError> {
    let unusable = |why: &str| RegistryError::InvalidValidationSet {
        why: format!("a validation set needs the first input `{}` to {why}", input.name),
    };
    let elem = dtype_size(&input.dtype).ok_or_else(|| unusable("have a numeric dtype"))?;
    if input.shape.is_empty() {
        return Err(unusable("have a batch dimension"));
    }
    let mut n = elem;
    for d in &input.shape[1..] {
        match d.kind {
            // Dims come from the uploaded file: checked, never wrapped.
            Some(Kind::Fixed(k)) => {
                n = n.checked_mul(k).ok_or_else(|| unusable("take fewer than 2^64 bytes per sample"))?;
            }
            _ => return Err(unusable("have fixed dimensions after the batch dimension")),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_proto::pb::Dimension;

    fn spec(dims: &[Option<u64>]) -> pb::TensorSpec {
        let shape =
            dims.iter().map(|d| Dimension { kind: Some(d.map_or(Kind::Symbolic("N".into()), Kind::Fixed)) }).collect();
        pb::TensorSpec { name: "x".into(), dtype: "float32".into(), shape }
    }

    #[test]
    fn a_sample_size_is_the_fixed_dims_times_the_element_and_never_wraps() {
        assert_eq!(sample_bytes(&spec(&[None, Some(64)])).ok(), Some(256));
        // Dims an uploaded file declares: 2^62 x 4 bytes would wrap.
        let err = sample_bytes(&spec(&[None, Some(1 << 62), Some(4)])).unwrap_err();
        assert!(err.to_string().contains("fewer than 2^64 bytes per sample"), "{err}");
        assert!(sample_bytes(&spec(&[None, None])).is_err());
    }

    #[test]
    fn build_metadata_does_not_make_a_new_version() {
        assert!(same_precedence("1.0.0", "1.0.0+build.5"));
        assert!(!same_precedence("1.0.0", "1.0.1"));
        assert!(same_precedence("not semver", "not semver"));
    }
}
