//! The signed model manifest.
//!
//! The hub signs the protobuf encoding of a [`ModelManifest`]; the agent
//! checks the signature over the bytes it received *before* decoding them,
//! then checks that the decoded manifest is well formed. [`ManifestView`] is
//! the JSON shape of a manifest for REST clients and humans; it is never what
//! gets signed.

use std::collections::BTreeMap;

use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, Signer, TrustedKeys};
use crate::pb::{self, ModelManifest, SignedManifest, Stage};

/// Domain separation for manifest signatures.
pub const MANIFEST_CONTEXT: &[u8] = b"sentinel-manifest-v1\0";

/// The only model format so far.
pub const FORMAT_ONNX: &str = "onnx";

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest signature check failed")]
    Signature(#[from] KeyError),
    #[error("manifest bytes are not a valid protobuf ModelManifest")]
    Decode(#[source] prost::DecodeError),
    #[error("manifest names key {inner} but was signed with {outer}")]
    KeyIdMismatch { inner: String, outer: String },
    #[error("manifest field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Signs `manifest` with `signer`. The manifest's `key_id` is set to the
/// signer's id first, so the id is itself covered by the signature.
pub fn sign_manifest(signer: &Signer, manifest: &ModelManifest) -> SignedManifest {
    let mut manifest = manifest.clone();
    manifest.key_id = signer.key_id().to_owned();
    let bytes = manifest.encode_to_vec();
    let signature = signer.sign(MANIFEST_CONTEXT, &bytes);
    SignedManifest { manifest: bytes, signature, key_id: manifest.key_id }
}

/// Verifies a signed manifest against the trusted keys and returns it decoded.
///
/// Fails on an unknown key id, a signature that does not match the bytes,
/// bytes that do not decode, a key id inside the manifest that differs from
/// the one it was signed with, or a manifest that is not well formed.
pub fn verify_manifest(signed: &SignedManifest, trusted: &TrustedKeys) -> Result<ModelManifest, ManifestError> {
    trusted.verify(&signed.key_id, MANIFEST_CONTEXT, &signed.manifest, &signed.signature)?;
    let manifest = ModelManifest::decode(signed.manifest.as_slice()).map_err(ManifestError::Decode)?;
    if manifest.key_id != signed.key_id {
        return Err(ManifestError::KeyIdMismatch { inner: manifest.key_id, outer: signed.key_id.clone() });
    }
    validate(&manifest)?;
    Ok(manifest)
}

/// The engines a manifest may name (empty: tract).
pub const ENGINES: [&str; 3] = ["", "tract", "ort"];

/// Checks the invariants every manifest must hold, signed or not.
pub fn validate(m: &ModelManifest) -> Result<(), ManifestError> {
    let invalid = |field, reason: &str| ManifestError::Invalid { field, reason: reason.to_owned() };
    validate_model_name(&m.name).map_err(|r| invalid("name", &r.to_string()))?;
    semver::Version::parse(&m.version).map_err(|e| invalid("version", &format!("not semver: {e}")))?;
    if !is_sha256_hex(&m.sha256) {
        return Err(invalid("sha256", "must be 64 lower-case hex digits"));
    }
    if m.size == 0 {
        return Err(invalid("size", "must be positive"));
    }
    if m.format != FORMAT_ONNX {
        return Err(invalid("format", "only \"onnx\" is supported"));
    }
    if m.inputs.is_empty() || m.outputs.is_empty() {
        return Err(invalid("inputs", "a model needs at least one input and one output"));
    }
    // The hub refuses anything else at upload; a verifier refuses it too
    // (a NaN would not even survive the JSON view).
    if let Some(a) = &m.accuracy
        && !(a.value.is_finite() && (0.0..=1.0).contains(&a.value))
    {
        return Err(invalid("accuracy", "the value must be a fraction between 0 and 1"));
    }
    if !ENGINES.contains(&m.engine.as_str()) {
        return Err(invalid("engine", "must be empty, \"tract\" or \"ort\""));
    }
    for (i, s) in m.serving_shapes.iter().enumerate() {
        let Some(spec) = m.inputs.iter().find(|t| t.name == s.input) else {
            return Err(invalid("serving_shapes", &format!("`{}` names no input", s.input)));
        };
        if m.serving_shapes[..i].iter().any(|o| o.input == s.input) {
            return Err(invalid("serving_shapes", &format!("`{}` has two shapes", s.input)));
        }
        let fits = spec.shape.len() == s.dims.len()
            && s.dims
                .iter()
                .zip(&spec.shape)
                .all(|(&n, d)| n > 0 && !matches!(d.kind, Some(crate::pb::dimension::Kind::Fixed(f)) if f != n));
        if !fits {
            return Err(invalid("serving_shapes", &format!("{:?} does not fit input `{}`", s.dims, s.input)));
        }
    }
    if let Some(v) = &m.validation {
        for blob in [&v.inputs, &v.labels] {
            match blob {
                Some(b) if is_sha256_hex(&b.sha256) => {}
                _ => return Err(invalid("validation", "inputs and labels need a sha256")),
            }
        }
    }
    if let Some(p) = &m.publisher {
        let bundle_ok = p.bundle.as_ref().is_some_and(|b| is_sha256_hex(&b.sha256) && b.size > 0);
        if p.name.is_empty() || !is_sha256_hex(&p.key_id) || !bundle_ok {
            return Err(invalid("publisher", "needs a name, a key id and the bundle's sha256 and size"));
        }
    }
    Ok(())
}

/// Why a name cannot be a model or device name. The text completes "model
/// name `x` …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; the limit is 128")]
    TooLong(usize),
    #[error("must not contain \"..\"")]
    DotDot,
    #[error("must contain a letter or digit")]
    NoLetterOrDigit,
    #[error("contains {0:?}; use letters, digits, '-', '_' and '.'")]
    Character(char),
}

/// Model names become URL path segments and directory names: keep them to a
/// safe alphabet so they can never escape either.
pub fn validate_model_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 128 {
        return Err(NameError::TooLong(name.len()));
    }
    if name.contains("..") {
        return Err(NameError::DotDot);
    }
    // `.` alone is a path segment that clients normalise away, so a model
    // named `.` could be created but never reached again.
    if !name.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(NameError::NoLetterOrDigit);
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(NameError::Character(c));
    }
    Ok(())
}

/// True for 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The stage's name as it appears in the REST API and CLI.
pub fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Unspecified => "unspecified",
        Stage::Development => "development",
        Stage::Staging => "staging",
        Stage::Production => "production",
        Stage::Archived => "archived",
    }
}

/// Parses a stage name (`development`, `staging`, `production`, `archived`).
pub fn parse_stage(s: &str) -> Result<Stage, UnknownStage> {
    match s {
        "development" | "dev" => Ok(Stage::Development),
        "staging" => Ok(Stage::Staging),
        "production" | "prod" => Ok(Stage::Production),
        "archived" => Ok(Stage::Archived),
        other => Err(UnknownStage(other.to_owned())),
    }
}

/// A stage name [`parse_stage`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stage {}; use development, staging, production or archived", crate::quote(.0))]
pub struct UnknownStage(pub String);

/// One dimension in JSON: a number when fixed, a string when symbolic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum DimView {
    Fixed(u64),
    Symbolic(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TensorView {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<DimView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccuracyView {
    pub metric: String,
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub value: f64,
    pub dataset: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BlobView {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ValidationView {
    pub inputs: BlobView,
    pub labels: BlobView,
    pub count: u64,
}

/// The JSON form of a [`ModelManifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ManifestView {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub format: String,
    pub inputs: Vec<TensorView>,
    pub outputs: Vec<TensorView>,
    pub accuracy: Option<AccuracyView>,
    pub hardware: Vec<String>,
    pub stage: String,
    pub created_at_unix_ms: i64,
    pub key_id: String,
    pub tags: Vec<String>,
    pub validation: Option<ValidationView>,
    /// The fixed shape each named input is served with, set at push; an
    /// input not named here has only its batch dim fixed (to 1).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub serving_shapes: BTreeMap<String, Vec<u64>>,
    /// `tract` when empty, or `ort`: the engine devices run the model with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
    /// Why the push-time check did not run, when it did not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check_skipped: String,
    /// The publisher whose model-signing bundle the hub verified at push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<PublisherView>,
}

/// The JSON form of a [`pb::PublisherSignature`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublisherView {
    /// The name the hub's admin registered the key under.
    pub name: String,
    /// Hex SHA-256 of the key's PEM (model-signing's key hint).
    pub key_id: String,
    /// The stored bundle.
    pub bundle: BlobView,
}

impl From<&pb::TensorSpec> for TensorView {
    fn from(t: &pb::TensorSpec) -> Self {
        let shape = t
            .shape
            .iter()
            .map(|d| match &d.kind {
                Some(pb::dimension::Kind::Fixed(n)) => DimView::Fixed(*n),
                Some(pb::dimension::Kind::Symbolic(s)) => DimView::Symbolic(s.clone()),
                None => DimView::Symbolic("?".into()),
            })
            .collect();
        Self { name: t.name.clone(), dtype: t.dtype.clone(), shape }
    }
}

impl From<&TensorView> for pb::TensorSpec {
    fn from(t: &TensorView) -> Self {
        let shape = t
            .shape
            .iter()
            .map(|d| pb::Dimension {
                kind: Some(match d {
                    DimView::Fixed(n) => pb::dimension::Kind::Fixed(*n),
                    DimView::Symbolic(s) => pb::dimension::Kind::Symbolic(s.clone()),
                }),
            })
            .collect();
        Self { name: t.name.clone(), dtype: t.dtype.clone(), shape }
    }
}

fn blob_view(b: &Option<pb::BlobRef>) -> BlobView {
    let b = b.clone().unwrap_or_default();
    BlobView { sha256: b.sha256, size: b.size }
}

impl From<&ModelManifest> for ManifestView {
    fn from(m: &ModelManifest) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            size: m.size,
            format: m.format.clone(),
            inputs: m.inputs.iter().map(TensorView::from).collect(),
            outputs: m.outputs.iter().map(TensorView::from).collect(),
            accuracy: m.accuracy.as_ref().map(|a| AccuracyView {
                metric: a.metric.clone(),
                value: a.value,
                dataset: a.dataset.clone(),
            }),
            hardware: m.hardware.clone(),
            stage: stage_name(m.stage()).to_owned(),
            created_at_unix_ms: m.created_at_unix_ms,
            key_id: m.key_id.clone(),
            tags: m.tags.clone(),
            validation: m.validation.as_ref().map(|v| ValidationView {
                inputs: blob_view(&v.inputs),
                labels: blob_view(&v.labels),
                count: v.count,
            }),
            serving_shapes: m.serving_shapes.iter().map(|s| (s.input.clone(), s.dims.clone())).collect(),
            engine: m.engine.clone(),
            check_skipped: m.check_skipped.clone(),
            publisher: m.publisher.as_ref().map(|p| PublisherView {
                name: p.name.clone(),
                key_id: p.key_id.clone(),
                bundle: blob_view(&p.bundle),
            }),
        }
    }
}

impl TryFrom<&ManifestView> for ModelManifest {
    type Error = ManifestError;

    fn try_from(v: &ManifestView) -> Result<Self, ManifestError> {
        let stage =
            parse_stage(&v.stage).map_err(|e| ManifestError::Invalid { field: "stage", reason: e.to_string() })?;
        let blob = |b: &BlobView| pb::BlobRef { sha256: b.sha256.clone(), size: b.size };
        Ok(ModelManifest {
            name: v.name.clone(),
            version: v.version.clone(),
            sha256: v.sha256.clone(),
            size: v.size,
            format: v.format.clone(),
            inputs: v.inputs.iter().map(pb::TensorSpec::from).collect(),
            outputs: v.outputs.iter().map(pb::TensorSpec::from).collect(),
            accuracy: v.accuracy.as_ref().map(|a| pb::Accuracy {
                metric: a.metric.clone(),
                value: a.value,
                dataset: a.dataset.clone(),
            }),
            hardware: v.hardware.clone(),
            stage: stage as i32,
            created_at_unix_ms: v.created_at_unix_ms,
            key_id: v.key_id.clone(),
            tags: v.tags.clone(),
            validation: v.validation.as_ref().map(|val| pb::ValidationSet {
                inputs: Some(blob(&val.inputs)),
                labels: Some(blob(&val.labels)),
                count: val.count,
            }),
            // In input order, so a manifest survives its view byte for byte.
            serving_shapes: v
                .inputs
                .iter()
                .filter_map(|t| {
                    v.serving_shapes.get(&t.name).map(|d| pb::ServingShape { input: t.name.clone(), dims: d.clone() })
                })
                .collect(),
            engine: v.engine.clone(),
            check_skipped: v.check_skipped.clone(),
            publisher: v.publisher.as_ref().map(|p| pb::PublisherSignature {
                name: p.name.clone(),
                key_id: p.key_id.clone(),
                bundle: Some(blob(&p.bundle)),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::dimension::Kind;

    fn sample() -> ModelManifest {
        ModelManifest {
            name: "digits".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            size: 19831,
            format: FORMAT_ONNX.into(),
            inputs: vec![pb::TensorSpec {
                name: "input".into(),
                dtype: "float32".into(),
                shape: vec![
                    pb::Dimension { kind: Some(Kind::Symbolic("N".into())) },
                    pb::Dimension { kind: Some(Kind::Fixed(64)) },
                ],
            }],
            outputs: vec![pb::TensorSpec {
                name: "label".into(),
                dtype: "int64".into(),
                shape: vec![pb::Dimension { kind: Some(Kind::Symbolic("N".into())) }],
            }],
            accuracy: Some(pb::Accuracy { metric: "top1".into(), value: 0.9694, dataset: "digits-test".into() }),
            hardware: vec!["x86_64".into(), "aarch64".into()],
            stage: Stage::Staging as i32,
            created_at_unix_ms: 1_790_000_000_000,
            key_id: String::new(),
            tags: vec!["mlp".into()],
            validation: Some(pb::ValidationSet {
                inputs: Some(pb::BlobRef { sha256: "cd".repeat(32), size: 92160 }),
                labels: Some(pb::BlobRef { sha256: "ef".repeat(32), size: 2880 }),
                count: 360,
            }),
            serving_shapes: vec![pb::ServingShape { input: "input".into(), dims: vec![1, 64] }],
            engine: "ort".into(),
            check_skipped: "this hub lacks the ort engine".into(),
            publisher: Some(pb::PublisherSignature {
                name: "ml-team".into(),
                key_id: "12".repeat(32),
                bundle: Some(pb::BlobRef { sha256: "34".repeat(32), size: 1520 }),
            }),
        }
    }

    #[test]
    fn serving_shapes_must_name_an_input_and_fit_it() {
        assert!(validate(&sample()).is_ok());
        for (dims, input, why) in [
            (vec![1, 64], "nope", "names no input"),
            (vec![1, 32], "input", "does not fit"),
            (vec![1, 64, 1], "input", "does not fit"),
            (vec![0, 64], "input", "does not fit"),
        ] {
            let mut m = sample();
            m.serving_shapes = vec![pb::ServingShape { input: input.into(), dims }];
            let e = validate(&m).expect_err(why);
            assert!(e.to_string().contains(why), "{e}");
        }
        let mut m = sample();
        m.serving_shapes.push(m.serving_shapes[0].clone());
        assert!(validate(&m).expect_err("twice").to_string().contains("two shapes"));
    }

    fn signer_and_keys() -> (Signer, TrustedKeys) {
        let (signer, _) = Signer::generate().expect("generate");
        let mut trusted = TrustedKeys::new();
        trusted.add(signer.public_key()).expect("add");
        (signer, trusted)
    }

    #[test]
    fn round_trip_sign_verify_decode() {
        let (signer, trusted) = signer_and_keys();
        let signed = sign_manifest(&signer, &sample());
        let back = verify_manifest(&signed, &trusted).expect("verifies");
        let mut expected = sample();
        expected.key_id = signer.key_id().to_owned();
        assert_eq!(back, expected);
        // The JSON view round-trips too.
        let view = ManifestView::from(&back);
        let json = serde_json_roundtrip(&view);
        assert_eq!(ModelManifest::try_from(&json).expect("from view"), back);
    }

    fn serde_json_roundtrip(v: &ManifestView) -> ManifestView {
        let text = serde_json::to_string(v).expect("serialize");
        serde_json::from_str(&text).expect("deserialize")
    }

    /// A manifest the hub would never sign: its accuracy is not a fraction.
    #[test]
    fn an_accuracy_outside_0_to_1_is_refused() {
        let (signer, trusted) = signer_and_keys();
        for value in [f64::NAN, f64::INFINITY, -0.5, 1.5] {
            let mut m = sample();
            m.accuracy.as_mut().expect("acc").value = value;
            let err = verify_manifest(&sign_manifest(&signer, &m), &trusted).expect_err("refused");
            assert!(matches!(err, ManifestError::Invalid { field: "accuracy", .. }), "{value}: {err}");
        }
    }

    /// Found by the `signed_manifest` fuzz target: serde_json's default
    /// float parser is off by one ULP for some values, so an accuracy read
    /// back from the hub's JSON was not the one that was signed.
    #[test]
    fn accuracy_survives_the_json_view_exactly() {
        let mut m = sample();
        m.accuracy.as_mut().expect("acc").value = f64::from_bits(0x3fef_0553_0100_0001);
        let view = ManifestView::from(&m);
        let back = serde_json_roundtrip(&view);
        assert_eq!(back.accuracy.as_ref().map(|a| a.value.to_bits()), Some(0x3fef_0553_0100_0001));
        assert_eq!(back, view);
    }

    #[test]
    fn encoding_is_deterministic() {
        let (signer, _) = signer_and_keys();
        let a = sign_manifest(&signer, &sample());
        let b = sign_manifest(&signer, &sample());
        assert_eq!(a.manifest, b.manifest);
        assert_eq!(a.signature, b.signature, "Ed25519 signatures are deterministic");
    }

    /// Every field of the manifest, changed one at a time, breaks the signature.
    #[test]
    fn changing_any_field_fails_verification() {
        let (signer, trusted) = signer_and_keys();
        let signed = sign_manifest(&signer, &sample());
        let original = ModelManifest::decode(signed.manifest.as_slice()).expect("decode");
        type Mutation = (&'static str, fn(&mut ModelManifest));
        let mutations: &[Mutation] = &[
            ("name", |m| m.name = "digitz".into()),
            ("version", |m| m.version = "1.0.1".into()),
            ("sha256", |m| m.sha256 = "ac".repeat(32)),
            ("size", |m| m.size += 1),
            ("format", |m| m.format = "onnx2".into()),
            ("input name", |m| m.inputs[0].name = "x".into()),
            ("input dtype", |m| m.inputs[0].dtype = "float16".into()),
            ("input shape", |m| m.inputs[0].shape[1] = pb::Dimension { kind: Some(Kind::Fixed(65)) }),
            ("symbolic dim", |m| m.inputs[0].shape[0] = pb::Dimension { kind: Some(Kind::Symbolic("B".into())) }),
            ("output", |m| m.outputs[0].dtype = "int32".into()),
            ("accuracy value", |m| m.accuracy.as_mut().expect("acc").value = 0.99),
            ("accuracy metric", |m| m.accuracy.as_mut().expect("acc").metric = "top5".into()),
            ("accuracy dataset", |m| m.accuracy.as_mut().expect("acc").dataset = "other".into()),
            ("hardware", |m| m.hardware.push("cuda".into())),
            ("stage", |m| m.stage = Stage::Production as i32),
            ("created_at", |m| m.created_at_unix_ms += 1),
            ("key_id", |m| m.key_id = "ed25519-0000000000000000".into()),
            ("tags", |m| m.tags.clear()),
            ("validation", |m| m.validation.as_mut().expect("val").count = 359),
            ("publisher", |m| m.publisher.as_mut().expect("pub").name = "someone-else".into()),
            ("publisher bundle", |m| m.publisher = None),
        ];
        for (what, mutate) in mutations {
            let mut changed = original.clone();
            mutate(&mut changed);
            let tampered = SignedManifest { manifest: changed.encode_to_vec(), ..signed.clone() };
            let err = verify_manifest(&tampered, &trusted).expect_err(what);
            assert!(matches!(err, ManifestError::Signature(KeyError::BadSignature { .. })), "{what}: {err}");
        }
        // And so does any single flipped bit in the signed bytes.
        for i in 0..signed.manifest.len() {
            let mut bytes = signed.manifest.clone();
            bytes[i] ^= 0x01;
            let tampered = SignedManifest { manifest: bytes, ..signed.clone() };
            assert!(verify_manifest(&tampered, &trusted).is_err(), "flipped byte {i}");
        }
    }

    #[test]
    fn an_unknown_key_id_fails() {
        let (signer, _) = signer_and_keys();
        let (_, other_trusted) = signer_and_keys();
        let signed = sign_manifest(&signer, &sample());
        let err = verify_manifest(&signed, &other_trusted).unwrap_err();
        assert!(matches!(err, ManifestError::Signature(KeyError::UnknownKey { .. })), "{err}");
    }

    #[test]
    fn a_rotated_key_keeps_old_manifests_verifiable() {
        let (old, _) = signer_and_keys();
        let (new, _) = signer_and_keys();
        let mut trusted = TrustedKeys::new();
        trusted.add(old.public_key()).expect("add");
        trusted.add(new.public_key()).expect("add");
        verify_manifest(&sign_manifest(&old, &sample()), &trusted).expect("old key");
        verify_manifest(&sign_manifest(&new, &sample()), &trusted).expect("new key");
    }

    #[test]
    fn a_signature_swapped_to_another_trusted_key_fails() {
        let (a, _) = signer_and_keys();
        let (b, _) = signer_and_keys();
        let mut trusted = TrustedKeys::new();
        trusted.add(a.public_key()).expect("add");
        trusted.add(b.public_key()).expect("add");
        let mut signed = sign_manifest(&a, &sample());
        signed.key_id = b.key_id().to_owned();
        assert!(verify_manifest(&signed, &trusted).is_err());
    }

    #[test]
    fn model_names_are_checked() {
        for bad in ["", "a/b", ".", "..", "a..b", "-", "_.-", "has space", &"x".repeat(129), "é"] {
            assert!(validate_model_name(bad).is_err(), "{bad:?}");
        }
        for good in ["digits", "yolo-v10", "a.b_c", &"x".repeat(128)] {
            assert!(validate_model_name(good).is_ok(), "{good:?}");
        }
    }
}
