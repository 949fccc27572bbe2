//! `sentinel demo` works end to end: a real hub and a real agent as separate
//! processes, the degraded release rolled back by the agent on its own, and
//! the deployment halted by the hub, with exit 0.
//!
//! The agent binaries come from [`common::agent_binaries`]. The demo's
//! decisions depend on sample counts, not on time, so the output asserted
//! here is stable.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::common::agent_binaries;

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
