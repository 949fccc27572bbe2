//! A publisher's signature bundle (OpenSSF model-signing, Sigstore bundle
//! JSON): what `sentinel model push --signature` sends the hub and what a
//! device that pins publishers downloads (`sentinel_proto::publisher`).
//!
//! Input: the bundle's bytes, checked as received against a publisher key the
//! harness makes; and the same bytes as the in-toto statement of a bundle the
//! harness signs with that key, which reaches the statement's parsing and
//! digest checks that only a publisher's (or a stolen key's) bytes reach.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use sentinel_proto::publisher::{MAX_BUNDLE_BYTES, PAYLOAD_TYPE_IN_TOTO, PublisherKey, SPKI_P256, pae, verify_bundle};

/// The digits v1 model's sha256, which the signed statements may name.
const MODEL_SHA256: &str = "a2548c61976d7687ddc92c70b77ef09758699d7fbe11f13f83ef0383075ec0c4";

fn key() -> &'static (EcdsaKeyPair, PublisherKey) {
    static KEY: OnceLock<(EcdsaKeyPair, PublisherKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        let mut spki = SPKI_P256.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&spki));
        let key = PublisherKey::from_pem("fuzz", pem.as_bytes()).expect("the harness key parses");
        (pair, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let (pair, key) = key();
    let keys = std::slice::from_ref(key);
    // As received.
    if let Ok(v) = verify_bundle(data, keys, MODEL_SHA256) {
        assert_eq!(v.sha256, MODEL_SHA256);
    }
    // As the statement of a bundle the publisher signed.
    if data.len() <= MAX_BUNDLE_BYTES / 2 {
        let Ok(sig) = pair.sign(&SystemRandom::new(), &pae(data)) else { return };
        let bundle = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": key.key_id}, "tlogEntries": []},
            "dsseEnvelope": {
                "payload": STANDARD.encode(data),
                "payloadType": PAYLOAD_TYPE_IN_TOTO,
                "signatures": [{"sig": STANDARD.encode(sig.as_ref()), "keyid": ""}],
            },
        });
        let bytes = serde_json::to_vec(&bundle).expect("json");
        if let Ok(v) = verify_bundle(&bytes, keys, MODEL_SHA256) {
            assert_eq!((v.publisher.as_str(), v.sha256.as_str()), ("fuzz", MODEL_SHA256));
        }
    }
});
