//! Publisher signatures: OpenSSF `model-signing` bundles over one model file,
//! checked against publisher keys the verifier holds.
//!
//! The hub checks a bundle at push against the keys its admin registered; a
//! device that pins publishers checks it again against its own copies, so a
//! stolen hub key alone cannot put a model on it.
//!
//! What is accepted is what `model_signing sign key MODEL.onnx --private_key
//! key.pem` (model-signing 1.x) writes: a Sigstore bundle (v0.3 JSON) whose
//! DSSE envelope holds an in-toto statement, predicate
//! `https://model_signing/signature/v1.0`, serialised with method `files` and
//! hash `sha256`, naming exactly one resource: the file. The envelope is
//! signed with ECDSA P-256/SHA-256 or P-384/SHA-384 (the key's curve picks the
//! hash, as model-signing does) over DSSE's pre-authentication encoding.
//!
//! Certificate and keyless (Fulcio/Rekor) bundles need the network to verify
//! and are refused as such. So are directory models and shard serialisation:
//! a Sentinel version is one ONNX file.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;

/// The largest bundle read. One file's bundle is ~1.5 KB; a bound keeps a
/// hostile one from costing more than this to parse.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// The largest publisher key file read (a P-384 PEM is 215 bytes).
pub const MAX_KEY_BYTES: usize = 4 * 1024;

const BUNDLE_MEDIA_TYPES: [&str; 2] =
    ["application/vnd.dev.sigstore.bundle.v0.3+json", "application/vnd.dev.sigstore.bundle+json;version=0.3"];
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

/// DER prefixes of an uncompressed EC public key's SubjectPublicKeyInfo,
/// before the 0x04 || X || Y point (ring's public key bytes).
pub const SPKI_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
pub const SPKI_P384: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00,
    0x22, 0x03, 0x62, 0x00,
];

/// Why a publisher key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("the key is {0} bytes; a public key PEM is at most {MAX_KEY_BYTES}")]
    TooLarge(usize),
    #[error("not a PEM public key (expected -----BEGIN PUBLIC KEY-----, as `openssl ec -pubout` writes)")]
    NotPem,
    #[error("the PEM body is not base64")]
    BadBase64,
    #[error(
        "not an uncompressed EC P-256 or P-384 public key (model-signing's `key` method signs with those; \
         make one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem` and \
         `openssl ec -in key.pem -pubout -out pub.pem`)"
    )]
    UnsupportedKey,
    #[error("the point is not on the curve")]
    BadPoint,
}

/// A publisher's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherKey {
    /// Who the key belongs to, as the verifier named it.
    pub name: String,
    /// Hex SHA-256 of the canonical PEM: model-signing's key hint.
    pub key_id: String,
    curve: Curve,
    /// The SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    /// The SubjectPublicKeyInfo DER before the point, and the uncompressed
    /// point's length.
    fn spki(self) -> (&'static [u8], usize) {
        match self {
            Curve::P256 => (SPKI_P256, 65),
            Curve::P384 => (SPKI_P384, 97),
        }
    }
}

/// The short form of a key id that refusals name (16 of its 64 hex digits).
pub fn short_key_id(key_id: &str) -> &str {
    key_id.get(..16).unwrap_or(key_id)
}

impl PublisherKey {
    /// Reads a PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<Self, KeyFileError> {
        if pem.len() > MAX_KEY_BYTES {
            return Err(KeyFileError::TooLarge(pem.len()));
        }
        let text = std::str::from_utf8(pem).map_err(|_| KeyFileError::NotPem)?;
        let body = text
            .trim()
            .strip_prefix("-----BEGIN PUBLIC KEY-----")
            .and_then(|t| t.strip_suffix("-----END PUBLIC KEY-----"))
            .ok_or(KeyFileError::NotPem)?;
        let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let spki = STANDARD.decode(b64).map_err(|_| KeyFileError::BadBase64)?;
        let curve = [Curve::P256, Curve::P384]
            .into_iter()
            .find(|c| {
                let (prefix, point) = c.spki();
                spki.len() == prefix.len() + point && spki.starts_with(prefix)
            })
            .ok_or(KeyFileError::UnsupportedKey)?;
        let key = Self { name: name.to_owned(), key_id: String::new(), curve, spki };
        // Checked now, so a bad key is refused when it is registered rather
        // than read as "the signature does not verify" at every push.
        let point = key.point();
        if point.first() != Some(&0x04) || !on_curve(curve, point) {
            return Err(KeyFileError::BadPoint);
        }
        let key_id = hex::encode(ring::digest::digest(&ring::digest::SHA256, key.pem().as_bytes()));
        Ok(Self { key_id, ..key })
    }

    /// The key as PEM, in the exact form Python's `cryptography` writes
    /// (64-column base64): its SHA-256 is model-signing's key hint.
    pub fn pem(&self) -> String {
        let b64 = STANDARD.encode(&self.spki);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// The signature algorithm the key verifies.
    pub fn algorithm(&self) -> &'static str {
        match self.curve {
            Curve::P256 => "ecdsa-p256-sha256",
            Curve::P384 => "ecdsa-p384-sha384",
        }
    }

    /// `name (key 0123456789abcdef)`, as refusals name a key.
    pub fn label(&self) -> String {
        format!("{} (key {})", self.name, short_key_id(&self.key_id))
    }

    fn point(&self) -> &[u8] {
        &self.spki[self.curve.spki().0.len()..]
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let alg: &'static dyn VerificationAlgorithm = match self.curve {
            Curve::P256 => &ECDSA_P256_SHA256_ASN1,
            Curve::P384 => &ECDSA_P384_SHA384_ASN1,
        };
        UnparsedPublicKey::new(alg, self.point()).verify(message, signature).is_ok()
    }
}

/// Whether `point` is a point of `curve`. ring's signature keys have no
/// "parse only"; its ECDH does validate a peer's point, so one ephemeral
/// agreement checks it.
fn on_curve(curve: Curve, point: &[u8]) -> bool {
    use ring::agreement::{ECDH_P256, ECDH_P384, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    let alg = match curve {
        Curve::P256 => &ECDH_P256,
        Curve::P384 => &ECDH_P384,
    };
    let rng = ring::rand::SystemRandom::new();
    EphemeralPrivateKey::generate(alg, &rng)
        .is_ok_and(|mine| agree_ephemeral(mine, &UnparsedPublicKey::new(alg, point), |_| ()).is_ok())
}

/// Why a bundle did not verify. Each text says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the signature bundle is {0} bytes; at most {MAX_BUNDLE_BYTES} are read")]
    TooLarge(usize),
    #[error("the signature is not a Sigstore bundle as model-signing writes it: {0}")]
    Malformed(String),
    #[error("bundle media type {0:?} is not a Sigstore bundle v0.3")]
    MediaType(String),
    #[error(
        "the bundle is certificate-based or keyless (Sigstore): verifying those needs the network; \
         sign with model-signing's `key` method"
    )]
    NotKeyBased,
    #[error("the DSSE payload type is {0:?}, not {PAYLOAD_TYPE}")]
    PayloadType(String),
    #[error("the bundle has {0} signatures; model-signing writes exactly one")]
    SignatureCount(usize),
    #[error("no known publisher key matches the bundle's key hint {hint}")]
    UnknownKey { hint: String },
    #[error("there is no publisher key to verify it with")]
    NoKeys,
    #[error("the signature does not verify with {tried}")]
    BadSignature { tried: String },
    #[error("the signed statement is not an in-toto v1 statement with predicate {PREDICATE_TYPE}: {0}")]
    Statement(String),
    #[error(
        "the bundle signs {method} serialisation with {hash} hashes; only method `files` with sha256 over one \
         file is supported"
    )]
    Serialization { method: String, hash: String },
    #[error("the bundle signs {0} files; sign the .onnx file itself (`model_signing sign key model.onnx ...`)")]
    NotOneFile(usize),
    #[error("the statement is inconsistent: its subject digest does not match its resources")]
    Inconsistent,
    #[error("the bundle signs a file with sha256 {signed}, but this model's sha256 is {actual}")]
    OtherFile { signed: String, actual: String },
}

impl BundleError {
    /// A short machine-readable kind, for error codes and refusal reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) | Self::MediaType(_) | Self::PayloadType(_) | Self::SignatureCount(_) => "malformed",
            Self::NotKeyBased => "not_key_based",
            Self::UnknownKey { .. } | Self::NoKeys => "unknown_key",
            Self::BadSignature { .. } => "bad_signature",
            Self::Statement(_) | Self::Serialization { .. } | Self::NotOneFile(_) | Self::Inconsistent => {
                "unsupported_statement"
            }
            Self::OtherFile { .. } => "other_file",
        }
    }
}

/// A bundle that verified: who signed which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The matching key's name and id.
    pub publisher: String,
    pub key_id: String,
    /// The sha256 of the file the statement signs (equal to the model's).
    pub sha256: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    #[serde(default)]
    verification_material: Option<Material>,
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Material {
    #[serde(default)]
    public_key: Option<KeyHint>,
    #[serde(default)]
    certificate: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    x509_certificate_chain: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct KeyHint {
    #[serde(default)]
    hint: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Deserialize)]
struct Subject {
    digest: Digests,
}

#[derive(Deserialize)]
struct Digests {
    sha256: String,
}

#[derive(Deserialize)]
struct Predicate {
    resources: Vec<Resource>,
    serialization: Serialization,
}

#[derive(Deserialize)]
struct Resource {
    algorithm: String,
    digest: String,
}

#[derive(Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
}

/// The DSSE payload type model-signing's statements carry.
pub const PAYLOAD_TYPE_IN_TOTO: &str = PAYLOAD_TYPE;

/// DSSE v1 pre-authentication encoding of `payload`: the bytes the
/// envelope's signature covers.
pub fn pae(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {PAYLOAD_TYPE} {} ", PAYLOAD_TYPE.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Verifies `bundle` with one of `keys` and checks it signs the file whose
/// sha256 is `model_sha256` (lower-case hex).
pub fn verify_bundle(bundle: &[u8], keys: &[PublisherKey], model_sha256: &str) -> Result<Verified, BundleError> {
    if bundle.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(bundle.len()));
    }
    let malformed = |e: &dyn std::fmt::Display| BundleError::Malformed(e.to_string());
    let b: Bundle = serde_json::from_slice(bundle).map_err(|e| malformed(&e))?;
    if !BUNDLE_MEDIA_TYPES.contains(&b.media_type.as_str()) {
        return Err(BundleError::MediaType(b.media_type.chars().take(100).collect()));
    }
    let material = b.verification_material.ok_or_else(|| malformed(&"no verificationMaterial"))?;
    if material.certificate.is_some() || material.x509_certificate_chain.is_some() || material.public_key.is_none() {
        return Err(BundleError::NotKeyBased);
    }
    let hint = material.public_key.and_then(|k| k.hint).unwrap_or_default();
    let envelope = b.dsse_envelope.ok_or_else(|| malformed(&"no dsseEnvelope (a message signature bundle?)"))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(BundleError::PayloadType(envelope.payload_type.chars().take(100).collect()));
    }
    if envelope.signatures.len() != 1 {
        return Err(BundleError::SignatureCount(envelope.signatures.len()));
    }
    let payload = STANDARD.decode(&envelope.payload).map_err(|e| malformed(&format!("payload: {e}")))?;
    let sig = STANDARD.decode(&envelope.signatures[0].sig).map_err(|e| malformed(&format!("signature: {e}")))?;

    // The hint names the key; an old bundle without one is tried on every key.
    let candidates: Vec<&PublisherKey> =
        if hint.is_empty() { keys.iter().collect() } else { keys.iter().filter(|k| k.key_id == hint).collect() };
    if candidates.is_empty() {
        return Err(if keys.is_empty() || hint.is_empty() {
            BundleError::NoKeys
        } else {
            BundleError::UnknownKey { hint: hint.chars().take(64).collect() }
        });
    }
    let message = pae(&payload);
    let key = candidates.iter().find(|k| k.verify(&message, &sig)).ok_or_else(|| BundleError::BadSignature {
        tried: candidates.iter().map(|k| k.label()).collect::<Vec<_>>().join(", "),
    })?;

    // Signed: now what it says.
    let st: Statement = serde_json::from_slice(&payload).map_err(|e| BundleError::Statement(e.to_string()))?;
    if st.kind != STATEMENT_TYPE || st.predicate_type != PREDICATE_TYPE {
        return Err(BundleError::Statement(format!(
            "type {:?}, predicate {:?}",
            st.kind.chars().take(100).collect::<String>(),
            st.predicate_type.chars().take(100).collect::<String>()
        )));
    }
    let ser = &st.predicate.serialization;
    if ser.method != "files" || ser.hash_type != "sha256" {
        return Err(BundleError::Serialization {
            method: ser.method.chars().take(32).collect(),
            hash: ser.hash_type.chars().take(32).collect(),
        });
    }
    let [resource] = st.predicate.resources.as_slice() else {
        return Err(BundleError::NotOneFile(st.predicate.resources.len()));
    };
    let [subject] = st.subject.as_slice() else {
        return Err(BundleError::Statement(format!("{} subjects; expected one", st.subject.len())));
    };
    let digest = hex::decode(&resource.digest).ok().filter(|d| d.len() == 32 && resource.algorithm == "sha256");
    let Some(digest) = digest else {
        return Err(BundleError::Statement("the resource digest is not a sha256".into()));
    };
    // The subject's digest is the SHA-256 of the resources' digests, in order.
    if hex::encode(ring::digest::digest(&ring::digest::SHA256, &digest)) != subject.digest.sha256.to_ascii_lowercase() {
        return Err(BundleError::Inconsistent);
    }
    let signed = hex::encode(&digest);
    if signed != model_sha256 {
        return Err(BundleError::OtherFile { signed, actual: model_sha256.to_owned() });
    }
    Ok(Verified { publisher: key.name.clone(), key_id: key.key_id.clone(), sha256: signed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};

    /// A P-256 key pair and its publisher key.
    fn keypair(name: &str) -> (EcdsaKeyPair, PublisherKey) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("generate");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).expect("parse");
        let mut spki = SPKI_P256.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&spki));
        let key = PublisherKey::from_pem(name, pem.as_bytes()).expect("key");
        (pair, key)
    }

    fn statement(file_sha: &str, resources: usize) -> Vec<u8> {
        let digest = hex::decode(file_sha).expect("hex");
        let mut all = Vec::new();
        for _ in 0..resources {
            all.extend_from_slice(&digest);
        }
        let root = hex::encode(ring::digest::digest(&ring::digest::SHA256, &all));
        let res: Vec<_> = (0..resources)
            .map(|i| serde_json::json!({"name": if resources == 1 { ".".into() } else { format!("f{i}") }, "algorithm": "sha256", "digest": file_sha}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "_type": STATEMENT_TYPE,
            "subject": [{"name": "model.onnx", "digest": {"sha256": root}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {"resources": res, "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": false}},
        }))
        .expect("json")
    }

    /// A bundle as model-signing writes it, signed by `pair`.
    fn bundle(pair: &EcdsaKeyPair, hint: &str, payload: &[u8]) -> Vec<u8> {
        let sig = pair.sign(&SystemRandom::new(), &pae(payload)).expect("sign");
        serde_json::to_vec(&serde_json::json!({
            "mediaType": BUNDLE_MEDIA_TYPES[0],
            "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
            "dsseEnvelope": {
                "payload": STANDARD.encode(payload),
                "payloadType": PAYLOAD_TYPE,
                "signatures": [{"sig": STANDARD.encode(sig.as_ref()), "keyid": ""}],
            },
        }))
        .expect("json")
    }

    const SHA: &str = "a2548c61976d7687ddc92c70b77ef09758699d7fbe11f13f83ef0383075ec0c4";

    #[test]
    fn a_good_bundle_verifies_and_names_its_publisher() {
        let (pair, key) = keypair("ml-team");
        let (_, other) = keypair("other");
        let b = bundle(&pair, &key.key_id, &statement(SHA, 1));
        let v = verify_bundle(&b, &[other.clone(), key.clone()], SHA).expect("verifies");
        assert_eq!((v.publisher.as_str(), v.key_id.as_str(), v.sha256.as_str()), ("ml-team", key.key_id.as_str(), SHA));
        // No hint (model-signing before 1.0): every key is tried.
        let b = bundle(&pair, "", &statement(SHA, 1));
        assert_eq!(verify_bundle(&b, &[other, key], SHA).expect("verifies").publisher, "ml-team");
    }

    #[test]
    fn each_bad_bundle_is_refused_saying_why() {
        let (pair, key) = keypair("ml-team");
        let (other_pair, other) = keypair("other");
        let good = statement(SHA, 1);
        let keys = [key.clone()];
        let other_sha = "00".repeat(32);
        let cases: Vec<(&str, Vec<u8>, &[PublisherKey], &str)> = vec![
            ("another file", bundle(&pair, &key.key_id, &statement(&other_sha, 1)), &keys, "other_file"),
            ("foreign key", bundle(&other_pair, &other.key_id, &good), &keys, "unknown_key"),
            ("wrong key, right hint", bundle(&other_pair, &key.key_id, &good), &keys, "bad_signature"),
            ("directory", bundle(&pair, &key.key_id, &statement(SHA, 2)), &keys, "unsupported_statement"),
            ("not json", b"{".to_vec(), &keys, "malformed"),
            ("no keys", bundle(&pair, &key.key_id, &good), &[], "unknown_key"),
            ("too large", vec![b' '; MAX_BUNDLE_BYTES + 1], &keys, "too_large"),
        ];
        for (what, b, keys, kind) in cases {
            let err = verify_bundle(&b, keys, SHA).expect_err(what);
            assert_eq!(err.kind(), kind, "{what}: {err}");
        }
        // A payload changed after signing.
        let mut v: serde_json::Value = serde_json::from_slice(&bundle(&pair, &key.key_id, &good)).expect("json");
        v["dsseEnvelope"]["payload"] = STANDARD.encode(statement(&other_sha, 1)).into();
        let err = verify_bundle(&serde_json::to_vec(&v).expect("json"), &keys, &other_sha).expect_err("tampered");
        assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
        // A certificate-based bundle.
        v["verificationMaterial"] = serde_json::json!({"certificate": {"rawBytes": "AA=="}});
        let err = verify_bundle(&serde_json::to_vec(&v).expect("json"), &keys, SHA).expect_err("cert");
        assert_eq!(err, BundleError::NotKeyBased);
    }

    #[test]
    fn keys_are_read_from_pem_and_others_are_refused_saying_why() {
        let (_, key) = keypair("k");
        let again = PublisherKey::from_pem("k", key.pem().as_bytes()).expect("round trip");
        assert_eq!(again, key);
        assert_eq!(key.key_id.len(), 64);
        assert_eq!(PublisherKey::from_pem("k", b"hello"), Err(KeyFileError::NotPem));
        let ed25519 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert_eq!(PublisherKey::from_pem("k", ed25519.as_bytes()), Err(KeyFileError::UnsupportedKey));
        assert_eq!(PublisherKey::from_pem("k", &[b'a'; MAX_KEY_BYTES + 1]), Err(KeyFileError::TooLarge(4097)));
    }
}
