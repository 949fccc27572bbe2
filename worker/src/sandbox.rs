//! The worker's seccomp sandbox: `PR_SET_NO_NEW_PRIVS`, then an allow-list
//! filter on every thread. Anything not on the list kills the whole process
//! with `SIGSYS`, which the supervisor reads as a sandbox violation of that slot.
//!
//! The policy is reviewed data: one table, one line per syscall with the
//! reason it is needed, shared by x86_64 and aarch64. It covers what the
//! worker does after warm-up and nothing else: read requests from stdin, run tract or ONNX
//! Runtime (single threaded, so no `clone`), allocate, write responses to
//! stdout, exit, and crash with its usual signal (`SIGSEGV`, `SIGABRT`) rather
//! than `SIGSYS`.
//! There is no `openat` at all, so no file can be opened for reading or
//! writing, and no `socket`, `connect`, `execve`, `ptrace`, `fork` or `clone`.
//!
//! Under qemu-user the `seccomp` syscall is not emulated and fails with
//! `ENOSYS`; the worker then warns on stderr and reports itself unconfined in
//! its ready frame rather than refusing to serve.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use sentinel_worker_protocol::launch::Confinement;

/// What [`confine`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxStatus {
    /// The filter is installed on every thread.
    Confined,
    /// The worker runs without a filter, for the stated reason.
    Unconfined { reason: String },
}

/// The sandbox could not be installed on a system that supports it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setting PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("compiling the seccomp policy")]
    Compile(#[source] seccompiler::Error),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// One allowed syscall: its name (for review and messages), number, and
/// which arguments it may take.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub name: &'static str,
    pub nr: libc::c_long,
    pub args: Args,
}

/// Argument restrictions for an [`Allowed`] syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// `tgkill(own pid, any thread, SIGABRT)` only: how glibc's `abort()`
    /// raises `SIGABRT`, and nothing else.
    AbortSelf,
}

const fn any(name: &'static str, nr: libc::c_long) -> Allowed {
    Allowed { name, nr, args: Args::Any }
}

const fn abort_self(name: &'static str, nr: libc::c_long) -> Allowed {
    Allowed { name, nr, args: Args::AbortSelf }
}

// The lists below were checked with `strace -f` on the integration tests:
// after the filter a serving worker only calls read, write, sigaltstack,
// munmap and exit_group. The allocator calls stay because a different input
// or a fragmented heap needs them; the signal and abort calls stay so that a
// segfault, a stack overflow or an allocation failure ends in SIGSEGV or
// SIGABRT and is not mistaken for a sandbox violation. Tract runs single
// threaded, so `futex`, `sched_yield`, `clone` and `exit` are not needed;
// `clock_gettime` is answered by the vDSO.
//
// The ONNX Runtime engine (feature `ort`) needs nothing more, because
// `engine_ort` keeps it to the same shape as tract: one intra-op thread and
// sequential execution (no thread pool), and ORT_DISABLE_TELEMETRY=1. Checked
// with `strace -f` on digits v1, v3 and the vision model with ONNX Runtime
// 1.32: after the filter it calls only read, write, brk, mmap, munmap,
// sigaltstack and exit_group. Telemetry must stay off: otherwise ONNX Runtime
// keeps a timer thread (futex), a SQLite store under $HOME/.cache (fcntl locks
// at exit) and HTTPS uploads (socket), none of which a worker may do, so a
// worker with telemetry on dies with SIGSYS, at the latest when it exits.

/// The allow-list, for x86_64 and aarch64 alike. The `libc::SYS_*` constants
/// give each architecture its own numbers; a syscall that exists on only one
/// of them (aarch64 has no legacy `open`, `poll` or `creat`) would be a row
/// under `#[cfg(target_arch = …)]`, and today there is none: every name here
/// exists on both.
pub const POLICY: &[Allowed] = &[
    any("read", libc::SYS_read),                     // requests arrive on stdin
    any("write", libc::SYS_write),                   // responses on stdout, warnings and panics on stderr
    any("brk", libc::SYS_brk),                       // allocator: grows the main heap
    any("mmap", libc::SYS_mmap),                     // allocator: large blocks (tract tensors, scratch)
    any("munmap", libc::SYS_munmap),                 // allocator: frees large blocks; std at exit
    any("mremap", libc::SYS_mremap),                 // allocator: realloc of large blocks
    any("madvise", libc::SYS_madvise),               // allocator: returns freed pages to the kernel
    any("sigaltstack", libc::SYS_sigaltstack),       // std removes the main thread's signal stack at exit
    any("rt_sigreturn", libc::SYS_rt_sigreturn),     // std's SIGSEGV handler returns to re-fault with SIG_DFL
    any("rt_sigprocmask", libc::SYS_rt_sigprocmask), // abort(): unblocks SIGABRT
    any("getpid", libc::SYS_getpid),                 // abort(): finds its own process for tgkill
    any("gettid", libc::SYS_gettid),                 // abort(): finds its own thread for tgkill
    abort_self("tgkill", libc::SYS_tgkill),          // abort(): raises SIGABRT on itself, nothing else
    any("exit_group", libc::SYS_exit_group),         // the worker ending when stdin closes
];

/// What a worker whose ONNX Runtime session uses a GPU provider (CUDA,
/// TensorRT) may do beyond [`POLICY`], added only then. The driver and the
/// runtime open their device nodes and start their threads while the model
/// loads and warms up, before the filter; after it they talk to the open
/// descriptors and coordinate those threads. Not verified on GPU hardware in
/// CI (it has none): `benches/gpu-check.sh` is the check to run on a Jetson
/// or a CUDA machine, and it fails on a `SIGSYS`.
pub fn gpu_policy() -> Vec<Allowed> {
    #[allow(unused_mut)]
    let mut extra = vec![
        any("ioctl", libc::SYS_ioctl), // driver calls on the GPU nodes opened before the filter
        any("futex", libc::SYS_futex), // the CUDA runtime's own threads wait on each other
        any("sched_yield", libc::SYS_sched_yield), // spin-waits on kernels to finish
        any("mprotect", libc::SYS_mprotect), // the driver's pinned and JIT-compiled memory
        any("ppoll", libc::SYS_ppoll), // the runtime's event threads (aarch64's only poll)
        any("clock_nanosleep", libc::SYS_clock_nanosleep), // back-off while a GPU queue is full
    ];
    #[cfg(target_arch = "x86_64")]
    extra.push(any("poll", libc::SYS_poll)); // the same event threads, through glibc's poll on x86_64
    extra
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the worker's seccomp policy is written for x86_64 and aarch64 only");

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Compiles [`POLICY`] (and [`gpu_policy`] when `gpu`) for the process `pid`
/// into a BPF program: listed syscalls with allowed arguments pass, anything
/// else kills the process with `SIGSYS`.
pub fn compile(pid: u32, gpu: bool) -> Result<BpfProgram, SandboxError> {
    let compile_err = |e: seccompiler::BackendError| SandboxError::Compile(e.into());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra = if gpu { gpu_policy() } else { Vec::new() };
    for allowed in POLICY.iter().chain(&extra) {
        let chain = match allowed.args {
            Args::Any => Vec::new(),
            Args::AbortSelf => {
                let eq = |arg, value| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value);
                vec![
                    SeccompRule::new(vec![
                        eq(0, u64::from(pid)).map_err(compile_err)?,
                        eq(2, libc::SIGABRT as u64).map_err(compile_err)?,
                    ])
                    .map_err(compile_err)?,
                ]
            }
        };
        rules.insert(allowed.nr, chain);
    }
    let filter =
        SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, ARCH).map_err(compile_err)?;
    BpfProgram::try_from(filter).map_err(compile_err)
}

/// Confines the calling process as `confinement` asks. Call it after warm-up
/// and before reading the first request: from here on the process can only do
/// what [`POLICY`] lists.
/// `gpu` adds [`gpu_policy`].
pub fn confine(confinement: Confinement, gpu: bool) -> Result<SandboxStatus, SandboxError> {
    if confinement == Confinement::Off {
        return Ok(SandboxStatus::Unconfined { reason: "confinement off".into() });
    }
    // Compile first: building the program allocates, which is still allowed,
    // and a policy error must not leave the process half confined.
    let program = compile(std::process::id(), gpu)?;
    // seccompiler sets it again; doing it here keeps the order visible and
    // makes its failure a distinct error.
    set_no_new_privs()?;
    match seccompiler::apply_filter_all_threads(&program) {
        Ok(()) => Ok(SandboxStatus::Confined),
        Err(seccompiler::Error::Seccomp(e)) if e.raw_os_error() == Some(libc::ENOSYS) => {
            let reason = format!("sandbox unavailable: seccomp syscall not implemented here ({e})");
            eprintln!("sentinel-worker: warning: {reason}; serving unconfined");
            Ok(SandboxStatus::Unconfined { reason })
        }
        Err(e) => Err(SandboxError::Install(e)),
    }
}

/// Forbids gaining privileges through exec (setuid binaries, file
/// capabilities). The kernel requires it before an unprivileged process may
/// install a seccomp filter.
fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integer arguments and changes no
    // memory; the trailing zeros are required by the kernel.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Closes every descriptor above stderr: a worker keeps nothing the agent
/// had open (a listener, a database, a socket some library opened without
/// `O_CLOEXEC`). The worker's own guarantee, made before it opens anything.
///
/// `close_range(3, ~0)` (Linux 5.11); older kernels (Jetson's L4T 32 runs
/// 4.9) get one `close` per descriptor up to the descriptor limit. Called
/// through `syscall(2)`: glibc's wrapper would raise the worker's glibc
/// floor to 2.34.
pub fn close_inherited_descriptors() -> std::io::Result<()> {
    const FIRST: libc::c_uint = 3;
    #[allow(unsafe_code)]
    // SAFETY: close_range takes integers only; the descriptors it closes are
    // none this process uses (it has opened nothing yet).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, FIRST, libc::c_uint::MAX, 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(err);
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes only the struct it is given, on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let last = libc::c_int::try_from(lim.rlim_cur).unwrap_or(libc::c_int::MAX);
    for fd in FIRST as libc::c_int..last {
        #[allow(unsafe_code)]
        // SAFETY: close on an integer descriptor; EBADF for one not open is expected.
        unsafe {
            libc::close(fd);
        }
    }
    Ok(())
}

/// Limits the address space (`RLIMIT_AS`, soft and hard) to `bytes`.
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlim_t::try_from(bytes).unwrap_or(libc::RLIM_INFINITY);
    let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    #[allow(unsafe_code)]
    // SAFETY: setrlimit reads only the struct it is given, on this stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles_and_has_no_duplicates() {
        assert!(!compile(std::process::id(), false).unwrap().is_empty());
        let all: Vec<Allowed> = POLICY.iter().copied().chain(gpu_policy()).collect();
        assert!(compile(std::process::id(), true).unwrap().len() > compile(std::process::id(), false).unwrap().len());
        let mut nrs: Vec<_> = all.iter().map(|a| a.nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), all.len(), "the GPU rules repeat none of the base ones");
    }

    #[test]
    fn policy_allows_nothing_that_escapes_the_process() {
        let mut escapes = vec![
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_openat,
            libc::SYS_kill,
        ];
        // The legacy calls only x86_64 has.
        #[cfg(target_arch = "x86_64")]
        escapes.extend([libc::SYS_fork, libc::SYS_vfork, libc::SYS_open, libc::SYS_creat]);
        for nr in escapes {
            assert!(POLICY.iter().all(|a| a.nr != nr), "syscall {nr} must not be allowed");
            assert!(gpu_policy().iter().all(|a| a.nr != nr), "syscall {nr} must not be allowed for a GPU either");
        }
    }

    #[test]
    fn off_is_explicit_and_installs_nothing() {
        assert_eq!(Confinement::default(), Confinement::Enforce);
        assert!(matches!(confine(Confinement::Off, false), Ok(SandboxStatus::Unconfined { .. })));
    }
}
