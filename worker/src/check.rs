//! `sentinel-worker --check`: the push-time check the hub runs on an upload.
//!
//! The same load, warm-up and seccomp confinement as a serving worker, then
//! one probe inference on zeros, then one [`CheckReport`] as a JSON line on
//! stdout and an exit code from [`sentinel_worker_protocol::check`]. The hub runs it
//! as a child under `RLIMIT_AS` and a wall-time limit, so a model that needs
//! gigabytes to fold its constants, or minutes to optimise, costs this
//! process and not the hub.
//!
//! Engine panics (tract asserts on a failed allocation) are caught and
//! reported; an allocation Rust's collections cannot make aborts the process
//! instead, and the hub recognises that from its stderr and signal.

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use sentinel_worker_protocol::check::{
    CHECK_EXIT_IO, CHECK_EXIT_MODEL, CHECK_EXIT_OK, CHECK_EXIT_PANIC, CHECK_EXIT_SANDBOX, CheckFailure, CheckReport,
    CheckStage, LoadStepReport, ProbeTensor, is_allocation_failure,
};

use crate::model::{self, LoadedModel, ModelError};
use crate::sandbox::{self, SandboxStatus};
use crate::{Confinement, Engine};

/// What to check and how.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// The ONNX file.
    pub model: PathBuf,
    /// One fixed shape per model input, in model order: the shapes a device
    /// serves with by default (symbolic dimensions fixed to 1).
    pub input_shapes: Vec<Vec<usize>>,
    pub engine: Engine,
    pub confinement: Confinement,
}

/// Runs the check and writes its report to stdout. Returns the exit code.
pub fn run(config: &CheckConfig) -> u8 {
    // The default hook prints the panic to stderr, which the hub keeps; the
    // report carries the message too, so nothing else is needed here.
    let mut report = CheckReport {
        engine: config.engine.name().to_owned(),
        input_shapes: config.input_shapes.iter().map(|s| s.iter().map(|&d| d as u64).collect()).collect(),
        confined: false,
        load_ms: 0,
        failure: None,
        outputs: Vec::new(),
        probe_skipped: None,
        load_steps: Vec::new(),
    };
    // Take stdout and its buffer before the filter goes up.
    let mut out = io::stdout().lock();
    let code = match check(config, &mut report) {
        Ok(()) => CHECK_EXIT_OK,
        Err(Stop::Failed(failure)) => {
            let code = if failure.panicked { CHECK_EXIT_PANIC } else { CHECK_EXIT_MODEL };
            report.failure = Some(failure);
            code
        }
        Err(Stop::Sandbox(e)) => {
            eprintln!("sentinel-worker: confining the check: {e}");
            return CHECK_EXIT_SANDBOX;
        }
    };
    let written = serde_json::to_writer(&mut out, &report)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => code,
        Err(e) => {
            eprintln!("sentinel-worker: writing the check report: {e}");
            CHECK_EXIT_IO
        }
    }
}

enum Stop {
    Failed(CheckFailure),
    Sandbox(sandbox::SandboxError),
}

fn check(config: &CheckConfig, report: &mut CheckReport) -> Result<(), Stop> {
    let path = &config.model;
    let started = Instant::now();
    let loaded = guarded(CheckStage::Load, || match config.engine {
        // Optimise whatever the element types, so that a model the wire
        // protocol cannot carry yet still proves it loads.
        Engine::Tract => {
            let (typed, attempts) = model::optimise_tract_steps(path, &config.input_shapes);
            for attempt in attempts {
                match &attempt.error {
                    None => eprintln!("sentinel-worker: loaded {}", attempt.step.name()),
                    Some(e) => eprintln!("sentinel-worker: loading {} failed: {e}", attempt.step.name()),
                }
                report.load_steps.push(LoadStepReport { step: attempt.step.name().to_owned(), error: attempt.error });
            }
            typed.and_then(|typed| LoadedModel::from_optimised(path, typed))
        }
        other => LoadedModel::load_with(other, path, &config.input_shapes),
    });
    report.load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let model = match loaded? {
        Ok(model) => model,
        Err(e @ ModelError::UnsupportedDType { .. }) => {
            report.probe_skipped = Some(e.to_string());
            return Ok(());
        }
        Err(e) => return Err(failed(CheckStage::Load, e.to_string(), false)),
    };
    guarded(CheckStage::WarmUp, || model.warm_up(path))?
        .map_err(|e| failed(CheckStage::WarmUp, e.to_string(), false))?;
    report.confined = match sandbox::confine(config.confinement, false).map_err(Stop::Sandbox)? {
        SandboxStatus::Confined => true,
        SandboxStatus::Unconfined { .. } => false,
    };
    let outputs = guarded(CheckStage::Probe, || model.run_zeros())?
        .map_err(|e| failed(CheckStage::Probe, e.to_string(), false))?;
    report.outputs = outputs
        .iter()
        .map(|t| ProbeTensor { dtype: t.dtype.name().to_owned(), shape: t.shape.iter().map(|&d| d as u64).collect() })
        .collect();
    Ok(())
}

/// Runs one stage, turning an engine panic into a reported failure.
fn guarded<T>(stage: CheckStage, f: impl FnOnce() -> T) -> Result<T, Stop> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned());
        failed(stage, format!("the engine panicked: {message}"), true)
    })
}

fn failed(stage: CheckStage, reason: String, panicked: bool) -> Stop {
    let out_of_memory = is_allocation_failure(&reason);
    Stop::Failed(CheckFailure { stage, reason, panicked, out_of_memory })
}
