//! The hub's Ed25519 signing keys.
//!
//! Keys live in `DATA/keys/` as `<key-id>.pk8` (PKCS#8, mode 0600) with the
//! id of the key that signs new manifests in `DATA/keys/active`. The first
//! start generates one. Rotation generates another and makes it active; the
//! old keys stay, so manifests they signed keep verifying on devices that pin
//! both public keys.

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

/// All signing keys of this hub, and which one is active.
#[derive(Debug)]
pub struct Keyring {
    dir: PathBuf,
    signers: Vec<Arc<Signer>>,
    active: usize,
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
        let mut signers = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(io_err("read dir", dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pk8"))
            .collect();
        entries.sort();
        for path in entries {
            let mode = fs::metadata(&path).map_err(io_err("stat", &path))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(KeyringError::Permissions { path, mode: mode & 0o777 });
            }
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            let signer =
                Signer::from_pkcs8(&bytes).map_err(|source| KeyringError::Parse { path: path.clone(), source })?;
            signers.push(Arc::new(signer));
        }
        let mut ring = Self { dir: dir.to_path_buf(), signers, active: 0 };
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

    /// Generates a new key, stores it, and makes it the active one. Returns its id.
    pub fn rotate(&mut self) -> Result<String, KeyringError> {
        let (signer, pkcs8) = Signer::generate().map_err(KeyringError::Generate)?;
        let id = signer.key_id().to_owned();
        write_private(&self.dir.join(format!("{id}.pk8")), &pkcs8)?;
        write_private(&self.dir.join("active"), id.as_bytes())?;
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
        self.signers
            .iter()
            .enumerate()
            .map(|(i, s)| PublicKeyInfo {
                key_id: s.key_id().to_owned(),
                algorithm: "ed25519",
                public_key: s.public_key_base64(),
                active: i == self.active,
            })
            .collect()
    }

    /// The set of keys a verifier of this hub's signatures should trust.
    pub fn trusted(&self) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        for s in &self.signers {
            // A key we generated is always 32 bytes.
            let _ = t.add(s.public_key());
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
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Keyring::open_or_create(dir.path()).expect("create");
        let file = dir.path().join(format!("{}.pk8", ring.active().key_id()));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(Keyring::open_or_create(dir.path()), Err(KeyringError::Permissions { .. })));
    }
}
