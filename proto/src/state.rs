//! The signed desired state a hub pushes to one device.
//!
//! [`verify_state`] is what stands between the network and a device: it
//! checks the hub's signature over the exact bytes received, that the state
//! is addressed to this device, that its revision does not go backwards (a
//! replay), that it has not expired (a freeze), and that every manifest in it
//! verifies on its own. Only a state that passes all of these is acted on.

use prost::Message as _;

use crate::keys::{KeyError, Signer, TrustedKeys};
use crate::manifest::{ManifestError, verify_manifest};
use crate::pb::{DesiredState, ModelManifest, SignedDesiredState};

/// Domain separation for desired-state signatures.
pub const STATE_CONTEXT: &[u8] = b"sentinel-desired-state-v1\0";

/// Why a desired state was refused. Each variant is a distinct, reportable kind.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("desired state signature check failed")]
    Signature(#[source] KeyError),
    #[error("desired state bytes do not decode")]
    Decode(#[source] prost::DecodeError),
    #[error("desired state is for device {got:?}, not this device ({want:?})")]
    WrongDevice { got: String, want: String },
    #[error("desired state revision {got} is older than the verified revision {have}: replay refused")]
    Replayed { got: u64, have: u64 },
    #[error("desired state expired at {expires_at_unix_ms} ms (now {now_unix_ms} ms): refused as a possible freeze")]
    Expired { expires_at_unix_ms: i64, now_unix_ms: i64 },
    #[error("manifest of model {model:?} in the desired state is invalid")]
    Manifest {
        model: String,
        #[source]
        source: ManifestError,
    },
    #[error("desired state names model {0:?} twice")]
    DuplicateModel(String),
}

impl StateError {
    /// A short, stable name for metrics and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            StateError::Signature(KeyError::UnknownKey { .. }) => "unknown_key",
            StateError::Signature(_) => "bad_signature",
            StateError::Decode(_) => "decode",
            StateError::WrongDevice { .. } => "wrong_device",
            StateError::Replayed { .. } => "replayed",
            StateError::Expired { .. } => "expired",
            StateError::Manifest { source: ManifestError::Signature(KeyError::UnknownKey { .. }), .. } => {
                "manifest_unknown_key"
            }
            StateError::Manifest { .. } => "manifest_invalid",
            StateError::DuplicateModel(_) => "duplicate_model",
        }
    }
}

/// A desired state that passed [`verify_state`], with its manifests decoded
/// (in the same order as `state.models`).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedState {
    pub state: DesiredState,
    pub manifests: Vec<ModelManifest>,
    /// The signed form, kept so it can be stored and re-verified after a restart.
    pub signed: SignedDesiredState,
}

/// Signs a desired state with the hub's key.
pub fn sign_state(signer: &Signer, state: &DesiredState) -> SignedDesiredState {
    let bytes = state.encode_to_vec();
    SignedDesiredState {
        signature: signer.sign(STATE_CONTEXT, &bytes),
        state: bytes,
        key_id: signer.key_id().to_owned(),
    }
}

/// Verifies a signed desired state for `device_id`, given the last verified
/// revision (0 for none) and the current time.
///
/// A state with the same revision as the last one is accepted: the hub
/// re-sends a state with a fresh expiry without changing its content, and a
/// replay of the same revision carries the same content.
pub fn verify_state(
    signed: &SignedDesiredState,
    trusted: &TrustedKeys,
    device_id: &str,
    last_revision: u64,
    now_unix_ms: i64,
) -> Result<VerifiedState, StateError> {
    trusted.verify(&signed.key_id, STATE_CONTEXT, &signed.state, &signed.signature).map_err(StateError::Signature)?;
    let state = DesiredState::decode(signed.state.as_slice()).map_err(StateError::Decode)?;
    if state.device_id != device_id {
        return Err(StateError::WrongDevice { got: state.device_id, want: device_id.to_owned() });
    }
    if state.revision < last_revision {
        return Err(StateError::Replayed { got: state.revision, have: last_revision });
    }
    if state.expires_at_unix_ms <= now_unix_ms {
        return Err(StateError::Expired { expires_at_unix_ms: state.expires_at_unix_ms, now_unix_ms });
    }
    let mut manifests = Vec::with_capacity(state.models.len());
    for assignment in &state.models {
        let signed_manifest = assignment.manifest.clone().unwrap_or_default();
        let m = verify_manifest(&signed_manifest, trusted)
            .map_err(|source| StateError::Manifest { model: model_name_hint(&signed_manifest), source })?;
        if manifests.iter().any(|x: &ModelManifest| x.name == m.name) {
            return Err(StateError::DuplicateModel(m.name));
        }
        manifests.push(m);
    }
    Ok(VerifiedState { state, manifests, signed: signed.clone() })
}

/// The model name in a manifest that failed verification, for the error
/// message only: never trusted for anything else.
fn model_name_hint(signed: &crate::pb::SignedManifest) -> String {
    ModelManifest::decode(signed.manifest.as_slice()).map(|m| m.name).unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::sign_manifest;
    use crate::pb::{ModelAssignment, dimension::Kind};

    fn manifest(name: &str) -> ModelManifest {
        ModelManifest {
            name: name.into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            format: "onnx".into(),
            inputs: vec![crate::pb::TensorSpec {
                name: "x".into(),
                dtype: "float32".into(),
                shape: vec![crate::pb::Dimension { kind: Some(Kind::Fixed(1)) }],
            }],
            outputs: vec![crate::pb::TensorSpec { name: "y".into(), dtype: "float32".into(), shape: vec![] }],
            ..Default::default()
        }
    }

    fn setup() -> (Signer, TrustedKeys) {
        let (signer, _) = Signer::generate().expect("generate");
        let mut t = TrustedKeys::new();
        t.add(signer.public_key()).expect("add");
        (signer, t)
    }

    fn state(signer: &Signer, device: &str, revision: u64, expires: i64) -> SignedDesiredState {
        let s = DesiredState {
            device_id: device.into(),
            revision,
            issued_at_unix_ms: 0,
            expires_at_unix_ms: expires,
            labels: Default::default(),
            models: vec![ModelAssignment {
                manifest: Some(sign_manifest(signer, &manifest("digits"))),
                artifact_url: "http://hub/x".into(),
                ..Default::default()
            }],
        };
        sign_state(signer, &s)
    }

    #[test]
    fn a_good_state_verifies() {
        let (signer, trusted) = setup();
        let v = verify_state(&state(&signer, "a", 5, 1000), &trusted, "a", 4, 999).expect("verifies");
        assert_eq!(v.state.revision, 5);
        assert_eq!(v.manifests[0].name, "digits");
        // The same revision again (a refresh) is fine.
        verify_state(&state(&signer, "a", 5, 2000), &trusted, "a", 5, 999).expect("refresh");
    }

    #[test]
    fn each_refusal_has_its_kind() {
        let (signer, trusted) = setup();
        let (other, _) = setup();
        let kind = |r: Result<VerifiedState, StateError>| r.expect_err("refused").kind();
        assert_eq!(kind(verify_state(&state(&other, "a", 5, 1000), &trusted, "a", 0, 0)), "unknown_key");
        assert_eq!(kind(verify_state(&state(&signer, "b", 5, 1000), &trusted, "a", 0, 0)), "wrong_device");
        assert_eq!(kind(verify_state(&state(&signer, "a", 3, 1000), &trusted, "a", 4, 0)), "replayed");
        assert_eq!(kind(verify_state(&state(&signer, "a", 5, 1000), &trusted, "a", 0, 1000)), "expired");
        let mut tampered = state(&signer, "a", 5, 1000);
        let last = tampered.state.len() - 1;
        tampered.state[last] ^= 1;
        assert_eq!(kind(verify_state(&tampered, &trusted, "a", 0, 0)), "bad_signature");
    }

    #[test]
    fn a_manifest_signed_by_an_unknown_key_spoils_the_state() {
        let (signer, trusted) = setup();
        let (other, _) = setup();
        let s = DesiredState {
            device_id: "a".into(),
            revision: 1,
            expires_at_unix_ms: 10,
            models: vec![ModelAssignment {
                manifest: Some(sign_manifest(&other, &manifest("m"))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = verify_state(&sign_state(&signer, &s), &trusted, "a", 0, 0).expect_err("refused");
        assert_eq!(err.kind(), "manifest_unknown_key");
    }
}
