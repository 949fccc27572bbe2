//! Agent configuration: a TOML file, then `SENTINEL_AGENT_*` environment
//! overrides, validated before anything starts.
//!
//! Every error names the field that is wrong; `sentinel-agent` exits 64 on
//! any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sentinel_proto::TrustedKeys;

use crate::rollout::policy::{self, Policy};
use sentinel_worker_protocol::launch::Confinement;
use serde::Deserialize;

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

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device_id: Option<String>,
    /// REST base URL of the hub, e.g. `https://hub.example:8080`.
    hub_url: Option<String>,
    /// gRPC URL of the hub; default: `hub_url` (the hub serves gRPC there).
    grpc_url: Option<String>,
    token_file: Option<PathBuf>,
    /// Base64 Ed25519 public keys of the hub (see `sentinel hub key`).
    #[serde(default)]
    pinned_keys: Vec<String>,
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
struct RawServing {
    listen: Option<String>,
    metrics_listen: Option<String>,
    unix_socket: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    max_inflight_bytes: Option<usize>,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    worker_bin: Option<PathBuf>,
    confinement: Option<String>,
    memory_limit_mib: Option<u64>,
    request_timeout_ms: Option<u64>,
    load_timeout_secs: Option<u64>,
    validation_tolerance: Option<f64>,
    #[serde(default)]
    input_shapes: BTreeMap<String, Vec<String>>,
}

/// How the agent runs models and serves the local inference API.
#[derive(Debug, Clone)]
pub struct ServingSettings {
    /// TCP address of the KServe v2 API (default `127.0.0.1:8601`); `None` when disabled.
    pub listen: Option<String>,
    /// TCP address of the Prometheus `/metrics` listener (default
    /// [`DEFAULT_METRICS_LISTEN`]); `None` when disabled (`""`).
    pub metrics_listen: Option<String>,
    /// Unix socket for the v2 API, in addition to (or instead of) TCP.
    pub unix_socket: Option<PathBuf>,
    /// Largest inference request body (default 16 MiB).
    pub max_body_bytes: usize,
    /// Request bodies the inference API holds at once; past it, 503 with
    /// `Retry-After` (default 4 x `max_body_bytes`, at least `max_body_bytes`).
    pub max_inflight_bytes: usize,
    /// Connections open at once on the inference API and metrics listeners
    /// (default 1024, lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Time a new connection has to send its first request head (default 10 s).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed (default 120 s).
    pub idle_timeout: Duration,
    /// The `sentinel-worker` executable (default: next to `sentinel-agent`).
    pub worker_bin: PathBuf,
    pub confinement: Confinement,
    /// `RLIMIT_AS` of each worker (default 2048 MiB; 0 for none).
    pub memory_limit_bytes: Option<u64>,
    pub request_timeout: Duration,
    pub load_timeout: Duration,
    /// How far below the manifest's declared accuracy the on-device
    /// validation-set accuracy may be (default 0.02).
    pub validation_tolerance: f64,
    /// Fixed input shapes per model name, for models that declare symbolic
    /// non-batch dims (default: symbolic dims become 1).
    pub input_shapes: BTreeMap<String, Vec<Vec<usize>>>,
}

/// Largest `serving.memory_limit_mib` accepted (1 TiB): larger values would
/// wrap when turned into bytes.
pub const MAX_MEMORY_LIMIT_MIB: u64 = 1 << 20;

/// Largest `serving.max_body_bytes` accepted (1 GiB).
pub const MAX_BODY_LIMIT: usize = 1 << 30;

impl ServingSettings {
    /// The bounds of every connection to the inference API and metrics.
    pub fn connection_limits(&self) -> sentinel_net::Limits {
        sentinel_net::Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            ..sentinel_net::Limits::default()
        }
    }
}

fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("sentinel-worker")))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/sentinel-worker"))
}

impl RawServing {
    fn validate(self, resolve: impl Fn(PathBuf) -> PathBuf) -> Result<ServingSettings, ConfigError> {
        let address = |field: &str, value: Option<&str>, default: &str| match value {
            None => Ok(Some(default.to_owned())),
            Some("") => Ok(None),
            Some(a) => {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| bad(field, format!("{a:?} is not an address:port: {e}")))?;
                Ok(Some(a.to_owned()))
            }
        };
        let listen = address("serving.listen", self.listen.as_deref(), "127.0.0.1:8601")?;
        let metrics_listen = address("serving.metrics_listen", self.metrics_listen.as_deref(), DEFAULT_METRICS_LISTEN)?;
        let confinement = match self.confinement.as_deref().unwrap_or("enforce") {
            "enforce" => Confinement::Enforce,
            "off" => Confinement::Off,
            other => return Err(bad("serving.confinement", format!("{other:?}: expected \"enforce\" or \"off\""))),
        };
        let tolerance = self.validation_tolerance.unwrap_or(0.02);
        if !(0.0..=1.0).contains(&tolerance) {
            return Err(bad("serving.validation_tolerance", "must be between 0 and 1"));
        }
        let mut input_shapes = BTreeMap::new();
        for (model, shapes) in self.input_shapes {
            let field = format!("serving.input_shapes.{model}");
            let parsed = shapes
                .iter()
                .map(|s| {
                    s.split(',')
                        .map(|d| d.trim().parse::<usize>().ok().filter(|d| *d > 0))
                        .collect::<Option<Vec<usize>>>()
                        .ok_or_else(|| bad(&field, format!("{s:?}: expected positive dims like \"1,3,48,192\"")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            input_shapes.insert(model, parsed);
        }
        let positive = |field: &str, v: u64| if v == 0 { Err(bad(field, "must be positive")) } else { Ok(v) };
        let bounded = |field: &str, v: u64, most: u64| {
            if v == 0 || v > most { Err(bad(field, format!("must be between 1 and {most}"))) } else { Ok(v) }
        };
        let max_body_bytes = self.max_body_bytes.unwrap_or(16 << 20);
        if max_body_bytes == 0 || max_body_bytes > MAX_BODY_LIMIT {
            return Err(bad("serving.max_body_bytes", format!("must be between 1 and {MAX_BODY_LIMIT}")));
        }
        let max_inflight_bytes = self.max_inflight_bytes.unwrap_or(max_body_bytes.saturating_mul(4));
        if max_inflight_bytes < max_body_bytes {
            return Err(bad(
                "serving.max_inflight_bytes",
                format!(
                    "{max_inflight_bytes} is below serving.max_body_bytes ({max_body_bytes}): no large request could run"
                ),
            ));
        }
        Ok(ServingSettings {
            listen,
            metrics_listen,
            unix_socket: self.unix_socket.map(&resolve),
            max_body_bytes,
            max_inflight_bytes,
            max_connections: match self.max_connections.unwrap_or(1024) {
                0 => return Err(bad("serving.max_connections", "must be positive")),
                n => sentinel_net::Limits::connections_within_fd_limit(n),
            },
            header_read_timeout: Duration::from_secs(bounded(
                "serving.header_read_timeout_secs",
                self.header_read_timeout_secs.unwrap_or(10),
                3600,
            )?),
            idle_timeout: Duration::from_secs(bounded(
                "serving.idle_timeout_secs",
                self.idle_timeout_secs.unwrap_or(120),
                86_400,
            )?),
            worker_bin: self.worker_bin.map(&resolve).unwrap_or_else(default_worker_bin),
            confinement,
            memory_limit_bytes: match self.memory_limit_mib.unwrap_or(2048) {
                0 => None,
                mib if mib > MAX_MEMORY_LIMIT_MIB => {
                    return Err(bad(
                        "serving.memory_limit_mib",
                        format!("{mib} is over {MAX_MEMORY_LIMIT_MIB} (1 TiB); 0 means no limit"),
                    ));
                }
                mib => Some(mib << 20),
            },
            request_timeout: Duration::from_millis(positive(
                "serving.request_timeout_ms",
                self.request_timeout_ms.unwrap_or(5000),
            )?),
            load_timeout: Duration::from_secs(positive(
                "serving.load_timeout_secs",
                self.load_timeout_secs.unwrap_or(60),
            )?),
            validation_tolerance: tolerance,
            input_shapes,
        })
    }
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
    pub hub_url: String,
    pub grpc_url: String,
    pub token: String,
    pub trusted: TrustedKeys,
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
            raw.hub_url = Some(v);
        }
        if let Some(v) = get("GRPC_URL") {
            raw.grpc_url = Some(v);
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
        if let Some(v) = get("RUNTIME_DIR") {
            raw.runtime_dir = Some(v.into());
        }
        if let Some(v) = get("PINNED_KEYS") {
            raw.pinned_keys = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let device_id = raw.device_id.ok_or_else(|| bad("device_id", "missing"))?;
        sentinel_proto::manifest::validate_model_name(&device_id).map_err(|r| bad("device_id", r))?;
        let hub_url = raw.hub_url.ok_or_else(|| bad("hub_url", "missing"))?.trim_end_matches('/').to_owned();
        // The hub serves gRPC on its REST listener: one URL is enough.
        let grpc_url = raw.grpc_url.map_or_else(|| hub_url.clone(), |u| u.trim_end_matches('/').to_owned());
        for (field, url) in [("hub_url", &hub_url), ("grpc_url", &grpc_url)] {
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
        let serving = raw.serving.validate(resolve)?;
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
            hub_url,
            grpc_url,
            token,
            trusted,
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HMY/NU8+avTxTr2xxPvEEejvfDT2rPtpP+yM9qxqlck=";

    fn base(dir: &Path) -> String {
        std::fs::write(dir.join("token"), "snt_x\n").expect("token");
        format!(
            "device_id = \"edge-1\"\nhub_url = \"http://127.0.0.1:8080\"\ngrpc_url = \"http://127.0.0.1:8081\"\n\
             token_file = \"token\"\npinned_keys = [\"{KEY}\"]\nstate_dir = \"state\"\n[labels]\nsite = \"a\"\n"
        )
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = AgentConfig::parse(&base(dir.path()), &BTreeMap::new(), dir.path()).expect("parses");
        assert_eq!(c.token, "snt_x");
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert_eq!(c.backoff_cap, Duration::from_secs(60));
        assert_eq!(c.hardware, native_hardware());
        assert_eq!(c.control_socket(), dir.path().join("state/run/control.sock"));
        assert_eq!(c.serving.metrics_listen.as_deref(), Some(DEFAULT_METRICS_LISTEN));
    }

    #[test]
    fn the_runtime_dir_comes_from_the_file_then_systemd_then_the_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env: BTreeMap<_, _> = [("RUNTIME_DIRECTORY".to_owned(), "/run/sentinel:/run/other".to_owned())].into();
        let c = AgentConfig::parse(&base(dir.path()), &env, dir.path()).expect("parses");
        assert_eq!(c.runtime_dir, Path::new("/run/sentinel"));
        let text = format!("runtime_dir = \"rt\"\n{}[serving]\nmetrics_listen = \"\"\n", base(dir.path()));
        let c = AgentConfig::parse(&text, &env, dir.path()).expect("parses");
        assert_eq!(c.runtime_dir, dir.path().join("rt"));
        assert_eq!(c.serving.metrics_listen, None);
    }

    #[test]
    fn relative_paths_become_absolute_from_a_relative_config_path() {
        // Workers run in private working directories: every path handed to
        // them must be absolute, even when the agent was started as
        // `sentinel-agent run --config agent.toml` with `state_dir = "state"`.
        let dir = tempfile::tempdir_in(".").expect("tempdir in the working directory");
        std::fs::write(dir.path().join("agent.toml"), base(dir.path())).expect("write");
        let relative = Path::new(dir.path().file_name().expect("name")).join("agent.toml");
        let c = AgentConfig::load(&relative, &BTreeMap::new()).expect("loads");
        assert!(c.state_dir.is_absolute(), "{}", c.state_dir.display());
        assert_eq!(c.state_dir, std::path::absolute(dir.path()).expect("absolute").join("state"));
    }

    #[test]
    fn serving_sizes_and_timeouts_are_bounded_and_named_when_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parse = |serving: &str| {
            AgentConfig::parse(&format!("{}[serving]\n{serving}\n", base(dir.path())), &BTreeMap::new(), dir.path())
        };
        let c = parse("").expect("defaults");
        assert_eq!((c.serving.max_body_bytes, c.serving.max_inflight_bytes), (16 << 20, 64 << 20));
        assert_eq!(c.serving.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.serving.idle_timeout, Duration::from_secs(120));
        assert!(c.serving.max_connections >= 1 && c.serving.max_connections <= 1024);
        for (text, field) in [
            ("max_body_bytes = 0", "serving.max_body_bytes"),
            ("max_body_bytes = 2147483648", "serving.max_body_bytes"),
            ("max_body_bytes = 1048576\nmax_inflight_bytes = 1048575", "serving.max_inflight_bytes"),
            ("max_connections = 0", "serving.max_connections"),
            ("header_read_timeout_secs = 0", "serving.header_read_timeout_secs"),
            ("idle_timeout_secs = 86401", "serving.idle_timeout_secs"),
            ("memory_limit_mib = 18446744073709551615", "serving.memory_limit_mib"),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }

    #[test]
    fn env_overrides_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env: BTreeMap<_, _> = [("SENTINEL_AGENT_DEVICE_ID".to_owned(), "edge-2".to_owned())].into();
        let c = AgentConfig::parse(&base(dir.path()), &env, dir.path()).expect("parses");
        assert_eq!(c.device_id, "edge-2");
    }

    #[test]
    fn grpc_url_defaults_to_hub_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = base(dir.path()).replace("grpc_url = \"http://127.0.0.1:8081\"\n", "");
        let c = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("parses");
        assert_eq!(c.grpc_url, "http://127.0.0.1:8080");
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = base(dir.path());
        let cases: Vec<(String, &str)> = vec![
            (good.replace("device_id = \"edge-1\"\n", ""), "device_id"),
            (good.replace(KEY, "not-base64!"), "pinned_keys[0]"),
            (good.replace("pinned_keys = [\"", "pinned_keys = [] #"), "pinned_keys"),
            (good.replace("http://127.0.0.1:8080", "http://hub.example:8080"), "hub_url"),
            (good.replace("http://127.0.0.1:8081", "ftp://x"), "grpc_url"),
            (good.replace("token_file = \"token\"", "token_file = \"missing\""), "token_file"),
            (format!("{good}colour = 1\n"), "line"),
            (format!("{good}[sync]\nbackoff_cap_secs = 0\n"), "sync.backoff_cap_secs"),
            (format!("{good}[serving]\nlisten = \"localhost\"\n"), "serving.listen"),
            (format!("{good}[serving]\nmetrics_listen = \"9465\"\n"), "serving.metrics_listen"),
            (format!("{good}[serving]\nconfinement = \"maybe\"\n"), "serving.confinement"),
            (format!("{good}[serving.input_shapes]\nm = [\"1,x\"]\n"), "serving.input_shapes.m"),
        ];
        for (text, field) in cases {
            let err = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect_err(field);
            assert!(err.field.starts_with(field), "wanted {field}, got {err}");
        }
    }

    #[test]
    fn plain_text_off_loopback_needs_the_explicit_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = base(dir.path()).replace("127.0.0.1", "10.0.0.9");
        assert!(AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).is_err());
        let text = format!("transport = \"insecure-plaintext\"\n{text}");
        AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("allowed when asked for");
    }
}
