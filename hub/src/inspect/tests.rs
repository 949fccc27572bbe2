//! Unit tests of [`super`].

use super::*;

const MIB: u64 = 1024 * 1024;

fn report(failure: Option<CheckFailure>) -> CheckReport {
    CheckReport {
        engine: "tract".into(),
        input_shapes: vec![vec![1, 64]],
        confined: true,
        load_ms: 1,
        failure,
        outputs: vec![],
        probe_skipped: None,
        load_steps: vec![],
    }
}

fn failure(reason: &str, panicked: bool) -> Option<CheckFailure> {
    Some(CheckFailure {
        stage: CheckStage::Load,
        reason: reason.into(),
        panicked,
        out_of_memory: is_allocation_failure(reason),
    })
}

fn code(c: i32) -> Exit {
    Exit { code: Some(c), signal: None }
}

fn signal(s: i32) -> Exit {
    Exit { code: None, signal: Some(s) }
}

#[test]
fn a_passing_check_returns_its_report() {
    assert!(outcome(code(0), Some(report(None)), "", 1024 * MIB).is_ok());
}

#[test]
fn an_engine_refusal_keeps_the_engine_reason() {
    let e = outcome(code(65), Some(report(failure("Impossible to unify", false))), "", MIB).unwrap_err();
    assert!(matches!(&e, InspectError::Refused { reason, .. } if reason == "Impossible to unify"), "{e}");
    assert!(e.is_refusal());
}

#[test]
fn allocation_failures_are_the_memory_limit_whether_panic_or_abort() {
    let panic = "the engine panicked: failed to allocate Layout { size: 1000000000, align: 128 }";
    let e = outcome(code(70), Some(report(failure(panic, true))), "", 1024 * MIB).unwrap_err();
    assert!(e.to_string().contains("exceeds the inspection limit of 1024 MiB of memory"), "{e}");
    let stderr = "memory allocation of 1000000000 bytes failed";
    let e = outcome(signal(libc::SIGABRT), None, stderr, 512 * MIB).unwrap_err();
    assert!(e.to_string().contains("exceeds the inspection limit of 512 MiB of memory"), "{e}");
    assert!(e.to_string().contains(stderr), "{e}");
}

#[test]
fn crashes_and_sandbox_kills_are_refusals_and_odd_exits_are_faults() {
    assert!(matches!(outcome(signal(libc::SIGSYS), None, "", MIB), Err(InspectError::SandboxViolation)));
    let e = outcome(signal(libc::SIGSEGV), None, "boom", MIB).unwrap_err();
    assert!(matches!(e, InspectError::Crashed { .. }) && e.is_refusal(), "{e}");
    let e = outcome(code(64), None, "bad flag", MIB).unwrap_err();
    assert!(!e.is_refusal(), "a usage error is the hub's fault: {e}");
    let e = outcome(code(0), None, "", MIB).unwrap_err();
    assert!(!e.is_refusal(), "no report is the hub's fault: {e}");
}

#[test]
fn reasons_are_clipped() {
    let long = "x".repeat(10 * MAX_REASON_CHARS);
    assert!(clip(&long).chars().count() <= MAX_REASON_CHARS + 1);
}

#[tokio::test]
async fn a_missing_worker_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = InspectConfig { worker: Some(tmp.path().join("nope")), ..InspectConfig::default() };
    let e = Inspector::new(config, tmp.path().join("inspect")).expect_err("refused");
    assert!(e.to_string().contains("--worker"), "{e}");
}
