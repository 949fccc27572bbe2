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
    /// A `--database` or `--blobs` value that names no back end this hub has.
    #[error("{flag} {value:?}: {reason}")]
    Url { flag: &'static str, value: String, reason: String },
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
    /// Every push must carry a publisher signature that verifies with a
    /// registered publisher key, whatever its model says.
    pub require_publisher: bool,
    /// Base URL devices use to download artifacts; default: `http(s)://<listen>`.
    pub public_url: Option<String>,
    /// How long a pushed desired state stays valid. A device refuses an
    /// expired state, so a network attacker cannot freeze it on an old one.
    pub state_ttl: Duration,
    /// How often the hub sends each stream a heartbeat (and re-signs states
    /// that are half-way to expiry). Agents report at the same interval.
    pub heartbeat: Duration,
    /// Device telemetry: bucket widths and how long each series is kept.
    pub telemetry: crate::telemetry::Retention,
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
    /// Where the metadata lives; `None`: SQLite at `DATA_DIR/hub.db`.
    pub database: Option<DatabaseUrl>,
    /// Where model bytes live; `None`: `DATA_DIR/blobs`.
    pub blobs: Option<BlobsUrl>,
    /// CA certificates (PEM) TLS to PostgreSQL trusts besides the system's
    /// roots: a managed database's own CA.
    pub database_ca_file: Option<PathBuf>,
    /// S3 settings beyond the `--blobs` URL; unset fields come from the
    /// standard AWS environment.
    pub s3: S3Settings,
    /// Artifact downloads answer with a redirect to a presigned URL on the
    /// bucket (S3 blobs only), so model bytes bypass the hub.
    pub artifact_redirect: bool,
    /// The 32-byte key that seals the signing keys kept in a shared database
    /// (PostgreSQL). Every replica is given the same file.
    pub key_encryption_key_file: Option<PathBuf>,
}

/// How to reach an S3-compatible server; `None` fields come from the AWS
/// environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// The `--database` URL: `sqlite://PATH` or `postgres://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    /// The whole URL, handed to the client as given.
    Postgres(String),
}

/// The `--blobs` URL: `file://DIR` or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobsUrl {
    File(PathBuf),
    /// A bucket and a key prefix (empty, or ending in `/`).
    S3 {
        bucket: String,
        prefix: String,
    },
}

/// Parses a `--database` value.
pub fn parse_database(s: &str) -> Result<DatabaseUrl, ConfigError> {
    let bad = |reason: &str| ConfigError::Url { flag: "--database", value: s.to_owned(), reason: reason.to_owned() };
    if let Some(path) = s.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(bad("sqlite:// needs a file path, e.g. sqlite:///var/lib/sentinel-hub/hub.db"));
        }
        return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return Ok(DatabaseUrl::Postgres(s.to_owned()));
    }
    Err(bad("expected sqlite://PATH or postgres://USER@HOST[:PORT]/DB"))
}

/// Parses a `--blobs` value.
pub fn parse_blobs(s: &str) -> Result<BlobsUrl, ConfigError> {
    let bad = |reason: &str| ConfigError::Url { flag: "--blobs", value: s.to_owned(), reason: reason.to_owned() };
    if let Some(dir) = s.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(bad("file:// needs a directory, e.g. file:///var/lib/sentinel-hub/blobs"));
        }
        return Ok(BlobsUrl::File(PathBuf::from(dir)));
    }
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket naming rules, which every compatible server accepts.
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid_bucket {
            return Err(bad("the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(bad("the prefix may not contain '.', '..' or empty segments"));
        }
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        return Ok(BlobsUrl::S3 { bucket: bucket.to_owned(), prefix });
    }
    Err(bad("expected file://DIR or s3://BUCKET[/PREFIX]"))
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
            require_publisher: false,
            public_url: None,
            state_ttl: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(15),
            telemetry: crate::telemetry::Retention::default(),
            tls: None,
            transport: Transport::Safe,
            connections: sentinel_net::Limits {
                max_connections: sentinel_net::Limits::connections_within_fd_limit(DEFAULT_MAX_CONNECTIONS),
                ..sentinel_net::Limits::default()
            },
            inspect: InspectConfig::default(),
            database: None,
            blobs: None,
            database_ca_file: None,
            s3: S3Settings::default(),
            artifact_redirect: false,
            key_encryption_key_file: None,
        }
    }

    /// The database, defaults applied.
    pub fn database(&self) -> DatabaseUrl {
        self.database.clone().unwrap_or_else(|| DatabaseUrl::Sqlite(self.data_dir.join("hub.db")))
    }

    /// The blob store, defaults applied.
    pub fn blobs(&self) -> BlobsUrl {
        self.blobs.clone().unwrap_or_else(|| BlobsUrl::File(self.data_dir.join("blobs")))
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
    fn back_ends_are_chosen_by_url_and_bad_ones_are_named() {
        assert_eq!(parse_database("sqlite:///var/db/hub.db"), Ok(DatabaseUrl::Sqlite("/var/db/hub.db".into())));
        assert_eq!(
            parse_database("postgres://hub@db/sentinel"),
            Ok(DatabaseUrl::Postgres("postgres://hub@db/sentinel".into()))
        );
        assert!(matches!(parse_database("postgresql://db/s"), Ok(DatabaseUrl::Postgres(_))));
        let err = parse_database("mysql://db").expect_err("unknown scheme");
        assert_eq!(
            err.to_string(),
            r#"--database "mysql://db": expected sqlite://PATH or postgres://USER@HOST[:PORT]/DB"#
        );
        assert!(parse_database("sqlite://").is_err());
        assert_eq!(parse_blobs("file:///srv/blobs"), Ok(BlobsUrl::File("/srv/blobs".into())));
        assert_eq!(
            parse_blobs("s3://models/hub/a/"),
            Ok(BlobsUrl::S3 { bucket: "models".into(), prefix: "hub/a/".into() })
        );
        assert_eq!(parse_blobs("s3://models"), Ok(BlobsUrl::S3 { bucket: "models".into(), prefix: String::new() }));
        for bad in ["s3://", "s3://Models", "s3://ab", "s3://models/../x", "s3://models/a//b", "gs://models", "file://"]
        {
            assert!(parse_blobs(bad).is_err(), "{bad}");
        }
        let c = HubConfig::new("/d");
        assert_eq!(c.database(), DatabaseUrl::Sqlite("/d/hub.db".into()));
        assert_eq!(c.blobs(), BlobsUrl::File("/d/blobs".into()));
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
