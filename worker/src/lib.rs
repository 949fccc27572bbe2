//! Sentinel's confined inference worker, behind the `sentinel-worker` binary.
//!
//! One worker process serves one model: it loads the file with tract (or ONNX
//! Runtime, with the `ort` feature) for fixed input shapes, runs one warm-up
//! inference, confines itself with seccomp, writes a [`protocol::Ready`] frame
//! and then answers framed requests on stdin with framed responses on stdout
//! until stdin closes. It uses no async runtime and
//! no network stack; the agent supervises it as a child process.
//!
//! What the agent and the worker must agree on (frames, launch flags, exit
//! codes, the `--check` report) is in [`sentinel_worker_protocol`], the only
//! part of this package the agent links.
//!
//! # Layout
//! - [`model`]: the [`Engine`] choice, loading, warm-up and checked inference.
//! - `engine_ort` (feature `ort`): the ONNX Runtime engine.
//! - [`sandbox`]: the per-architecture seccomp allow-list and its installation.
//! - `probe` (feature `test-probes`): forbidden-action requests that let
//!   tests prove the sandbox; not in the binary that ships.
//! - [`check`]: `--check`, the hub's push-time check: load, confine, probe
//!   once, report as JSON, exit.

pub mod check;
#[cfg(feature = "ort")]
pub mod engine_ort;
pub mod model;
#[cfg(feature = "test-probes")]
pub mod probe;
pub mod sandbox;

use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use model::{LoadedModel, ModelError};
use sandbox::{SandboxError, SandboxStatus};
use sentinel_worker_protocol::frame::{self as protocol, FrameError, Ready};
pub use sentinel_worker_protocol::launch::{
    Confinement, EXIT_IO, EXIT_MODEL, EXIT_SANDBOX, EXIT_USAGE, Engine, Provider, Providers,
};

/// Whether `FORBID:` requests are honoured (see `probe`, feature
/// `test-probes`). Without the feature there is nothing to honour them with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ForbiddenProbe {
    /// `FORBID:` payloads are malformed requests like any other.
    #[default]
    Disabled,
    /// `FORBID:` payloads attempt the named action (tests only). The file the
    /// `open-write` action creates is named before the sandbox goes up, so the
    /// attempt is the `openat` alone.
    #[cfg(feature = "test-probes")]
    Enabled { write_target: PathBuf },
}

/// What a worker serves and how.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The ONNX file.
    pub model: PathBuf,
    /// One fixed shape per model input, in model order.
    pub input_shapes: Vec<Vec<usize>>,
    /// Which engine runs the model.
    pub engine: Engine,
    /// Largest batch a request may carry, run as one (1: fixed shapes only).
    pub max_batch: usize,
    /// ONNX Runtime's execution providers.
    pub providers: Providers,
    /// Keep running batches as one only if that is faster per sample
    /// (`--tune-batch`; see [`LoadedModel::tune_batching`]).
    pub tune_batch: bool,
    pub confinement: Confinement,
    pub probe: ForbiddenProbe,
}

/// Why a worker stopped before stdin closed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("preparing the model")]
    Model(#[from] ModelError),
    #[error("confining the worker")]
    Sandbox(#[from] SandboxError),
    #[error("reading a request from stdin")]
    ReadRequest(#[source] io::Error),
    #[error("writing to stdout")]
    WriteResponse(#[source] io::Error),
}

impl WorkerError {
    /// The process exit code for this failure (see the `EXIT_*` constants).
    pub fn exit_code(&self) -> u8 {
        match self {
            // Asking a build without the `ort` feature for ONNX Runtime is a
            // configuration error, not a bad model.
            WorkerError::Model(ModelError::EngineUnavailable { .. }) => EXIT_USAGE,
            WorkerError::Model(_) => EXIT_MODEL,
            WorkerError::Sandbox(_) => EXIT_SANDBOX,
            WorkerError::ReadRequest(_) | WorkerError::WriteResponse(_) => EXIT_IO,
        }
    }
}

/// Runs a worker on this process's stdin and stdout. Returns `Ok` when stdin
/// closes between frames.
pub fn run(config: &WorkerConfig) -> Result<(), WorkerError> {
    // Loading runs on a thread of lower priority, so that a new version
    // loading beside a busy one (a promotion under load, on a device with
    // few cores) takes CPU time the serving processes do not want, rather
    // than delay their requests. It ends before the sandbox goes up; this
    // thread, which serves, keeps the normal priority.
    let model = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("load".into())
            .spawn_scoped(scope, || {
                lower_priority(LOAD_NICE);
                prepare(config)
            })
            .map_err(|e| ModelError::WarmUp { path: config.model.clone(), message: format!("no loading thread: {e}") })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    // And once on this thread, which serves: whatever the engines set up
    // per thread is then in place before the filter.
    model.warm_up(&config.model)?;
    // Take the std handles and their buffers before the filter goes up, so
    // nothing is lazily initialised under it.
    let mut input = io::stdin().lock();
    let mut output = BufWriter::new(io::stdout().lock());
    let gpu = config.engine == Engine::Ort && config.providers.gpu();
    let ready = match sandbox::confine(config.confinement, gpu)? {
        SandboxStatus::Confined => Ready { ready: true, confined: true, reason: None, max_batch: model.max_batch() },
        SandboxStatus::Unconfined { reason } => {
            Ready { ready: true, confined: false, reason: Some(reason), max_batch: model.max_batch() }
        }
    };
    protocol::write_frame(&mut output, &protocol::encode_ready(&ready)).map_err(WorkerError::WriteResponse)?;
    serve(&model, &config.probe, &mut input, &mut output)
}

/// The nice value of the loading thread: its CPU weight is about a tenth of
/// a normal thread's, so it yields to serving when the CPUs are busy and
/// loads at full speed when they are not. (Lower, a large model's load on a
/// saturated device could outlast the load timeout.)
const LOAD_NICE: i32 = 10;

/// Loads, warms up and (with `--tune-batch`) tunes the model.
fn prepare(config: &WorkerConfig) -> Result<LoadedModel, WorkerError> {
    let mut model = LoadedModel::load_batched(
        config.engine,
        &config.model,
        &config.input_shapes,
        config.max_batch,
        &config.providers,
    )?;
    model.warm_up(&config.model)?;
    if config.tune_batch {
        let wanted = model.max_batch();
        match model.tune_batching() {
            Ok(Some((one, per_sample))) => eprintln!(
                "sentinel-worker: {}: one sample {one:?}, a sample in a batch of {wanted} {per_sample:?}: batches {}",
                config.model.display(),
                if model.max_batch() > 1 { "run as one" } else { "run sample by sample (not worth it)" }
            ),
            Ok(None) => {}
            Err(e) => return Err(ModelError::WarmUp { path: config.model.clone(), message: e.to_string() }.into()),
        }
        if wanted > 1 && model.max_batch() == 1 && config.engine == Engine::Ort {
            // ONNX Runtime's arena keeps what the largest batch needed for
            // the session's life: a fresh session for single samples gives
            // that memory back.
            drop(model);
            model =
                LoadedModel::load_batched(config.engine, &config.model, &config.input_shapes, 1, &config.providers)?;
            model.warm_up(&config.model)?;
        }
    }
    Ok(model)
}

/// Raises the calling thread's nice value (Linux keeps one per thread).
/// Best effort: a worker that cannot lower its priority loads at the normal one.
fn lower_priority(nice: i32) {
    // SAFETY: gettid and setpriority take integers and touch no memory.
    #[allow(unsafe_code)]
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, u32::try_from(tid).unwrap_or(0), nice) != 0
    };
    if failed {
        eprintln!("sentinel-worker: loading at normal priority: {}", io::Error::last_os_error());
    }
}

/// Answers request frames from `input` on `output`, one response per request,
/// until `input` ends between frames. A bad request gets an error response;
/// only I/O failures end the loop.
pub fn serve(
    model: &LoadedModel,
    probe: &ForbiddenProbe,
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<(), WorkerError> {
    loop {
        let response = match protocol::read_frame(input) {
            Ok(Some(payload)) => answer(model, probe, &payload),
            Ok(None) => return Ok(()),
            Err(FrameError::TooLarge(len)) => {
                discard(input, len).map_err(WorkerError::ReadRequest)?;
                protocol::encode_error_response(&format!(
                    "request of {len} bytes exceeds the {}-byte limit",
                    protocol::MAX_FRAME_LEN
                ))
            }
            Err(FrameError::Io(e)) => return Err(WorkerError::ReadRequest(e)),
        };
        protocol::write_frame(output, &response).map_err(WorkerError::WriteResponse)?;
    }
}

fn answer(model: &LoadedModel, probe: &ForbiddenProbe, payload: &[u8]) -> Vec<u8> {
    #[cfg(feature = "test-probes")]
    if let Some(response) = probe::answer(probe, payload) {
        return response;
    }
    #[cfg(not(feature = "test-probes"))]
    let ForbiddenProbe::Disabled = probe;
    let request = match protocol::decode_request(payload) {
        Ok(request) => request,
        Err(e) => return protocol::encode_error_response(&format!("bad request: {e}")),
    };
    let started = std::time::Instant::now();
    let outputs = if request.rows { model.run_rows(&request.inputs) } else { model.run(&request.inputs) };
    match outputs {
        Ok(outputs) => protocol::encode_ok_timed(&outputs, started.elapsed()),
        Err(e) => protocol::encode_error_response(&e.to_string()),
    }
}

/// Skips an oversized payload so the stream stays in step with the frames.
fn discard(input: &mut impl Read, mut len: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while len > 0 {
        let want = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        match input.read(&mut buf[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => len -= n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
