//! What the fuzz targets share: a signing key made once per process, and the
//! fixed facts (device, time, revision) a desired state is checked against.
//!
//! Signatures guard the decoders behind them, so a fuzzer that can only
//! mutate signed bytes would never get past the signature check. The
//! targets therefore check each input twice: once as received (the signature
//! path itself), and once signed with [`keys`]'s key, as if the hub had
//! signed exactly those bytes, which reaches the decoding and validation that
//! only a hub's (or a stolen key's) bytes reach in production.
//!
//! # Layout
//! - `fuzz_targets/`: one libFuzzer target per untrusted input.
//! - `examples/seed_corpus.rs`: writes `corpus/<target>/` from the repo's own models and data.

use std::sync::OnceLock;

use sentinel_proto::{Signer, TrustedKeys};

/// The device a fuzzed desired state is verified for.
pub const DEVICE_ID: &str = "edge-1";
/// The last verified revision a fuzzed desired state is compared with.
pub const LAST_REVISION: u64 = 3;
/// "Now" for expiry checks (2026-09-21), fixed so runs reproduce.
pub const NOW_UNIX_MS: i64 = 1_790_000_000_000;

/// A hub key generated once per process and the trusted set holding it.
#[derive(Debug)]
pub struct Keys {
    pub signer: Signer,
    pub trusted: TrustedKeys,
}

/// The process's signing key and trusted set.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (signer, _) = Signer::generate().expect("generating an Ed25519 key");
        let mut trusted = TrustedKeys::new();
        trusted.add(signer.public_key()).expect("trusting the generated key");
        Keys { signer, trusted }
    })
}
