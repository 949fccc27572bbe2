//! The workspace's binaries, for tests in a package that does not build them.
//!
//! Cargo builds only a package's own binaries for its integration tests
//! (`CARGO_BIN_EXE_*`), and the agent, the worker and the hub are separate
//! packages. The first call here runs `cargo test --workspace --no-run` into
//! the calling test's target dir and profile: the unit graph of the README's
//! test command, so under that command it is a freshness check that compiles
//! nothing. Building only the wanted package would resolve features
//! differently (the worker's tests switch on its `test-probes` feature) and
//! recompile a dozen crates.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `target/<profile>` of the running test binary (`target/<profile>/deps/it-…`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("a test binary lives in target/<profile>/deps").to_path_buf()
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The path of the workspace binary `name` (`sentinel-agent`,
/// `sentinel-worker`, `sentinel-hub`, `sentinel`) in this test's profile,
/// built and current. The worker there has its `test-probes` feature.
pub fn bin(name: &str) -> PathBuf {
    build_once();
    let path = profile_dir().join(name);
    assert!(path.is_file(), "{} was not built by `cargo test --workspace --no-run`", path.display());
    path
}

/// The confined inference worker.
pub fn worker() -> PathBuf {
    bin("sentinel-worker")
}

/// The device agent.
pub fn agent() -> PathBuf {
    bin("sentinel-agent")
}

fn build_once() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let mut cargo = std::process::Command::new(env!("CARGO"));
        // What cargo set for this test process describes its package, not
        // the build: inherited, CARGO_MANIFEST_DIR alone makes ring's build
        // script, and all that depends on it, rebuild.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .iter()
            .any(|p| name.starts_with(p))
            {
                cargo.env_remove(&*name);
            }
        }
        cargo.args(["test", "--workspace", "--no-run", "--quiet", "--manifest-path"]);
        cargo.arg(workspace_root().join("Cargo.toml"));
        cargo.arg("--target-dir").arg(profile.parent().expect("target/<profile> has a parent"));
        match profile.file_name().and_then(|n| n.to_str()).expect("a UTF-8 profile name") {
            "debug" => {}
            "release" => {
                cargo.arg("--release");
            }
            other => {
                cargo.args(["--profile", other]);
            }
        }
        let status = cargo.status().expect("running cargo");
        assert!(status.success(), "building the workspace's binaries (cargo test --workspace --no-run): {status}");
    });
}
