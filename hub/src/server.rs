//! Opening a hub's data dir and serving its API until shutdown: the hub's
//! one composition root. It builds the state, puts the adapters (REST API,
//! web interface, gRPC, metrics endpoint) on their listeners, and nothing
//! in the crate imports it.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::serve::ListenerExt as _;
use sentinel_proto::pb::agent_sync_server::AgentSyncServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

use crate::auth::{Role, generate_token, hash_token};
pub use crate::config::ADMIN_TOKEN_FILE;
use crate::config::HubConfig;
use crate::config::{BlobsUrl, DatabaseUrl};
use crate::keys::{Kek, Keyring, KeyringError};
use crate::service::replicas::Shared;
use crate::service::{HubState, Parts, SharedState};
use crate::store::{
    BlobError, BlobStore, LocalBlobStore, MetadataStore, PostgresStore, S3BlobStore, SqliteStore, StoreError,
};

/// Failures while starting or running the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("preparing the data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the metadata store")]
    Store(#[from] StoreError),
    #[error("opening the blob store")]
    Blobs(#[from] BlobError),
    #[error("loading the signing keys")]
    Keys(#[from] KeyringError),
    #[error("loading the signing keys from the database")]
    SharedKeys(#[source] crate::service::ServiceError),
    #[error(
        "a PostgreSQL database keeps the signing keys every replica shares, sealed: give \
         --key-encryption-key-file (32 random bytes, the same file on every replica)"
    )]
    NoKek,
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a listener's task failed")]
    Serve(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Transport(crate::config::ConfigError),
    #[error("loading the TLS identity")]
    Tls(#[source] crate::tls::TlsError),
    #[error("registering the metrics")]
    Metrics(#[from] prometheus::Error),
    #[error("setting up upload inspection")]
    Inspect(#[source] crate::inspect::InspectError),
}

/// The hub's bound sockets.
#[derive(Debug)]
pub struct Listeners {
    pub rest: TcpListener,
    pub grpc: Option<TcpListener>,
    /// The plain-HTTP `/metrics` listener.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub fn rest_addr(&self) -> Option<SocketAddr> {
        self.rest.local_addr().ok()
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// A hub whose storage is open and ready to serve.
#[derive(Debug)]
pub struct Hub {
    state: SharedState,
    /// The admin token created on this start, if this was the first start.
    pub bootstrap_token: Option<String>,
}

/// The directory, in the data dir, that holds each running inspection's
/// private working directory. Emptied at start.
pub const INSPECT_DIR: &str = "inspect";

impl Hub {
    /// Opens (creating on first start) the data dir: database, blob store,
    /// signing key, and the first admin token. Removes blobs that no version
    /// references: leftovers of uploads interrupted between storing the bytes
    /// and registering the version.
    pub fn open(config: HubConfig) -> Result<Self, HubError> {
        let dir = &config.data_dir;
        let dir_err = |source| HubError::DataDir { path: dir.clone(), source };
        // Tokens' hashes, the audit log, keys and models: the owner's only,
        // including what an older release left readable.
        sentinel_proto::private::create_dir(dir).map_err(dir_err)?;
        let tightened = sentinel_proto::private::tighten_tree(dir).map_err(dir_err)?;
        if tightened > 0 {
            tracing::info!(count = tightened, dir = %dir.display(), "made data files 0600 and dirs 0700");
        }
        let (meta, replicas, keys): (Arc<dyn MetadataStore>, _, _) = match config.database() {
            DatabaseUrl::Sqlite(path) => {
                // Created 0600 before SQLite opens it; its -wal and -shm files take this mode.
                sentinel_proto::private::create_file(&path).map_err(dir_err)?;
                let keys = Keyring::open_or_create(&dir.join("keys"))?;
                (Arc::new(SqliteStore::open(&path)?), None, keys)
            }
            DatabaseUrl::Postgres(url) => {
                let Some(kek_file) = &config.key_encryption_key_file else {
                    return Err(HubError::NoKek);
                };
                let kek = Arc::new(Kek::from_file(kek_file)?);
                let replica = crate::auth::generate_token();
                let store = Arc::new(PostgresStore::open(
                    &url,
                    &replica[..12.min(replica.len())],
                    config.database_ca_file.as_deref(),
                )?);
                tracing::info!(database = %store.url(), "metadata in PostgreSQL");
                let shared = Shared::new(store.clone(), kek);
                let keys = shared.open_keyring().map_err(HubError::SharedKeys)?;
                (store as Arc<dyn MetadataStore>, Some(shared), keys)
            }
        };
        let blobs: Arc<dyn BlobStore> = match config.blobs() {
            BlobsUrl::File(path) => Arc::new(LocalBlobStore::open(path.join("sha256"))?),
            BlobsUrl::S3 { bucket, prefix } => {
                let store = S3BlobStore::open(&bucket, &prefix, &config.s3, dir.join("staging"))?;
                tracing::info!(%bucket, %prefix, "model bytes in S3");
                Arc::new(store)
            }
        };
        let inspector =
            crate::inspect::Inspector::new(config.inspect.clone(), dir.join(INSPECT_DIR)).map_err(HubError::Inspect)?;

        // Replicas share the blob store: a blob another replica has just
        // committed, whose version row is not written yet, looks orphaned.
        // Only a hub alone on its store sweeps at start.
        if replicas.is_none() {
            let referenced: std::collections::HashSet<String> = meta.referenced_blobs()?.into_iter().collect();
            for sha in blobs.list()? {
                if !referenced.contains(&sha) {
                    tracing::info!(%sha, "removing a blob no version references (interrupted upload)");
                    blobs.remove(&sha)?;
                }
            }
        }

        let bootstrap_token = if meta.count_tokens()? == 0 {
            let token = generate_token();
            // Stored first, written second: of replicas starting together on
            // one database, only the one whose token was stored writes it.
            let stored = meta.insert_first_token(
                "admin",
                Role::Admin.as_str(),
                &hash_token(&token),
                "bootstrap",
                crate::now_ms(),
            )?;
            if stored.is_some() {
                write_admin_token(&dir.join(ADMIN_TOKEN_FILE), &token).map_err(dir_err)?;
                tracing::warn!(path = %dir.join(ADMIN_TOKEN_FILE).display(), "first start: wrote the admin token");
            }
            stored.map(|_| token)
        } else {
            None
        };

        let state = HubState::new(Parts {
            meta,
            blobs,
            keys,
            metrics: crate::metrics::HubMetrics::new()?,
            inspector,
            replicas,
            // One connection budget over REST, gRPC and metrics; HTTP/2
            // pings at the heartbeat keep device streams alive through NATs
            // and find dead peers.
            connections: sentinel_net::Connections::new(sentinel_net::Limits {
                http2_keepalive_interval: Some(config.heartbeat),
                http2_keepalive_timeout: config.heartbeat * 2,
                ..config.connections.clone()
            }),
            config,
        });
        Ok(Self { state, bootstrap_token })
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    pub fn data_dir(&self) -> &Path {
        &self.state.config().data_dir
    }

    /// Checks the transport settings and binds the configured addresses.
    /// Port 0 picks a free port; the returned listeners know which. Sets the
    /// public URL devices download from.
    pub async fn bind(&self) -> Result<Listeners, HubError> {
        let config = self.state.config();
        config.check_transport().map_err(HubError::Transport)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| HubError::Bind { addr, source })
        };
        let rest = bind(config.listen).await?;
        let grpc = match config.grpc_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let metrics = match config.metrics_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        let local = rest.local_addr().map_err(|source| HubError::Bind { addr: config.listen, source })?;
        let url = config.public_url.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
        self.state.set_public_url(url.trim_end_matches('/').to_owned());
        Ok(Listeners { rest, grpc, metrics })
    }

    /// Serves the REST API and the gRPC service (on the REST listener, and on
    /// its own when bound) until
    /// `shutdown` completes, then lets in-flight requests finish.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let state = self.state;
        // Replicas: push other replicas' changes to this one's devices.
        let following = tokio::spawn(crate::service::replicas::follow(state.clone()));
        let pruning = tokio::spawn(crate::service::telemetry::prune_forever(state.clone()));
        let closing = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Streams never end on their own: close them so the servers drain.
            closing.fleet().close_all();
            closing.events().close();
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let tls = match &state.config().tls {
            Some(files) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(&files.cert, &files.key).map_err(HubError::Tls)?,
            )),
            None => None,
        };
        let connections = state.connections().clone();
        tracing::info!(
            max_connections = connections.limits().max_connections,
            header_read_timeout = ?connections.limits().header_read_timeout,
            idle_timeout = ?connections.limits().idle_timeout,
            "connection limits"
        );
        if state.config().require_publisher {
            tracing::info!("every push must carry a publisher signature (--require-publisher)");
        }
        let mut servers = tokio::task::JoinSet::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Some(listener) = listeners.grpc {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, %scheme, serves = "gRPC (agents)", "listener");
            }
            let app = grpc_router(state.clone());
            let (connections, tls, stop) = (connections.clone(), tls.clone(), stopped(stop_rx.clone()));
            servers.spawn(async move { connections.serve("grpc", nodelay(listener), tls, app, stop).await });
        }
        if let Some(listener) = listeners.metrics {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, scheme = "http", serves = "Prometheus /metrics", "listener");
            }
            let app = crate::metrics::router(state.clone());
            let (connections, stop) = (connections.clone(), stopped(stop_rx.clone()));
            servers.spawn(async move { connections.serve("metrics", nodelay(listener), None, app, stop).await });
        }
        if let Ok(addr) = listeners.rest.local_addr() {
            tracing::info!(%addr, %scheme, serves = "REST API, web UI and gRPC (agents)", "listener");
        }
        // gRPC paths (`/sentinel.v1.AgentSync/...`) never collide with the
        // REST ones, and connections speak HTTP/1 or HTTP/2 as the client
        // chooses: agents reach the hub on its one advertised URL. Added
        // after the REST layers: devices authenticate per call with their
        // own tokens.
        let path = format!("/{}/{{*rest}}", <AgentSyncServer<crate::grpc::SyncService> as NamedService>::NAME);
        let grpc = tower::ServiceExt::map_request(
            crate::grpc::SyncService::new(state.clone()),
            |req: axum::http::Request<axum::body::Body>| req.map(tonic::body::Body::new),
        );
        let app = router(state).route_service(&path, grpc);
        servers
            .spawn(async move { connections.serve("rest", nodelay(listeners.rest), tls, app, stopped(stop_rx)).await });
        // A listener whose task panicked is an error, reported once all have stopped.
        let mut failed = None;
        while let Some(done) = servers.join_next().await {
            if let Err(e) = done {
                failed.get_or_insert(e);
            }
        }
        following.abort();
        pruning.abort();
        failed.map_or(Ok(()), |e| Err(HubError::Serve(e)))
    }
}

/// The whole HTTP surface of the REST listener (gRPC aside): the REST API
/// under `/api/v1`, the probes and the web interface, behind
/// authentication and, outermost, the request metrics.
pub fn router(state: SharedState) -> axum::Router {
    axum::Router::new()
        .nest("/api/v1", crate::api::routes())
        .merge(crate::api::probe_routes())
        .merge(crate::web::ui_routes())
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), crate::api::auth::authenticate))
        // Outermost, so requests refused by authentication are counted too.
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), crate::metrics::track_http))
        .with_state(state)
}

/// The gRPC service agents sync over, as a router.
fn grpc_router(state: SharedState) -> axum::Router {
    tonic::service::Routes::new(crate::grpc::SyncService::new(state)).into_axum_router()
}

/// Without TCP_NODELAY, small responses on keep-alive connections can wait
/// ~40 ms for the peer's delayed ACK.
fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "setting TCP_NODELAY failed");
        }
    })
}

/// Writes the admin token once, mode 0600; never overwrites an existing file.
fn write_admin_token(path: &Path, token: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(f, "{token}")?;
    f.sync_all()
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
