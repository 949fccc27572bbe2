//! The push-time check contract between the hub and `sentinel-worker --check`.
//!
//! The hub does not load an uploaded model in its own process: it runs
//! `sentinel-worker --check` as a child under an address-space and wall-time
//! limit. The worker loads and optimises the model with the engine a device
//! would use, warms it up, confines itself with the same seccomp filter as a
//! serving worker, runs one probe inference, prints one [`CheckReport`] as a
//! JSON line on stdout and exits with one of the `CHECK_EXIT_*` codes.
//!
//! Both sides name the same types and codes from here, so the contract is
//! checked by the compiler rather than by two copies of a string.

use serde::{Deserialize, Serialize};

/// Exit code: the model loaded, and the probe ran (or was skipped, see [`CheckReport::probe`]).
pub const CHECK_EXIT_OK: u8 = 0;
/// Exit code: the arguments were unusable (`EX_USAGE`).
pub const CHECK_EXIT_USAGE: u8 = 64;
/// Exit code: the model does not load, warm up or run (`EX_DATAERR`); the report says why.
pub const CHECK_EXIT_MODEL: u8 = 65;
/// Exit code: the engine panicked (`EX_SOFTWARE`); the report carries the panic message.
pub const CHECK_EXIT_PANIC: u8 = 70;
/// Exit code: the sandbox could not be installed (`EX_OSERR`).
pub const CHECK_EXIT_SANDBOX: u8 = 71;
/// Exit code: writing the report failed (`EX_IOERR`).
pub const CHECK_EXIT_IO: u8 = 74;

/// Where in the check a model failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStage {
    /// Decoding, analysing and optimising the graph for the probe shapes.
    Load,
    /// The first inference on zeros, before the sandbox goes up.
    WarmUp,
    /// The probe inference on zeros, under the sandbox.
    Probe,
}

impl CheckStage {
    /// The stage's name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStage::Load => "load",
            CheckStage::WarmUp => "warm-up",
            CheckStage::Probe => "probe",
        }
    }
}

/// One tensor the probe produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTensor {
    /// The worker's wire dtype name (`float32`, `int64`).
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// What `sentinel-worker --check` prints: one JSON object on one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The engine that loaded the model (`tract`, `ort`).
    pub engine: String,
    /// The input shapes the model was loaded and probed with.
    pub input_shapes: Vec<Vec<u64>>,
    /// Whether the seccomp filter was installed before the probe.
    pub confined: bool,
    /// Milliseconds spent loading and optimising.
    pub load_ms: u64,
    /// The failure, if any; `None` when the model passed.
    pub failure: Option<CheckFailure>,
    /// The probe's outputs, when it ran.
    pub outputs: Vec<ProbeTensor>,
    /// Why the probe did not run although the model loaded (for example a
    /// dtype the worker protocol does not carry yet); `None` when it ran or
    /// the model failed first.
    pub probe_skipped: Option<String>,
    /// Each documented load step tried, in order (tract only; the last one
    /// loaded the model unless the check failed at load).
    #[serde(default)]
    pub load_steps: Vec<LoadStepReport>,
}

/// How one load step went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadStepReport {
    /// The step, as the worker names it (`as declared`, `ignoring value_info and output shapes`).
    pub step: String,
    /// Why it failed; `None` when it loaded the model.
    pub error: Option<String>,
}

/// The operator an engine message says it cannot run, if it says so (tract:
/// `Unimplemented(OpName)`; ONNX Runtime: `Could not find an implementation
/// for OpName(` or `No opset import for domain`).
pub fn unsupported_operator(message: &str) -> Option<String> {
    let after = |marker: &str| {
        message.find(marker).map(|at| {
            message[at + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect::<String>()
        })
    };
    after("Unimplemented(").or_else(|| after("Could not find an implementation for ")).filter(|op| !op.is_empty())
}

/// Why a model failed its check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckFailure {
    pub stage: CheckStage,
    /// The engine's reason, as it gave it.
    pub reason: String,
    /// The engine panicked rather than returning an error.
    pub panicked: bool,
    /// The failure was an allocation the address-space limit refused.
    pub out_of_memory: bool,
}

/// Whether an engine's panic or error message says an allocation failed,
/// which under the check's `RLIMIT_AS` means the model needs more memory than
/// the limit allows. tract panics with "failed to allocate"; Rust's
/// collections abort with "memory allocation of N bytes failed" (seen on
/// stderr) or panic with "capacity overflow".
pub fn is_allocation_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["failed to allocate", "memory allocation of", "capacity overflow", "out of memory", "cannot allocate memory"]
        .iter()
        .any(|p| m.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_json() {
        let report = CheckReport {
            engine: "tract".into(),
            input_shapes: vec![vec![1, 64]],
            confined: true,
            load_ms: 3,
            failure: Some(CheckFailure {
                stage: CheckStage::WarmUp,
                reason: "boom".into(),
                panicked: true,
                out_of_memory: false,
            }),
            outputs: vec![ProbeTensor { dtype: "float32".into(), shape: vec![1, 10] }],
            probe_skipped: None,
            load_steps: vec![LoadStepReport { step: "as declared".into(), error: None }],
        };
        let json = serde_json::to_string(&report).expect("serialises");
        assert!(json.contains(r#""stage":"warm_up""#), "{json}");
        assert_eq!(serde_json::from_str::<CheckReport>(&json).expect("parses"), report);
    }

    #[test]
    fn allocation_failures_are_recognised() {
        assert!(is_allocation_failure("failed to allocate Layout { size: 1000000000, align: 128 }"));
        assert!(is_allocation_failure("memory allocation of 512000000000 bytes failed"));
        assert!(is_allocation_failure("capacity overflow"));
        assert!(!is_allocation_failure("Impossible to unify Sym(N) with Val(1)"));
    }

    #[test]
    fn unsupported_operators_are_named_from_engine_messages() {
        let tract = "Translating node #1 \"p\" Unimplemented(SentinelNoSuchOp) ToTypedTranslator: Operator can not be made a TypedOp.";
        assert_eq!(unsupported_operator(tract).as_deref(), Some("SentinelNoSuchOp"));
        let ort = "Could not find an implementation for SentinelNoSuchOp(1) node with name ''";
        assert_eq!(unsupported_operator(ort).as_deref(), Some("SentinelNoSuchOp"));
        assert_eq!(unsupported_operator("Impossible to unify Sym(N) with Val(1)"), None);
    }
}
