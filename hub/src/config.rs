//! Hub settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Name of the file the first admin token is written to, in the data dir
/// (here, not in the server, so the CLI's demo can find it without
/// importing the server).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Default cap on one uploaded model file: 2 GiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// `sentinel-hub`'s default metrics address: loopback, on the port commonly
/// used by Prometheus exporters of OpenTelemetry.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Settings that cannot be served as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A listen address flag holds neither an address nor `off`. The parse
    /// error is part of the message, not a source: clap prints a value
    /// parser's error without its chain.
    #[error("{value:?} is not an address like {example}, nor `off` ({reason})")]
    ParseListen { value: String, example: &'static str, reason: std::net::AddrParseError },
    /// Plain text on a non-loopback address, not explicitly allowed.
    #[error(
        "refusing to serve plain text on {addrs:?}: give --tls-cert and --tls-key, \
         or pass --insecure-plaintext to accept the risk"
    )]
    PlainTextOffLoopback { addrs: Vec<SocketAddr> },
}

/// An address, or `None` for `off` or nothing.
fn parse_listen(s: &str, example: &'static str) -> Result<Option<SocketAddr>, ConfigError> {
    match s.trim() {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|reason| ConfigError::ParseListen {
            value: addr.to_owned(),
            example,
            reason,
        }),
    }
}

/// Parses a `--metrics-listen` value: an address, or `off` or nothing to
/// serve no metrics.
pub fn parse_metrics_listen(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    parse_listen(s, "127.0.0.1:9464")
}

/// Parses a `--grpc-listen` value: an address for a separate gRPC
/// listener, or `off` or nothing for none (the REST listener serves gRPC).
pub fn parse_grpc_listen(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    parse_listen(s, "0.0.0.0:8081")
}

/// Default `RLIMIT_AS` of an upload's inspection, in MiB.
pub const DEFAULT_INSPECT_MEMORY_MIB: u64 = 1024;
/// Default wall-time limit of an upload's inspection, in seconds.
pub const DEFAULT_INSPECT_TIMEOUT_SECS: u64 = 60;

/// How uploads are inspected (see [`crate::inspect`]).
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// The `sentinel-worker` executable that checks uploads. `None`:
    /// `sentinel-worker` beside the running executable, else on `PATH`; the
    /// hub refuses to start when neither exists.
    pub worker: Option<PathBuf>,
    /// `RLIMIT_AS` of a check.
    pub memory_limit_bytes: u64,
    /// Wall time a check may take before it is killed.
    pub timeout: Duration,
    /// Graphs with more nodes are refused before they are loaded.
    pub max_nodes: u64,
    /// Checks running at once; further uploads wait for a slot.
    pub concurrency: usize,
    /// The ONNX Runtime library for checks of versions pushed with
    /// `engine=ort` (`--ort-library`, else `ORT_DYLIB_PATH`). Without it
    /// such a check is skipped and says so.
    pub ort_library: Option<PathBuf>,
}

impl Default for InspectConfig {
    fn default() -> Self {
        Self {
            worker: None,
            memory_limit_bytes: DEFAULT_INSPECT_MEMORY_MIB * 1024 * 1024,
            timeout: Duration::from_secs(DEFAULT_INSPECT_TIMEOUT_SECS),
            max_nodes: crate::onnx::DEFAULT_MAX_NODES,
            concurrency: default_inspect_concurrency(),
            ort_library: None,
        }
    }
}

/// One check per CPU: a check is single threaded and CPU bound.
pub fn default_inspect_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Everything a hub needs to start. Built from flags by `sentinel-hub`, or
/// from values by tests.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Holds `hub.db`, `blobs/`, `keys/` and `admin.token`.
    pub data_dir: PathBuf,
    /// REST listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// A separate gRPC listen address for agents. The REST listener serves
    /// gRPC too, always; `None`: no separate listener.
    pub grpc_listen: Option<SocketAddr>,
    /// Plain-HTTP listen address of the Prometheus `/metrics` endpoint;
    /// `None`: no metrics listener. Off for hubs built from values (tests,
    /// embedding); `sentinel-hub` turns it on at [`DEFAULT_METRICS_LISTEN`].
    pub metrics_listen: Option<SocketAddr>,
    /// Uploads larger than this are refused with 413 while streaming.
    pub max_upload_bytes: u64,
    /// Base URL devices use to download artifacts; default: `http(s)://<listen>`.
    pub public_url: Option<String>,
    /// How long a pushed desired state stays valid. A device refuses an
    /// expired state, so a network attacker cannot freeze it on an old one.
    pub state_ttl: Duration,
    /// How often the hub sends each stream a heartbeat (and re-signs states
    /// that are half-way to expiry). Agents report at the same interval.
    pub heartbeat: Duration,
    /// TLS certificate and key (PEM). Without them the hub serves plain text.
    pub tls: Option<TlsFiles>,
    /// Plain text off loopback: refused unless explicitly allowed.
    pub transport: Transport,
    /// Bounds on every connection of the REST, gRPC and metrics listeners
    /// together: a cap (kept below the open-file limit), header-read and
    /// idle timeouts. The HTTP/2 keep-alive follows `heartbeat`.
    pub connections: sentinel_net::Limits,
    /// Push-time inspection: the worker binary and its limits.
    pub inspect: InspectConfig,
}

/// Default cap on connections over all the hub's listeners: room for a
/// fleet of 10,000 device streams plus operators; lowered at start to fit
/// the process's open-file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// PEM files for the hub's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether the hub may serve plain text on a non-loopback address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TLS everywhere except loopback (the default).
    #[default]
    Safe,
    /// Plain text on any address, with a warning in the log.
    InsecurePlaintext,
}

impl HubConfig {
    /// Defaults for a hub on loopback with its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_listen: None,
            metrics_listen: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            public_url: None,
            state_ttl: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(15),
            tls: None,
            transport: Transport::Safe,
            connections: sentinel_net::Limits {
                max_connections: sentinel_net::Limits::connections_within_fd_limit(DEFAULT_MAX_CONNECTIONS),
                ..sentinel_net::Limits::default()
            },
            inspect: InspectConfig::default(),
        }
    }

    /// Refuses plain text on a non-loopback address unless allowed.
    pub fn check_transport(&self) -> Result<(), ConfigError> {
        if self.tls.is_some() {
            return Ok(());
        }
        let off_loopback: Vec<SocketAddr> =
            [Some(self.listen), self.grpc_listen].into_iter().flatten().filter(|a| !a.ip().is_loopback()).collect();
        match (off_loopback.is_empty(), self.transport) {
            (true, _) => Ok(()),
            (false, Transport::InsecurePlaintext) => {
                tracing::warn!(
                    ?off_loopback,
                    "serving PLAIN TEXT off loopback: tokens and models cross the network unencrypted"
                );
                Ok(())
            }
            (false, Transport::Safe) => Err(ConfigError::PlainTextOffLoopback { addrs: off_loopback }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_off_loopback_is_refused_unless_asked_for() {
        let mut c = HubConfig::new("/tmp/x");
        assert!(c.check_transport().is_ok(), "loopback is fine");
        c.grpc_listen = Some(SocketAddr::from(([0, 0, 0, 0], 8081)));
        let err = c.check_transport().expect_err("refused");
        assert_eq!(
            err.to_string(),
            "refusing to serve plain text on [0.0.0.0:8081]: give --tls-cert and --tls-key, or pass \
             --insecure-plaintext to accept the risk"
        );
        c.transport = Transport::InsecurePlaintext;
        assert!(c.check_transport().is_ok());
        c.transport = Transport::Safe;
        c.tls = Some(TlsFiles { cert: "c".into(), key: "k".into() });
        assert!(c.check_transport().is_ok(), "TLS anywhere is fine");
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        assert_eq!(parse_metrics_listen(DEFAULT_METRICS_LISTEN), Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9464)))));
        assert_eq!(parse_metrics_listen("off"), Ok(None));
        assert_eq!(parse_metrics_listen(""), Ok(None));
        let err = parse_metrics_listen(" localhost ").expect_err("not an address");
        assert_eq!(
            err.to_string(),
            r#""localhost" is not an address like 127.0.0.1:9464, nor `off` (invalid socket address syntax)"#
        );
        let err = parse_grpc_listen("8081").expect_err("not an address");
        assert!(err.to_string().starts_with(r#""8081" is not an address like 0.0.0.0:8081"#), "{err}");
    }
}
