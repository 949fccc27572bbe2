//! Publisher keys and OpenSSF model-signing bundles made by the real tool
//! (PyPI `model-signing`, run as `python3 -m model_signing`), for the hub's
//! and the agent's publisher-signature tests.

use std::path::{Path, PathBuf};

/// An EC P-256 key pair as PEM files, made by Python's `cryptography` (a
/// dependency of model-signing): what `openssl ecparam -name prime256v1
/// -genkey` and `openssl ec -pubout` would write.
#[derive(Debug, Clone)]
pub struct Keypair {
    pub private: PathBuf,
    pub public: PathBuf,
}

const KEYGEN: &str = "
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], 'wb').write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
open(sys.argv[2], 'wb').write(key.public_key().public_bytes(serialization.Encoding.PEM,
    serialization.PublicFormat.SubjectPublicKeyInfo))
";

const MISSING: &str = "model-signing 1.1.1 and pyOpenSSL from PyPI are needed (.ci/test installs them)";

/// Makes a key pair `name.key` / `name.pub` in `dir`.
pub fn keypair(dir: &Path, name: &str) -> Keypair {
    let (private, public) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let out = std::process::Command::new("python3").args(["-c", KEYGEN]).arg(&private).arg(&public).output().unwrap();
    assert!(out.status.success(), "key generation failed ({MISSING}):\n{}", String::from_utf8_lossy(&out.stderr));
    Keypair { private, public }
}

/// Signs `model` with `key` as the README says a pipeline does:
/// `model_signing sign key MODEL --private_key KEY --signature OUT`.
/// Returns the bundle's path.
pub fn sign(model: &Path, key: &Keypair, out: &Path) -> PathBuf {
    let result = std::process::Command::new("python3")
        .args(["-m", "model_signing", "sign", "key"])
        .arg(model)
        .arg("--private_key")
        .arg(&key.private)
        .arg("--signature")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "model_signing sign failed ({MISSING}):\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    out.to_owned()
}

/// Checks `bundle` over `model` with model-signing's own verifier.
pub fn verify(model: &Path, key: &Keypair, bundle: &Path) -> bool {
    std::process::Command::new("python3")
        .args(["-m", "model_signing", "verify", "key"])
        .arg(model)
        .arg("--public_key")
        .arg(&key.public)
        .arg("--signature")
        .arg(bundle)
        .output()
        .unwrap()
        .status
        .success()
}
