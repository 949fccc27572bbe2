//! Agent configuration: a TOML file, then `SENTINEL_AGENT_*` environment
//! overrides, validated before anything starts.
//!
//! Every error names the field that is wrong; `sentinel-agent` exits 64 on
//! any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sentinel_proto::TrustedKeys;
use sentinel_proto::publisher::PublisherKey;

use crate::rollout::policy::{self, Policy};
use serde::Deserialize;

mod serving;

use sentinel_worker_protocol::launch::ORT_DYLIB_ENV;
use serving::RawServing;
pub use serving::{
    EngineChoice, LoadTimeouts, MAX_BODY_LIMIT, MAX_MEMORY_LIMIT_MIB, MAX_POOL_SIZE, ModelServingSettings,
    ServingSettings, load_timeout_for, pool_size,
};

/// Where the agent looks for its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/sentinel/agent.toml";

/// Where the agent serves Prometheus metrics by default (the hub uses 9464).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";

/// The control socket's file name inside the runtime dir.
pub const CONTROL_SOCKET: &str = "control.sock";

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config field `{field}`: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_owned(), reason: reason.into() }
}

/// Whether the agent may talk to its hub in plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TLS, except to a loopback hub (the default).
    #[default]
    Safe,
    /// Plain text to any hub, with a warning in the log.
    InsecurePlaintext,
}

/// One URL or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Urls {
    One(String),
    Many(Vec<String>),
}

impl Urls {
    /// From an environment variable: comma-separated.
    fn from_env(v: &str) -> Self {
        Urls::Many(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }

    fn into_vec(self) -> Vec<String> {
        match self {
            Urls::One(u) => vec![u],
            Urls::Many(v) => v,
        }
    }
}

/// Hub URLs a config may list: replicas are few, and each is a stream to try.
pub const MAX_HUB_URLS: usize = 16;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device_id: Option<String>,
    /// REST base URL of the hub, e.g. `https://hub.example:8080`, or a list
    /// of hub replicas' URLs, tried in order.
    hub_url: Option<Urls>,
    /// gRPC URL(s) of the hub; default: `hub_url` (the hub serves gRPC there).
    grpc_url: Option<Urls>,
    token_file: Option<PathBuf>,
    /// Base64 Ed25519 public keys of the hub (see `sentinel hub key`).
    #[serde(default)]
    pinned_keys: Vec<String>,
    /// Publisher keys (OpenSSF model-signing, EC P-256/P-384 PEM): when
    /// set, a model must carry a publisher signature that verifies with one
    /// of them here, on the device, whatever the hub signed.
    #[serde(default)]
    pinned_publishers: Vec<RawPublisher>,
    state_dir: Option<PathBuf>,
    /// Where the control socket lives (default: `$RUNTIME_DIRECTORY`, else `<state_dir>/run`).
    runtime_dir: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Default: the CPU architecture (`x86_64`, `aarch64`, ...).
    hardware: Option<Vec<String>>,
    /// PEM CA bundle to trust for the hub's certificate (default: system roots).
    ca_file: Option<PathBuf>,
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    serving: RawServing,
    /// Rollout defaults for deployments that do not set a policy, in the
    /// hub's policy format (`phases = ["canary:10", "full"]`, `bake_seconds`, ...).
    #[serde(default)]
    rollout: Option<RawRollout>,
}

/// One pinned publisher: a name and its public key, in a file or inline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublisher {
    name: String,
    key_file: Option<PathBuf>,
    key: Option<String>,
}

/// Publishers a config may pin.
pub const MAX_PINNED_PUBLISHERS: usize = 64;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default)]
    phases: Vec<String>,
    #[serde(default)]
    bake_seconds: u64,
    #[serde(default)]
    min_samples: u64,
    #[serde(default)]
    max_latency_ratio: f64,
    #[serde(default)]
    latency_slo_ms: f64,
    #[serde(default)]
    max_error_rate: f64,
    #[serde(default)]
    min_accuracy: f64,
    #[serde(default)]
    max_accuracy_drop: f64,
    #[serde(default)]
    min_shadow_agreement: f64,
    #[serde(default)]
    standby_bake_seconds: u64,
    #[serde(default)]
    min_accuracy_samples: u64,
    #[serde(default)]
    max_restarts: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    backoff_initial_ms: Option<u64>,
    backoff_cap_secs: Option<u64>,
    heartbeat_secs: Option<u64>,
    download_attempts: Option<u32>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: String,
    /// The hub replicas' REST URLs, in the order they are tried.
    pub hub_urls: Vec<String>,
    /// Their gRPC URLs, in the same order (`hub_urls` unless given).
    pub grpc_urls: Vec<String>,
    pub token: String,
    pub trusted: TrustedKeys,
    /// Publisher keys every model must be signed with (one of), checked on
    /// the device; empty: the hub's signature alone suffices.
    pub publishers: Vec<PublisherKey>,
    pub state_dir: PathBuf,
    /// Holds the control socket ([`AgentConfig::control_socket`]).
    pub runtime_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub hardware: Vec<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub transport: Transport,
    /// First reconnect delay; doubles per failure, jittered.
    pub backoff_initial: Duration,
    /// Reconnect delays never exceed this (default 60 s), so a fleet
    /// reconnecting after a hub restart spreads out instead of stampeding.
    pub backoff_cap: Duration,
    /// Report (heartbeat) interval, until the hub says otherwise.
    pub heartbeat: Duration,
    /// Download attempts without progress before giving up on a version.
    pub download_attempts: u32,
    pub serving: ServingSettings,
    /// The rollout policy of deployments that set none (and the base that
    /// a deployment's own fields override).
    pub rollout: Policy,
}

/// The hardware tag of the CPU this agent was built for.
pub fn native_hardware() -> Vec<String> {
    vec![std::env::consts::ARCH.to_owned()]
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(host.trim_matches(['[', ']']), "localhost" | "::1") || host.starts_with("127.")
}

impl AgentConfig {
    /// Points the agent at one hub: `rest` for downloads, `grpc` for the
    /// stream (replacing any list of replicas).
    pub fn set_hub(&mut self, rest: &str, grpc: &str) {
        self.hub_urls = vec![rest.trim_end_matches('/').to_owned()];
        self.grpc_urls = vec![grpc.trim_end_matches('/').to_owned()];
    }

    /// The first hub replica's REST URL.
    pub fn hub_url(&self) -> &str {
        self.hub_urls.first().map_or("", String::as_str)
    }

    /// The first hub replica's gRPC URL.
    pub fn grpc_url(&self) -> &str {
        self.grpc_urls.first().map_or("", String::as_str)
    }

    /// The control socket `sentinel-agent status` talks to.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join(CONTROL_SOCKET)
    }

    /// Reads `path`, applies `env` overrides (`SENTINEL_AGENT_<FIELD>`, and
    /// systemd's `RUNTIME_DIRECTORY`), and validates.
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| bad("(file)", format!("cannot read {}: {e}", path.display())))?;
        // Relative paths in the file resolve against its directory, made
        // absolute: workers run in private working directories, so a
        // relative model path would not open there.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base =
            std::path::absolute(dir).map_err(|e| bad("(file)", format!("cannot resolve {}: {e}", dir.display())))?;
        Self::parse(&text, env, &base)
    }

    /// Parses TOML text; relative paths resolve against `base`.
    pub fn parse(text: &str, env: &BTreeMap<String, String>, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, env, base, &|path| std::fs::read(path))
    }

    /// [`AgentConfig::parse`], reading the files the config names (the
    /// token, the CA bundle) through `read_file`: the config fuzz target
    /// (`fuzz/`) parses without touching the filesystem, where a fuzzed
    /// path could name a FIFO or `/dev/zero`.
    pub fn parse_with(
        text: &str,
        env: &BTreeMap<String, String>,
        base: &Path,
        read_file: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| {
            let field =
                e.span().map(|s| text[..s.start].lines().count()).map(|l| format!("line {l}")).unwrap_or_default();
            bad(if field.is_empty() { "(file)" } else { &field }, e.message().to_owned())
        })?;
        let get = |k: &str| env.get(&format!("SENTINEL_AGENT_{k}")).cloned();
        if let Some(v) = get("DEVICE_ID") {
            raw.device_id = Some(v);
        }
        if let Some(v) = get("HUB_URL") {
            raw.hub_url = Some(Urls::from_env(&v));
        }
        if let Some(v) = get("GRPC_URL") {
            raw.grpc_url = Some(Urls::from_env(&v));
        }
        if let Some(v) = get("TOKEN_FILE") {
            raw.token_file = Some(v.into());
        }
        if let Some(v) = get("STATE_DIR") {
            raw.state_dir = Some(v.into());
        }
        if let Some(v) = get("WORKER_BIN") {
            raw.serving.worker_bin = Some(v.into());
        }
        if let Some(v) = get("LISTEN") {
            raw.serving.listen = Some(v);
        }
        if let Some(v) = get("METRICS_LISTEN") {
            raw.serving.metrics_listen = Some(v);
        }
        if let Some(v) = get("ENGINE") {
            raw.serving.engine = Some(v);
        }
        if let Some(v) = get("WORKERS") {
            raw.serving.workers = Some(v.parse().map_err(|e| bad("SENTINEL_AGENT_WORKERS", format!("{v:?}: {e}")))?);
        }
        if let Some(v) = get("MAX_QUEUE_DELAY_US") {
            raw.serving.max_queue_delay_us =
                Some(v.parse().map_err(|e| bad("SENTINEL_AGENT_MAX_QUEUE_DELAY_US", format!("{v:?}: {e}")))?);
        }
        if let Some(v) = get("RUNTIME_DIR") {
            raw.runtime_dir = Some(v.into());
        }
        if let Some(v) = get("PINNED_KEYS") {
            raw.pinned_keys = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let device_id = raw.device_id.ok_or_else(|| bad("device_id", "missing"))?;
        sentinel_proto::manifest::validate_model_name(&device_id).map_err(|r| bad("device_id", r.to_string()))?;
        let tidy =
            |v: Vec<String>| v.into_iter().map(|u| u.trim().trim_end_matches('/').to_owned()).collect::<Vec<_>>();
        let hub_urls = tidy(raw.hub_url.ok_or_else(|| bad("hub_url", "missing"))?.into_vec());
        // The hub serves gRPC on its REST listener: one URL is enough.
        let grpc_urls = raw.grpc_url.map_or_else(|| hub_urls.clone(), |u| tidy(u.into_vec()));
        for (field, urls) in [("hub_url", &hub_urls), ("grpc_url", &grpc_urls)] {
            if urls.is_empty() || urls.len() > MAX_HUB_URLS {
                return Err(bad(field, format!("lists {} URLs; give 1 to {MAX_HUB_URLS}", urls.len())));
            }
        }
        if grpc_urls.len() != hub_urls.len() {
            return Err(bad(
                "grpc_url",
                format!(
                    "lists {} URLs for {} hub_url entries; give one per replica, in the same order",
                    grpc_urls.len(),
                    hub_urls.len()
                ),
            ));
        }
        for (field, url) in hub_urls.iter().map(|u| ("hub_url", u)).chain(grpc_urls.iter().map(|u| ("grpc_url", u))) {
            let plain = url.starts_with("http://");
            if !plain && !url.starts_with("https://") {
                return Err(bad(field, format!("{url:?} must start with https:// (or http:// on loopback)")));
            }
            if plain && !is_loopback_url(url) {
                match raw.transport {
                    Transport::Safe => {
                        return Err(bad(
                            field,
                            format!(
                                "{url:?} is plain text off loopback; use https, or set transport = \"insecure-plaintext\""
                            ),
                        ));
                    }
                    Transport::InsecurePlaintext => {
                        tracing::warn!(%url, "talking to the hub in PLAIN TEXT: tokens and models cross the network unencrypted");
                    }
                }
            }
        }
        let token_file = resolve(raw.token_file.ok_or_else(|| bad("token_file", "missing"))?);
        let token = read_file(&token_file)
            .map_err(|e| bad("token_file", format!("cannot read {}: {e}", token_file.display())))?;
        let token = String::from_utf8(token)
            .map_err(|_| bad("token_file", format!("{} is not UTF-8 text", token_file.display())))?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(bad("token_file", format!("{} is empty", token_file.display())));
        }
        if raw.pinned_keys.is_empty() {
            return Err(bad("pinned_keys", "at least one hub public key is needed (`sentinel hub key` prints them)"));
        }
        let mut trusted = TrustedKeys::new();
        for (i, k) in raw.pinned_keys.iter().enumerate() {
            trusted.add_base64(k).map_err(|e| bad(&format!("pinned_keys[{i}]"), e.to_string()))?;
        }
        if raw.pinned_publishers.len() > MAX_PINNED_PUBLISHERS {
            return Err(bad("pinned_publishers", format!("at most {MAX_PINNED_PUBLISHERS} publishers")));
        }
        let mut publishers = Vec::with_capacity(raw.pinned_publishers.len());
        for (i, p) in raw.pinned_publishers.iter().enumerate() {
            let field = format!("pinned_publishers[{i}]");
            let pem = match (&p.key_file, &p.key) {
                (Some(f), None) => {
                    let f = resolve(f.clone());
                    read_file(&f).map_err(|e| bad(&field, format!("cannot read {}: {e}", f.display())))?
                }
                (None, Some(k)) => k.clone().into_bytes(),
                _ => return Err(bad(&field, "give exactly one of key_file (a PEM file) and key (inline PEM)")),
            };
            let key = PublisherKey::from_pem(&p.name, &pem).map_err(|e| bad(&field, e.to_string()))?;
            if p.name.is_empty() || publishers.iter().any(|k: &PublisherKey| k.name == p.name || k.key_id == key.key_id)
            {
                return Err(bad(&field, "needs a name, and the name and key may be pinned once"));
            }
            publishers.push(key);
        }
        let state_dir = resolve(raw.state_dir.ok_or_else(|| bad("state_dir", "missing"))?);
        // systemd's RuntimeDirectory= may list several, colon-separated: the first is ours.
        let systemd_runtime = env.get("RUNTIME_DIRECTORY").and_then(|v| v.split(':').next()).filter(|v| !v.is_empty());
        let runtime_dir = match (raw.runtime_dir, systemd_runtime) {
            (Some(p), _) => resolve(p),
            (None, Some(p)) => PathBuf::from(p),
            (None, None) => state_dir.join("run"),
        };
        for (k, v) in &raw.labels {
            if k.is_empty() || v.is_empty() || k.contains([',', '=']) || v.contains([',', '=']) {
                return Err(bad(&format!("labels.{k}"), "keys and values must be non-empty, without ',' or '='"));
            }
        }
        let hardware = raw.hardware.unwrap_or_else(native_hardware);
        if hardware.iter().any(|h| h.is_empty() || h.contains(',')) {
            return Err(bad("hardware", "tags must be non-empty, without commas"));
        }
        let ca_pem = match raw.ca_file {
            None => None,
            Some(p) => {
                let p = resolve(p);
                Some(read_file(&p).map_err(|e| bad("ca_file", format!("cannot read {}: {e}", p.display())))?)
            }
        };
        let sync = raw.sync;
        let backoff_initial = Duration::from_millis(sync.backoff_initial_ms.unwrap_or(500));
        let backoff_cap = Duration::from_secs(sync.backoff_cap_secs.unwrap_or(60));
        if backoff_cap.is_zero() || backoff_initial.is_zero() || backoff_initial > backoff_cap {
            return Err(bad("sync.backoff_cap_secs", "must be positive and at least sync.backoff_initial_ms"));
        }
        let heartbeat = Duration::from_secs(sync.heartbeat_secs.unwrap_or(15));
        if heartbeat.is_zero() {
            return Err(bad("sync.heartbeat_secs", "must be positive"));
        }
        let download_attempts = sync.download_attempts.unwrap_or(8);
        if download_attempts == 0 {
            return Err(bad("sync.download_attempts", "must be positive"));
        }
        let serving = raw.serving.validate(resolve, env.get(ORT_DYLIB_ENV).map(String::as_str))?;
        let defaults = policy::default_policy();
        let rollout = match raw.rollout {
            None => defaults,
            Some(r) => {
                let p = sentinel_proto::pb::RolloutPolicy {
                    phases: r.phases,
                    bake_seconds: r.bake_seconds,
                    min_samples: r.min_samples,
                    max_latency_ratio: r.max_latency_ratio,
                    latency_slo_ms: r.latency_slo_ms,
                    max_error_rate: r.max_error_rate,
                    min_accuracy: r.min_accuracy,
                    max_accuracy_drop: r.max_accuracy_drop,
                    min_shadow_agreement: r.min_shadow_agreement,
                    standby_bake_seconds: r.standby_bake_seconds,
                    min_accuracy_samples: r.min_accuracy_samples,
                    max_restarts: r.max_restarts,
                };
                policy::policy_from(Some(&p), &defaults).map_err(|e| bad("rollout", e.to_string()))?
            }
        };
        Ok(Self {
            rollout,
            serving,
            device_id,
            hub_urls,
            grpc_urls,
            token,
            trusted,
            publishers,
            state_dir,
            runtime_dir,
            labels: raw.labels,
            hardware,
            ca_pem,
            transport: raw.transport,
            backoff_initial,
            backoff_cap,
            heartbeat,
            download_attempts,
        })
    }
}

/// A minimal valid configuration, for unit tests here and in other modules.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    /// The pinned hub key of [`base`].
    pub const KEY: &str = "HMY/NU8+avTxTr2xxPvEEejvfDT2rPtpP+yM9qxqlck=";

    /// A config without `[serving]`, its token file written into `dir`.
    pub fn base(dir: &Path) -> String {
        std::fs::write(dir.join("token"), "snt_x\n").expect("token");
        format!(
            "device_id = \"edge-1\"\nhub_url = \"http://127.0.0.1:8080\"\ngrpc_url = \"http://127.0.0.1:8081\"\n\
             token_file = \"token\"\npinned_keys = [\"{KEY}\"]\nstate_dir = \"state\"\n[labels]\nsite = \"a\"\n"
        )
    }
}

#[cfg(test)]
mod tests;
