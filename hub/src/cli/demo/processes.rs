//! The demo's child processes: finding (or building) the sibling
//! binaries, starting them with their stderr in a log file, reading their
//! ready lines, and stopping them with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use super::{DemoError, WAIT, io};
use crate::cli::args::DemoArgs;

/// The package and binary target of each sibling the demo builds and runs.
const SIBLINGS: [(&str, &str); 3] =
    [("sentinel-hub", "sentinel-hub"), ("sentinel-agent", "sentinel-agent"), ("sentinel-worker", "sentinel-worker")];

/// The sibling executables the demo runs.
#[derive(Debug)]
pub(super) struct Binaries {
    pub(super) hub: PathBuf,
    pub(super) agent: PathBuf,
    pub(super) worker: PathBuf,
}

impl Binaries {
    /// Flags first, then siblings of this executable. Under `cargo run`,
    /// siblings are built (or found up to date) first, because `cargo run
    /// --bin sentinel` builds only this binary.
    pub(super) async fn resolve(args: &DemoArgs) -> Result<Self, DemoError> {
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        let sibling = |name: &str| exe_dir.as_ref().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name));
        let all_given = args.hub_bin.is_some() && args.agent_bin.is_some() && args.worker_bin.is_some();
        if let (false, Some(dir), Some(cargo)) = (all_given, &exe_dir, std::env::var_os("CARGO")) {
            build_siblings(dir, &cargo).await?;
        }
        let bins = Self {
            hub: args.hub_bin.clone().unwrap_or_else(|| sibling("sentinel-hub")),
            agent: args.agent_bin.clone().unwrap_or_else(|| sibling("sentinel-agent")),
            worker: args.worker_bin.clone().unwrap_or_else(|| sibling("sentinel-worker")),
        };
        for (name, flag, path) in [
            ("sentinel-hub", "hub-bin", &bins.hub),
            ("sentinel-agent", "agent-bin", &bins.agent),
            ("sentinel-worker", "worker-bin", &bins.worker),
        ] {
            if !path.is_file() {
                return Err(DemoError::MissingBinary { name, flag, path: path.display().to_string() });
            }
        }
        Ok(bins)
    }
}

/// `cargo build` of the hub and agent binaries into the target dir this
/// executable lives in, with its profile. Skipped outside a checkout.
async fn build_siblings(exe_dir: &Path, cargo: &std::ffi::OsStr) -> Result<(), DemoError> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let (Some(profile), Some(target_dir)) = (exe_dir.file_name().and_then(|n| n.to_str()), exe_dir.parent()) else {
        return Ok(());
    };
    if !manifest.is_file() {
        return Ok(());
    }
    println!("==> building sentinel-hub, sentinel-agent and sentinel-worker ({profile}), if needed");
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--manifest-path").arg(&manifest).arg("--target-dir").arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    for (package, bin) in SIBLINGS {
        cmd.args(["-p", package, "--bin", bin]);
    }
    cmd.arg("--quiet");
    let status = cmd.status().await.map_err(io("running cargo build"))?;
    if !status.success() {
        return Err(DemoError::Build(status.to_string()));
    }
    Ok(())
}

/// The last lines of a child's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(8)..].join("\n");
    format!("the end of {}:\n{last}", log.display())
}

/// A child process whose stderr goes to a log file.
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) name: &'static str,
    child: Child,
}

impl Proc {
    /// Starts `cmd` and reads its stdout until, for each prefix in `wanted`,
    /// a line starting with it has appeared; returns those lines.
    pub(super) async fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
        wanted: &[&str],
    ) -> Result<(Self, Vec<String>), DemoError> {
        let log_file = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io(format!("starting {name}")))?;
        let stdout = child.stdout.take().ok_or_else(|| DemoError::Unexpected(format!("{name} has no stdout")))?;
        let proc = Self { name, child };
        let mut lines = BufReader::new(stdout).lines();
        let mut found: Vec<Option<String>> = vec![None; wanted.len()];
        let read = async {
            while found.iter().any(Option::is_none) {
                let Some(line) = lines.next_line().await.map_err(io(format!("reading {name}'s output")))? else {
                    return Err(DemoError::Startup { name, reason: format!("it exited early; {}", tail(log)) });
                };
                if let Some(i) = wanted.iter().position(|w| line.starts_with(w)) {
                    found[i] = Some(line);
                }
            }
            Ok(())
        };
        match tokio::time::timeout(WAIT, read).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = proc.stop().await;
                return Err(e);
            }
            Err(_) => {
                let _ = proc.stop().await;
                return Err(DemoError::Startup { name, reason: format!("not ready within {WAIT:?}; {}", tail(log)) });
            }
        }
        // Keep draining stdout so a late line never blocks or breaks the child.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((proc, found.into_iter().flatten().collect()))
    }

    /// SIGTERM, then wait for a clean exit (SIGKILL after 15 s).
    pub(super) async fn stop(mut self) -> Result<ExitStatus, std::io::Error> {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            #[allow(unsafe_code)]
            // SAFETY: `kill` has no memory effects; `pid` is our own child,
            // not yet reaped (so not recycled), because `id()` returned it.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                self.child.kill().await?;
                self.child.wait().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SIBLINGS;

    /// `cargo run --bin sentinel -- demo` builds the siblings with these
    /// `-p`/`--bin` pairs: each binary must be a target of its package (the
    /// worker moved to its own package once, and the build broke unseen).
    #[test]
    fn every_sibling_is_a_binary_of_the_package_it_is_built_from() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let out = std::process::Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
            .arg(&manifest)
            .output()
            .expect("cargo metadata runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
        let packages = meta["packages"].as_array().expect("packages");
        for (package, bin) in SIBLINGS {
            let p = packages.iter().find(|p| p["name"] == package).unwrap_or_else(|| panic!("no package {package}"));
            let targets = p["targets"].as_array().expect("targets");
            assert!(
                targets
                    .iter()
                    .any(|t| t["name"] == bin && t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"))),
                "package {package} has no binary {bin}"
            );
        }
    }
}
