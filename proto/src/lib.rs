//! Sentinel's wire contract, shared by the hub and the agent.
//!
//! Everything a device trusts crosses the network as protobuf bytes signed
//! with the hub's Ed25519 key. This crate holds the generated types and the
//! two operations on them that must agree on both ends: signing and verifying.
//!
//! # Layout
//! - [`pb`]: types generated from `proto/sentinel/v1/*.proto` at build time (protox, no system protoc).
//! - [`keys`]: signing keys, key ids and the set of keys a verifier trusts.
//! - [`manifest`]: the signed model manifest: sign, verify, validate, and its JSON view.
//! - [`private`]: data and state files only their owner may read (0600 in 0700 dirs).
//! - [`publisher`]: OpenSSF model-signing bundles checked against publisher keys.
//! - [`quote`]: quoting a caller's value back in an error message, bounded.
//! - [`state`]: the signed desired state pushed to one device: sign and verify
//!   (signature, device, replay, expiry, every manifest).
//! - [`telemetry`]: the mergeable latency sketch devices report and the hub keeps.

pub mod keys;
pub mod manifest;
pub mod private;
pub mod publisher;
pub mod quote;
pub mod state;
pub mod telemetry;
pub mod time;

/// Types generated from `proto/sentinel/v1`.
#[allow(missing_docs, clippy::all, unused_qualifications, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/sentinel.v1.rs"));
}

pub use keys::{KeyError, Signer, TrustedKeys};
pub use manifest::{ManifestError, ManifestView, sign_manifest, verify_manifest};
pub use quote::quote;
pub use state::{StateError, VerifiedState, sign_state, verify_state};
