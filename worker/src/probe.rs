//! Forbidden-action probes, for tests only: compiled in with the
//! `test-probes` feature, which the binary that ships does not have.
//!
//! With `--test-forbidden` the worker treats a request payload of
//! `FORBID:<action>` as an order to attempt something the sandbox must stop
//! (`socket`, `open-write`, `exec`), or a control action (`none`, `abort`).
//! Under the filter the attempt kills the worker with `SIGSYS`; without it the
//! worker answers: an ok response with no tensors when the action succeeded,
//! an error response when the system refused it (`exec` always gets `ENOENT`,
//! see [`EXEC_TARGET`]). This
//! is how the integration tests prove that the filter, and not something else,
//! stops each action (Firecracker's `examples/seccomp/{harmless,malicious}.rs`).
//! Production workers never pass the flag, and without it such a payload is
//! just a malformed request.

use std::io;
use std::path::{Path, PathBuf};

use sentinel_worker_protocol::frame;

use crate::ForbiddenProbe;

/// Probes enabled for this process.
pub fn enabled() -> ForbiddenProbe {
    ForbiddenProbe::Enabled { write_target: write_target(std::process::id()) }
}

/// The response to `payload` if it is a probe request and `probe` honours it;
/// `None` when the request is for the model.
pub fn answer(probe: &ForbiddenProbe, payload: &[u8]) -> Option<Vec<u8>> {
    let ForbiddenProbe::Enabled { write_target } = probe else {
        return None;
    };
    let action = Action::parse(payload)?;
    let attempted =
        action.and_then(|a| a.attempt(write_target).map_err(|e| format!("forbidden action {a:?} failed: {e}")));
    Some(match attempted {
        Ok(()) => frame::encode_ok_response(&[]),
        Err(message) => frame::encode_error_response(&message),
    })
}

/// The file a worker with process id `pid` tries to create for `open-write`.
pub fn write_target(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("sentinel-worker-forbidden-{pid}"))
}

/// The program the `exec` action tries to run. It does not exist on purpose:
/// seccomp checks a syscall before the kernel looks at its arguments, so under
/// the filter the worker dies of `SIGSYS`, while an allowed `execve` returns
/// `ENOENT` and the worker answers. A real program such as `/bin/true` would
/// inherit the filter and die of `SIGSYS` at its first syscall, so a test
/// could not tell whether the filter stopped `execve` itself.
pub const EXEC_TARGET: &std::ffi::CStr = c"/nonexistent/sentinel-worker-forbidden-exec";

/// Prefix of a probe request.
pub const PREFIX: &[u8] = b"FORBID:";

/// An action the sandbox must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Does nothing: shows the worker still answers after confinement.
    None,
    /// `socket(AF_INET, SOCK_STREAM, 0)`, leaving the descriptor open.
    Socket,
    /// Creates a file under `/tmp` for writing (`openat` with `O_WRONLY|O_CREAT`).
    OpenWrite,
    /// `execve` of [`EXEC_TARGET`].
    Exec,
    /// Not forbidden: `abort()`. The control showing that a crash under the
    /// filter still ends in `SIGABRT`, so the supervisor can tell it from a
    /// sandbox violation.
    Abort,
}

impl Action {
    /// The action named after [`PREFIX`], if `payload` is a probe request.
    pub fn parse(payload: &[u8]) -> Option<Result<Action, String>> {
        let name = payload.strip_prefix(PREFIX)?;
        Some(match name {
            b"none" => Ok(Action::None),
            b"socket" => Ok(Action::Socket),
            b"open-write" => Ok(Action::OpenWrite),
            b"exec" => Ok(Action::Exec),
            b"abort" => Ok(Action::Abort),
            other => Err(format!("unknown forbidden action {:?}", String::from_utf8_lossy(other))),
        })
    }

    /// Attempts the action, creating `write_target` for `open-write`. Returns
    /// only if the system let it happen, or refused it with an error.
    pub fn attempt(self, write_target: &Path) -> io::Result<()> {
        match self {
            Action::None => Ok(()),
            Action::Socket => {
                // SAFETY: socket() takes no pointers and touches no memory.
                #[allow(unsafe_code)]
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The descriptor is left open on purpose: closing it is one
                // more syscall the filter forbids, and the tests must see the
                // worker die on `socket` itself, not on the `close` after it.
                Ok(())
            }
            Action::OpenWrite => {
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(write_target)?;
                std::fs::remove_file(write_target)
            }
            Action::Exec => {
                let path = EXEC_TARGET;
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                // SAFETY: `path` is a NUL-terminated literal, `argv` and `envp`
                // are null-terminated arrays of valid C strings that outlive
                // the call. The path does not exist, so an allowed execve
                // returns ENOENT and replaces nothing.
                #[allow(unsafe_code)]
                unsafe {
                    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                }
                Err(io::Error::last_os_error())
            }
            Action::Abort => std::process::abort(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_probe_payloads() {
        assert_eq!(Action::parse(b"FORBID:socket"), Some(Ok(Action::Socket)));
        assert_eq!(Action::parse(b"FORBID:open-write"), Some(Ok(Action::OpenWrite)));
        assert_eq!(Action::parse(b"FORBID:exec"), Some(Ok(Action::Exec)));
        assert_eq!(Action::parse(b"FORBID:none"), Some(Ok(Action::None)));
        assert_eq!(Action::parse(b"FORBID:abort"), Some(Ok(Action::Abort)));
        assert!(matches!(Action::parse(b"FORBID:reboot"), Some(Err(_))));
        assert_eq!(Action::parse(b"\x01\x00\x00\x00"), None);
    }

    #[test]
    fn harmless_actions_succeed_unconfined() {
        let target = write_target(std::process::id());
        Action::None.attempt(&target).unwrap();
        Action::Socket.attempt(&target).unwrap();
        Action::OpenWrite.attempt(&target).unwrap();
        assert!(!target.exists(), "open-write cleans up after itself");
        let exec = Action::Exec.attempt(&target).unwrap_err();
        assert_eq!(exec.raw_os_error(), Some(libc::ENOENT));
    }
}
