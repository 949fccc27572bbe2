//! `sentinel-worker --check`, the hub's push-time check: one JSON report on
//! stdout and a documented exit code for a model that passes, one the engine
//! refuses, a truncated file, and one that does not fit its address-space
//! limit; the probe runs under the seccomp filter.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use sentinel_worker_protocol::check::{CHECK_EXIT_MODEL, CHECK_EXIT_OK, CheckReport, CheckStage};

use sentinel_testkit::models::model_path;

/// Runs a check, optionally under `RLIMIT_AS`, and returns its exit code and report.
fn check(model: &Path, shape: &str, memory_limit: Option<u64>) -> (i32, CheckReport) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sentinel-worker"));
    cmd.arg("--check").arg("--model").arg(model).arg(format!("--input-shape={shape}")).env_clear();
    if let Some(limit) = memory_limit {
        let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        // SAFETY: runs in the forked child before exec; setrlimit is
        // async-signal-safe and reads only the copied struct.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_AS, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no report ({e}): {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn a_good_model_passes_with_its_probe_run_confined() {
    let (code, report) = check(&model_path("digits/digits_mlp_v1.onnx"), "1,64", None);
    assert_eq!(code, i32::from(CHECK_EXIT_OK), "{report:?}");
    assert!(report.failure.is_none() && report.probe_skipped.is_none(), "{report:?}");
    assert!(report.confined, "the probe runs under the seccomp filter: {report:?}");
    let shapes: Vec<_> = report.outputs.iter().map(|t| (t.dtype.as_str(), t.shape.clone())).collect();
    assert_eq!(shapes, [("float32", vec![1, 10]), ("int64", vec![1])]);
}

/// Builds a model with the hub's `tests/models/make_onnx.py KIND OUT` (PyPI `onnx`).
fn make_onnx(kind: &str, dir: &Path) -> std::path::PathBuf {
    let out = dir.join(format!("{kind}.onnx"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/tests/models/make_onnx.py");
    let run = Command::new("python3").arg(&script).arg(kind).arg(&out).output().unwrap();
    assert!(run.status.success(), "make_onnx.py {kind} (python3 -m pip install onnx): {run:?}");
    out
}

#[test]
fn a_value_info_conflict_loads_through_the_fallback_and_says_so() {
    // value_info types `h` as [DynamicDimension.0, 10], as Paddle exports do.
    let tmp = tempfile::tempdir().unwrap();
    let (code, report) = check(&make_onnx("paddle_value_info", tmp.path()), "1,64", None);
    assert_eq!(code, i32::from(CHECK_EXIT_OK), "{report:?}");
    assert!(report.failure.is_none() && report.probe_skipped.is_none(), "{report:?}");
    let steps: Vec<_> = report.load_steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(steps, ["as declared", "ignoring value_info and output shapes"], "{report:?}");
    let first = report.load_steps[0].error.as_deref().unwrap_or_default();
    assert!(first.contains("Impossible to unify Sym(DynamicDimension.0)"), "{first}");
    assert!(report.load_steps[1].error.is_none(), "{report:?}");
    let shapes: Vec<_> = report.outputs.iter().map(|t| (t.dtype.as_str(), t.shape.clone())).collect();
    assert_eq!(shapes, [("float32", vec![1, 10])]);
}

#[test]
fn a_model_the_engine_refuses_fails_at_load_with_its_reason() {
    let (code, report) = check(&model_path("broken/unsupported_op.onnx"), "1,64", None);
    assert_eq!(code, i32::from(CHECK_EXIT_MODEL), "{report:?}");
    let failure = report.failure.clone().unwrap();
    assert_eq!(failure.stage, CheckStage::Load);
    assert!(!failure.panicked && !failure.out_of_memory, "{failure:?}");
    assert!(failure.reason.contains("Unimplemented(SentinelNoSuchOp)"), "{failure:?}");
    assert_eq!(report.load_steps.len(), 2, "both load steps were tried: {report:?}");
    assert!(report.load_steps.iter().all(|s| s.error.is_some()), "{report:?}");

    let tmp = tempfile::tempdir().unwrap();
    let truncated = tmp.path().join("half.onnx");
    let bytes = std::fs::read(model_path("digits/digits_mlp_v1.onnx")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (code, report) = check(&truncated, "1,64", None);
    assert_eq!(code, i32::from(CHECK_EXIT_MODEL), "{report:?}");
}

#[test]
fn a_probe_shape_beyond_the_address_space_limit_is_reported_as_out_of_memory() {
    // 100,000,000 x 64 f32 zeros: 25.6 GB for the warm-up input, under a
    // 512 MiB limit. The check reports it rather than aborting.
    let (code, report) = check(&model_path("digits/digits_mlp_v1.onnx"), "100000000,64", Some(512 << 20));
    let failure = report.failure.clone().unwrap_or_else(|| panic!("passed: {report:?}"));
    assert_eq!(code, i32::from(CHECK_EXIT_MODEL), "{failure:?}");
    assert_eq!(failure.stage, CheckStage::WarmUp, "{failure:?}");
    assert!(failure.out_of_memory && !failure.panicked, "{failure:?}");
}
