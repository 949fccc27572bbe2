//! One `sentinel-worker` child process: spawning it under resource limits,
//! reading its ready frame, and exchanging framed requests with it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, Notify, watch};

mod child;

use super::Delivered;
pub use child::remove_stale_work_dirs;
use child::{EXIT_GRACE, WorkDir, forward_stderr, read_frame, reap, wait_exit, widen_pipe, write_frame};

use sentinel_worker_protocol::frame::{self as protocol, ProtocolError, Ready, ResponseError, Tensor};
use sentinel_worker_protocol::launch::{
    Confinement, EXIT_IO, EXIT_MODEL, EXIT_SANDBOX, EXIT_USAGE, Engine, ORT_DYLIB_ENV, ORT_TELEMETRY_ENV, Providers,
};

/// Whether a worker honours the `FORBID:<action>` probe requests that attempt
/// forbidden syscalls. Only tests that prove the sandbox turn them on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TestProbes {
    /// Probe requests are ordinary malformed requests.
    #[default]
    Refuse,
    /// Pass the hidden `--test-forbidden` flag.
    Honour,
}

/// How to start one worker and how long to wait for it.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The `sentinel-worker` executable.
    pub worker_bin: PathBuf,
    /// The ONNX file to serve.
    pub model: PathBuf,
    /// One fixed shape per model input, in model order (`--input-shape`).
    pub input_shapes: Vec<Vec<usize>>,
    /// Seccomp confinement; enforced by default.
    pub confinement: Confinement,
    /// The worker's inference engine (`--engine`); tract by default.
    pub engine: Engine,
    /// The ONNX Runtime library, passed to an [`Engine::Ort`] worker as
    /// `ORT_DYLIB_PATH` (its environment is otherwise cleared, and it also
    /// gets `ORT_DISABLE_TELEMETRY=1`). Whoever builds the spec takes it from
    /// the agent's own `ORT_DYLIB_PATH`.
    pub ort_dylib: Option<PathBuf>,
    /// Largest batch a request may carry in every input's first dim, run as
    /// one (`--max-batch`); 1 for the fixed shapes only. The worker may
    /// grant less (see [`Worker::max_batch`]).
    pub max_batch: usize,
    /// Whether the worker keeps `max_batch` only where a batch is faster per
    /// sample than single runs (`--tune-batch`).
    pub tune_batch: bool,
    /// ONNX Runtime's execution providers (ignored by tract).
    pub providers: Providers,
    /// `RLIMIT_AS` for the worker, if any.
    pub memory_limit_bytes: Option<u64>,
    /// Bound on one request/response exchange; a worker that misses it is killed.
    pub request_timeout: Duration,
    /// Bound on loading, warming up and confining, up to the ready frame.
    pub load_timeout: Duration,
    /// Each worker gets a private `HOME` and current directory below this one.
    pub work_dir: PathBuf,
    /// Tests only: see [`TestProbes`].
    pub test_probes: TestProbes,
}

impl WorkerSpec {
    /// A confined worker without a memory limit, with a 5 s request and 60 s load timeout.
    pub fn new(worker_bin: PathBuf, model: PathBuf, input_shapes: Vec<Vec<usize>>, work_dir: PathBuf) -> WorkerSpec {
        WorkerSpec {
            worker_bin,
            model,
            input_shapes,
            confinement: Confinement::Enforce,
            engine: Engine::Tract,
            ort_dylib: None,
            max_batch: 1,
            tune_batch: false,
            providers: Providers::default(),
            memory_limit_bytes: None,
            request_timeout: Duration::from_secs(5),
            load_timeout: Duration::from_secs(60),
            work_dir,
            test_probes: TestProbes::Refuse,
        }
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = |code: i32| match u8::try_from(code) {
            Ok(EXIT_USAGE) => ": bad arguments",
            Ok(EXIT_MODEL) => ": model failed to load or warm up",
            Ok(EXIT_SANDBOX) => ": sandbox could not be installed",
            Ok(EXIT_IO) => ": stdin/stdout failed",
            _ => "",
        };
        match (self.code, self.signal) {
            (_, Some(libc::SIGSYS)) => f.write_str("killed by SIGSYS: sandbox violation"),
            (_, Some(sig)) => write!(f, "killed by signal {sig}"),
            (Some(code), None) => write!(f, "exit code {code}{}", known(code)),
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// A worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("creating the worker directory {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {}", .bin.display())]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `memory_limit_bytes` is repeated here because a too-small limit
    /// usually shows as a bare SIGSEGV or SIGABRT with nothing on stderr.
    #[error(
        "worker for {} ended before its ready frame ({exit}){}{}",
        .model.display(),
        limit_suffix(*.memory_limit_bytes),
        stderr_suffix(.stderr)
    )]
    ExitedBeforeReady { model: PathBuf, exit: Exit, memory_limit_bytes: Option<u64>, stderr: Vec<String> },
    #[error("worker for {} sent no ready frame within {timeout:?}", .model.display())]
    LoadTimeout { model: PathBuf, timeout: Duration },
    #[error("worker for {} sent a bad ready frame", .model.display())]
    BadReady {
        model: PathBuf,
        #[source]
        source: ProtocolError,
    },
}

fn limit_suffix(limit: Option<u64>) -> String {
    limit.map(|l| format!(" under an address-space limit of {} MiB", l >> 20)).unwrap_or_default()
}

fn stderr_suffix(lines: &[String]) -> String {
    if lines.is_empty() { String::new() } else { format!("; stderr: {}", lines.join(" | ")) }
}

/// Why [`Worker::infer`] produced no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// The worker refused the request or inference failed; the worker keeps serving.
    #[error("bad input: {0}")]
    BadInput(String),
    /// No response within the request timeout; the worker has been killed.
    #[error("request timed out; worker killed")]
    Timeout,
    /// The worker died (or had died) without a response.
    #[error("worker crashed ({})", Exit { code: *.code, signal: *.signal })]
    Crashed { code: Option<i32>, signal: Option<i32> },
    /// The worker was killed by its seccomp filter.
    #[error("sandbox violation (SIGSYS)")]
    SandboxViolation,
    /// An earlier caller abandoned its request mid-exchange; the worker has been killed.
    #[error("an earlier request was cancelled mid-exchange; worker killed")]
    Cancelled,
    /// The response was garbled; the worker has been killed.
    #[error("malformed response: {0}")]
    Malformed(String),
}

impl From<Exit> for InferError {
    fn from(exit: Exit) -> InferError {
        match exit.signal {
            Some(libc::SIGSYS) => InferError::SandboxViolation,
            _ => InferError::Crashed { code: exit.code, signal: exit.signal },
        }
    }
}

/// The pipes to a worker. `dead` is set once the stream is unusable; every
/// later request returns it without touching the pipes.
#[derive(Debug)]
struct Pipes {
    stdin: ChildStdin,
    stdout: ChildStdout,
    dead: Option<InferError>,
}

/// A running worker that has sent its ready frame. Dropping it kills the process.
#[derive(Debug)]
pub struct Worker {
    pid: u32,
    ready: Ready,
    request_timeout: Duration,
    /// One request in flight at a time: a Tokio mutex because it is held
    /// across the write and the read of an exchange.
    pipes: Mutex<Pipes>,
    kill: Arc<Notify>,
    exit: watch::Receiver<Option<Exit>>,
    _dir: WorkDir,
}

static WORKER_SEQ: AtomicU64 = AtomicU64::new(0);

impl Worker {
    /// Starts a worker and waits for its ready frame. Must run inside a Tokio runtime.
    pub async fn spawn(spec: &WorkerSpec) -> Result<Worker, SupervisorError> {
        let seq = WORKER_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = spec.work_dir.join(format!("worker-{}-{seq}", std::process::id()));
        sentinel_proto::private::create_dir(&dir)
            .map_err(|source| SupervisorError::CreateDir { path: dir.clone(), source })?;
        let dir = WorkDir(dir);

        let mut cmd = Command::new(&spec.worker_bin);
        cmd.arg("--model").arg(&spec.model);
        for shape in &spec.input_shapes {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            cmd.arg("--input-shape").arg(dims.join(","));
        }
        cmd.arg("--confinement").arg(spec.confinement.flag());
        cmd.arg("--engine").arg(spec.engine.name());
        if spec.max_batch > 1 {
            cmd.arg("--max-batch").arg(spec.max_batch.to_string());
            if spec.tune_batch {
                cmd.arg("--tune-batch");
            }
        }
        if spec.engine == Engine::Ort {
            cmd.args(spec.providers.args());
        }
        if spec.test_probes == TestProbes::Honour {
            cmd.arg("--test-forbidden");
        }
        // The worker inherits nothing from the agent's environment but what
        // is set below, and keeps no descriptor but the three pipes (it
        // closes the rest first thing, `sandbox::close_inherited_descriptors`).
        cmd.env_clear()
            .env("HOME", &dir.0)
            .current_dir(&dir.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // An ONNX Runtime worker needs two more: where its library is, and
        // telemetry off (its thread, files and uploads would break the sandbox).
        if spec.engine == Engine::Ort {
            cmd.env(ORT_TELEMETRY_ENV, "1");
            if let Some(dylib) = &spec.ort_dylib {
                cmd.env(ORT_DYLIB_ENV, dylib);
            }
        }
        // No `pre_exec`: std then starts the worker with `posix_spawn`
        // (vfork), not `fork`, which would copy the agent's page tables and
        // make every agent thread fault on copy-on-write until the exec. The
        // worker limits its own address space and closes inherited
        // descriptors as its first acts (`--memory-limit`).
        if let Some(limit) = spec.memory_limit_bytes {
            cmd.arg("--memory-limit").arg(limit.to_string());
        }
        // The spawn waits for the exec: off the runtime's worker.
        let mut child = crate::util::blocking(|| cmd.spawn())
            .map_err(|source| SupervisorError::Spawn { bin: spec.worker_bin.clone(), source })?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(mut stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(SupervisorError::Spawn {
                bin: spec.worker_bin.clone(),
                source: io::Error::other("child pipes missing"),
            });
        };
        // A request of a vision model is hundreds of KiB: in a 64 KiB pipe it
        // takes a dozen wake-ups of writer and reader to cross.
        for fd in [std::os::fd::AsRawFd::as_raw_fd(&stdin), std::os::fd::AsRawFd::as_raw_fd(&stdout)] {
            widen_pipe(fd);
        }
        let tail = Arc::new(StdMutex::new(VecDeque::new()));
        let stderr_task = tokio::spawn(forward_stderr(pid, stderr, Arc::clone(&tail)));
        let kill = Arc::new(Notify::new());
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(reap(child, Arc::clone(&kill), exit_tx));

        let worker_exit = |exit: Option<Exit>| async move {
            // The stderr pipe closes when the process is gone; wait for the
            // last lines, which usually say why.
            let _ = tokio::time::timeout(EXIT_GRACE, stderr_task).await;
            let stderr = tail.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
            SupervisorError::ExitedBeforeReady {
                model: spec.model.clone(),
                exit: exit.unwrap_or(Exit { code: None, signal: None }),
                memory_limit_bytes: spec.memory_limit_bytes,
                stderr,
            }
        };
        let ready = match tokio::time::timeout(spec.load_timeout, read_frame(&mut stdout)).await {
            Err(_) => {
                kill.notify_one();
                return Err(SupervisorError::LoadTimeout { model: spec.model.clone(), timeout: spec.load_timeout });
            }
            Ok(Ok(Some(frame))) => protocol::decode_ready(&frame)
                .and_then(|r| if r.ready { Ok(r) } else { Err(ProtocolError::Ready("ready is false".into())) })
                .map_err(|source| {
                    kill.notify_one();
                    SupervisorError::BadReady { model: spec.model.clone(), source }
                })?,
            Ok(Ok(None) | Err(_)) => return Err(worker_exit(wait_exit(exit, &kill).await).await),
        };
        if !ready.confined {
            tracing::warn!(pid, model = %spec.model.display(), reason = ?ready.reason, "worker is NOT confined");
        }
        Ok(Worker {
            pid,
            ready,
            request_timeout: spec.request_timeout,
            pipes: Mutex::new(Pipes { stdin, stdout, dead: None }),
            kill,
            exit,
            _dir: dir,
        })
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the worker reported its seccomp filter installed.
    pub fn confined(&self) -> bool {
        self.ready.confined
    }

    /// Why the worker is not confined, when it is not.
    pub fn unconfined_reason(&self) -> Option<&str> {
        self.ready.reason.as_deref()
    }

    /// The largest batch one request may carry, run as one: what the worker
    /// granted of [`WorkerSpec::max_batch`] (1 when its engine could not plan
    /// a dynamic batch).
    pub fn max_batch(&self) -> usize {
        self.ready.max_batch.max(1)
    }

    /// Resident memory of the process (`VmRSS`), `None` once it is gone.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// How the process ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// A watch that turns `Some` when the process ends, for monitors that
    /// must not keep the worker alive themselves.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// Waits until the process has ended (callers bound this with a timeout).
    pub async fn exited(&self) -> Exit {
        wait_exit(self.exit.clone(), &self.kill).await.unwrap_or(Exit { code: None, signal: None })
    }

    /// Kills the process (SIGKILL); the exit is then visible through [`Worker::exited`].
    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// Runs one inference. Concurrent callers are served one at a time.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferError> {
        self.infer_timed(inputs).await.map(|(outputs, _)| outputs)
    }

    /// Like [`Worker::infer`], with the model's compute time as the worker measured it.
    pub async fn infer_timed(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Option<Duration>), InferError> {
        self.attempt(&protocol::request_parts(inputs, false)).await.map_err(|f| f.error)
    }

    /// Like [`Worker::infer_timed`], running each sample of the inputs'
    /// first dim by itself (see [`protocol::Request::rows`]).
    pub async fn infer_rows(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Option<Duration>), InferError> {
        self.attempt(&protocol::request_parts(inputs, true)).await.map_err(|f| f.error)
    }

    /// Sends one encoded request, in pieces (see [`protocol::Request`] and
    /// [`protocol::request_parts`]), saying on failure whether it reached the
    /// worker, so a pool can try a sibling with one that did not.
    pub(crate) async fn attempt(&self, parts: &[Cow<'_, [u8]>]) -> Result<(Vec<Tensor>, Option<Duration>), Failure> {
        self.request(parts).await
    }

    /// Tests only: sends a `FORBID:<action>` probe (see [`TestProbes`]).
    #[doc(hidden)]
    pub async fn probe(&self, action: &str) -> Result<Vec<Tensor>, InferError> {
        let probe = [Cow::Owned(format!("FORBID:{action}").into_bytes())];
        self.request(&probe).await.map(|(outputs, _)| outputs).map_err(|f| f.error)
    }

    async fn request(&self, parts: &[Cow<'_, [u8]>]) -> Result<(Vec<Tensor>, Option<Duration>), Failure> {
        let mut pipes = self.pipes.lock().await;
        if let Some(dead) = &pipes.dead {
            return Err(Failure { error: dead.clone(), delivered: Delivered::No });
        }
        // If the caller drops this future mid-exchange, the stream is out of
        // step: the guard kills the worker and `dead` stays set.
        pipes.dead = Some(InferError::Cancelled);
        let guard = KillOnDrop(Some(&self.kill));
        let Pipes { stdin, stdout, .. } = &mut *pipes;
        let mut delivered = false;
        let outcome = tokio::time::timeout(self.request_timeout, async {
            write_frame(stdin, parts).await?;
            delivered = true;
            read_frame(stdout).await
        })
        .await;
        guard.disarm();
        pipes.dead = None;
        // A timeout counts as delivered: the worker may be stuck on this very request.
        let delivered = delivered || outcome.is_err();
        let error = match outcome {
            // A half-done exchange leaves the stream out of step: a stuck
            // worker is a dead worker.
            Err(_) => {
                self.kill();
                InferError::Timeout
            }
            Ok(Ok(Some(frame))) => match protocol::decode_response_timed(&frame) {
                Ok(outputs) => return Ok(outputs),
                Err(ResponseError::Worker(message)) => {
                    return Err(Failure { error: InferError::BadInput(message), delivered: Delivered::Yes });
                }
                Err(ResponseError::Malformed(e)) => {
                    self.kill();
                    InferError::Malformed(e.to_string())
                }
            },
            // The pipe closed: the process is dying; its exit says why.
            Ok(Ok(None) | Err(_)) => self.exited().await.into(),
        };
        pipes.dead = Some(error.clone());
        Err(Failure { error, delivered: if delivered { Delivered::Yes } else { Delivered::No } })
    }
}

/// A failed [`Worker::attempt`].
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) error: InferError,
    /// Whether the whole request was written to the worker. One that was
    /// not (the worker was already dead, or died before reading it) cannot
    /// have caused the failure.
    pub(crate) delivered: Delivered,
}

/// Kills the worker when dropped while armed.
struct KillOnDrop<'a>(Option<&'a Notify>);

impl KillOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(kill) = self.0 {
            kill.notify_one();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill.notify_one();
    }
}
