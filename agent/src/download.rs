//! Verified, resumable model downloads.
//!
//! The file streams into `.partial-<sha256>` in the model directory while
//! its SHA-256 is computed; it may never grow past the size the signed
//! manifest declares. A connection that breaks is resumed with
//! `Range: bytes=N-` (and `If-Range` on the expected ETag) from what is
//! already on disk. Only a file whose digest matches the manifest is
//! fsynced and renamed to its digest, so a model file is either absent or
//! whole and verified.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, IF_RANGE, RANGE};

/// Why a download failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("downloaded bytes hash to {actual}, but the signed manifest says {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("the server sent more than the {limit} bytes the signed manifest declares")]
    TooLarge { limit: u64 },
    #[error("not enough disk space: {needed} bytes needed, {available} available in {dir}")]
    NoSpace { needed: u64, available: u64, dir: String },
    #[error("the hub refused the download of {url}: HTTP {status}")]
    Refused { url: String, status: u16 },
    #[error("gave up on {url} after {attempts} attempts without progress: {last}")]
    GaveUp { url: String, attempts: u32, last: String },
    #[error("model store I/O failed: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    /// A short, stable name for reports and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::HashMismatch { .. } => "hash_mismatch",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::NoSpace { .. } => "no_space",
            FetchError::Refused { .. } => "refused",
            FetchError::GaveUp { .. } => "unreachable",
            FetchError::Io { .. } => "io",
        }
    }
}

/// What to download and how to check it.
#[derive(Debug, Clone)]
pub struct Wanted<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub sha256: &'a str,
    pub size: u64,
}

/// How a download went, for logs, reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Body bytes received over the network.
    pub bytes_transferred: u64,
    /// Offsets each resumed request started from.
    pub resumed_from: Vec<u64>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io { op, path, source }
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn available_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call, and `st` points to writable memory of the right size; statvfs
    // writes the struct fully on success and we read it only then.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.assume_init()
    };
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Downloads `wanted` into `dir/<sha256>` unless it is already there.
/// Retries (resuming) up to `attempts` times in a row without progress.
pub async fn fetch(
    client: &reqwest::Client,
    dir: &Path,
    wanted: &Wanted<'_>,
    attempts: u32,
    mut on_resume: impl FnMut(u64),
) -> Result<(PathBuf, Outcome), FetchError> {
    let final_path = dir.join(wanted.sha256);
    if final_path.is_file() {
        return Ok((final_path, Outcome::default()));
    }
    let partial = dir.join(format!(".partial-{}", wanted.sha256));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(sentinel_proto::private::FILE_MODE)
        .open(&partial)
        .map_err(io_err("open", &partial))?;
    // Whatever is already there (an earlier attempt by this process) is
    // hashed again rather than trusted.
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut have = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", &partial))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        have += n as u64;
    }
    let mut outcome = Outcome::default();
    let mut failures = 0u32;
    let mut last_error = String::new();
    while have < wanted.size || have == 0 {
        let available = available_space(dir).map_err(io_err("statvfs", dir))?;
        let needed = wanted.size.saturating_sub(have);
        if available < needed {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(FetchError::NoSpace { needed, available, dir: dir.display().to_string() });
        }
        if failures >= attempts {
            return Err(FetchError::GaveUp { url: wanted.url.to_owned(), attempts: failures, last: last_error });
        }
        let mut req = client.get(wanted.url).bearer_auth(wanted.token);
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-")).header(IF_RANGE, format!("\"{}\"", wanted.sha256));
            outcome.resumed_from.push(have);
            on_resume(have);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                last_error = e.to_string();
                retry_pause(failures).await;
                continue;
            }
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(have) {
                    // Not the range we asked for: start over.
                    restart(&mut file, &partial, &mut digest, &mut have)?;
                    failures += 1;
                    last_error = "server answered a different range".into();
                    continue;
                }
            }
            StatusCode::OK => {
                if have > 0 {
                    restart(&mut file, &partial, &mut digest, &mut have)?;
                }
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                failures += 1;
                last_error = format!("HTTP {s}");
                retry_pause(failures).await;
                continue;
            }
            s => {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(FetchError::Refused { url: wanted.url.to_owned(), status: s.as_u16() });
            }
        }
        let mut resp = resp;
        let before = have;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    outcome.bytes_transferred += chunk.len() as u64;
                    if have + chunk.len() as u64 > wanted.size {
                        drop(file);
                        let _ = std::fs::remove_file(&partial);
                        return Err(FetchError::TooLarge { limit: wanted.size });
                    }
                    digest.update(&chunk);
                    file.write_all(&chunk).map_err(io_err("write", &partial))?;
                    have += chunk.len() as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    last_error = e.to_string();
                    break;
                }
            }
        }
        if have == before {
            failures += 1;
            retry_pause(failures).await;
        } else {
            failures = 0;
        }
        if have == wanted.size {
            break;
        }
    }
    // fsyncs wait for the disk: on the blocking pool, so that the Tokio
    // worker goes on serving requests meanwhile.
    off_runtime(move || file.sync_all()).await.map_err(io_err("fsync", &partial))?;
    let actual = hex::encode(digest.finish().as_ref());
    if actual != wanted.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::HashMismatch { expected: wanted.sha256.to_owned(), actual });
    }
    std::fs::rename(&partial, &final_path).map_err(io_err("rename", &final_path))?;
    let dir_path = dir.to_path_buf();
    off_runtime(move || std::fs::File::open(dir_path).and_then(|d| d.sync_all()))
        .await
        .map_err(io_err("fsync dir", dir))?;
    Ok((final_path, outcome))
}

/// Runs blocking file work on Tokio's blocking pool.
async fn off_runtime(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

fn restart(
    file: &mut std::fs::File,
    partial: &Path,
    digest: &mut ring::digest::Context,
    have: &mut u64,
) -> Result<(), FetchError> {
    file.set_len(0).map_err(io_err("truncate", partial))?;
    file.seek(SeekFrom::Start(0)).map_err(io_err("seek", partial))?;
    *digest = ring::digest::Context::new(&ring::digest::SHA256);
    *have = 0;
    Ok(())
}

/// Backoff between attempts on the same download: 100 ms, doubling, at most 5 s.
async fn retry_pause(failures: u32) {
    let ms = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
