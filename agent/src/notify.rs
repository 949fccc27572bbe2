//! A minimal `sd_notify(3)` client: tells systemd that the agent is ready,
//! stopping, what it is doing, and that it is still alive (watchdog).
//!
//! The protocol is one datagram of newline-separated `KEY=VALUE` assignments
//! sent to the unix socket named by `$NOTIFY_SOCKET`, either a path or, when it
//! starts with `@`, a Linux abstract socket name. It is small enough that a
//! crate (and `libsystemd`) is not worth the dependency, and it needs no
//! `unsafe`. The kernel attaches the sender's credentials itself, which is how
//! systemd applies `NotifyAccess=main`.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op returning
//! `Ok(false)`, so the agent calls these unconditionally. Nothing here reads
//! the environment more than once per call or changes it: unsetting
//! `NOTIFY_SOCKET` for children, as `sd_notify(unset_environment = 1)` does, is
//! `unsafe` in edition 2024. The supervisor should instead start workers with
//! `env_remove("NOTIFY_SOCKET")`; `NotifyAccess=main` ignores them anyway.
//!
//! The watchdog is scheduled by the caller: [`watchdog_interval`] says how
//! often systemd expects a ping (ping at half of it), [`watchdog_ping`] sends
//! one. This keeps the module free of any async runtime.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The environment variable naming systemd's notification socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (one or more `KEY=VALUE` lines, e.g. `"READY=1"`) to systemd.
///
/// Returns `Ok(false)` when `$NOTIFY_SOCKET` is unset or empty (not running
/// under systemd, or under a unit type that does not listen), `Ok(true)` once
/// the datagram has been sent. Errors come from an unusable socket address or
/// a failed send; a notification is advisory, so callers usually log them and
/// carry on.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os(NOTIFY_SOCKET).as_deref(), state)
}

/// `READY=1`: start-up is complete (configuration loaded, state opened).
/// With `Type=notify`, systemd holds back dependent units until this arrives.
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// `STOPPING=1`: a shutdown has begun; systemd shows the unit as deactivating.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `STATUS=<msg>`: a one-line status shown by `systemctl status`.
///
/// Line breaks in `msg` are replaced by spaces: each line of a notification
/// is a separate assignment, so a message taken from, say, a hub error must
/// not be able to smuggle in `READY=1` or `MAINPID=`.
pub fn status(msg: &str) -> io::Result<bool> {
    notify(&status_assignment(msg))
}

/// The single `STATUS=` line [`status`] sends.
fn status_assignment(msg: &str) -> String {
    format!("STATUS={}", msg.replace(['\n', '\r'], " "))
}

/// `WATCHDOG=1`: the agent is alive. Send it at half of [`watchdog_interval`].
pub fn watchdog_ping() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// How often systemd expects [`watchdog_ping`], from `$WATCHDOG_USEC`, or
/// `None` if the unit has no watchdog or it is meant for another process
/// (`$WATCHDOG_PID` set to a PID that is not ours, as happens in a child that
/// inherited the environment).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var_os("WATCHDOG_USEC");
    let pid = std::env::var_os("WATCHDOG_PID");
    parse_watchdog(usec.as_deref().and_then(OsStr::to_str), pid.as_deref().and_then(OsStr::to_str), std::process::id())
}

/// The pure part of [`watchdog_interval`]: the values of `WATCHDOG_USEC` and
/// `WATCHDOG_PID` (if set) and this process's id, to a ping deadline.
///
/// An unparsable or zero `WATCHDOG_USEC`, or an unparsable `WATCHDOG_PID`,
/// means no watchdog, as in `sd_watchdog_enabled(3)`.
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// [`notify`] with the value of `$NOTIFY_SOCKET` passed in, so tests need not
/// touch the process environment.
fn notify_to(socket: Option<&OsStr>, state: &str) -> io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let sent = match socket.as_encoded_bytes() {
        [b'@', name @ ..] => send_abstract(&sock, name, state.as_bytes())?,
        [b'/', ..] => sock.send_to(state.as_bytes(), socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET}={socket:?} is neither an absolute path nor an @abstract name"),
            ));
        }
    };
    // A datagram is sent whole or not at all; anything else would leave
    // systemd with a truncated assignment.
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, format!("sent {sent} of {} bytes", state.len())));
    }
    Ok(true)
}

/// Sends to a Linux abstract socket (the name without its leading `@`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;

    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr)
}

/// Abstract sockets exist only on Linux.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_sock: &UnixDatagram, _name: &[u8], _msg: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract unix sockets are Linux-only"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::unix::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    static SEQ: AtomicU32 = AtomicU32::new(0);

    fn unique(tag: &str) -> String {
        format!("sentinel-notify-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
    }

    /// A fake systemd: a datagram socket bound at a fresh path, removed on drop.
    struct FakeSystemd {
        sock: UnixDatagram,
        path: PathBuf,
    }

    impl FakeSystemd {
        fn bind() -> FakeSystemd {
            let path = std::env::temp_dir().join(unique("path"));
            let sock = UnixDatagram::bind(&path).expect("bind the fake notify socket");
            // A bound for a broken sender, so the test fails instead of hanging.
            sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            FakeSystemd { sock, path }
        }
    }

    impl Drop for FakeSystemd {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn ready_arrives_as_ready_1_on_a_path_socket() {
        let systemd = FakeSystemd::bind();
        assert!(notify_to(Some(systemd.path.as_os_str()), "READY=1").expect("sent"));
        assert_eq!(recv(&systemd.sock), "READY=1");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn an_abstract_socket_works() {
        let name = unique("abstract");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let env = format!("@{name}");
        assert!(notify_to(Some(OsStr::new(&env)), "WATCHDOG=1").expect("sent"));
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn an_unset_or_empty_socket_is_a_no_op() {
        assert!(!notify_to(None, "READY=1").expect("no-op"));
        assert!(!notify_to(Some(OsStr::new("")), "READY=1").expect("no-op"));
    }

    #[test]
    fn a_status_cannot_smuggle_in_other_assignments() {
        assert_eq!(status_assignment("syncing\nREADY=1\r\n"), "STATUS=syncing READY=1  ");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        let err = notify_to(Some(OsStr::new("run/notify")), "READY=1").expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_silent_success() {
        let path = std::env::temp_dir().join(unique("missing"));
        assert!(notify_to(Some(path.as_os_str()), "READY=1").is_err());
    }

    #[test]
    fn watchdog_usec_is_read_in_microseconds() {
        assert_eq!(parse_watchdog(Some("30000000"), None, 42), Some(Duration::from_secs(30)));
        assert_eq!(parse_watchdog(Some("1500"), Some("42"), 42), Some(Duration::from_micros(1500)));
    }

    #[test]
    fn watchdog_for_another_pid_or_garbage_is_no_watchdog() {
        assert_eq!(parse_watchdog(Some("30000000"), Some("41"), 42), None);
        assert_eq!(parse_watchdog(Some("30000000"), Some("x"), 42), None);
        assert_eq!(parse_watchdog(Some("0"), None, 42), None);
        assert_eq!(parse_watchdog(Some("-5"), None, 42), None);
        assert_eq!(parse_watchdog(Some("30s"), None, 42), None);
        assert_eq!(parse_watchdog(None, Some("42"), 42), None);
    }
}
