//! The `sentinel` command-line client of the hub's REST API.
//!
//! Output is a human table by default and JSON with `--json`. Exit codes say
//! what went wrong, so scripts can branch on them:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | not found (404) |
//! | 3 | conflict (409): duplicate version, still deployed, nothing to roll back |
//! | 4 | `model import`: one or more versions were refused (each is named) |
//! | 64 | usage: bad flags or arguments (e.g. a push without `--version`) |
//! | 65 | the hub refused the input (400, 413, 415, 422) |
//! | 66 | a local file could not be read |
//! | 69 | the hub (or the MLflow server an import reads) is unreachable or failed (5xx) |
//! | 70 | `sentinel demo` failed |
//! | 73 | a file the command writes could not be written (`device enroll --agent-config`; the message says whether the device was enrolled) |
//! | 77 | missing or wrong token, or a role that is not allowed (401, 403) |
//!
//! # Layout
//! - [`admin`]: `device`, `token` and `hub`: the fleet, API tokens and signing keys.
//! - [`args`]: the clap command tree.
//! - [`client`]: a small typed client of `/api/v1`, with upload progress.
//! - [`commands`]: dispatch, the `model` and `deployments` commands, and the
//!   table and JSON output they share.
//! - [`mlflow`]: `model import mlflow`, registered versions from an MLflow
//!   tracking server pushed through `model push`'s path.
//! - [`demo`]: `sentinel demo`, a real hub and agent on loopback (exit 70 on failure).
//! - [`deploy`]: the deploy request from a policy file and flags, and the
//!   rollout view of `deployments show`.
//! - [`enroll`]: `device enroll --agent-config`, the agent config and token
//!   file of a new device.

pub mod admin;
pub mod args;
pub mod client;
pub mod commands;
pub mod demo;
pub mod deploy;
pub mod enroll;
pub mod mlflow;

pub use args::Cli;

/// A failure of a CLI command, carrying its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}")]
    LocalFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the hub at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the hub answered {status}: {message}")]
    Hub { status: u16, message: String },
    #[error("the hub sent a response this CLI does not understand")]
    Protocol(#[source] reqwest::Error),
    #[error("the demo failed")]
    Demo(#[source] Box<demo::DemoError>),
    #[error(transparent)]
    Mlflow(#[from] mlflow::MlflowError),
    #[error("{refused} of {total} MLflow versions were refused")]
    ImportRefused { refused: usize, total: usize },
    /// A file the command writes; the message says what was done already.
    #[error("{message}")]
    WriteFile {
        message: String,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// The process exit code for this failure (see the module docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 64,
            CliError::LocalFile { .. } => 66,
            CliError::Unreachable { .. } | CliError::Protocol(_) => 69,
            CliError::Demo(_) => 70,
            CliError::Mlflow(e) if e.is_not_found() => 1,
            CliError::Mlflow(mlflow::MlflowError::LocalFile { .. }) => 66,
            CliError::Mlflow(_) => 69,
            CliError::ImportRefused { .. } => 4,
            CliError::WriteFile { .. } => 73,
            CliError::Hub { status, .. } => match status {
                404 => 1,
                409 => 3,
                401 | 403 => 77,
                400..=499 => 65,
                _ => 69,
            },
        }
    }
}

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    commands::dispatch(cli).await
}
