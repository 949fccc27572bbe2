//! [`MetadataStore`](super::MetadataStore) on PostgreSQL: the store of a hub
//! that runs as several replicas on one database.
//!
//! - **Connections.** A pool (deadpool-postgres over tokio-postgres). The
//!   connections run on a small runtime of the store's own, so the
//!   synchronous store interface works from any thread: a call takes a pooled
//!   client there and drives its queries to completion on the calling
//!   (blocking) thread.
//! - **Migrations** are numbered, each applied once, all under one
//!   transaction-scoped advisory lock: replicas started together on an
//!   empty database wait for each other instead of racing.
//! - **Exactly once.** Halting and widening are conditional `UPDATE`s
//!   (`... WHERE state = 'active'`, `... AND wave = $from`). PostgreSQL takes
//!   the row lock, and a second replica's `UPDATE` waits for the first to
//!   commit, re-reads the row and matches nothing: one halt, one restore, one
//!   audit entry, however many replicas race. Row locks rather than advisory
//!   locks, because they are held exactly as long as the transaction that
//!   changes the row and cannot be forgotten by a code path.
//! - **One revision, one content.** Every change to what devices run bumps
//!   the `fleet` row in its own transaction; snapshots are read in one
//!   `REPEATABLE READ` transaction.
//! - **Change notices.** Each such transaction also sends `NOTIFY` (delivered
//!   at commit, so never for a rolled-back change), and [`PostgresStore::listen`]
//!   hands every replica the notices of the others.
//!
//! # Layout
//! - [`migrations`]: the schema, one migration per version.
//! - [`registry`], [`deployments`], [`devices`], [`access`]: as in the SQLite store.
//! - [`keys`]: the sealed signing keys all replicas share.
//! - [`import`]: `sentinel-hub migrate`, from an embedded hub's data dir.

mod access;
mod deployments;
mod devices;
pub mod import;
pub mod keys;
#[cfg(test)]
mod migration_tests;
mod migrations;
mod registry;
mod telemetry;

use std::future::Future;
use std::str::FromStr as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use super::StoreError;

/// The channel change notices travel on.
pub const CHANNEL: &str = "sentinel_changes";

/// Connections per replica. A request takes one for a few short statements.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free connection, or for a new one to open.
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata store on a PostgreSQL database.
pub struct PostgresStore {
    pool: Pool,
    /// Drives the connections. Shut down without blocking on drop, since a
    /// hub may drop its store on an async thread.
    runtime: Option<tokio::runtime::Runtime>,
    /// The URL without its password, for messages.
    url: String,
    config: tokio_postgres::Config,
    /// TLS for every connection: used as `sslmode` says (tokio-postgres's
    /// default, `prefer`, takes TLS when the server offers it).
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// A notice carries the sender's replica id, so a replica ignores its own.
    replica: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("url", &self.url).field("replica", &self.replica).finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn db(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Database { op, source: Box::new(source) }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// A column that does not read as what the hub stored (corrupt JSON, an
/// unknown enum value, a negative size): the row is refused.
fn corrupt(op: &'static str, column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database { op, source: format!("column {column}: {e}").into() }
}

fn json_col<T: serde::de::DeserializeOwned>(op: &'static str, row: &Row, column: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(column).map_err(db(op))?;
    serde_json::from_str(&text).map_err(|e| corrupt(op, column, e))
}

fn text_col<T>(op: &'static str, row: &Row, column: &str) -> Result<T, StoreError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(column).map_err(db(op))?;
    text.parse().map_err(|e| corrupt(op, column, e))
}

fn u32_col(op: &'static str, row: &Row, column: &str) -> Result<u32, StoreError> {
    let v: i64 = row.try_get(column).map_err(db(op))?;
    u32::try_from(v).map_err(|e| corrupt(op, column, e))
}

fn u64_col(op: &'static str, row: &Row, column: &str) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(column).map_err(db(op))?;
    u64::try_from(v).map_err(|e| corrupt(op, column, e))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Runs `f` to completion on this thread. Queries only talk to their
/// connection's task over channels, so no runtime is needed here.
fn block<F: Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

/// `postgres://user:secret@host/db` without the secret.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`,
    /// `?sslmode=require` for TLS only) and applies pending migrations.
    /// `replica` names this hub process in change notices. TLS trusts the
    /// system's roots and `ca_file`'s certificates, and always checks the
    /// server's name.
    pub fn open(url: &str, replica: &str, ca_file: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let redacted = redact(url);
        let open_err = |source: StoreError| StoreError::Open { path: redacted.clone(), source: Box::new(source) };
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Open { path: redacted.clone(), source: Box::new(e) })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sentinel-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Open { path: redacted.clone(), source: Box::new(e) })?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
            crate::tls::client_config(ca_file)
                .map_err(|e| StoreError::Open { path: redacted.clone(), source: Box::new(e) })?,
        );
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Open { path: redacted.clone(), source: Box::new(e) })?;
        let store =
            Self { pool, runtime: Some(runtime), url: redacted.clone(), config, tls, replica: replica.to_owned() };
        let mut client = store.client("connect").map_err(open_err)?;
        block(migrations::migrate(&mut client, &redacted))?;
        Ok(store)
    }

    /// The URL this store connects to, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let c = self.client("read schema version")?;
        block(async {
            let row = c
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(db("read schema version"))?;
            row.try_get(0).map_err(db("read schema version"))
        })
    }

    fn handle(&self) -> Result<&tokio::runtime::Handle, StoreError> {
        self.runtime
            .as_ref()
            .map(tokio::runtime::Runtime::handle)
            .ok_or_else(|| StoreError::Database { op: "connect", source: "the store is closed".into() })
    }

    /// A pooled connection, opened on the store's runtime if need be.
    fn client(&self, op: &'static str) -> Result<Object, StoreError> {
        let pool = self.pool.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle()?.spawn(async move {
            let _ = tx.send(pool.get().await);
        });
        match rx.recv() {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(StoreError::Database { op, source: Box::new(e) }),
            Err(_) => Err(StoreError::Database { op, source: "the store's runtime stopped".into() }),
        }
    }

    /// Change notices from the other replicas: a task on the store's runtime
    /// keeps one connection in `LISTEN` (reconnecting after a failure) and
    /// sends each notice's kind on the returned channel. After a reconnection
    /// it sends [`RESYNC`]: notices may have been missed, so everything is stale.
    pub fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<String>, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let me = self.replica.clone();
        self.handle()?.spawn(devices::listen_loop(config, tls, me, tx));
        Ok(rx)
    }

    /// Sends a change notice to the other replicas (outside any transaction).
    pub fn announce(&self, kind: &str) -> Result<(), StoreError> {
        let c = self.client("announce change")?;
        let payload = notice(&self.replica, kind);
        block(async {
            c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await.map_err(db("announce change"))?;
            Ok(())
        })
    }
}

/// What a replica sends on [`CHANNEL`]: its id and the kind of change.
fn notice(replica: &str, kind: &str) -> String {
    format!("{replica} {kind}")
}

/// Sent by [`PostgresStore::listen`] after its connection came back.
pub const RESYNC: &str = "resync";

/// The notice kind for a change to deployments (and so to desired states).
pub const DEPLOYMENTS: &str = "deployments";
/// The notice kind for a rotation of the signing keys.
pub const KEYS: &str = "keys";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://hub:s3cret@db:5432/sentinel"), "postgres://hub:***@db:5432/sentinel");
        assert_eq!(redact("postgres://db/sentinel"), "postgres://db/sentinel");
        assert_eq!(redact("host=db user=hub"), "host=db user=hub");
    }
}
