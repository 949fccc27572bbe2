//! `sentinel demo` works end to end: a real hub and a real agent as separate
//! processes, the degraded release rolled back by the agent on its own, and
//! the deployment halted by the hub, with exit 0.
//!
//! `sentinel-agent` and `sentinel-worker` belong to the agent package, which
//! cargo does not build for this package's tests, so the test first runs
//! `cargo build -p sentinel-agent --bins` into the same target dir and
//! profile (a no-op when they are up to date). The demo's decisions depend
//! on sample counts, not on time, so the output asserted here is stable.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the agent binaries next to this package's and returns their paths.
fn agent_binaries() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_BIN_EXE_sentinel")).parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "-p", "sentinel-agent", "--bins", "--manifest-path"]);
    cargo.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    cargo.arg("--target-dir").arg(dir.parent().unwrap());
    match dir.file_name().unwrap().to_str().unwrap() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let status = cargo.status().unwrap();
    assert!(status.success(), "cargo build -p sentinel-agent --bins: {status}");
    (dir.join("sentinel-agent"), dir.join("sentinel-worker"))
}

#[test]
fn the_demo_shows_the_agent_rolling_back_and_the_hub_halting_the_deployment() {
    let (agent, worker) = agent_binaries();
    let out = Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .arg("demo")
        .arg("--hub-bin")
        .arg(env!("CARGO_BIN_EXE_sentinel-hub"))
        .arg("--agent-bin")
        .arg(&agent)
        .arg("--worker-bin")
        .arg(&worker)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);

    let rollback = stdout.lines().find(|l| l.contains("rolled 2.0.0 back on its own")).unwrap_or_else(|| {
        panic!("no rollback line:\n{stdout}");
    });
    assert!(rollback.contains("accuracy"), "the reason names the failed check: {rollback}");
    assert!(stdout.contains("failed requests during the canary and rollback: 0"), "{stdout}");
    assert!(stdout.contains("traffic is back on 1.0.0: 50 of 50"), "{stdout}");
    assert!(stdout.contains("state: halted"), "the fleet status shows the halt: {stdout}");
    assert!(stdout.contains("demo finished in"), "{stdout}");
}
