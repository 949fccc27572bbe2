//! The operating-system side of one worker child: its private directory,
//! the descriptors it inherits, reaping it, its stderr, and async framing on
//! its pipes.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use sentinel_worker_protocol::frame as protocol;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr};
use tokio::sync::{Notify, watch};

use super::Exit;

/// How many stderr lines of a worker are kept for error messages.
pub(super) const STDERR_TAIL_LINES: usize = 20;
/// How long a worker that closed its pipes gets to finish exiting before it is killed.
pub(super) const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The worker's private directory, removed when the worker is dropped.
#[derive(Debug)]
pub(super) struct WorkDir(pub(super) PathBuf);

/// Removes the `worker-<pid>-<n>` directories under `work_dir` that another
/// process left: a crashed or killed agent runs no destructors. Call once no
/// other agent can be using `work_dir` (after the control socket is bound).
/// Returns how many it removed.
pub fn remove_stale_work_dirs(work_dir: &Path) -> std::io::Result<usize> {
    let own = format!("worker-{}-", std::process::id());
    let entries = match std::fs::read_dir(work_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("worker-") && !name.starts_with(&own) && entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory costs disk, not correctness.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for the reaper to publish the exit; kills a process that closed its
/// pipes but does not exit within [`EXIT_GRACE`].
pub(super) async fn wait_exit(mut exit: watch::Receiver<Option<Exit>>, kill: &Notify) -> Option<Exit> {
    if let Ok(Ok(e)) = tokio::time::timeout(EXIT_GRACE, exit.wait_for(Option::is_some)).await {
        return *e;
    }
    kill.notify_one();
    match tokio::time::timeout(EXIT_GRACE, exit.wait_for(Option::is_some)).await {
        Ok(Ok(e)) => *e,
        _ => None,
    }
}

/// Owns the child: waits for it (or kills it when asked) and publishes how it ended.
pub(super) async fn reap(mut child: Child, kill: Arc<Notify>, exit: watch::Sender<Option<Exit>>) {
    use std::os::unix::process::ExitStatusExt;
    let status = tokio::select! {
        status = child.wait() => status,
        () = kill.notified() => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let ended = match status {
        Ok(s) => Exit { code: s.code(), signal: s.signal() },
        Err(e) => {
            tracing::warn!(error = %e, "waiting for a worker failed");
            Exit { code: None, signal: None }
        }
    };
    exit.send_replace(Some(ended));
}

/// Logs each stderr line at warn level and keeps the last few for error messages.
pub(super) async fn forward_stderr(pid: u32, stderr: ChildStderr, tail: Arc<StdMutex<VecDeque<String>>>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                tracing::warn!(worker_pid = pid, "{text}");
                let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        }
    }
}

/// Async twin of [`protocol::read_frame`]: `Ok(None)` on a clean end between frames.
pub(super) async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > protocol::MAX_FRAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes is too large")));
    }
    // Read into spare capacity: zeroing a large buffer first costs as much
    // as a copy.
    let mut payload = Vec::with_capacity(len);
    let got = r.take(len as u64).read_to_end(&mut payload).await?;
    if got < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(payload))
}

/// Writes one frame whose payload is `parts` joined (see
/// [`protocol::request_parts`]) and flushes it.
pub(super) async fn write_frame(w: &mut (impl AsyncWrite + Unpin), parts: &[Cow<'_, [u8]>]) -> io::Result<()> {
    let prefix = protocol::frame_len(parts.iter().map(|p| p.len()).sum())?;
    // Small pieces are joined and go in one write (a copy is cheaper than a
    // syscall); a large one, tensor data, is written from where it is.
    let mut pending = prefix.to_vec();
    for part in parts {
        if part.len() <= SMALL_FRAME {
            pending.extend_from_slice(part);
            continue;
        }
        if !pending.is_empty() {
            w.write_all(&pending).await?;
            pending.clear();
        }
        w.write_all(part).await?;
    }
    if !pending.is_empty() {
        w.write_all(&pending).await?;
    }
    w.flush().await
}

/// Pieces of a frame up to this size are joined before they are written.
const SMALL_FRAME: usize = 16 << 10;

/// Pipe capacity asked for the worker's stdin and stdout: 1 MiB, Linux's
/// default `fs.pipe-max-size`, the most an unprivileged process may set.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Raises a pipe's capacity to [`PIPE_BYTES`]. Best effort: past the user's
/// pipe-page budget (`fs.pipe-user-pages-soft`) the kernel refuses, and the
/// pipe keeps its 64 KiB, which only costs more wake-ups per large frame.
pub(super) fn widen_pipe(fd: std::os::fd::RawFd) {
    #[allow(unsafe_code)]
    // SAFETY: fcntl on a descriptor this process owns, with an integer argument.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES) };
    if rc < 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "pipe to a worker keeps its default capacity");
    }
}
