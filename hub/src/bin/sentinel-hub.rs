//! `sentinel-hub`: the registry server. Parses flags and hands over to
//! [`sentinel_hub::Hub`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sentinel_hub::server::shutdown_signal;
use sentinel_hub::{Hub, HubConfig};

/// Sentinel hub: signed ONNX model registry and deployment server.
///
/// With no subcommand it serves; `init` and `migrate` prepare a shared
/// database for replicas.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Prepare a PostgreSQL database for hub replicas: apply the migrations,
    /// make the first signing key, and print the first admin token (once).
    Init {
        /// The database: postgres://USER[:PASSWORD]@HOST[:PORT]/DB.
        #[arg(long, env = "SENTINEL_DATABASE", value_parser = sentinel_hub::config::parse_database)]
        database: sentinel_hub::config::DatabaseUrl,
        /// CA certificates (PEM) TLS to the database trusts besides the system's roots.
        #[arg(long, env = "SENTINEL_DATABASE_CA_FILE")]
        database_ca_file: Option<PathBuf>,
        /// The key that seals the signing keys (32 random bytes; the same file on every replica).
        #[arg(long, env = "SENTINEL_KEY_ENCRYPTION_KEY_FILE")]
        key_encryption_key_file: PathBuf,
    },
    /// Move an embedded hub (SQLite, its blobs and keys) onto PostgreSQL and
    /// a shared blob store. Re-hashes every blob; safe to re-run after an
    /// interruption; refuses a target that holds a registry unless --force.
    Migrate {
        /// The embedded hub's database: sqlite://PATH (its data dir's hub.db;
        /// keys/ and blobs/ are read beside it). Stop that hub first.
        #[arg(long, value_parser = sentinel_hub::config::parse_database)]
        from: sentinel_hub::config::DatabaseUrl,
        /// The target: postgres://...
        #[arg(long, value_parser = sentinel_hub::config::parse_database)]
        to: sentinel_hub::config::DatabaseUrl,
        /// CA certificates (PEM) TLS to the database trusts besides the system's roots.
        #[arg(long, env = "SENTINEL_DATABASE_CA_FILE")]
        database_ca_file: Option<PathBuf>,

        /// Where the blobs go: s3://BUCKET[/PREFIX] (with the AWS environment)
        /// or file://DIR. Default: they stay in the source's blobs/, re-hashed.
        #[arg(long, value_parser = sentinel_hub::config::parse_blobs)]
        blobs_to: Option<sentinel_hub::config::BlobsUrl>,
        /// The key that will seal the signing keys in the target.
        #[arg(long, env = "SENTINEL_KEY_ENCRYPTION_KEY_FILE")]
        key_encryption_key_file: PathBuf,
        /// Merge into a target that already holds a registry (rows that exist are kept).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Directory for the database, model blobs, signing keys and admin token.
    #[arg(long, env = "SENTINEL_DATA_DIR", default_value = "/var/lib/sentinel-hub")]
    data_dir: PathBuf,
    /// Where the metadata lives: `sqlite://PATH` (default: DATA_DIR/hub.db)
    /// or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, shared by replicas.
    #[arg(long, env = "SENTINEL_DATABASE", value_parser = sentinel_hub::config::parse_database)]
    database: Option<sentinel_hub::config::DatabaseUrl>,
    /// Where model bytes live: `file://DIR` (default: DATA_DIR/blobs) or
    /// `s3://BUCKET[/PREFIX]`, with the AWS environment (AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "SENTINEL_BLOBS", value_parser = sentinel_hub::config::parse_blobs)]
    blobs: Option<sentinel_hub::config::BlobsUrl>,
    /// Artifact downloads answer 302 with a presigned URL (5 minutes) on the
    /// bucket, so model bytes bypass the hub (`--blobs s3://...` only).
    /// Devices verify size, digest and signature as always.
    #[arg(long, env = "SENTINEL_ARTIFACT_REDIRECT")]
    artifact_redirect: bool,
    /// CA certificates (PEM) that TLS to PostgreSQL trusts besides the
    /// system's roots (a managed database's own CA). `?sslmode=require` in
    /// the URL makes TLS mandatory; the server's name is always checked.
    #[arg(long, env = "SENTINEL_DATABASE_CA_FILE")]
    database_ca_file: Option<PathBuf>,
    /// The key that seals the signing keys in a PostgreSQL database: 32
    /// random bytes (raw, hex or base64), the same file on every replica.
    #[arg(long, env = "SENTINEL_KEY_ENCRYPTION_KEY_FILE")]
    key_encryption_key_file: Option<PathBuf>,
    /// REST API listen address (port 0 picks a free port).
    #[arg(long, env = "SENTINEL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A separate gRPC listen address for agents; `off` or "" (the default)
    /// opens none. The REST listener serves gRPC too, always, so agents can
    /// use the hub's one URL.
    #[arg(long, env = "SENTINEL_GRPC_LISTEN", default_value = "off",
        value_parser = sentinel_hub::config::parse_grpc_listen)]
    grpc_listen: ::std::option::Option<SocketAddr>,
    /// Plain-HTTP listen address of the Prometheus `/metrics` endpoint
    /// (port 0 picks a free port); `off` or "" serves no metrics.
    #[arg(long, env = "SENTINEL_METRICS_LISTEN", default_value = sentinel_hub::config::DEFAULT_METRICS_LISTEN,
        value_parser = sentinel_hub::config::parse_metrics_listen)]
    // Fully qualified so clap takes the whole `Option` from the parser
    // instead of making the flag optional.
    metrics_listen: ::std::option::Option<SocketAddr>,
    /// Largest model file accepted, in bytes.
    #[arg(long, default_value_t = sentinel_hub::config::DEFAULT_MAX_UPLOAD_BYTES)]
    max_upload_bytes: u64,
    /// Refuse every push without a publisher signature (an OpenSSF
    /// model-signing bundle, `sentinel model push --signature`) that verifies
    /// with a key registered by `sentinel publisher add`. Without this flag a
    /// model can still require one (`sentinel model update --require-publisher`).
    #[arg(long, env = "SENTINEL_REQUIRE_PUBLISHER")]
    require_publisher: bool,
    /// Base URL devices download artifacts from (default: this hub's listen address).
    #[arg(long, env = "SENTINEL_PUBLIC_URL")]
    public_url: Option<String>,
    /// TLS certificate chain (PEM) for REST and gRPC.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain text on non-loopback addresses (logs a warning).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Seconds a pushed desired state stays valid on devices.
    #[arg(long, default_value_t = 3600)]
    state_ttl_secs: u64,
    /// Seconds between stream heartbeats.
    #[arg(long, default_value_t = 15)]
    heartbeat_secs: u64,
    /// Width of a fine device-telemetry bucket, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    telemetry_fine_secs: u64,
    /// Hours fine telemetry buckets are kept.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=24 * 366))]
    telemetry_fine_hours: u64,
    /// Width of a coarse device-telemetry bucket, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
    telemetry_coarse_secs: u64,
    /// Days coarse telemetry buckets are kept.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3660))]
    telemetry_coarse_days: u64,
    /// Connections open at once over the REST, gRPC and metrics listeners
    /// (lowered to fit the open-file limit). At the cap, connections that
    /// have not sent a request yet, then idle ones, make room.
    #[arg(long, default_value_t = sentinel_hub::config::DEFAULT_MAX_CONNECTIONS as u64,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Seconds a new connection has to finish its TLS handshake and first request head.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_read_timeout_secs: u64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// The `sentinel-worker` binary that checks every upload in a confined
    /// child process. Default: `sentinel-worker` beside this executable, else
    /// on PATH; the hub does not start without one.
    #[arg(long, env = "SENTINEL_WORKER")]
    worker: Option<PathBuf>,
    /// The ONNX Runtime library that checks versions pushed with
    /// `engine=ort` (without it those checks are skipped, visibly).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_library: Option<PathBuf>,
    /// Address-space limit (RLIMIT_AS) of one upload check, in MiB.
    #[arg(long, default_value_t = sentinel_hub::config::DEFAULT_INSPECT_MEMORY_MIB)]
    inspect_memory_mib: u64,
    /// Wall time one upload check may take before it is killed, in seconds.
    #[arg(long, default_value_t = sentinel_hub::config::DEFAULT_INSPECT_TIMEOUT_SECS)]
    inspect_timeout_secs: u64,
    /// Uploads whose graph has more nodes (subgraphs included) are refused
    /// before any engine loads them.
    #[arg(long, default_value_t = sentinel_hub::onnx::DEFAULT_MAX_NODES)]
    inspect_max_nodes: u64,
    /// Upload checks running at once (default: the number of CPUs); at most
    /// this many times --inspect-memory-mib is in use for checks.
    #[arg(long)]
    inspect_concurrency: Option<usize>,
}

/// Exit codes: 0 clean shutdown, 64 bad configuration (including no
/// `sentinel-worker` to inspect uploads with), 70 failure while running,
/// 71 cannot open storage or bind.
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sentinel-hub: cannot start the async runtime: {e}");
            return ExitCode::from(71);
        }
    };
    match cli.command {
        None => runtime.block_on(run(cli.serve)),
        Some(Command::Init { database, database_ca_file, key_encryption_key_file }) => {
            runtime.block_on(async { init(database, database_ca_file.as_deref(), key_encryption_key_file) })
        }
        Some(Command::Migrate { from, to, database_ca_file, blobs_to, key_encryption_key_file, force }) => runtime
            .block_on(async {
                migrate(from, to, database_ca_file.as_deref(), blobs_to, &key_encryption_key_file, force)
            }),
    }
}

/// Opens a shared database with its key-encryption key; exit 64 or 71 on failure.
fn open_shared(
    database: sentinel_hub::config::DatabaseUrl,
    ca_file: Option<&std::path::Path>,
    kek_file: &std::path::Path,
) -> Result<sentinel_hub::service::replicas::Shared, ExitCode> {
    let sentinel_hub::config::DatabaseUrl::Postgres(url) = database else {
        eprintln!("sentinel-hub: a shared database is postgres://...; an embedded hub needs no preparing");
        return Err(ExitCode::from(64));
    };
    let kek = sentinel_hub::keys::Kek::from_file(kek_file).map_err(|e| {
        print_chain(&e);
        ExitCode::from(64)
    })?;
    let store = sentinel_hub::store::PostgresStore::open(&url, "cli", ca_file).map_err(|e| {
        print_chain(&e);
        ExitCode::from(71)
    })?;
    Ok(sentinel_hub::service::replicas::Shared::new(std::sync::Arc::new(store), std::sync::Arc::new(kek)))
}

fn init(database: sentinel_hub::config::DatabaseUrl, ca_file: Option<&std::path::Path>, kek_file: PathBuf) -> ExitCode {
    use sentinel_hub::store::AccessStore as _;
    let shared = match open_shared(database, ca_file, &kek_file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = shared.open_keyring() {
        print_chain(&e);
        return ExitCode::from(71);
    }
    let token = sentinel_hub::auth::generate_token();
    let hash = sentinel_hub::auth::hash_token(&token);
    match shared.store.insert_first_token("admin", "admin", &hash, "init", sentinel_hub::now_ms()) {
        Ok(Some(_)) => {
            // The only copy: the database keeps its hash.
            println!("{token}");
            eprintln!("sentinel-hub: the database is ready; above is the first admin token (shown once)");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "sentinel-hub: the database is ready and already has tokens; make more with `sentinel token create`"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_chain(&e);
            ExitCode::from(71)
        }
    }
}

fn migrate(
    from: sentinel_hub::config::DatabaseUrl,
    to: sentinel_hub::config::DatabaseUrl,
    ca_file: Option<&std::path::Path>,
    blobs_to: Option<sentinel_hub::config::BlobsUrl>,
    kek_file: &std::path::Path,
    force: bool,
) -> ExitCode {
    use sentinel_hub::config::BlobsUrl;
    use sentinel_hub::store::postgres::import;
    use sentinel_hub::store::{BlobStore, LocalBlobStore, RegistryStore as _, S3BlobStore, SqliteStore};
    let sentinel_hub::config::DatabaseUrl::Sqlite(source) = from else {
        eprintln!("sentinel-hub: --from is the embedded hub's sqlite://PATH");
        return ExitCode::from(64);
    };
    let data_dir = source.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let shared = match open_shared(to, ca_file, kek_file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let fail = |e: &dyn std::error::Error, code: u8| {
        print_chain(e);
        ExitCode::from(code)
    };
    // The source at its newest schema (what its hub would do at start).
    let digests = match SqliteStore::open(&source).and_then(|s| s.referenced_blobs()) {
        Ok(d) => d,
        Err(e) => return fail(&e, 71),
    };
    let from_blobs = match LocalBlobStore::open(data_dir.join("blobs").join("sha256")) {
        Ok(b) => b,
        Err(e) => return fail(&e, 71),
    };
    let staging = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => return fail(&e, 71),
    };
    let to_blobs: Box<dyn BlobStore> = match blobs_to {
        None => match LocalBlobStore::open(data_dir.join("blobs").join("sha256")) {
            Ok(b) => Box::new(b),
            Err(e) => return fail(&e, 71),
        },
        Some(BlobsUrl::File(dir)) => match LocalBlobStore::open(dir.join("sha256")) {
            Ok(b) => Box::new(b),
            Err(e) => return fail(&e, 71),
        },
        Some(BlobsUrl::S3 { bucket, prefix }) => {
            match S3BlobStore::open(&bucket, &prefix, &Default::default(), staging.path().join("staging")) {
                Ok(b) => Box::new(b),
                Err(e) => return fail(&e, 71),
            }
        }
    };
    let blobs = match import::copy_blobs(&digests, &from_blobs, to_blobs.as_ref()) {
        Ok(n) => n,
        Err(e) => return fail(&e, 1),
    };
    eprintln!("sentinel-hub: {blobs} blobs re-hashed and in the target store");
    let keys = match import::sealed_keys(&data_dir.join("keys"), &shared.kek) {
        Ok(k) => k,
        Err(e) => return fail(&e, 1),
    };
    match shared.store.import_sqlite(&source, &keys, force) {
        Ok(done) => {
            for (table, n) in &done.rows {
                println!("{table}\t{n}");
            }
            println!("blobs\t{blobs}");
            println!("signing_keys\t{}", done.keys);
            eprintln!("sentinel-hub: migrated; start the replicas on the target");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, 1),
    }
}

fn print_chain(err: &dyn std::error::Error) {
    eprintln!("sentinel-hub: {}", sentinel_hub::error_chain(err));
}

async fn run(args: Args) -> ExitCode {
    let mut config = HubConfig::new(args.data_dir);
    config.database = args.database;
    config.blobs = args.blobs;
    config.key_encryption_key_file = args.key_encryption_key_file;
    config.database_ca_file = args.database_ca_file;
    if args.artifact_redirect && !matches!(config.blobs, Some(sentinel_hub::config::BlobsUrl::S3 { .. })) {
        eprintln!("sentinel-hub: --artifact-redirect needs --blobs s3://...: only a bucket can presign a download");
        return ExitCode::from(64);
    }
    config.artifact_redirect = args.artifact_redirect;
    config.listen = args.listen;
    config.grpc_listen = args.grpc_listen;
    config.metrics_listen = args.metrics_listen;
    config.max_upload_bytes = args.max_upload_bytes;
    config.require_publisher = args.require_publisher;
    config.public_url = args.public_url;
    config.tls = args.tls_cert.zip(args.tls_key).map(|(cert, key)| sentinel_hub::config::TlsFiles { cert, key });
    if args.insecure_plaintext {
        config.transport = sentinel_hub::config::Transport::InsecurePlaintext;
    }
    if args.heartbeat_secs == 0 || args.state_ttl_secs <= args.heartbeat_secs {
        eprintln!("sentinel-hub: --state-ttl-secs must be longer than --heartbeat-secs, which must be positive");
        return ExitCode::from(64);
    }
    let telemetry = sentinel_hub::telemetry::Retention {
        fine_bucket: std::time::Duration::from_secs(args.telemetry_fine_secs),
        fine_keep: std::time::Duration::from_secs(args.telemetry_fine_hours * 3600),
        coarse_bucket: std::time::Duration::from_secs(args.telemetry_coarse_secs),
        coarse_keep: std::time::Duration::from_secs(args.telemetry_coarse_days * 86_400),
    };
    if telemetry.coarse_bucket < telemetry.fine_bucket
        || telemetry.fine_keep < telemetry.fine_bucket
        || telemetry.coarse_keep < telemetry.coarse_bucket.max(telemetry.fine_keep)
    {
        eprintln!(
            "sentinel-hub: --telemetry-coarse-secs must be at least --telemetry-fine-secs, each series must be kept \
             longer than one of its buckets, and coarse buckets at least as long as fine ones"
        );
        return ExitCode::from(64);
    }
    config.telemetry = telemetry;
    if args.inspect_memory_mib < 64 || args.inspect_timeout_secs == 0 || args.inspect_max_nodes == 0 {
        eprintln!(
            "sentinel-hub: --inspect-memory-mib must be at least 64, and --inspect-timeout-secs and \
             --inspect-max-nodes positive"
        );
        return ExitCode::from(64);
    }
    if args.inspect_concurrency == Some(0) {
        eprintln!("sentinel-hub: --inspect-concurrency must be positive");
        return ExitCode::from(64);
    }
    config.inspect = sentinel_hub::config::InspectConfig {
        worker: args.worker,
        memory_limit_bytes: args.inspect_memory_mib.saturating_mul(1024 * 1024),
        timeout: std::time::Duration::from_secs(args.inspect_timeout_secs),
        max_nodes: args.inspect_max_nodes,
        concurrency: args.inspect_concurrency.unwrap_or_else(sentinel_hub::config::default_inspect_concurrency),
        ort_library: args.ort_library.filter(|p| p.is_file()),
    };
    config.state_ttl = std::time::Duration::from_secs(args.state_ttl_secs);
    let fds = sentinel_net::raise_fd_limit();
    let wanted = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
    config.connections.max_connections = sentinel_net::Limits::connections_within_fd_limit(wanted);
    if config.connections.max_connections < wanted {
        tracing::warn!(
            wanted,
            open_file_limit = fds,
            max_connections = config.connections.max_connections,
            "lowered --max-connections to fit the open-file limit (raise LimitNOFILE)"
        );
    }
    config.connections.header_read_timeout = std::time::Duration::from_secs(args.header_read_timeout_secs);
    config.connections.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs);
    config.heartbeat = std::time::Duration::from_secs(args.heartbeat_secs);
    let hub = match Hub::open(config) {
        Ok(h) => h,
        // No worker to inspect uploads with, or no key-encryption key for a
        // shared database, is a configuration error.
        Err(e @ (sentinel_hub::server::HubError::Inspect(_) | sentinel_hub::server::HubError::NoKek)) => {
            print_chain(&e);
            return ExitCode::from(64);
        }
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(71);
        }
    };
    let listeners = match hub.bind().await {
        Ok(l) => l,
        Err(e @ sentinel_hub::server::HubError::Transport(_)) => {
            print_chain(&e);
            return ExitCode::from(64);
        }
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(71);
        }
    };
    let addr = listeners.rest_addr().map(|a| a.to_string()).unwrap_or_default();
    let scheme = if hub.state().config().tls.is_some() { "https" } else { "http" };
    if hub.bootstrap_token.is_some() {
        println!("admin token written to {}", hub.data_dir().join(sentinel_hub::server::ADMIN_TOKEN_FILE).display());
    }
    // Before the listening line: a script may stop reading (and close the
    // pipe) once it has that line, and a later print would then fail.
    if let Some(metrics) = listeners.metrics_addr() {
        println!("sentinel-hub metrics on http://{metrics}");
    }
    // Scripts and tests read this line to learn the port.
    println!("sentinel-hub listening on {scheme}://{addr}");
    if let Some(grpc) = listeners.grpc_addr() {
        println!("sentinel-hub grpc on {scheme}://{grpc}");
    }
    match hub.serve(listeners, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(&e);
            ExitCode::from(70)
        }
    }
}
