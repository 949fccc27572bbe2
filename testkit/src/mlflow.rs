//! A real MLflow tracking server (`mlflow server --serve-artifacts` on a
//! SQLite store) from the venv `.ci/install-mlflow` makes, and versions
//! registered in it by MLflow's own Python client
//! (`hub/tests/models/mlflow_register.py`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::wait::WAIT;

/// How to get the venv, said by every failure to find it.
const HOW: &str = "the MLflow import tests need a real MLflow: run `.ci/install-mlflow` (a venv under \
                   target/mlflow-venv, ~900 MB from PyPI; `.ci/test` does it), or point SENTINEL_MLFLOW_BIN \
                   at a bin directory with mlflow and python";

/// The venv's bin directory: `SENTINEL_MLFLOW_BIN`, else
/// `target/mlflow-venv/bin` of this repository. A test that needs it fails
/// rather than skips without it.
pub fn venv_bin() -> PathBuf {
    let bin = std::env::var_os("SENTINEL_MLFLOW_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::bins::workspace_root().join("target/mlflow-venv/bin"));
    for exe in ["mlflow", "python"] {
        assert!(bin.join(exe).is_file(), "{} is missing; {HOW}", bin.join(exe).display());
    }
    bin
}

/// MLflow's client and server would otherwise try to report usage, and the
/// server would start a pool of job runners nothing here uses (a third of
/// its start-up time).
const QUIET: [(&str, &str); 3] =
    [("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"), ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")];

/// A running tracking server; dropping it kills its whole process group
/// (the server, uvicorn and its job runners).
#[derive(Debug)]
pub struct MlflowServer {
    pub url: String,
    child: std::process::Child,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// One version [`MlflowServer::register`] made.
#[derive(Debug, Clone)]
pub struct Registered {
    pub version: String,
    pub run_id: String,
    /// sha256 of the ONNX file as MLflow's client downloads it; `None` for
    /// a version of plain files.
    pub sha256: Option<String>,
}

impl MlflowServer {
    /// Starts a server on a free loopback port and waits for `/health`.
    pub async fn start() -> Self {
        let bin = venv_bin();
        sentinel_hub::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_loopback_port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = std::process::Command::new(bin.join("mlflow"));
        cmd.arg("server")
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.path().join("mlflow.db").display()))
            .arg("--serve-artifacts")
            .arg("--artifacts-destination")
            .arg(dir.path().join("artifacts"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            .envs(QUIET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}; {HOW}", bin.join("mlflow").display()));
        // Owned from here on, so that a panic below still kills it.
        let mut server = Self { url: format!("http://127.0.0.1:{port}"), child, bin, dir };
        let (client, health) = (reqwest::Client::new(), format!("{}/health", server.url));
        let Self { child, dir, .. } = &mut server;
        let log = dir.path().join("server.log");
        // A first start creates the SQLite schema: longer than a hub's start.
        let up = crate::wait::within(WAIT * 2, async || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the MLflow server exited ({status}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            let r = client.get(&health).timeout(Duration::from_secs(5)).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(up.is_some(), "the MLflow server did not answer /health within {:?}:\n{}", WAIT * 2, server.log());
        server
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Registers versions of `model` as `spec` says (see
    /// `hub/tests/models/mlflow_register.py`), in order.
    pub async fn register(&self, model: &str, spec: &Value) -> Vec<Registered> {
        let script = crate::bins::workspace_root().join("hub/tests/models/mlflow_register.py");
        let result = tempfile::NamedTempFile::new().unwrap();
        let mut child = tokio::process::Command::new(self.bin.join("python"))
            .arg(&script)
            .arg(&self.url)
            .arg(model)
            .arg(result.path())
            .envs(QUIET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, spec.to_string().as_bytes()).await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}\n{}\nserver log:\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let v: Value = serde_json::from_slice(&std::fs::read(result.path()).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| Registered {
                version: r["version"].as_str().unwrap().to_owned(),
                run_id: r["run_id"].as_str().unwrap().to_owned(),
                sha256: r["sha256"].as_str().map(str::to_owned),
            })
            .collect()
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        // The group: `mlflow server` leaves uvicorn and job runners behind
        // when only it is killed.
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).output();
        let _ = self.child.wait();
    }
}
