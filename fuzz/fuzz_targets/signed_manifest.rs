//! A signed model manifest, verified then decoded: what `sentinel-agent
//! verify --manifest` reads from a file (the hub's JSON or protobuf
//! `SignedManifest`, `agent/src/verify.rs`) and what every desired state
//! carries per model (`sentinel_proto::verify_manifest`).
//!
//! Input: the bytes of a manifest file, and also the protobuf `ModelManifest`
//! payload a hub would sign. A verified manifest must render as the hub's
//! JSON view without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_agent::verify::parse_signed_manifest;
use sentinel_proto::manifest::{MANIFEST_CONTEXT, ManifestView};
use sentinel_proto::pb::{ModelManifest, SignedManifest};
use sentinel_proto::verify_manifest;

fuzz_target!(|data: &[u8]| {
    let keys = sentinel_fuzz::keys();
    // As received: a manifest file in either form, checked against the pins.
    if let Ok(signed) = parse_signed_manifest(data) {
        let _ = verify_manifest(&signed, &keys.trusted);
    }
    // As if the hub had signed these bytes: decoding and validation run.
    let key_id = keys.signer.key_id().to_owned();
    let signed =
        SignedManifest { manifest: data.to_vec(), signature: keys.signer.sign(MANIFEST_CONTEXT, data), key_id };
    if let Ok(manifest) = verify_manifest(&signed, &keys.trusted) {
        let view = ManifestView::from(&manifest);
        let json = serde_json::to_string(&view).expect("a manifest view serialises");
        let back: ManifestView = serde_json::from_str(&json).expect("a manifest view parses back");
        assert_eq!(back, view, "the JSON view round-trips");
        if let Ok(again) = ModelManifest::try_from(&back) {
            // What the view can express survives it.
            assert_eq!(again.name, manifest.name);
            assert_eq!(again.sha256, manifest.sha256);
            assert_eq!(again.size, manifest.size);
        }
    }
});
