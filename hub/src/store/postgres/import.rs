//! `sentinel-hub migrate`: moving an embedded hub (SQLite, local blobs,
//! keys in its data dir) onto PostgreSQL and a shared blob store.
//!
//! 1. Blobs first: each one the registry references is read from the source,
//!    re-hashed on the way into the target store, and refused (naming it)
//!    when its bytes no longer match its digest. Blobs are content-addressed,
//!    so a re-run after an interruption copies only what is missing.
//! 2. Then every table and the signing keys (sealed with the key-encryption
//!    key) in **one** transaction: an interrupted run leaves the target's
//!    tables empty, and a re-run starts over. Ids are kept (desired states
//!    and device reports name deployment ids), sequences follow them, and
//!    the fleet revision moves one past the source's, so devices accept the
//!    next state as new.
//! 3. A target that already holds a registry is refused unless `force`
//!    (then rows that exist are kept, and the rest added).

use std::io::Read as _;

use rusqlite::types::ValueRef;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, block, db};
use crate::keys::{Kek, SigningKeyRecord};
use crate::store::{BlobStore, StoreError};

/// A column's type, as PostgreSQL needs it bound.
#[derive(Debug, Clone, Copy)]
enum Col {
    I64,
    I32,
    F64,
    Text,
    Bytes,
    Bool,
}

use Col::{Bool, Bytes, F64, I32, I64, Text};

/// Every table, parents before children, with the columns both schemas share.
const TABLES: &[(&str, &[(&str, Col)])] = &[
    (
        "models",
        &[
            ("name", Text),
            ("description", Text),
            ("tags", Text),
            ("created_at_ms", I64),
            ("updated_at_ms", I64),
            ("require_publisher", Bool),
        ],
    ),
    (
        "publishers",
        &[("name", Text), ("key_id", Text), ("public_key", Text), ("created_at_ms", I64), ("created_by", Text)],
    ),
    (
        "versions",
        &[
            ("model", Text),
            ("version", Text),
            ("sha256", Text),
            ("size", I64),
            ("stage", Text),
            ("hardware", Text),
            ("manifest", Bytes),
            ("signature", Bytes),
            ("key_id", Text),
            ("created_at_ms", I64),
            ("created_by", Text),
        ],
    ),
    ("version_blobs", &[("model", Text), ("version", Text), ("sha256", Text)]),
    (
        "deployments",
        &[
            ("id", I64),
            ("model", Text),
            ("version", Text),
            ("target", Text),
            ("kind", Text),
            ("state", Text),
            ("created_by", Text),
            ("created_at_ms", I64),
            ("updated_at_ms", I64),
            ("replaces", I64),
            ("policy", Text),
            ("halt_fraction", F64),
            ("halt_count", I64),
            ("halt_reason", Text),
            ("waves", Text),
            ("wave", I64),
        ],
    ),
    (
        "tokens",
        &[
            ("id", I64),
            ("name", Text),
            ("role", Text),
            ("secret_sha256", Text),
            ("created_at_ms", I64),
            ("created_by", Text),
            ("revoked", Bool),
        ],
    ),
    (
        "audit",
        &[
            ("id", I64),
            ("at_ms", I64),
            ("actor", Text),
            ("role", Text),
            ("action", Text),
            ("status", I32),
            ("outcome", Text),
            ("detail", Text),
        ],
    ),
    (
        "devices",
        &[
            ("id", Text),
            ("token_sha256", Text),
            ("labels", Text),
            ("hardware", Text),
            ("agent_version", Text),
            ("created_at_ms", I64),
            ("created_by", Text),
            ("last_seen_ms", I64),
            ("hello", Text),
            ("report", Text),
            ("report_at_ms", I64),
            ("telemetry_run", I64),
            ("telemetry_seq", I64),
        ],
    ),
    (
        "device_events",
        &[
            ("id", I64),
            ("device_id", Text),
            ("at_ms", I64),
            ("kind", Text),
            ("model", Text),
            ("version", Text),
            ("reason", Text),
            ("evidence", Text),
        ],
    ),
    (
        "deployment_devices",
        &[
            ("deployment_id", I64),
            ("device_id", Text),
            ("version", Text),
            ("state", Text),
            ("detail", Text),
            ("updated_ms", I64),
        ],
    ),
    ("deployment_transitions", &[("deployment_id", I64), ("device_id", Text), ("state", Text), ("at_ms", I64)]),
    (
        "telemetry",
        &[
            ("device_id", Text),
            ("model", Text),
            ("version", Text),
            ("resolution", I32),
            ("bucket_ms", I64),
            ("requests", I64),
            ("errors", I64),
            ("feedback_correct", I64),
            ("feedback_total", I64),
            ("agreement_agreed", I64),
            ("agreement_total", I64),
            ("restarts", I64),
            ("validation_accuracy", F64),
            ("validation_samples", I64),
            ("rss_max_bytes", I64),
            ("latency", Bytes),
            ("compute", Bytes),
        ],
    ),
];

/// Tables with a serial id whose sequence must follow the copied ids.
const SERIAL: &[&str] = &["deployments", "tokens", "audit", "device_events"];

/// Failures of a migration.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] crate::store::BlobError),
    #[error("reading the source database {path}")]
    Source {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("reading the source's signing keys")]
    Keys(#[from] crate::keys::KeyringError),
    #[error(
        "the target database already holds a registry ({models} models, {tokens} tokens); pass --force to \
         merge into it (rows that exist are kept)"
    )]
    NotEmpty { models: i64, tokens: i64 },
    #[error("blob {sha256} is missing from the source store")]
    MissingBlob { sha256: String },
    #[error("blob {sha256} in the source store has changed: its bytes hash to {actual}; nothing was migrated")]
    Corrupt { sha256: String, actual: String },
    #[error("reading blob {sha256} from the source store")]
    ReadBlob {
        sha256: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a migration copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Rows copied per table, in [`TABLES`] order.
    pub rows: Vec<(&'static str, u64)>,
    /// Blobs re-hashed and present in the target (copied or already there).
    pub blobs: u64,
    pub keys: u64,
}

fn src_err(path: &std::path::Path) -> impl Fn(rusqlite::Error) -> ImportError + '_ {
    move |source| ImportError::Source { path: path.display().to_string(), source }
}

/// One SQLite value bound as PostgreSQL wants `col`.
fn bind(v: ValueRef<'_>, col: Col) -> Box<dyn ToSql + Sync + Send> {
    match (v, col) {
        (ValueRef::Null, I64) => Box::new(None::<i64>),
        (ValueRef::Null, I32) => Box::new(None::<i32>),
        (ValueRef::Null, F64) => Box::new(None::<f64>),
        (ValueRef::Null, Text) => Box::new(None::<String>),
        (ValueRef::Null, Bytes) => Box::new(None::<Vec<u8>>),
        (ValueRef::Null, Bool) => Box::new(None::<bool>),
        (ValueRef::Integer(i), I64) => Box::new(i),
        (ValueRef::Integer(i), I32) => Box::new(i32::try_from(i).unwrap_or(i32::MAX)),
        (ValueRef::Integer(i), F64) => Box::new(i as f64),
        (ValueRef::Integer(i), Bool) => Box::new(i != 0),
        (ValueRef::Real(f), F64) => Box::new(f),
        (ValueRef::Text(t), Text) => Box::new(String::from_utf8_lossy(t).into_owned()),
        (ValueRef::Blob(b), Bytes) => Box::new(b.to_vec()),
        (ValueRef::Text(t), Bytes) => Box::new(t.to_vec()),
        (ValueRef::Blob(b), Text) => Box::new(String::from_utf8_lossy(b).into_owned()),
        // A value of another type than its column says: as text, and let
        // PostgreSQL refuse it by name if it does not fit.
        (other, _) => Box::new(format!("{other:?}")),
    }
}

/// Copies `blobs` (by digest) from `from` to `to`, re-hashing each.
pub fn copy_blobs(digests: &[String], from: &dyn BlobStore, to: &dyn BlobStore) -> Result<u64, ImportError> {
    let mut n = 0;
    for sha in digests {
        let Some(blob) = from.open(sha)? else { return Err(ImportError::MissingBlob { sha256: sha.clone() }) };
        let crate::store::BlobBody::File(mut file) = blob.body else {
            return Err(ImportError::MissingBlob { sha256: sha.clone() });
        };
        let staged = to.stage()?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1024 * 1024];
        let read_err = |source| ImportError::ReadBlob { sha256: sha.clone(), source };
        loop {
            let k = file.read(&mut buf).map_err(read_err)?;
            if k == 0 {
                break;
            }
            ctx.update(&buf[..k]);
            std::io::Write::write_all(&mut staged.file(), &buf[..k]).map_err(read_err)?;
        }
        let actual = hex::encode(ctx.finish().as_ref());
        if actual != *sha {
            return Err(ImportError::Corrupt { sha256: sha.clone(), actual });
        }
        to.commit(staged, sha)?;
        n += 1;
    }
    Ok(n)
}

impl PostgresStore {
    /// Copies the tables of the SQLite database at `source` and `keys` into
    /// this database in one transaction (see the module). Blobs must be
    /// copied first ([`copy_blobs`]).
    pub fn import_sqlite(
        &self,
        source: &std::path::Path,
        keys: &[SigningKeyRecord],
        force: bool,
    ) -> Result<Imported, ImportError> {
        let src = rusqlite::Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(src_err(source))?;
        let mut c = self.client("migrate")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin migrate"))?;
            let count = async |t: &str| -> Result<i64, StoreError> {
                tx.query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(db("count target rows"))
            };
            let (models, tokens) = (count("models").await?, count("tokens").await?);
            if (models > 0 || tokens > 0) && !force {
                return Err(ImportError::NotEmpty { models, tokens });
            }
            let mut out = Imported::default();
            for (table, cols) in TABLES {
                let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
                let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
                let insert = format!(
                    "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
                    names.join(", "),
                    placeholders.join(", ")
                );
                let stmt = tx.prepare(&insert).await.map_err(db("prepare migrate insert"))?;
                let mut select =
                    src.prepare(&format!("SELECT {} FROM {table}", names.join(", "))).map_err(src_err(source))?;
                let mut rows = select.query([]).map_err(src_err(source))?;
                let mut n = 0u64;
                while let Some(row) = rows.next().map_err(src_err(source))? {
                    let values: Vec<Box<dyn ToSql + Sync + Send>> = cols
                        .iter()
                        .enumerate()
                        .map(|(i, (_, col))| row.get_ref(i).map(|v| bind(v, *col)))
                        .collect::<Result<_, _>>()
                        .map_err(src_err(source))?;
                    let refs: Vec<&(dyn ToSql + Sync)> =
                        values.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
                    n += tx.execute(&stmt, &refs).await.map_err(db("copy a row"))?;
                }
                out.rows.push((*table, n));
            }
            for table in SERIAL {
                tx.execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST((SELECT MAX(id) FROM {table}), 1))"
                    ),
                    &[],
                )
                .await
                .map_err(db("move a sequence"))?;
            }
            let revision: i64 =
                src.query_row("SELECT revision FROM fleet WHERE id = 1", [], |r| r.get(0)).map_err(src_err(source))?;
            tx.execute("UPDATE fleet SET revision = GREATEST(revision, $1::BIGINT + 1) WHERE id = 1", &[&revision])
                .await
                .map_err(db("move the revision"))?;
            if keys.iter().any(|k| k.active) {
                tx.execute("UPDATE signing_keys SET active = FALSE WHERE active", &[])
                    .await
                    .map_err(db("retire signing key"))?;
            }
            for k in keys {
                out.keys += tx
                    .execute(
                        "INSERT INTO signing_keys (key_id, public_key, sealed_pkcs8, created_at_ms, active)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id) DO UPDATE SET active = excluded.active",
                        &[&k.key_id, &k.public_key, &k.sealed_pkcs8, &k.created_at_ms, &k.active],
                    )
                    .await
                    .map_err(db("copy a signing key"))?;
            }
            tx.commit().await.map_err(db("commit migrate"))?;
            Ok(out)
        })
    }
}

/// The signing keys of an embedded hub's `keys/` directory, sealed for a
/// shared database.
pub fn sealed_keys(dir: &std::path::Path, kek: &Kek) -> Result<Vec<SigningKeyRecord>, ImportError> {
    let (files, active) = crate::keys::key_files(dir)?;
    let mut out = Vec::new();
    for (id, public_key, pkcs8) in files {
        out.push(SigningKeyRecord {
            sealed_pkcs8: kek.seal(&id, &pkcs8)?,
            public_key,
            active: id == active,
            key_id: id,
            created_at_ms: crate::now_ms(),
        });
    }
    Ok(out)
}
