//! Offline verification of a model file: `sentinel-agent verify FILE --manifest M`.
//!
//! The same checks the agent makes before it loads a download, without a hub
//! or a running agent: the manifest's signature against the pinned keys
//! (over the exact bytes the hub signed), then the file's size and SHA-256
//! against the verified manifest.
//!
//! The manifest may be given in either form the hub hands out: the JSON of
//! `GET /api/v1/models/{name}/versions/{version}/manifest`
//! (`{"manifest", "signature", "key_id", ...}`, base64 fields; its `decoded`
//! part is ignored, it is never what is verified), or the protobuf
//! `SignedManifest` bytes.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message as _;
use sentinel_proto::TrustedKeys;
use sentinel_proto::pb::{ModelManifest, SignedManifest};

/// Why a file did not verify, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the manifest file is neither the hub's JSON nor protobuf SignedManifest bytes: {0}")]
    ManifestFormat(String),
    #[error("the manifest does not verify against the pinned keys")]
    Manifest(#[source] sentinel_proto::ManifestError),
    #[error("the file has {actual} bytes; the signed manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the file hashes to sha256 {actual}; the signed manifest says {expected}")]
    Hash { expected: String, actual: String },
}

impl VerifyError {
    /// Whether the inputs could not even be read (as opposed to not verifying).
    pub fn is_unreadable(&self) -> bool {
        matches!(self, VerifyError::Read { .. })
    }
}

/// The hub's JSON form of a signed manifest.
#[derive(Debug, serde::Deserialize)]
struct SignedManifestJson {
    manifest: String,
    signature: String,
    key_id: String,
}

/// Parses a signed manifest in the hub's JSON form or as protobuf bytes.
pub fn parse_signed_manifest(bytes: &[u8]) -> Result<SignedManifest, VerifyError> {
    let text_start = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if text_start == Some(&b'{') {
        let j: SignedManifestJson =
            serde_json::from_slice(bytes).map_err(|e| VerifyError::ManifestFormat(format!("JSON: {e}")))?;
        let decode = |field: &str, v: &str| {
            B64.decode(v.trim()).map_err(|e| VerifyError::ManifestFormat(format!("JSON field `{field}`: {e}")))
        };
        return Ok(SignedManifest {
            manifest: decode("manifest", &j.manifest)?,
            signature: decode("signature", &j.signature)?,
            key_id: j.key_id,
        });
    }
    let signed = SignedManifest::decode(bytes).map_err(|e| VerifyError::ManifestFormat(format!("protobuf: {e}")))?;
    if signed.manifest.is_empty() || signed.signature.is_empty() {
        return Err(VerifyError::ManifestFormat("protobuf: no manifest bytes or no signature".to_owned()));
    }
    Ok(signed)
}

/// Verifies `file` against the signed manifest in `manifest_file` with the
/// `trusted` keys. Returns the verified manifest.
pub fn verify_file(file: &Path, manifest_file: &Path, trusted: &TrustedKeys) -> Result<ModelManifest, VerifyError> {
    fn read(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
        move |source| VerifyError::Read { path: path.to_path_buf(), source }
    }
    let bytes = std::fs::read(manifest_file).map_err(read(manifest_file))?;
    let signed = parse_signed_manifest(&bytes)?;
    let manifest = sentinel_proto::verify_manifest(&signed, trusted).map_err(VerifyError::Manifest)?;
    let mut f = std::fs::File::open(file).map_err(read(file))?;
    let actual_size = f.metadata().map_err(read(file))?.len();
    if actual_size != manifest.size {
        return Err(VerifyError::Size { expected: manifest.size, actual: actual_size });
    }
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(read(file))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    let actual = hex::encode(digest.finish().as_ref());
    if actual != manifest.sha256 {
        return Err(VerifyError::Hash { expected: manifest.sha256.clone(), actual });
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_neither_form() {
        assert!(
            matches!(parse_signed_manifest(b"{\"manifest\": 1}"), Err(VerifyError::ManifestFormat(m)) if m.starts_with("JSON"))
        );
        assert!(matches!(parse_signed_manifest(b"\xff\xff\xff"), Err(VerifyError::ManifestFormat(_))));
        assert!(matches!(parse_signed_manifest(b""), Err(VerifyError::ManifestFormat(_))));
    }

    #[test]
    fn both_forms_parse_to_the_same_signed_manifest() {
        let signed = SignedManifest { manifest: vec![1, 2, 3], signature: vec![4, 5], key_id: "k1".to_owned() };
        let json = serde_json::json!({
            "manifest": B64.encode(&signed.manifest),
            "signature": B64.encode(&signed.signature),
            "key_id": "k1",
            "decoded": {"ignored": true},
        });
        assert_eq!(parse_signed_manifest(json.to_string().as_bytes()).expect("json"), signed);
        assert_eq!(parse_signed_manifest(&signed.encode_to_vec()).expect("protobuf"), signed);
    }
}
