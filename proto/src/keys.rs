//! Ed25519 signing keys and key ids.
//!
//! A key id is `ed25519-` followed by the first 16 hex digits of the SHA-256
//! of the raw 32-byte public key, so anyone holding a public key can compute
//! its id, and ids never need a registry of their own.
//!
//! Every signature covers a context string followed by the payload, so a
//! signature made for one kind of message (a manifest) can never be replayed
//! as another kind (a desired state).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Failures of key handling and signature checks.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating an Ed25519 key failed")]
    Generate,
    #[error("the key file is not a valid PKCS#8 Ed25519 key")]
    ParsePkcs8,
    #[error("public key is not 32 bytes of base64: {0}")]
    ParsePublic(String),
    #[error("key id {key_id} is not among the trusted keys")]
    UnknownKey { key_id: String },
    #[error("signature does not verify with key {key_id}")]
    BadSignature { key_id: String },
}

/// The id of an Ed25519 public key: `ed25519-` + 16 hex digits of its SHA-256.
pub fn key_id_for(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    format!("ed25519-{}", &hex::encode(digest.as_ref())[..16])
}

/// An Ed25519 private key with its id.
pub struct Signer {
    key_pair: Ed25519KeyPair,
    key_id: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl Signer {
    /// Generates a new key. Returns the signer and its PKCS#8 document, which
    /// is what gets stored on disk.
    pub fn generate() -> Result<(Self, Vec<u8>), KeyError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
        let signer = Self::from_pkcs8(doc.as_ref())?;
        Ok((signer, doc.as_ref().to_vec()))
    }

    /// Loads a key from its PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| KeyError::ParsePkcs8)?;
        let key_id = key_id_for(key_pair.public_key().as_ref());
        Ok(Self { key_pair, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    /// The public key as standard base64, the form operators pin on devices.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.public_key())
    }

    /// Signs `context || payload`.
    pub fn sign(&self, context: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(context.len() + payload.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(payload);
        self.key_pair.sign(&msg).as_ref().to_vec()
    }
}

/// The public keys a verifier accepts, by key id. Holding several keys is how
/// rotation works: manifests signed by a retired key keep verifying for as
/// long as its public key stays trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, Vec<u8>>,
}

impl TrustedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a raw 32-byte public key and returns its id.
    pub fn add(&mut self, public_key: &[u8]) -> Result<String, KeyError> {
        if public_key.len() != 32 {
            return Err(KeyError::ParsePublic(format!("{} bytes", public_key.len())));
        }
        let id = key_id_for(public_key);
        self.keys.insert(id.clone(), public_key.to_vec());
        Ok(id)
    }

    /// Trusts a base64-encoded public key and returns its id.
    pub fn add_base64(&mut self, public_key: &str) -> Result<String, KeyError> {
        let raw = B64.decode(public_key.trim()).map_err(|e| KeyError::ParsePublic(e.to_string()))?;
        self.add(&raw)
    }

    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks `signature` over `context || payload` with the key named `key_id`.
    pub fn verify(&self, key_id: &str, context: &[u8], payload: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        let public = self.keys.get(key_id).ok_or_else(|| KeyError::UnknownKey { key_id: key_id.to_owned() })?;
        let mut msg = Vec::with_capacity(context.len() + payload.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(payload);
        UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(&msg, signature)
            .map_err(|_| KeyError::BadSignature { key_id: key_id.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_is_stable_and_derived_from_the_public_key() {
        let (signer, pkcs8) = Signer::generate().expect("generate");
        let again = Signer::from_pkcs8(&pkcs8).expect("reload");
        assert_eq!(signer.key_id(), again.key_id());
        assert!(signer.key_id().starts_with("ed25519-"));
        assert_eq!(signer.key_id().len(), "ed25519-".len() + 16);
    }

    #[test]
    fn a_signature_does_not_verify_under_another_context() {
        let (signer, _) = Signer::generate().expect("generate");
        let mut trusted = TrustedKeys::new();
        trusted.add_base64(&signer.public_key_base64()).expect("add");
        let sig = signer.sign(b"a\0", b"payload");
        trusted.verify(signer.key_id(), b"a\0", b"payload", &sig).expect("same context verifies");
        let err = trusted.verify(signer.key_id(), b"b\0", b"payload", &sig).unwrap_err();
        assert!(matches!(err, KeyError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn garbage_keys_are_refused() {
        assert!(Signer::from_pkcs8(b"not a key").is_err());
        let mut trusted = TrustedKeys::new();
        assert!(trusted.add_base64("AAAA").is_err());
        assert!(trusted.add_base64("%%%").is_err());
    }
}
