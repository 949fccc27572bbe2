//! A real hub on 127.0.0.1:0 with its own data dir, and helpers to call it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use reqwest::Response;
use serde_json::Value;

/// `target/<profile>` of this test binary (`target/<profile>/deps/it-…`).
pub fn profile_dir() -> PathBuf {
    sentinel_testkit::bins::profile_dir()
}

/// The `sentinel-agent` and `sentinel-worker` binaries of this build, for
/// tests that need a real device process (built on demand, see
/// [`sentinel_testkit::bins`]).
pub fn agent_binaries() -> (PathBuf, PathBuf) {
    (sentinel_testkit::bins::agent(), sentinel_testkit::bins::worker())
}

pub use sentinel_testkit::hub::TestHub;
pub use sentinel_testkit::models::{V1, V2, V3, VISION, model_bytes, model_path};

/// Asserts a JSON error response with `status`, returning its message.
pub async fn expect_error(r: Response, status: u16) -> String {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "expected {status}, got {got}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
    let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message in {text}")).to_owned();
    assert!(!msg.is_empty());
    msg
}

/// What a run of the `sentinel` CLI printed, and its exit code.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `sentinel` binary against `hub` as `token`.
pub async fn sentinel(hub: &TestHub, token: &str, args: &[&str]) -> Run {
    sentinel_at(&hub.url, Some(token), args).await
}

/// Runs the real `sentinel` binary with `SENTINEL_HUB` set to `hub_url`, as
/// `token` (none: no `SENTINEL_TOKEN` at all).
pub async fn sentinel_at(hub_url: &str, token: Option<&str>, args: &[&str]) -> Run {
    sentinel_env(hub_url, token, &[], args).await
}

/// [`sentinel_at`] with `env` set besides. `COLUMNS` is unset unless `env`
/// sets it, so tables come out whole whatever the test's terminal.
pub async fn sentinel_env(hub_url: &str, token: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel"));
    cmd.args(args).env("SENTINEL_HUB", hub_url).env_remove("SENTINEL_TOKEN").env_remove("COLUMNS");
    if let Some(t) = token {
        cmd.env("SENTINEL_TOKEN", t);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().await.unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}
