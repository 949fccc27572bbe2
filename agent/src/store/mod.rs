//! The device's model store and state database.
//!
//! - Model files live under `STATE/models/<sha256>`, written only by
//!   [`crate::download`] (temp file, fsync, rename). Partial downloads are
//!   `.partial-<sha256>`; a restart deletes them, so a file cut off by a
//!   crash is never taken for a model.
//! - `STATE/agent.db` (SQLite, WAL) holds the last verified desired state
//!   (the signed bytes, so it is re-verified when loaded), each model's
//!   active and standby version, and an event log with a flag for what has
//!   reached the hub.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use sentinel_proto::pb::{SignedDesiredState, SignedManifest};

use crate::slots::{Color, SlotState, Slots};
use crate::util::now_ms;

mod events;
mod kinds;
mod migrations;

pub use events::Event;
use migrations::MIGRATIONS;

pub use kinds::{EventKind, ModelStatus, UnknownWord};

/// Failures of the agent's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent database operation `{op}` failed")]
    Db {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value this agent cannot read back: never taken for "absent".
    #[error("agent database holds a corrupt {what} for `{key}`")]
    Corrupt {
        what: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A value that could not be encoded for storage.
    #[error("encoding {what} for the agent database failed")]
    Encode {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("agent store I/O failed: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn encode_slots(slots: &Slots) -> Result<String, StoreError> {
    serde_json::to_string(slots).map_err(|e| StoreError::Encode { what: "slots", source: Box::new(e) })
}

/// Column `i` of `row` parsed as a [`ModelStatus`] or [`EventKind`]: a word
/// that does not parse fails the read instead of becoming a default.
fn word<T: std::str::FromStr<Err = UnknownWord>>(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = row.get(i)?;
    text.parse().map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
}

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Db { op, source }
}

/// A model's slot assignment and latest status on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRow {
    pub name: String,
    pub active_version: Option<String>,
    pub active_sha256: Option<String>,
    pub active_deployment: Option<i64>,
    pub standby_version: Option<String>,
    pub standby_sha256: Option<String>,
    pub status: ModelStatus,
    /// The version the status is about (may differ from the active one).
    pub status_version: String,
    pub detail: String,
    /// The deployment the status is about, when known.
    pub status_deployment: Option<i64>,
}

/// The agent's durable state.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    models_dir: PathBuf,
}

impl Store {
    /// Opens the store in `state_dir`, creating it, and deletes partial
    /// downloads left by a crash or power loss.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        // The verified state and model files: the agent user's only,
        // including what an older release left readable.
        sentinel_proto::private::create_dir(state_dir).map_err(io("create", state_dir))?;
        let tightened = sentinel_proto::private::tighten_tree(state_dir).map_err(io("chmod", state_dir))?;
        if tightened > 0 {
            tracing::info!(count = tightened, dir = %state_dir.display(), "made state files 0600 and dirs 0700");
        }
        let models_dir = state_dir.join("models");
        sentinel_proto::private::create_dir(&models_dir).map_err(io("create", &models_dir))?;
        for entry in std::fs::read_dir(&models_dir).map_err(io("read dir", &models_dir))? {
            let entry = entry.map_err(io("read dir", &models_dir))?;
            if entry.file_name().to_string_lossy().starts_with(".partial-") {
                let p = entry.path();
                tracing::info!(path = %p.display(), "deleting a partial download from before the restart");
                std::fs::remove_file(&p).map_err(io("remove", &p))?;
            }
        }
        let path = state_dir.join("agent.db");
        // Created 0600 before SQLite opens it; its -wal and -shm files take this mode.
        sentinel_proto::private::create_file(&path).map_err(io("create", &path))?;
        let mut conn = Connection::open(&path).map_err(db("open"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db("wal"))?;
        // FULL: the slot assignment must survive power loss exactly.
        conn.pragma_update(None, "synchronous", "FULL").map_err(db("synchronous"))?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("user_version"))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
            let tx = conn.transaction().map_err(db("migrate"))?;
            tx.execute_batch(sql).map_err(db("migrate"))?;
            tx.pragma_update(None, "user_version", i + 1).map_err(db("migrate"))?;
            tx.commit().map_err(db("migrate"))?;
        }
        Ok(Self { conn: Mutex::new(conn), models_dir })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one write statement. A commit waits for the disk
    /// (`synchronous=FULL`), so it runs off the Tokio worker (see
    /// [`crate::util::blocking`]): inference requests are not held up behind it.
    fn execute(&self, op: &'static str, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
        crate::util::blocking(|| self.conn().execute(sql, params)).map(drop).map_err(db(op))
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Where the model file with this digest lives (digest already checked).
    pub fn model_path(&self, sha256: &str) -> PathBuf {
        self.models_dir.join(sha256)
    }

    pub fn has_model(&self, sha256: &str) -> bool {
        self.model_path(sha256).is_file()
    }

    /// The last verified desired state and its revision.
    pub fn desired(&self) -> Result<Option<(u64, SignedDesiredState)>, StoreError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn()
            .query_row("SELECT revision, signed FROM desired WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db("read desired"))?;
        Ok(row.and_then(|(rev, bytes)| {
            SignedDesiredState::decode(bytes.as_slice()).ok().map(|s| (u64::try_from(rev).unwrap_or(0), s))
        }))
    }

    /// Stores a verified desired state. Durable when it returns.
    pub fn save_desired(&self, revision: u64, signed: &SignedDesiredState) -> Result<(), StoreError> {
        self.execute(
            "save desired",
            "INSERT INTO desired (id, revision, signed, verified_at_ms) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET revision = ?1, signed = ?2, verified_at_ms = ?3",
            params![i64::try_from(revision).unwrap_or(i64::MAX), signed.encode_to_vec(), now_ms()],
        )?;
        Ok(())
    }

    pub fn last_revision(&self) -> Result<u64, StoreError> {
        Ok(self.desired()?.map(|(r, _)| r).unwrap_or(0))
    }

    pub fn models(&self) -> Result<Vec<ModelRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT name, active_version, active_sha256, active_deployment, standby_version, standby_sha256,
                        status, status_version, detail, status_deployment FROM models ORDER BY name",
            )
            .map_err(db("list models"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ModelRow {
                    name: r.get(0)?,
                    active_version: r.get(1)?,
                    active_sha256: r.get(2)?,
                    active_deployment: r.get(3)?,
                    standby_version: r.get(4)?,
                    standby_sha256: r.get(5)?,
                    status: word(r, 6)?,
                    status_version: r.get(7)?,
                    detail: r.get(8)?,
                    status_deployment: r.get(9)?,
                })
            })
            .map_err(db("list models"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list models"))
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelRow>, StoreError> {
        Ok(self.models()?.into_iter().find(|m| m.name == name))
    }

    /// Records a status for a model without touching its slots.
    pub fn set_status(&self, name: &str, status: ModelStatus, version: &str, detail: &str) -> Result<(), StoreError> {
        self.write_status(name, status, version, detail, None)
    }

    /// Records a status about one deployment's version (reported to the hub
    /// with that deployment's id).
    pub fn set_deployment_status(
        &self,
        name: &str,
        status: ModelStatus,
        version: &str,
        detail: &str,
        deployment: i64,
    ) -> Result<(), StoreError> {
        self.write_status(name, status, version, detail, Some(deployment))
    }

    fn write_status(
        &self,
        name: &str,
        status: ModelStatus,
        version: &str,
        detail: &str,
        deployment: Option<i64>,
    ) -> Result<(), StoreError> {
        self.execute(
            "set status",
            "INSERT INTO models (name, status, status_version, detail, updated_at_ms, status_deployment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET status = ?2, status_version = ?3, detail = ?4, updated_at_ms = ?5,
                    status_deployment = ?6",
            params![name, status.as_str(), version, detail, now_ms(), deployment],
        )?;
        Ok(())
    }

    /// Marks a version rolled back on this device at desired-state `revision`:
    /// it is not tried again until a newer revision names it.
    pub fn reject(
        &self,
        model: &str,
        sha256: &str,
        version: &str,
        revision: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "reject",
            "INSERT INTO rejected (model, sha256, version, revision, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(model, sha256, version) DO UPDATE SET revision = ?4, reason = ?5, at_ms = ?6",
            params![model, sha256, version, i64::try_from(revision).unwrap_or(i64::MAX), reason, now_ms()],
        )?;
        Ok(())
    }

    /// The revision at which a version was rolled back here, and why.
    pub fn rejected(&self, model: &str, sha256: &str, version: &str) -> Result<Option<(u64, String)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn()
            .query_row(
                "SELECT revision, reason FROM rejected WHERE model = ?1 AND sha256 = ?2 AND version = ?3",
                params![model, sha256, version],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db("read rejected"))?;
        Ok(row.map(|(rev, reason)| (u64::try_from(rev).unwrap_or(0), reason)))
    }

    /// Commits a promotion or a rollback: the model's slot pair and its
    /// active/standby row, in one transaction. After power loss the device
    /// has either the old or the new assignment, never a mix.
    pub fn activate(&self, slots: &Slots, deployment: i64) -> Result<(), StoreError> {
        let pair = encode_slots(slots)?;
        let slot_of =
            |state: SlotState| [Color::Blue, Color::Green].into_iter().map(|c| slots.get(c)).find(|s| s.state == state);
        let active = slot_of(SlotState::Active);
        let standby = slot_of(SlotState::Standby);
        let version = active.and_then(|s| s.version.clone());
        // A commit waits for the disk: off the Tokio worker, as in `execute`.
        crate::util::blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(db("activate"))?;
            tx.execute(
                "INSERT INTO slots (model, pair, committed_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(model) DO UPDATE SET pair = ?2, committed_at_ms = ?3",
                params![slots.model, pair, now_ms()],
            )
            .map_err(db("activate"))?;
            tx.execute(
                "INSERT INTO models (name, active_version, active_sha256, active_deployment, standby_version,
                                     standby_sha256, status, status_version, detail, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, COALESCE(?2, ''), '', ?7)
                 ON CONFLICT(name) DO UPDATE SET
                    active_version = ?2, active_sha256 = ?3, active_deployment = ?4,
                    standby_version = ?5, standby_sha256 = ?6,
                    status = ?8, status_version = COALESCE(?2, ''), detail = '', updated_at_ms = ?7,
                    status_deployment = ?4",
                params![
                    slots.model,
                    version,
                    active.and_then(|s| s.sha256.clone()),
                    deployment,
                    standby.and_then(|s| s.version.clone()),
                    standby.and_then(|s| s.sha256.clone()),
                    now_ms(),
                    ModelStatus::Serving.as_str()
                ],
            )
            .map_err(db("activate"))?;
            tx.commit().map_err(db("activate"))
        })
    }

    /// Keeps a verified manifest next to its model file, so the slots can be
    /// restored (and re-verified) after a restart even when the desired state
    /// has moved on.
    pub fn save_manifest(&self, signed: &SignedManifest) -> Result<(), StoreError> {
        let sha = sentinel_proto::pb::ModelManifest::decode(signed.manifest.as_slice())
            .map(|m| m.sha256)
            .map_err(|e| StoreError::Encode { what: "manifest (its sha256 does not decode)", source: Box::new(e) })?;
        self.execute(
            "save manifest",
            "INSERT INTO manifests (sha256, signed) VALUES (?1, ?2) ON CONFLICT(sha256) DO UPDATE SET signed = ?2",
            params![sha, signed.encode_to_vec()],
        )?;
        Ok(())
    }

    /// The stored signed manifest of a model file (verify before use).
    pub fn manifest(&self, sha256: &str) -> Result<Option<SignedManifest>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn()
            .query_row("SELECT signed FROM manifests WHERE sha256 = ?1", [sha256], |r| r.get(0))
            .optional()
            .map_err(db("read manifest"))?;
        bytes.map(|b| SignedManifest::decode(b.as_slice())).transpose().map_err(|e| StoreError::Corrupt {
            what: "signed manifest",
            key: sha256.to_owned(),
            source: Box::new(e),
        })
    }

    /// Writes a model's blue/green slots as one row, atomically: the commit
    /// step of [`crate::slots::Slots`]. Durable when it returns.
    pub fn commit_slots(&self, slots: &Slots) -> Result<(), StoreError> {
        let pair = encode_slots(slots)?;
        self.execute(
            "commit slots",
            "INSERT INTO slots (model, pair, committed_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(model) DO UPDATE SET pair = ?2, committed_at_ms = ?3",
            params![slots.model, pair, now_ms()],
        )?;
        Ok(())
    }

    /// The last committed slots of a model.
    pub fn load_slots(&self, model: &str) -> Result<Option<Slots>, StoreError> {
        let text: Option<String> = self
            .conn()
            .query_row("SELECT pair FROM slots WHERE model = ?1", [model], |r| r.get(0))
            .optional()
            .map_err(db("load slots"))?;
        text.map(|t| serde_json::from_str(&t)).transpose().map_err(|e| StoreError::Corrupt {
            what: "slots row",
            key: model.to_owned(),
            source: Box::new(e),
        })
    }

    /// Deletes model files that are neither active, standby, in `keep` (the
    /// versions the current desired state names), nor the one most recently
    /// written among the rest (one more version to fall back on). Returns
    /// what was removed.
    pub fn gc(&self, keep: &HashSet<String>) -> Result<Vec<String>, StoreError> {
        let mut keep = keep.clone();
        for m in self.models()? {
            keep.extend(m.active_sha256);
            keep.extend(m.standby_sha256);
        }
        let dir = &self.models_dir;
        let entries =
            std::fs::read_dir(dir).map_err(|source| StoreError::Io { op: "read dir", path: dir.clone(), source })?;
        let mut others: Vec<(std::time::SystemTime, String, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let written = entry.metadata().and_then(|m| m.modified()).ok()?;
                let candidate = sentinel_proto::manifest::is_sha256_hex(&name) && !keep.contains(&name);
                candidate.then(|| (written, name, entry.path()))
            })
            .collect();
        // Newest first; the newest survives as the "one more".
        others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut removed = Vec::new();
        for (_, name, p) in others.into_iter().skip(1) {
            std::fs::remove_file(&p).map_err(|source| StoreError::Io { op: "remove", path: p, source })?;
            removed.push(name);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests;
