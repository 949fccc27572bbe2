//! Push-time inspection of an uploaded model, bounded in memory and time.
//!
//! Two steps, only the first in the hub's own process:
//! 1. [`crate::onnx::read_signature`] walks the protobuf from disk for the
//!    signature and the node count, and refuses a graph over
//!    [`InspectConfig::max_nodes`] before any engine sees it.
//! 2. `sentinel-worker --check` (the agent's confined worker, in its check
//!    mode) loads and optimises the model with the engine devices use, warms
//!    it up, installs its seccomp filter and runs one probe inference on the
//!    declared shapes with symbolic dims fixed to 1: what a device does before
//!    it serves. It runs as a child with `RLIMIT_AS` at
//!    [`InspectConfig::memory_limit_bytes`], a wall-time limit after which it
//!    is killed, an empty environment, and a private empty `HOME`, `TMPDIR`
//!    and working directory that are removed afterwards. At most
//!    [`InspectConfig::concurrency`] checks run at once, so N uploads cannot
//!    take N times the memory limit.
//!
//! A model that needs more memory or time than that is refused with a message
//! saying it "exceeds the inspection limit", and which limit; the hub's own
//! memory does not move.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sentinel_worker_protocol::check::{
    CHECK_EXIT_MODEL, CHECK_EXIT_OK, CHECK_EXIT_PANIC, CheckFailure, CheckReport, CheckStage, is_allocation_failure,
    unsupported_operator,
};
use sentinel_worker_protocol::launch::{ORT_DYLIB_ENV, ORT_TELEMETRY_ENV};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::Command;
use tokio::sync::Semaphore;

use crate::config::InspectConfig;
use crate::onnx::{self, OnnxError, OnnxSignature, SignatureLimits};

/// The worker binary's file name, looked up beside the hub and on `PATH`.
pub const WORKER_NAME: &str = "sentinel-worker";

/// Most stdout a check may print (its report is a few hundred bytes).
const MAX_REPORT_BYTES: usize = 64 * 1024;
/// Most stderr kept from a check, from its end, for messages and the log.
const MAX_STDERR_BYTES: usize = 8 * 1024;
/// How much of the engine's reason goes into a refusal.
const MAX_REASON_CHARS: usize = 2000;
/// How much of ONNX Runtime's reason goes into a refusal's hint.
const MAX_ORT_REASON_CHARS: usize = 500;
/// The engines' names on the worker's command line.
const TRACT: &str = "tract";
const ORT: &str = "ort";

/// Why an upload was refused, or could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file is not a usable ONNX model, or is over the node limit.
    #[error(transparent)]
    Signature(#[from] OnnxError),
    /// A `--input-shape` given at push does not fit the model.
    #[error("{0}")]
    ServingShape(String),
    /// The engine refused the model.
    #[error("the model does not load ({stage}): {reason}{}", show_hint(hint))]
    Refused { stage: &'static str, reason: String, hint: Vec<String> },
    /// The check hit its address-space limit.
    #[error(
        "inspecting the model exceeds the inspection limit of {limit_mib} MiB of memory \
         (--inspect-memory-mib); the engine could not allocate what the model asks for{detail}"
    )]
    MemoryLimit { limit_mib: u64, detail: String },
    /// The check ran out of wall time and was killed.
    #[error(
        "inspecting the model exceeds the inspection limit of {} of time \
         (--inspect-timeout-secs); the check was stopped", show_duration(*.limit)
    )]
    TimeLimit { limit: Duration },
    /// The model made the confined engine attempt a forbidden syscall.
    #[error("the model made the confined engine attempt a forbidden system call (killed by SIGSYS)")]
    SandboxViolation,
    /// The engine crashed on the model.
    #[error("the inference engine crashed on this model ({how}){detail}")]
    Crashed { how: String, detail: String },
    /// The check could not be run: a fault of this hub, not of the upload.
    #[error("running {worker} --check: {message}")]
    Worker { worker: PathBuf, message: String },
}

impl InspectError {
    /// Whether the upload is at fault (422) rather than this hub (500).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, InspectError::Worker { .. } | InspectError::Signature(OnnxError::Read(_)))
    }
}

/// What inspection learnt about an upload that passed.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub signature: OnnxSignature,
    /// The worker's report; `probe_skipped` says when the probe could not run.
    pub report: CheckReport,
    /// Wall time of the check in the child.
    pub check_time: Duration,
    /// Why the engine check did not run (this hub lacks the version's engine).
    pub skipped: Option<String>,
}

/// Runs inspections; one per hub.
#[derive(Debug)]
pub struct Inspector {
    worker: PathBuf,
    config: InspectConfig,
    /// Parent of each check's private directory.
    scratch: PathBuf,
    slots: Arc<Semaphore>,
}

impl Inspector {
    /// Finds the worker binary and prepares `scratch` (emptied: a check's
    /// directory left by a crash is useless).
    pub fn new(config: InspectConfig, scratch: PathBuf) -> Result<Self, InspectError> {
        let worker = match &config.worker {
            Some(path) if path.is_file() => path.clone(),
            Some(path) => {
                return Err(InspectError::Worker {
                    worker: path.clone(),
                    message: "no such file; --worker must name the sentinel-worker binary".into(),
                });
            }
            None => find_worker().ok_or_else(|| InspectError::Worker {
                worker: WORKER_NAME.into(),
                message: "not found beside this executable nor on PATH; install it there or pass --worker PATH \
                          (the hub inspects every upload with it)"
                    .into(),
            })?,
        };
        let prepare = || -> std::io::Result<()> {
            if scratch.exists() {
                std::fs::remove_dir_all(&scratch)?;
            }
            sentinel_proto::private::create_dir(&scratch)
        };
        prepare().map_err(|e| InspectError::Worker {
            worker: worker.clone(),
            message: format!("preparing {}: {e}", scratch.display()),
        })?;
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        Ok(Self { worker, config, scratch, slots })
    }

    /// The worker binary in use.
    pub fn worker(&self) -> &Path {
        &self.worker
    }

    /// Reads the signature of the ONNX file at `path`, then checks it in a
    /// confined child. Waits for a free check slot.
    pub async fn inspect(&self, path: &Path) -> Result<Inspection, InspectError> {
        self.inspect_with(path, &BTreeMap::new(), "").await
    }

    /// [`Inspector::inspect`], checking the inputs named in `serving` with
    /// those fixed shapes (the `--input-shape` of a push) and the others with
    /// their symbolic dims fixed to 1.
    pub async fn inspect_with(
        &self,
        path: &Path,
        serving: &BTreeMap<String, Vec<u64>>,
        engine: &str,
    ) -> Result<Inspection, InspectError> {
        let limits = SignatureLimits { max_nodes: self.config.max_nodes };
        let owned = path.to_owned();
        let signature = tokio::task::spawn_blocking(move || onnx::read_signature(&owned, limits))
            .await
            .map_err(|e| self.fault(format!("the signature reader stopped: {e}")))??;
        let _slot = self.slots.acquire().await.map_err(|e| self.fault(e.to_string()))?;
        let started = Instant::now();
        let shapes = serving_shapes(&signature, serving)?;
        if engine == ORT {
            return match self.check(path, &shapes, ORT).await {
                Ok(report) => Ok(Inspection { signature, report, check_time: started.elapsed(), skipped: None }),
                // The worker lacks the engine: skipped, and said so, not passed.
                Err(e) if lacks_engine(&e) => {
                    let why = "the push-time check was skipped: this hub's sentinel-worker has no ONNX Runtime \
                               (the `ort` feature and ORT_DYLIB_PATH); nothing proves devices can load it";
                    tracing::warn!(model = %path.display(), "{why}");
                    let report = CheckReport {
                        engine: ORT.into(),
                        input_shapes: shapes,
                        confined: false,
                        load_ms: 0,
                        failure: None,
                        outputs: Vec::new(),
                        probe_skipped: Some(why.into()),
                        load_steps: Vec::new(),
                    };
                    Ok(Inspection { signature, report, check_time: started.elapsed(), skipped: Some(why.into()) })
                }
                Err(e) => Err(e),
            };
        }
        let report = match self.check(path, &shapes, TRACT).await {
            Err(InspectError::Refused { stage, reason, mut hint }) => {
                if let Some(op) = unsupported_operator(&reason) {
                    let domain = signature.operator_domain(&op).unwrap_or("unknown");
                    hint.push(format!("the operator {op} (domain {domain}) is not supported by tract"));
                }
                hint.push(self.ort_verdict(path, &shapes).await);
                return Err(InspectError::Refused { stage, reason, hint });
            }
            other => other?,
        };
        if !report.confined && report.probe_skipped.is_none() {
            // Only where seccomp is missing (qemu-user); the limits still held.
            tracing::warn!(model = %path.display(), "the upload check ran without its seccomp filter");
        }
        Ok(Inspection { signature, report, check_time: started.elapsed(), skipped: None })
    }

    /// Whether ONNX Runtime loads and runs a model tract refused, for the
    /// refusal's hint: one more confined check, with `--engine ort`.
    async fn ort_verdict(&self, path: &Path, shapes: &[Vec<u64>]) -> String {
        match self.check(path, shapes, ORT).await {
            Ok(_) => "ONNX Runtime loads and runs it: devices with the ort engine could serve it".into(),
            Err(e) if lacks_engine(&e) => "ONNX Runtime is not available on this hub (a sentinel-worker built \
                 with the `ort` feature and ORT_DYLIB_PATH), so it was not tried"
                .into(),
            Err(InspectError::Refused { reason, .. }) => {
                format!("ONNX Runtime refuses it too: {}", clip_to(&reason, MAX_ORT_REASON_CHARS))
            }
            Err(e @ InspectError::Worker { .. }) => {
                format!("whether ONNX Runtime loads it is unknown: {}", clip_to(&e.to_string(), MAX_ORT_REASON_CHARS))
            }
            Err(other) => {
                format!("ONNX Runtime fails on it too: {}", clip_to(&other.to_string(), MAX_ORT_REASON_CHARS))
            }
        }
    }

    fn fault(&self, message: String) -> InspectError {
        InspectError::Worker { worker: self.worker.clone(), message }
    }

    async fn check(&self, model: &Path, shapes: &[Vec<u64>], engine: &str) -> Result<CheckReport, InspectError> {
        let dir = tempfile::Builder::new()
            .prefix("check-")
            .tempdir_in(&self.scratch)
            .map_err(|e| self.fault(format!("creating a directory in {}: {e}", self.scratch.display())))?;
        let model = std::path::absolute(model).map_err(|e| self.fault(e.to_string()))?;
        let mut cmd = Command::new(&self.worker);
        cmd.arg("--check").arg("--model").arg(&model).arg(format!("--engine={engine}"));
        for shape in shapes {
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            cmd.arg(format!("--input-shape={}", dims.join(",")));
        }
        // Nothing of the hub's environment (tokens, keys, proxies) reaches
        // the child; only the three pipes do, since std opens every other
        // descriptor with O_CLOEXEC.
        cmd.env_clear()
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            // An ONNX Runtime check gets the library and telemetry off (its
            // thread, files and uploads would break the sandbox), nothing else.
            .envs(
                self.config
                    .ort_library
                    .iter()
                    .filter(|_| engine == ORT)
                    .map(|lib| (ORT_DYLIB_ENV, lib.as_os_str()))
                    .chain((engine == ORT).then_some((ORT_TELEMETRY_ENV, std::ffi::OsStr::new("1")))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        limit_child(&mut cmd, self.config.memory_limit_bytes);
        let mut child = cmd.spawn().map_err(|e| self.fault(format!("starting it: {e}")))?;
        let stdout = tokio::spawn(read_bounded(child.stdout.take(), MAX_REPORT_BYTES, Keep::Head));
        let stderr = tokio::spawn(read_bounded(child.stderr.take(), MAX_STDERR_BYTES, Keep::Tail));
        let status = match tokio::time::timeout(self.config.timeout, child.wait()).await {
            Ok(status) => status.map_err(|e| self.fault(format!("waiting for it: {e}")))?,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(InspectError::TimeLimit { limit: self.config.timeout });
            }
        };
        let stdout = stdout.await.unwrap_or_default();
        let stderr = String::from_utf8_lossy(&stderr.await.unwrap_or_default()).trim().to_owned();
        if !stderr.is_empty() {
            tracing::info!(model = %model.display(), stderr = %stderr, "inspection worker stderr");
        }
        let report = serde_json::from_slice::<CheckReport>(stdout.trim_ascii()).ok();
        outcome(Exit { code: status.code(), signal: status.signal() }, report, &stderr, self.config.memory_limit_bytes)
            .map_err(|e| match e {
                InspectError::Worker { message, .. } => self.fault(message),
                other => other,
            })
    }
}

/// The shapes to check with: the given ones where named, each checked
/// against the declared dims; the others with symbolic dims fixed to 1.
fn serving_shapes(sig: &OnnxSignature, serving: &BTreeMap<String, Vec<u64>>) -> Result<Vec<Vec<u64>>, InspectError> {
    if let Some(name) = serving.keys().find(|n| !sig.inputs.iter().any(|t| &t.name == *n)) {
        let names: Vec<&str> = sig.inputs.iter().map(|t| t.name.as_str()).collect();
        return Err(InspectError::ServingShape(format!(
            "--input-shape names `{name}`, which is no input of the model (its inputs: {})",
            names.join(", ")
        )));
    }
    let defaults = sig.default_input_shapes();
    sig.inputs
        .iter()
        .zip(defaults)
        .map(|(t, default)| match serving.get(&t.name) {
            None => Ok(default),
            Some(dims) => {
                let fits = dims.len() == t.shape.len()
                    && dims.iter().zip(&t.shape).all(|(&n, d)| {
                        n > 0 && !matches!(d.kind, Some(sentinel_proto::pb::dimension::Kind::Fixed(f)) if f != n)
                    });
                if fits {
                    Ok(dims.clone())
                } else {
                    Err(InspectError::ServingShape(format!(
                        "--input-shape {}={} does not fit the declared {}",
                        t.name,
                        dims.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                        onnx::show_shape(&t.shape)
                    )))
                }
            }
        })
        .collect()
}

/// Whether a check failed because the worker lacks the engine: a worker built
/// without the `ort` feature says so as a load failure.
fn lacks_engine(e: &InspectError) -> bool {
    match e {
        // A worker built without ONNX Runtime, or one given no library.
        InspectError::Refused { reason, .. } => {
            reason.contains("engine is unavailable") || reason.contains("ORT_DYLIB_PATH is not set")
        }
        _ => false,
    }
}

/// How the check process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
}

/// Turns a finished check into the upload's verdict. Pure, so every branch
/// is unit-tested.
fn outcome(
    exit: Exit,
    report: Option<CheckReport>,
    stderr: &str,
    memory_limit: u64,
) -> Result<CheckReport, InspectError> {
    let limit_mib = memory_limit / (1024 * 1024);
    let failure = report.as_ref().and_then(|r| r.failure.clone());
    match (exit.code.and_then(|c| u8::try_from(c).ok()), report, failure) {
        (Some(CHECK_EXIT_OK), Some(report), None) => Ok(report),
        (
            Some(CHECK_EXIT_MODEL | CHECK_EXIT_PANIC),
            Some(_),
            Some(CheckFailure { out_of_memory: true, reason, .. }),
        ) => Err(InspectError::MemoryLimit { limit_mib, detail: format!(": {}", clip(&reason)) }),
        (Some(CHECK_EXIT_MODEL | CHECK_EXIT_PANIC), Some(report), Some(CheckFailure { stage, reason, .. })) => {
            let failed: Vec<&str> =
                report.load_steps.iter().filter(|s| s.error.is_some()).map(|s| s.step.as_str()).collect();
            let hint = match stage {
                CheckStage::Load if !failed.is_empty() => {
                    vec![format!("{} failed at every load step: {}", report.engine, failed.join("; "))]
                }
                _ => vec![format!("{} loaded it but failed at {}", report.engine, stage.as_str())],
            };
            Err(InspectError::Refused { stage: stage.as_str(), reason: clip(&reason), hint })
        }
        _ if exit.signal == Some(libc::SIGSYS) => Err(InspectError::SandboxViolation),
        // Rust's collections abort (SIGABRT) when an allocation fails, after
        // saying so on stderr.
        _ if is_allocation_failure(stderr) => {
            let line = stderr.lines().rev().find(|l| is_allocation_failure(l)).unwrap_or_default();
            Err(InspectError::MemoryLimit { limit_mib, detail: format!(": {}", clip(line)) })
        }
        _ if exit.signal.is_some() => Err(InspectError::Crashed {
            how: format!("killed by signal {}", exit.signal.unwrap_or_default()),
            detail: last_line(stderr),
        }),
        (Some(code), _, _) => Err(InspectError::Worker {
            worker: PathBuf::new(),
            message: format!("exited with code {code} without a usable report{}", last_line(stderr)),
        }),
        (None, _, _) => Err(InspectError::Worker { worker: PathBuf::new(), message: "ended without a status".into() }),
    }
}

/// `60 s`, or `50 ms` for limits below a second or not a whole number of seconds.
fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{} s", d.as_secs()) } else { format!("{} ms", d.as_millis()) }
}

fn show_hint(hint: &[String]) -> String {
    if hint.is_empty() { String::new() } else { format!(". Hint: {}", hint.join("; ")) }
}

fn last_line(stderr: &str) -> String {
    stderr.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(": {}", clip(l))).unwrap_or_default()
}

fn clip(s: &str) -> String {
    clip_to(s, MAX_REASON_CHARS)
}

fn clip_to(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// `sentinel-worker` beside the running executable, else the first on `PATH`.
fn find_worker() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(WORKER_NAME)));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(WORKER_NAME)).collect::<Vec<_>>())
        .unwrap_or_default();
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}

/// Sets the child's address-space limit, and no core dumps (a check that
/// dies near its limit would otherwise write a file that large).
fn limit_child(cmd: &mut Command, memory_limit: u64) {
    let address_space = libc::rlimit { rlim_cur: memory_limit as libc::rlim_t, rlim_max: memory_limit as libc::rlim_t };
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec. It only calls
    // setrlimit (async-signal-safe) on copied plain structs and builds an
    // io::Error from errno, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &address_space) != 0
                || libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[derive(Debug, Clone, Copy)]
enum Keep {
    Head,
    Tail,
}

/// Reads a pipe to its end, keeping at most `cap` bytes (the first or the last).
async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>, cap: usize, keep: Keep) -> Vec<u8> {
    let Some(mut pipe) = pipe else { return Vec::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > cap {
                    match keep {
                        Keep::Head => kept.truncate(cap),
                        Keep::Tail => {
                            kept.drain(..kept.len() - cap);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
