//! Model bytes, addressed by SHA-256.
//!
//! A blob becomes visible only whole: bytes go to a temp file in the blob
//! directory itself (same filesystem, so the rename is atomic), the file is
//! fsynced, renamed to its digest, and the directory is fsynced so the rename
//! survives power loss. A crash mid-write leaves only a `.upload-*` temp file,
//! which the next start removes.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use sentinel_proto::manifest::is_sha256_hex;

const STAGING_PREFIX: &str = ".upload-";

/// Failures of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store I/O failed: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} is not a SHA-256 digest")]
    BadDigest(String),
    #[error("this hub was built without the {0} blob store")]
    Unsupported(&'static str),
    #[error("S3 {op} of s3://{bucket}/{key}: {why}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        why: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// A blob being written. Dropping it without committing deletes the file.
#[derive(Debug)]
pub struct StagedBlob {
    file: tempfile::NamedTempFile,
}

impl StagedBlob {
    /// A new, empty staging file in `dir`.
    pub fn in_dir(dir: &Path) -> Result<Self, BlobError> {
        let file =
            tempfile::Builder::new().prefix(STAGING_PREFIX).tempfile_in(dir).map_err(io_err("create temp", dir))?;
        Ok(Self { file })
    }

    /// The staged bytes from the start, through a new handle.
    pub fn reopen(&self) -> Result<File, BlobError> {
        self.file.reopen().map_err(io_err("reopen", self.path()))
    }

    /// The open temp file, for writing.
    pub fn file(&self) -> &File {
        self.file.as_file()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// A stored blob, opened for reading.
#[derive(Debug)]
pub struct Blob {
    pub len: u64,
    pub body: BlobBody,
}

/// Where a blob's bytes come from.
#[derive(Debug)]
pub enum BlobBody {
    /// A local file, at its start.
    File(File),
    /// An object in a bucket, read by ranged GETs (or a presigned URL).
    Object(super::s3::S3Object),
}

/// Where model bytes live.
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// A new, empty staging file.
    fn stage(&self) -> Result<StagedBlob, BlobError>;
    /// Makes a fully written staging file visible under `sha256`. Durable when
    /// this returns. Committing a digest that already exists keeps the old file.
    fn commit(&self, staged: StagedBlob, sha256: &str) -> Result<(), BlobError>;
    /// Opens a blob for reading; `None` when absent.
    fn open(&self, sha256: &str) -> Result<Option<Blob>, BlobError>;
    fn remove(&self, sha256: &str) -> Result<(), BlobError>;
    /// Digests of every stored blob.
    fn list(&self) -> Result<Vec<String>, BlobError>;
}

/// [`BlobStore`] on a local directory: one file per blob, named by its digest.
#[derive(Debug)]
pub struct LocalBlobStore {
    dir: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { op, path, source }
}

impl LocalBlobStore {
    /// Opens (creating) the store in `dir` and removes staging files left by a
    /// crash.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let dir = dir.into();
        sentinel_proto::private::create_dir(&dir).map_err(io_err("create", &dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io_err("read dir", &dir))? {
            let entry = entry.map_err(io_err("read dir", &dir))?;
            if entry.file_name().to_string_lossy().starts_with(STAGING_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing staging file left by an interrupted upload");
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Self { dir })
    }

    /// The path a blob would have. Only ever built from a checked digest, so it
    /// cannot escape the blob directory.
    pub fn path_of(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if !is_sha256_hex(sha256) {
            return Err(BlobError::BadDigest(sha256.to_owned()));
        }
        Ok(self.dir.join(sha256))
    }
}

impl BlobStore for LocalBlobStore {
    fn stage(&self) -> Result<StagedBlob, BlobError> {
        StagedBlob::in_dir(&self.dir)
    }

    fn commit(&self, staged: StagedBlob, sha256: &str) -> Result<(), BlobError> {
        let dest = self.path_of(sha256)?;
        staged.file.as_file().sync_all().map_err(io_err("fsync", staged.path()))?;
        if dest.exists() {
            // Same digest, same bytes: the existing file is already durable.
            return Ok(());
        }
        staged.file.persist(&dest).map_err(|e| BlobError::Io { op: "rename", path: dest.clone(), source: e.error })?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("fsync dir", &self.dir))?;
        Ok(())
    }

    fn open(&self, sha256: &str) -> Result<Option<Blob>, BlobError> {
        let path = self.path_of(sha256)?;
        match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err("stat", &path))?.len();
                Ok(Some(Blob { len, body: BlobBody::File(f) }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    fn remove(&self, sha256: &str) -> Result<(), BlobError> {
        let path = self.path_of(sha256)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<String>, BlobError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err("read dir", &self.dir))? {
            let name = entry.map_err(io_err("read dir", &self.dir))?.file_name().to_string_lossy().into_owned();
            if is_sha256_hex(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    const DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn a_blob_is_invisible_until_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalBlobStore::open(dir.path()).expect("open");
        let staged = store.stage().expect("stage");
        staged.file().write_all(b"hello").expect("write");
        assert!(store.open(DIGEST).expect("open").is_none());
        assert!(store.list().expect("list").is_empty());
        store.commit(staged, DIGEST).expect("commit");
        let blob = store.open(DIGEST).expect("open").expect("present");
        let (BlobBody::File(mut f), len) = (blob.body, blob.len) else { panic!("a local blob is a file") };
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        assert_eq!((s.as_str(), len), ("hello", 5));
    }

    #[test]
    fn dropped_staging_files_vanish_and_crash_leftovers_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalBlobStore::open(dir.path()).expect("open");
        let staged = store.stage().expect("stage");
        let path = staged.path().to_path_buf();
        drop(staged);
        assert!(!path.exists());
        // A crash cannot run destructors: simulate the leftover by hand.
        std::fs::write(dir.path().join(".upload-crashed"), b"partial").expect("write");
        drop(LocalBlobStore::open(dir.path()).expect("reopen"));
        assert!(!dir.path().join(".upload-crashed").exists());
    }

    #[test]
    fn digests_that_could_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalBlobStore::open(dir.path()).expect("open");
        for bad in ["../etc/passwd", "", "ABCDEF", &"g".repeat(64)] {
            assert!(matches!(store.open(bad), Err(BlobError::BadDigest(_))), "{bad:?}");
        }
    }
}
