//! [`MetadataStore`](super::MetadataStore) on SQLite: one file, WAL mode, schema migrations driven
//! by `PRAGMA user_version`.
//!
//! One connection behind a mutex. The hub's metadata traffic is small (a few
//! rows per request) and SQLite serialises writers anyway; a pool would add
//! moving parts without adding throughput.

//!
//! # Layout
//! - [`migrations`]: the schema, one migration per version.
//! - [`registry`]: models and versions.
//! - [`deployments`]: deployments, halts and waves.
//! - [`devices`]: devices, their reports, and the fleet revision.
//! - [`access`]: API tokens and the audit log.

mod access;
mod deployments;
mod devices;
mod migrations;
mod registry;
mod telemetry;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, Row};

use super::StoreError;

/// The metadata store on one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Database { op, source: Box::new(source) }
}

fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// A JSON column that does not parse: the row is refused, never read as a
/// default (a corrupt `waves` would otherwise mean "every device at once").
fn json_col<T: serde::de::DeserializeOwned>(idx: usize, text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

/// A text column that names an enum variant (a deployment's state, an audit
/// outcome): an unknown value refuses the row, never reads as a default.
fn text_col<T>(idx: usize, text: &str) -> rusqlite::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse().map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, switches it to WAL
    /// and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err =
            |source: rusqlite::Error| StoreError::Open { path: path.display().to_string(), source: Box::new(source) };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        // NORMAL is durable across power loss in WAL mode except for the last
        // transactions before the loss, which is what a registry can afford;
        // blob files are fsynced separately before their rows are written.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        migrations::migrate(&mut conn, path)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn().pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("read user_version"))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: every
        // write is a transaction that SQLite rolls back if not committed.
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
