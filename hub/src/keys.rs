//! The hub's Ed25519 signing keys.
//!
//! On the embedded defaults, keys live in `DATA/keys/` as `<key-id>.pk8`
//! (PKCS#8, mode 0600) with the id of the key that signs new manifests in
//! `DATA/keys/active`. The first start generates one. Rotation generates
//! another and makes it active; the old keys stay, so manifests they signed
//! keep verifying on devices that pin both public keys.
//!
//! Replicas on a shared database keep the keys there instead
//! ([`SigningKeyRecord`]), each private key sealed by a [`Kek`] that every
//! replica is given. The public keys are stored in the clear: a lost
//! key-encryption key loses the ability to sign with the old keys, never the
//! ability to verify what they signed.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sentinel_proto::{Signer, TrustedKeys};
use serde::Serialize;

/// Failures loading or creating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("key file I/O failed: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a valid Ed25519 PKCS#8 key")]
    Parse {
        path: PathBuf,
        #[source]
        source: sentinel_proto::KeyError,
    },
    #[error("key file {path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("active key {0} has no key file")]
    MissingActive(String),
    #[error("generating a key failed")]
    Generate(#[source] sentinel_proto::KeyError),
    #[error(
        "key-encryption key file {path}: {reason} (make one with `head -c 32 /dev/urandom > FILE`, \
         mode 0600, and give every replica the same file)"
    )]
    Kek { path: PathBuf, reason: String },
    #[error(
        "the active signing key {0} cannot be unsealed with this key-encryption key: it was sealed with \
         another one. Give the original --key-encryption-key-file"
    )]
    Unseal(String),
    #[error("sealing a signing key failed")]
    Seal,
    #[error("the database holds no active signing key")]
    NoActive,
}

/// The key-encryption key: AES-256-GCM over each private signing key kept in
/// a shared database, with the key id as associated data (a sealed key
/// cannot be moved to another id).
pub struct Kek {
    key: ring::aead::LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

const NONCE_LEN: usize = ring::aead::NONCE_LEN;

impl Kek {
    /// Reads a key-encryption key file: 32 raw bytes, or 64 hex digits, or
    /// 32 bytes in standard base64 (a trailing newline is fine). Refuses a
    /// file others can read.
    pub fn from_file(path: &Path) -> Result<Self, KeyringError> {
        let bad = |reason: String| KeyringError::Kek { path: path.to_path_buf(), reason };
        let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(bad(format!("readable by others (mode {:o}); run chmod 600 on it", mode & 0o777)));
        }
        // The longest form is 44 base64 characters and a newline: a bigger
        // file is the wrong file, and is not read.
        if meta.len() > 256 {
            return Err(bad(format!(
                "{} bytes; expected 32 raw bytes, 64 hex digits or 44 base64 characters",
                meta.len()
            )));
        }
        let bytes = fs::read(path).map_err(|e| bad(e.to_string()))?;
        Self::from_bytes(&bytes).map_err(bad)
    }

    /// As [`Kek::from_file`], from the file's contents.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        use base64::Engine as _;
        let text = std::str::from_utf8(bytes).ok().map(str::trim);
        let raw = if bytes.len() == 32 {
            bytes.to_vec()
        } else if let Some(hex) = text.filter(|t| t.len() == 64).and_then(|t| hex::decode(t).ok()) {
            hex
        } else if let Some(b64) =
            text.filter(|t| t.len() == 44).and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        {
            b64
        } else {
            return Err(format!("{} bytes; expected 32 raw bytes, 64 hex digits or 44 base64 characters", bytes.len()));
        };
        let unbound =
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &raw).map_err(|_| "not an AES-256 key".to_owned())?;
        Ok(Self { key: ring::aead::LessSafeKey::new(unbound) })
    }

    /// Seals `pkcs8` under `key_id`: a fresh random nonce, then ciphertext and tag.
    pub fn seal(&self, key_id: &str, pkcs8: &[u8]) -> Result<Vec<u8>, KeyringError> {
        use ring::rand::SecureRandom as _;
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SystemRandom::new().fill(&mut nonce).map_err(|_| KeyringError::Seal)?;
        let mut out = pkcs8.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(key_id.as_bytes()),
                &mut out,
            )
            .map_err(|_| KeyringError::Seal)?;
        let mut sealed = nonce.to_vec();
        sealed.append(&mut out);
        Ok(sealed)
    }

    /// The PKCS#8 bytes `sealed` holds, if this key sealed them under `key_id`.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, ring::aead::Aad::from(key_id.as_bytes()), &mut body).ok()?.len();
        body.truncate(plain);
        Some(body)
    }
}

/// A new key, sealed for a shared database.
pub fn generate_sealed(kek: &Kek, now_ms: i64) -> Result<SigningKeyRecord, KeyringError> {
    let (signer, pkcs8) = Signer::generate().map_err(KeyringError::Generate)?;
    let key_id = signer.key_id().to_owned();
    Ok(SigningKeyRecord {
        sealed_pkcs8: kek.seal(&key_id, &pkcs8)?,
        public_key: signer.public_key().to_vec(),
        key_id,
        created_at_ms: now_ms,
        active: true,
    })
}

/// A public key as served at `GET /api/v1/keys`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PublicKeyInfo {
    pub key_id: String,
    pub algorithm: &'static str,
    /// Raw 32-byte Ed25519 public key, standard base64.
    pub public_key: String,
    pub active: bool,
}

/// A signing key as a shared database keeps it: the public key in the clear,
/// the private key (PKCS#8) sealed with the hubs' key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub key_id: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// Nonce, then AES-256-GCM ciphertext and tag (see `keys::Kek`).
    pub sealed_pkcs8: Vec<u8>,
    pub created_at_ms: i64,
    pub active: bool,
}

/// Every `<key-id>.pk8` in `dir`, in name order, parsed, with its bytes. A
/// file others can read is refused.
fn read_keys(dir: &Path) -> Result<Vec<(Signer, Vec<u8>)>, KeyringError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err("read dir", dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pk8"))
        .collect();
    entries.sort();
    let mut out = Vec::with_capacity(entries.len());
    for path in entries {
        let mode = fs::metadata(&path).map_err(io_err("stat", &path))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions { path, mode: mode & 0o777 });
        }
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let signer = Signer::from_pkcs8(&bytes).map_err(|source| KeyringError::Parse { path: path.clone(), source })?;
        out.push((signer, bytes));
    }
    Ok(out)
}

/// One key file of an embedded hub: its key id, public key and PKCS#8 bytes.
pub type KeyFile = (String, Vec<u8>, Vec<u8>);

/// The keys in an embedded hub's `keys/` directory, and the active key's id;
/// for moving them to a shared database.
pub fn key_files(dir: &Path) -> Result<(Vec<KeyFile>, String), KeyringError> {
    let out: Vec<KeyFile> = read_keys(dir)?
        .into_iter()
        .map(|(signer, bytes)| (signer.key_id().to_owned(), signer.public_key().to_vec(), bytes))
        .collect();
    let active_path = dir.join("active");
    let active = fs::read_to_string(&active_path).map_err(io_err("read", &active_path))?.trim().to_owned();
    if !out.iter().any(|(id, _, _)| *id == active) {
        return Err(KeyringError::MissingActive(active));
    }
    Ok((out, active))
}

/// All signing keys of this hub, and which one is active.
#[derive(Debug)]
pub struct Keyring {
    /// Where [`Keyring::rotate`] stores keys; `None` for keys kept in a
    /// database, which the service rotates through the store.
    dir: Option<PathBuf>,
    signers: Vec<Arc<Signer>>,
    active: usize,
    /// Keys of a database that this key-encryption key cannot unseal: they
    /// sign nothing here, but stay trusted and listed.
    public_only: Vec<Vec<u8>>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyringError {
    let path = path.to_path_buf();
    move |source| KeyringError::Io { op, path, source }
}

/// Writes `bytes` to `path` with mode 0600, via a temp file and rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyringError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io_err("fsync dir", parent))?;
    }
    Ok(())
}

impl Keyring {
    /// Loads the keys in `dir`, generating the first one if there is none.
    pub fn open_or_create(dir: &Path) -> Result<Self, KeyringError> {
        sentinel_proto::private::create_dir(dir).map_err(io_err("create", dir))?;
        let signers = read_keys(dir)?.into_iter().map(|(signer, _)| Arc::new(signer)).collect();
        let mut ring = Self { dir: Some(dir.to_path_buf()), signers, active: 0, public_only: Vec::new() };
        let active_path = dir.join("active");
        if ring.signers.is_empty() {
            ring.rotate()?;
        } else {
            let active_id = fs::read_to_string(&active_path).map_err(io_err("read", &active_path))?;
            let active_id = active_id.trim();
            ring.active = ring
                .signers
                .iter()
                .position(|s| s.key_id() == active_id)
                .ok_or_else(|| KeyringError::MissingActive(active_id.to_owned()))?;
        }
        Ok(ring)
    }

    /// The keys a shared database holds, unsealed with `kek`. Keys it cannot
    /// unseal stay trusted, not signing; the active one must unseal.
    pub fn from_sealed(records: &[SigningKeyRecord], kek: &Kek) -> Result<Self, KeyringError> {
        let mut ring = Self { dir: None, signers: Vec::new(), active: usize::MAX, public_only: Vec::new() };
        for r in records {
            let signer = kek.open(&r.key_id, &r.sealed_pkcs8).and_then(|p| Signer::from_pkcs8(&p).ok());
            match signer {
                Some(s) if s.key_id() == r.key_id => {
                    if r.active {
                        ring.active = ring.signers.len();
                    }
                    ring.signers.push(Arc::new(s));
                }
                _ if r.active => return Err(KeyringError::Unseal(r.key_id.clone())),
                _ => {
                    tracing::warn!(key_id = %r.key_id, "a signing key cannot be unsealed with this key-encryption key; it stays trusted for verification only");
                    ring.public_only.push(r.public_key.clone());
                }
            }
        }
        if ring.active == usize::MAX {
            return Err(KeyringError::NoActive);
        }
        Ok(ring)
    }

    /// Whether this keyring is kept in a database (rotated through the store).
    pub fn is_shared(&self) -> bool {
        self.dir.is_none()
    }

    /// Generates a new key, stores it, and makes it the active one. Returns
    /// its id. Only for keys kept in a directory.
    pub fn rotate(&mut self) -> Result<String, KeyringError> {
        let Some(dir) = self.dir.clone() else { return Err(KeyringError::NoActive) };
        let (signer, pkcs8) = Signer::generate().map_err(KeyringError::Generate)?;
        let id = signer.key_id().to_owned();
        write_private(&dir.join(format!("{id}.pk8")), &pkcs8)?;
        write_private(&dir.join("active"), id.as_bytes())?;
        self.signers.push(Arc::new(signer));
        self.active = self.signers.len() - 1;
        tracing::info!(key_id = %id, "new signing key is active");
        Ok(id)
    }

    /// The key that signs new manifests.
    pub fn active(&self) -> Arc<Signer> {
        Arc::clone(&self.signers[self.active])
    }

    /// Every public key, the active one marked.
    pub fn public_keys(&self) -> Vec<PublicKeyInfo> {
        use base64::Engine as _;
        let mut keys: Vec<PublicKeyInfo> = self
            .signers
            .iter()
            .enumerate()
            .map(|(i, s)| PublicKeyInfo {
                key_id: s.key_id().to_owned(),
                algorithm: "ed25519",
                public_key: s.public_key_base64(),
                active: i == self.active,
            })
            .collect();
        for pk in &self.public_only {
            let mut t = TrustedKeys::new();
            if let Ok(key_id) = t.add(pk) {
                keys.push(PublicKeyInfo {
                    key_id,
                    algorithm: "ed25519",
                    public_key: base64::engine::general_purpose::STANDARD.encode(pk),
                    active: false,
                });
            }
        }
        keys
    }

    /// The set of keys a verifier of this hub's signatures should trust.
    pub fn trusted(&self) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        for s in &self.signers {
            // A key we generated is always 32 bytes.
            let _ = t.add(s.public_key());
        }
        for pk in &self.public_only {
            let _ = t.add(pk);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_creates_a_private_key_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let ring = Keyring::open_or_create(&keys).expect("create");
        let id = ring.active().key_id().to_owned();
        let file = keys.join(format!("{id}.pk8"));
        assert_eq!(fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o600);
        let again = Keyring::open_or_create(&keys).expect("reopen");
        assert_eq!(again.active().key_id(), id);
    }

    #[test]
    fn rotation_keeps_old_keys_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ring = Keyring::open_or_create(dir.path()).expect("create");
        let old = ring.active().key_id().to_owned();
        let new = ring.rotate().expect("rotate");
        assert_ne!(old, new);
        let reopened = Keyring::open_or_create(dir.path()).expect("reopen");
        assert_eq!(reopened.active().key_id(), new);
        assert!(reopened.trusted().contains(&old));
        assert_eq!(reopened.public_keys().iter().filter(|k| k.active).count(), 1);
    }

    #[test]
    fn sealed_keys_open_only_with_their_kek_and_their_id() {
        let kek = Kek::from_bytes(&[7u8; 32]).expect("kek");
        let other = Kek::from_bytes(hex::encode([8u8; 32]).as_bytes()).expect("hex kek");
        let old = generate_sealed(&kek, 1).expect("old");
        let mut new = generate_sealed(&kek, 2).expect("new");
        let old = SigningKeyRecord { active: false, ..old };
        let ring = Keyring::from_sealed(&[old.clone(), new.clone()], &kek).expect("unsealed");
        assert_eq!(ring.active().key_id(), new.key_id);
        assert!(ring.trusted().contains(&old.key_id) && ring.is_shared());
        // Another KEK: the active key cannot sign, and that is refused by name.
        let err = Keyring::from_sealed(&[old.clone(), new.clone()], &other).expect_err("wrong kek");
        assert!(matches!(&err, KeyringError::Unseal(id) if *id == new.key_id), "{err}");
        // A key sealed under another id does not open: sealed bytes cannot be moved.
        assert!(kek.open(&old.key_id, &new.sealed_pkcs8).is_none());
        // Old keys another KEK sealed stay trusted, and listed, but sign nothing.
        let newer = generate_sealed(&other, 3).expect("newer");
        new.active = false;
        let ring = Keyring::from_sealed(&[old.clone(), new.clone(), newer.clone()], &other).expect("public only");
        assert_eq!(ring.active().key_id(), newer.key_id);
        assert!(ring.trusted().contains(&old.key_id) && ring.trusted().contains(&new.key_id));
        assert_eq!(ring.public_keys().len(), 3);
        for bad in [&b"short"[..], &[0u8; 31][..], b"zz"] {
            assert!(Kek::from_bytes(bad).is_err());
        }
        // A file that cannot be a KEK is refused by its size, unread.
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        fs::write(&big, vec![0u8; 4096]).expect("write");
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = Kek::from_file(&big).expect_err("too big");
        assert!(err.to_string().contains("4096 bytes; expected 32 raw bytes"), "{err}");
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Keyring::open_or_create(dir.path()).expect("create");
        let file = dir.path().join(format!("{}.pk8", ring.active().key_id()));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(Keyring::open_or_create(dir.path()), Err(KeyringError::Permissions { .. })));
    }
}
