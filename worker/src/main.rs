//! `sentinel-worker`: the confined inference worker. Parses arguments and
//! hands over to [`sentinel_worker::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use sentinel_worker::check::{self, CheckConfig};
use sentinel_worker::{
    self as worker, Confinement, EXIT_USAGE, Engine, ForbiddenProbe, Provider, Providers, WorkerConfig,
};

/// Serves one ONNX model over length-prefixed frames on stdin/stdout, confined by seccomp.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 stdin closed, 64 bad arguments (or `--engine ort` in a build without \
                  the `ort` feature), 65 model failed to load or warm up, \
                  71 sandbox could not be installed, 74 stdin/stdout failed. \
                  Killed by SIGSYS: the model tried a syscall the sandbox forbids. \
                  With --check: 0 the model passed (or its probe was skipped, see the report), \
                  65 it failed to load, warm up or run, 70 the engine panicked, 71 sandbox, 74 stdout; \
                  the JSON report on stdout says why."
)]
struct Cli {
    /// The ONNX model file.
    #[arg(long)]
    model: PathBuf,
    /// Fixed shape of one model input, e.g. `1,64`; repeat once per input, in model order.
    #[arg(long = "input-shape", required = true, value_parser = parse_shape)]
    input_shapes: Vec<Vec<usize>>,
    /// The inference engine; `ort` needs a build with the `ort` feature and
    /// ORT_DYLIB_PATH naming the ONNX Runtime library.
    #[arg(long, value_enum, default_value_t = EngineArg::Tract)]
    engine: EngineArg,
    /// Run a request whose inputs all carry up to this many samples in their
    /// first dim as one batch (the fixed shapes' first dim must be 1, the
    /// model's symbolic batch dim). 1: fixed shapes only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
    max_batch: u16,
    /// With --max-batch: time one sample against the largest batch at load
    /// and run batches sample by sample unless a sample in the batch costs at
    /// most 0.8x of one alone.
    #[arg(long)]
    tune_batch: bool,
    /// An ONNX Runtime execution provider (tensorrt, cuda, cpu); repeat in
    /// order of preference. CPU kernels run whatever the others do not take.
    #[arg(long = "provider", value_parser = parse_provider)]
    providers: Vec<Provider>,
    /// Skip (and log) a provider the library lacks instead of failing to load.
    #[arg(long)]
    provider_fallback: bool,
    /// The GPU for CUDA and TensorRT (default 0).
    #[arg(long)]
    device_id: Option<u32>,
    /// Let TensorRT build FP16 kernels.
    #[arg(long)]
    tensorrt_fp16: bool,
    /// Where TensorRT keeps the engines it builds (opened before the sandbox).
    #[arg(long)]
    tensorrt_cache: Option<PathBuf>,
    /// `RLIMIT_AS` in bytes, set before anything else happens: the agent
    /// starts workers with `posix_spawn` (no `fork` of its own address
    /// space), so the limit is the worker's first act rather than the
    /// agent's last one.
    #[arg(long)]
    memory_limit: Option<u64>,
    /// Install the seccomp sandbox after warm-up (`off` only for debugging).
    #[arg(long, value_enum, default_value_t = ConfinementArg::On)]
    confinement: ConfinementArg,
    /// Check the model instead of serving it: load, warm up, confine, run one
    /// probe inference on zeros, print a JSON report on stdout and exit. The
    /// hub runs this on every upload, under memory and time limits.
    #[arg(long)]
    check: bool,
    /// Tests only: honour `FORBID:<action>` requests that attempt forbidden
    /// syscalls. Only in builds with the `test-probes` feature.
    #[cfg(feature = "test-probes")]
    #[arg(long, hide = true)]
    test_forbidden: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineArg {
    Tract,
    Ort,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ConfinementArg {
    On,
    Off,
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse().map_err(|e: sentinel_worker_protocol::launch::UnknownProvider| e.to_string())
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    // An empty shape is a scalar input.
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(|d| d.trim().parse::<usize>().map_err(|e| format!("dimension {d:?} in {s:?}: {e}"))).collect()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before the model is opened: no descriptor but the three pipes, and
    // the address space limited.
    if let Err(e) = sentinel_worker::sandbox::close_inherited_descriptors() {
        eprintln!("sentinel-worker: closing inherited descriptors: {e}");
        return ExitCode::from(sentinel_worker_protocol::launch::EXIT_SANDBOX);
    }
    if let Some(bytes) = cli.memory_limit
        && let Err(e) = sentinel_worker::sandbox::limit_address_space(bytes)
    {
        eprintln!("sentinel-worker: setting RLIMIT_AS to {bytes} bytes: {e}");
        return ExitCode::from(sentinel_worker_protocol::launch::EXIT_SANDBOX);
    }
    let engine = match cli.engine {
        EngineArg::Tract => Engine::Tract,
        EngineArg::Ort => Engine::Ort,
    };
    let confinement = match cli.confinement {
        ConfinementArg::On => Confinement::Enforce,
        ConfinementArg::Off => Confinement::Off,
    };
    if cli.check {
        return ExitCode::from(check::run(&CheckConfig {
            model: cli.model,
            input_shapes: cli.input_shapes,
            engine,
            confinement,
        }));
    }
    let probe = probe(&cli);
    let config = WorkerConfig {
        model: cli.model,
        input_shapes: cli.input_shapes,
        engine,
        max_batch: usize::from(cli.max_batch),
        tune_batch: cli.tune_batch,
        providers: Providers {
            order: cli.providers,
            fallback: cli.provider_fallback,
            device_id: cli.device_id,
            tensorrt_fp16: cli.tensorrt_fp16,
            tensorrt_cache: cli.tensorrt_cache,
        },
        confinement,
        probe,
    };
    match worker::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error_chain(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(feature = "test-probes")]
fn probe(cli: &Cli) -> ForbiddenProbe {
    if cli.test_forbidden { sentinel_worker::probe::enabled() } else { ForbiddenProbe::Disabled }
}

#[cfg(not(feature = "test-probes"))]
fn probe(_cli: &Cli) -> ForbiddenProbe {
    ForbiddenProbe::Disabled
}

fn print_error_chain(e: &dyn std::error::Error) {
    let mut line = format!("sentinel-worker: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{line}");
}
