//! The `sentinel` command tree.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

/// Sentinel: push, deploy and roll back ONNX models across a fleet.
#[derive(Debug, Parser)]
#[command(name = "sentinel", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Hub base URL.
    #[arg(long, global = true, env = "SENTINEL_HUB", default_value = "http://127.0.0.1:8080")]
    pub hub: String,
    /// API token (see `sentinel token create`; the first admin token is in the hub's admin.token).
    #[arg(long, global = true, env = "SENTINEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 not found, 3 conflict, 4 an import refused some versions, 64 usage, \
65 input refused by the hub, 66 local file unreadable, 69 hub (or MLflow) unreachable or failing, 73 a file to write \
could not be written, 77 token missing, wrong or not allowed.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Models and their versions.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Deployment records.
    #[command(subcommand)]
    Deployments(DeploymentsCommand),
    /// Devices: enrol, list, show, remove.
    #[command(subcommand, visible_alias = "devices")]
    Device(DeviceCommand),
    /// API tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Publisher keys: who may sign models (OpenSSF model-signing).
    #[command(subcommand)]
    Publisher(PublisherCommand),
    /// The hub itself.
    #[command(subcommand)]
    Hub(HubCommand),
    /// Run a real hub and agent on loopback and show a bad release rolling back on its own.
    Demo(DemoArgs),
    /// Print a shell completion script: `sentinel completions bash > /etc/bash_completion.d/sentinel`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `sentinel demo`: the binaries default to siblings of this executable.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the temporary directory (hub data, agent state, logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// The `sentinel-hub` executable.
    #[arg(long, value_name = "PATH")]
    pub hub_bin: Option<PathBuf>,
    /// The `sentinel-agent` executable.
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// The `sentinel-worker` executable.
    #[arg(long, value_name = "PATH")]
    pub worker_bin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload a new version (registers the model name if needed).
    Push(Box<PushArgs>),
    /// Import versions from another model registry; each goes through the
    /// same push as `model push` (inspection, signing, audit).
    #[command(subcommand)]
    Import(ImportCommand),
    /// List models.
    List(ListArgs),
    /// Show a model and its versions.
    Show { name: String },
    /// Deploy a version to the devices a target selects, with a rollout policy.
    Deploy(Box<DeployArgs>),
    /// Roll a target back to an earlier version.
    Rollback {
        name: String,
        /// Version to return to (default: the one deployed before).
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        target: Option<String>,
    },
    /// Change a model's description, or whether it requires a publisher signature.
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Refuse (true) or accept (false) new versions pushed without a
        /// publisher signature (`push --signature`).
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        require_publisher: Option<bool>,
    },
    /// Delete a model and all its versions (admin).
    Delete {
        name: String,
        /// Delete even while deployed.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Default, Args)]
pub struct PushArgs {
    /// The ONNX file.
    pub path: PathBuf,
    #[arg(long)]
    pub name: String,
    /// Semantic version, e.g. 1.0.0. Required: there is no default.
    #[arg(long)]
    pub version: Option<String>,
    /// development, staging, production or archived.
    #[arg(long, default_value = "development")]
    pub stage: String,
    /// Declared accuracy as a fraction, e.g. 0.97.
    #[arg(long)]
    pub accuracy: Option<f64>,
    /// Metric of the declared accuracy, e.g. top1.
    #[arg(long, requires = "accuracy")]
    pub metric: Option<String>,
    /// Dataset the accuracy was measured on.
    #[arg(long, requires = "accuracy")]
    pub dataset: Option<String>,
    /// Comma-separated hardware tags: x86_64, aarch64, jetson-orin, cuda...
    #[arg(long)]
    pub hardware: Option<String>,
    /// Comma-separated tags.
    #[arg(long)]
    pub tags: Option<String>,
    /// The shape devices serve input NAME with, e.g. `images=1,3,640,640`:
    /// fixes its symbolic dims (repeat for several inputs). Signed into the
    /// manifest; a device's `serving.input_shapes` still overrides it.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// The engine devices will run it with: tract (default) or ort. The hub's
    /// push-time check uses it, or says it skipped the check when it lacks it.
    #[arg(long, value_parser = ["tract", "ort"])]
    pub engine: Option<String>,
    /// Directory with `inputs.bin` (raw little-endian samples of the first
    /// input) and `labels.bin` (int64 labels), scored on the device before traffic.
    #[arg(long)]
    pub validation_set: Option<PathBuf>,
    /// The publisher's OpenSSF model-signing bundle over the file
    /// (`model_signing sign key MODEL.onnx --private_key key.pem --signature
    /// model.sig`). The hub verifies it against the keys `sentinel publisher
    /// add` registered and records the publisher in the signed manifest.
    #[arg(long, value_name = "BUNDLE")]
    pub signature: Option<PathBuf>,
    /// Description, used when the model name is registered by this push.
    #[arg(long, default_value = "")]
    pub description: String,
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Registered model versions from an MLflow tracking server, read over its
    /// REST API with the artifacts through its proxy (`mlflow server
    /// --serve-artifacts`). Without a selector, the latest version. A re-run
    /// imports only what is new.
    #[command(group(ArgGroup::new("which").args(["version", "alias", "stage", "all"])))]
    Mlflow(Box<MlflowImportArgs>),
}

#[derive(Debug, Args)]
pub struct MlflowImportArgs {
    /// The tracking server, e.g. http://mlflow.internal:5000.
    #[arg(long, value_name = "URL", env = "MLFLOW_TRACKING_URI")]
    pub tracking_uri: String,
    /// The registered model's name in MLflow.
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// The Sentinel model name (default: the MLflow name).
    #[arg(long)]
    pub name: Option<String>,
    /// One MLflow version, e.g. 3.
    #[arg(long)]
    pub version: Option<String>,
    /// The version an MLflow alias points at, e.g. champion.
    #[arg(long)]
    pub alias: Option<String>,
    /// The latest version in a legacy MLflow stage: Staging, Production...
    #[arg(long)]
    pub stage: Option<String>,
    /// Every version.
    #[arg(long)]
    pub all: bool,
    /// A run metric to declare as the accuracy (a fraction 0..1), e.g. accuracy.
    #[arg(long, value_name = "MLFLOW_METRIC")]
    pub metric: Option<String>,
}

/// `sentinel model deploy NAME VERSION`: the policy comes from `--policy
/// FILE`, and each flag overrides the file's field of the same name.
#[derive(Debug, Args)]
pub struct DeployArgs {
    pub name: String,
    /// Version to deploy, e.g. 1.2.0.
    #[arg(required_unless_present = "version_flag", conflicts_with = "version_flag")]
    pub version: Option<String>,
    /// The version, as a flag (same as the positional VERSION).
    #[arg(long = "version", id = "version_flag", value_name = "VERSION")]
    pub version_flag: Option<String>,
    /// Selector: `ring=production,site=a`, or a bare ring name; `hardware=TAG` requires hardware;
    /// `*` for every device. Required: there is no default target. (`stage=` is the old
    /// spelling of `ring=`: read as it, with a warning, until the next release.)
    #[arg(long)]
    pub target: Option<String>,
    /// Rollout policy file, JSON or TOML (by extension; otherwise JSON is
    /// tried first), with the API's policy fields and optionally
    /// `halt_fraction` and `halt_count`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Comma-separated phases: `shadow`, `canary:N` (1-99), `full` (last).
    #[arg(long, value_name = "PHASES")]
    pub phases: Option<String>,
    /// Seconds each phase runs before the next (default 30 with --phases).
    #[arg(long, value_name = "SECS")]
    pub bake_secs: Option<u64>,
    /// Requests a phase needs before its metrics count (default 100 with
    /// --phases, 200 without).
    #[arg(long)]
    pub min_samples: Option<u64>,
    /// p95 latency of the new version at most this times the old one's
    /// (default 1.5; needs a shadow or canary phase).
    #[arg(long, value_name = "RATIO")]
    pub max_latency_ratio: Option<f64>,
    /// Absolute minimum accuracy, 0..1 (default: the declared accuracy minus
    /// the device's validation tolerance, 0.02).
    #[arg(long, value_name = "FRACTION")]
    pub min_accuracy: Option<f64>,
    /// Largest accuracy drop from the old version, 0..1 (needs a shadow or
    /// canary phase).
    #[arg(long, value_name = "FRACTION")]
    pub max_accuracy_drop: Option<f64>,
    /// Absolute p95 latency bound in milliseconds (default: none).
    #[arg(long, value_name = "MS")]
    pub latency_slo_ms: Option<f64>,
    /// Largest error rate, 0..1 (default 0.05).
    #[arg(long, value_name = "FRACTION")]
    pub max_error_rate: Option<f64>,
    /// Smallest agreement with the old version in shadow, 0..1 (default: none;
    /// needs a shadow phase).
    #[arg(long, value_name = "FRACTION")]
    pub min_shadow_agreement: Option<f64>,
    /// Feedback (or shadow agreement) samples needed before accuracy counts (default 50).
    #[arg(long, value_name = "N")]
    pub min_accuracy_samples: Option<u64>,
    /// Seconds the old version stays warm after full promotion (default 60).
    #[arg(long, value_name = "SECS")]
    pub standby_bake_secs: Option<u64>,
    /// Worker restarts of the new version that roll it back (default 3).
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Halt the deployment when more than this fraction of targeted devices
    /// rolled back or failed (hub default 0.2).
    #[arg(long, value_name = "FRACTION")]
    pub halt_fraction: Option<f64>,
    /// Also halt when at least this many targeted devices rolled back or failed.
    #[arg(long, value_name = "N")]
    pub halt_count: Option<u32>,
    /// Staged rollout: cumulative percentages of the targeted devices, e.g.
    /// `10,50,100`; each wave starts once every device of the one before
    /// serves the version.
    #[arg(long, value_name = "PERCENTS", value_delimiter = ',')]
    pub waves: Vec<u8>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long)]
    pub hardware: Option<String>,
    #[arg(long)]
    pub limit: Option<u32>,
    #[arg(long)]
    pub offset: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum DeploymentsCommand {
    /// List deployments, newest first.
    List {
        #[arg(long)]
        model: Option<String>,
        /// active, superseded, rolled_back, halted or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one deployment: policy, per-state counts, one row per targeted
    /// device, and why it was halted.
    Show { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Enrol a device (admin); prints its token once, or writes it with a
    /// ready agent config (`--agent-config`).
    Enroll(EnrollArgs),
    /// List devices: connection, last seen, what they run.
    List,
    /// Show one device: last report, recent events, desired models.
    Show { id: String },
    /// Remove a device (admin): its token stops working.
    Remove { id: String },
}

/// `sentinel device enroll NAME`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Device id.
    pub name: String,
    /// Comma-separated labels, e.g. site=a,ring=production (`ring`: the deployment
    /// ring a bare `--target WORD` names).
    #[arg(long, default_value = "")]
    pub labels: String,
    /// Write a ready agent config to FILE (TOML: the hub's URL and pinned
    /// keys, the device id, the labels) and the token beside it, in
    /// `<stem>.token` (mode 0600), instead of printing the token. FILE's
    /// directory must exist; FILE and the token file must not, unless --force.
    #[arg(long, value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
    /// The agent's `state_dir` in the config (a relative one resolves against
    /// FILE's directory, as the agent reads it).
    #[arg(long, value_name = "DIR", requires = "agent_config", default_value = "/var/lib/sentinel-agent")]
    pub state_dir: PathBuf,
    /// The agent's `grpc_url`, for a hub devices should stream from on a
    /// separate `--grpc-listen` port. Default: none, the agent streams from
    /// `hub_url` (the hub's REST port serves gRPC too).
    #[arg(long, value_name = "URL", requires = "agent_config")]
    pub grpc_url: Option<String>,
    /// Replace FILE and its token file if they exist.
    #[arg(long, requires = "agent_config")]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once.
    Create {
        /// viewer, publisher, deployer or admin.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (secrets are never shown).
    List,
    /// Revoke a token by id.
    Revoke { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum PublisherCommand {
    /// Register a publisher's public key (admin): pushes whose
    /// `--signature` verifies with it are accepted as NAME's.
    Add {
        name: String,
        /// The EC P-256 or P-384 public key, PEM (`openssl ec -in key.pem -pubout -out pub.pem`).
        #[arg(long, value_name = "PEM_FILE")]
        key: PathBuf,
    },
    /// List publisher keys.
    List,
    /// Remove a publisher key (admin).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Print the hub's public signing keys, for pinning on devices.
    Key {
        /// Print only the public keys, one per line (active first): the
        /// values the agent's `pinned_keys` takes.
        #[arg(long)]
        pin: bool,
    },
    /// Generate a new signing key and make it active (admin).
    RotateKey,
}
