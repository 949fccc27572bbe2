//! [`MetadataStore`] on SQLite: one file, WAL mode, schema migrations driven
//! by `PRAGMA user_version`.
//!
//! One connection behind a mutex. The hub's metadata traffic is small (a few
//! rows per request) and SQLite serialises writers anyway; a pool would add
//! moving parts without adding throughput.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use super::{
    AuditEntry, DeploymentDevice, DeploymentRecord, DeviceEvent, DeviceRecord, HaltOutcome, MetadataStore, ModelFilter,
    ModelRecord, NewDeployment, StoreError, TokenRecord, VersionRecord,
};

/// Each entry moves the schema from version `i` to `i + 1`. Never edit an
/// entry that has shipped; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the registry.
    "CREATE TABLE models (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
     );
     CREATE TABLE versions (
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        stage TEXT NOT NULL,
        hardware TEXT NOT NULL,
        manifest BLOB NOT NULL,
        signature BLOB NOT NULL,
        key_id TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY (model, version)
     );
     CREATE TABLE version_blobs (
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
     );
     CREATE TABLE deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        replaces INTEGER
     );
     CREATE INDEX deployments_model_state ON deployments(model, state);
     CREATE TABLE tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
     );",
    // 2: devices and the fleet-wide desired-state revision.
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        labels TEXT NOT NULL,
        hardware TEXT NOT NULL DEFAULT '[]',
        agent_version TEXT NOT NULL DEFAULT '',
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        last_seen_ms INTEGER,
        hello TEXT,
        report TEXT
     );
     CREATE TABLE device_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        reason TEXT NOT NULL
     );
     CREATE INDEX device_events_device ON device_events(device_id, id);
     CREATE TABLE fleet (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL
     );
     INSERT INTO fleet (id, revision) VALUES (1, 1);",
    // 3: rollout policies, halt thresholds and halts; when each report arrived.
    "ALTER TABLE deployments ADD COLUMN policy TEXT;
     ALTER TABLE deployments ADD COLUMN halt_fraction REAL NOT NULL DEFAULT 0.2;
     ALTER TABLE deployments ADD COLUMN halt_count INTEGER;
     ALTER TABLE deployments ADD COLUMN halt_reason TEXT;
     ALTER TABLE devices ADD COLUMN report_at_ms INTEGER;",
    // 4: each device's last state per deployment, kept when it moves on, so
    // halted and superseded deployments keep their rollup; filled from the
    // reports stored so far.
    "CREATE TABLE deployment_devices (
        deployment_id INTEGER NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (deployment_id, device_id)
     ) WITHOUT ROWID;
     INSERT INTO deployment_devices (deployment_id, device_id, version, state, detail, updated_ms)
     SELECT json_extract(m.value, '$.deployment_id'), d.id, json_extract(m.value, '$.version'),
            json_extract(m.value, '$.state'), COALESCE(json_extract(m.value, '$.detail'), ''),
            COALESCE(d.report_at_ms, d.last_seen_ms, 0)
     FROM devices AS d,
          json_each(CASE WHEN json_valid(d.report) THEN d.report ELSE '{}' END, '$.models') AS m
     WHERE json_extract(m.value, '$.deployment_id') IN (SELECT id FROM deployments)
       AND json_type(m.value, '$.version') = 'text' AND json_type(m.value, '$.state') = 'text';",
    MIGRATION_WAVES,
];

/// 5: staged rollouts.
const MIGRATION_WAVES: &str = "ALTER TABLE deployments ADD COLUMN waves TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE deployments ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;";

/// Records each model of a report (`?3`, JSON) from device `?1` at `?2`
/// under the deployment it names. Models naming no stored deployment (0 for
/// none, or an id this hub never issued) are skipped.
const RECORD_DEPLOYMENT_STATES: &str =
    "INSERT INTO deployment_devices (deployment_id, device_id, version, state, detail, updated_ms)
         SELECT json_extract(m.value, '$.deployment_id'), ?1, json_extract(m.value, '$.version'),
                json_extract(m.value, '$.state'), COALESCE(json_extract(m.value, '$.detail'), ''), ?2
         FROM json_each(?3, '$.models') AS m
         WHERE json_extract(m.value, '$.deployment_id') IN (SELECT id FROM deployments)
           AND json_type(m.value, '$.version') = 'text' AND json_type(m.value, '$.state') = 'text'
         ON CONFLICT (deployment_id, device_id) DO UPDATE SET
             version = excluded.version, state = excluded.state, detail = excluded.detail,
             updated_ms = excluded.updated_ms";

/// The metadata store on one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Database { op, source }
}

/// Hardware tags are stored as `,a,b,` so a tag filter is one `LIKE`.
fn hardware_column(tags: &[String]) -> String {
    if tags.is_empty() { String::new() } else { format!(",{},", tags.join(",")) }
}

fn hardware_from_column(col: &str) -> Vec<String> {
    col.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn tags_from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn tags_to_json(tags: &[String]) -> String {
    serde_json::Value::from(tags.to_vec()).to_string()
}

fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn model_from_row(row: &Row<'_>) -> rusqlite::Result<ModelRecord> {
    Ok(ModelRecord {
        name: row.get(0)?,
        description: row.get(1)?,
        tags: tags_from_json(&row.get::<_, String>(2)?),
        created_at_ms: row.get(3)?,
        updated_at_ms: row.get(4)?,
    })
}

const VERSION_COLS: &str =
    "model, version, sha256, size, stage, hardware, manifest, signature, key_id, created_at_ms, created_by";

fn version_from_row(row: &Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        model: row.get(0)?,
        version: row.get(1)?,
        sha256: row.get(2)?,
        size: u64_col(row, 3)?,
        stage: row.get(4)?,
        hardware: hardware_from_column(&row.get::<_, String>(5)?),
        manifest: row.get(6)?,
        signature: row.get(7)?,
        key_id: row.get(8)?,
        created_at_ms: row.get(9)?,
        created_by: row.get(10)?,
    })
}

const DEPLOYMENT_COLS: &str = "id, model, version, target, kind, state, created_by, created_at_ms, updated_at_ms, \
     replaces, policy, halt_fraction, halt_count, halt_reason, waves, wave";

fn deployment_from_row(row: &Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: row.get(0)?,
        model: row.get(1)?,
        version: row.get(2)?,
        target: row.get(3)?,
        kind: row.get(4)?,
        state: row.get(5)?,
        created_by: row.get(6)?,
        created_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        replaces: row.get(9)?,
        // The policy was validated before it was stored; a row this hub
        // cannot read any more deploys with the agent's defaults.
        policy: row.get::<_, Option<String>>(10)?.and_then(|t| serde_json::from_str(&t).ok()),
        halt_fraction: row.get(11)?,
        halt_count: row.get(12)?,
        halt_reason: row.get(13)?,
        waves: serde_json::from_str(&row.get::<_, String>(14)?).unwrap_or_default(),
        wave: row.get(15)?,
    })
}

/// Marks the active deployments of `model` and `target` older than
/// `below` (all, if `None`) as `replaced_state`.
fn supersede_in(
    tx: &rusqlite::Transaction<'_>,
    model: &str,
    target: &str,
    below: Option<i64>,
    replaced_state: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE deployments SET state = ?3, updated_at_ms = ?4
         WHERE model = ?1 AND target = ?2 AND state = 'active' AND (?5 IS NULL OR id < ?5)",
        params![model, target, replaced_state, now_ms, below],
    )
    .map_err(db("supersede deployments"))?;
    Ok(())
}

/// Supersedes the active deployments of the same model and target (unless
/// `d` starts with a partial wave: they serve the devices outside it) and
/// stores `d` as active, inside the caller's transaction.
fn insert_deployment_in(
    tx: &rusqlite::Transaction<'_>,
    d: &NewDeployment,
    replaced_state: &str,
    now_ms: i64,
) -> Result<DeploymentRecord, StoreError> {
    if d.waves.first().is_none_or(|&p| p >= 100) {
        supersede_in(tx, &d.model, &d.target, None, replaced_state, now_ms)?;
    }
    let waves = serde_json::to_string(&d.waves).unwrap_or_else(|_| "[]".into());
    let policy = d.policy.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default());
    tx.execute(
        "INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms, updated_at_ms,
             replaces, policy, halt_fraction, halt_count, waves)
         VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            d.model,
            d.version,
            d.target,
            d.kind,
            d.created_by,
            now_ms,
            d.replaces,
            policy,
            d.halt_fraction,
            d.halt_count,
            waves
        ],
    )
    .map_err(db("insert deployment"))?;
    Ok(DeploymentRecord {
        id: tx.last_insert_rowid(),
        model: d.model.clone(),
        version: d.version.clone(),
        target: d.target.clone(),
        kind: d.kind.clone(),
        state: "active".into(),
        created_by: d.created_by.clone(),
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        replaces: d.replaces,
        policy: d.policy.clone(),
        halt_fraction: d.halt_fraction,
        halt_count: d.halt_count,
        halt_reason: None,
        waves: d.waves.clone(),
        wave: 0,
    })
}

const TOKEN_COLS: &str = "id, name, role, secret_sha256, created_at_ms, created_by, revoked";

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role: row.get(2)?,
        secret_sha256: row.get(3)?,
        created_at_ms: row.get(4)?,
        created_by: row.get(5)?,
        revoked: row.get::<_, i64>(6)? != 0,
    })
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, switches it to WAL
    /// and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        // NORMAL is durable across power loss in WAL mode except for the last
        // transactions before the loss, which is what a registry can afford;
        // blob files are fsynced separately before their rows are written.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        Self::migrate(&mut conn, path)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
        let found: i64 =
            conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("read user_version"))?;
        let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
        if found > known {
            return Err(StoreError::SchemaTooNew { path: path.display().to_string(), found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
            let tx = conn.transaction().map_err(db("begin migration"))?;
            tx.execute_batch(sql).map_err(db("apply migration"))?;
            tx.pragma_update(None, "user_version", i + 1).map_err(db("set user_version"))?;
            tx.commit().map_err(db("commit migration"))?;
        }
        Ok(())
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

impl MetadataStore for SqliteStore {
    fn create_model(
        &self,
        name: &str,
        description: &str,
        tags: &[String],
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO models (name, description, tags, created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
            params![name, description, tags_to_json(tags), now_ms],
        )
        .map_err(|e| {
            if is_constraint(&e) {
                StoreError::Conflict { what: format!("model {name}") }
            } else {
                db("insert model")(e)
            }
        })?;
        Ok(ModelRecord {
            name: name.to_owned(),
            description: description.to_owned(),
            tags: tags.to_vec(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        })
    }

    fn update_model(
        &self,
        name: &str,
        description: Option<&str>,
        tags: Option<&[String]>,
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError> {
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE models SET description = COALESCE(?2, description), tags = COALESCE(?3, tags),
                 updated_at_ms = ?4 WHERE name = ?1",
                params![name, description, tags.map(tags_to_json), now_ms],
            )
            .map_err(db("update model"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("model {name}") });
        }
        conn.query_row(
            "SELECT name, description, tags, created_at_ms, updated_at_ms FROM models WHERE name = ?1",
            [name],
            model_from_row,
        )
        .map_err(db("read model"))
    }

    fn get_model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT name, description, tags, created_at_ms, updated_at_ms FROM models WHERE name = ?1",
                [name],
                model_from_row,
            )
            .optional()
            .map_err(db("read model"))
    }

    fn list_models(&self, f: &ModelFilter) -> Result<(Vec<ModelRecord>, u64), StoreError> {
        let conn = self.conn();
        let where_clause = "WHERE (?1 IS NULL OR instr(m.name, ?1) > 0)
              AND (?2 IS NULL OR EXISTS (SELECT 1 FROM versions v WHERE v.model = m.name AND v.stage = ?2))
              AND (?3 IS NULL OR EXISTS (SELECT 1 FROM versions v WHERE v.model = m.name
                   AND (v.hardware = '' OR instr(v.hardware, ',' || ?3 || ',') > 0)))";
        let args = params![f.name, f.stage, f.hardware, f.limit, f.offset];
        let total: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM models m {where_clause}"), &args[..3], |r| r.get(0))
            .map_err(db("count models"))?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT m.name, m.description, m.tags, m.created_at_ms, m.updated_at_ms FROM models m
                 {where_clause} ORDER BY m.name LIMIT ?4 OFFSET ?5"
            ))
            .map_err(db("list models"))?;
        let rows = stmt.query_map(args, model_from_row).map_err(db("list models"))?;
        let models = rows.collect::<Result<Vec<_>, _>>().map_err(db("list models"))?;
        Ok((models, u64::try_from(total).unwrap_or(0)))
    }

    fn delete_model(&self, name: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin delete"))?;
        let mut candidates: Vec<String> = {
            let mut stmt = tx
                .prepare(
                    "SELECT sha256 FROM versions WHERE model = ?1
                     UNION SELECT sha256 FROM version_blobs WHERE model = ?1",
                )
                .map_err(db("list blobs"))?;
            let rows = stmt.query_map([name], |r| r.get(0)).map_err(db("list blobs"))?;
            rows.collect::<Result<_, _>>().map_err(db("list blobs"))?
        };
        let n = tx.execute("DELETE FROM models WHERE name = ?1", [name]).map_err(db("delete model"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("model {name}") });
        }
        tx.execute(
            "UPDATE deployments SET state = 'cancelled', updated_at_ms = ?2 WHERE model = ?1 AND state = 'active'",
            params![name, now_ms],
        )
        .map_err(db("cancel deployments"))?;
        // Identical bytes may be registered under another model: keep those.
        candidates.retain(|sha| {
            let still: Result<bool, _> = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE sha256 = ?1)
                     OR EXISTS (SELECT 1 FROM version_blobs WHERE sha256 = ?1)",
                [sha],
                |r| r.get(0),
            );
            matches!(still, Ok(false))
        });
        tx.commit().map_err(db("commit delete"))?;
        Ok(candidates)
    }

    fn insert_version(&self, v: &VersionRecord, extra_blobs: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin insert version"))?;
        tx.execute(
            &format!("INSERT INTO versions ({VERSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                v.model,
                v.version,
                v.sha256,
                i64::try_from(v.size).unwrap_or(i64::MAX),
                v.stage,
                hardware_column(&v.hardware),
                v.manifest,
                v.signature,
                v.key_id,
                v.created_at_ms,
                v.created_by
            ],
        )
        .map_err(|e| {
            if is_constraint(&e) {
                StoreError::Conflict { what: format!("version {} of model {}", v.version, v.model) }
            } else {
                db("insert version")(e)
            }
        })?;
        for d in extra_blobs {
            tx.execute(
                "INSERT INTO version_blobs (model, version, sha256) VALUES (?1, ?2, ?3)",
                [&v.model, &v.version, d],
            )
            .map_err(db("add version blob"))?;
        }
        tx.commit().map_err(db("commit insert version"))
    }

    fn get_version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {VERSION_COLS} FROM versions WHERE model = ?1 AND version = ?2"),
                [model, version],
                version_from_row,
            )
            .optional()
            .map_err(db("read version"))
    }

    fn list_versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {VERSION_COLS} FROM versions WHERE model = ?1 ORDER BY created_at_ms, version"))
            .map_err(db("list versions"))?;
        let rows = stmt.query_map([model], version_from_row).map_err(db("list versions"))?;
        let mut versions = rows.collect::<Result<Vec<_>, _>>().map_err(db("list versions"))?;
        // Newest semver first; unparsable versions cannot be stored, but sort them last anyway.
        versions.sort_by(|a, b| {
            let pa = semver::Version::parse(&a.version).ok();
            let pb = semver::Version::parse(&b.version).ok();
            pb.cmp(&pa)
        });
        Ok(versions)
    }

    fn update_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE versions SET stage = ?3, hardware = ?4, manifest = ?5, signature = ?6, key_id = ?7
                 WHERE model = ?1 AND version = ?2",
                params![v.model, v.version, v.stage, hardware_column(&v.hardware), v.manifest, v.signature, v.key_id],
            )
            .map_err(db("update version"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("version {} of model {}", v.version, v.model) });
        }
        Ok(())
    }

    fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT sha256 FROM versions UNION SELECT sha256 FROM version_blobs")
            .map_err(db("list referenced blobs"))?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(db("list referenced blobs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list referenced blobs"))
    }

    fn insert_deployment(&self, d: &NewDeployment, now_ms: i64) -> Result<DeploymentRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin deployment"))?;
        let replaced_state = if d.kind == "rollback" { "rolled_back" } else { "superseded" };
        let record = insert_deployment_in(&tx, d, replaced_state, now_ms)?;
        tx.commit().map_err(db("commit deployment"))?;
        Ok(record)
    }

    fn get_deployment(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        self.conn()
            .query_row(&format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = ?1"), [id], deployment_from_row)
            .optional()
            .map_err(db("read deployment"))
    }

    fn list_deployments(
        &self,
        model: Option<&str>,
        state: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<DeploymentRecord>, u64), StoreError> {
        let conn = self.conn();
        let where_clause = "WHERE (?1 IS NULL OR model = ?1) AND (?2 IS NULL OR state = ?2)";
        let total: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM deployments {where_clause}"), params![model, state], |r| r.get(0))
            .map_err(db("count deployments"))?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DEPLOYMENT_COLS} FROM deployments {where_clause} ORDER BY id DESC LIMIT ?3 OFFSET ?4"
            ))
            .map_err(db("list deployments"))?;
        let rows = stmt
            .query_map(params![model, state, limit, offset], deployment_from_row)
            .map_err(db("list deployments"))?;
        let list = rows.collect::<Result<Vec<_>, _>>().map_err(db("list deployments"))?;
        Ok((list, u64::try_from(total).unwrap_or(0)))
    }

    fn active_deployments(&self, model: &str) -> Result<Vec<DeploymentRecord>, StoreError> {
        Ok(self.list_deployments(Some(model), Some("active"), u32::MAX, 0)?.0)
    }

    fn set_deployment_state(&self, id: i64, state: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute("UPDATE deployments SET state = ?2, updated_at_ms = ?3 WHERE id = ?1", params![id, state, now_ms])
            .map_err(db("update deployment"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("deployment {id}") });
        }
        Ok(())
    }

    fn halt_deployment(
        &self,
        id: i64,
        reason: &str,
        restore: Option<&NewDeployment>,
        now_ms: i64,
    ) -> Result<HaltOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin halt"))?;
        let n = tx
            .execute(
                "UPDATE deployments SET state = 'halted', halt_reason = ?2, updated_at_ms = ?3
                 WHERE id = ?1 AND state = 'active'",
                params![id, reason, now_ms],
            )
            .map_err(db("halt deployment"))?;
        if n == 0 {
            return Ok(HaltOutcome::NotActive);
        }
        let restored = restore.map(|d| insert_deployment_in(&tx, d, "superseded", now_ms).map(Box::new)).transpose()?;
        tx.commit().map_err(db("commit halt"))?;
        Ok(HaltOutcome::Halted { restored })
    }

    fn advance_wave(&self, id: i64, from: u32, now_ms: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin widening"))?;
        let n = tx
            .execute(
                "UPDATE deployments SET wave = wave + 1, updated_at_ms = ?3
                 WHERE id = ?1 AND state = 'active' AND wave = ?2 AND wave + 1 < json_array_length(waves)",
                params![id, from, now_ms],
            )
            .map_err(db("widen deployment"))?;
        if n == 0 {
            return Ok(None);
        }
        let d = tx
            .query_row(&format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = ?1"), [id], deployment_from_row)
            .map_err(db("read deployment"))?;
        if crate::rollout::waves::current_percent(&d.waves, d.wave) >= 100 {
            supersede_in(&tx, &d.model, &d.target, Some(d.id), "superseded", now_ms)?;
        }
        tx.commit().map_err(db("commit widening"))?;
        Ok(Some(d))
    }

    fn insert_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<TokenRecord, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO tokens (name, role, secret_sha256, created_at_ms, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, role, secret_sha256, now_ms, created_by],
        )
        .map_err(db("insert token"))?;
        Ok(TokenRecord {
            id: conn.last_insert_rowid(),
            name: name.to_owned(),
            role: role.to_owned(),
            secret_sha256: secret_sha256.to_owned(),
            created_at_ms: now_ms,
            created_by: created_by.to_owned(),
            revoked: false,
        })
    }

    fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE secret_sha256 = ?1 AND revoked = 0"),
                [secret_sha256],
                token_from_row,
            )
            .optional()
            .map_err(db("find token"))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY id")).map_err(db("list tokens"))?;
        let rows = stmt.query_map([], token_from_row).map_err(db("list tokens"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list tokens"))
    }

    fn revoke_token(&self, id: i64) -> Result<(), StoreError> {
        let n = self.conn().execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id]).map_err(db("revoke token"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("token {id}") });
        }
        Ok(())
    }

    fn count_tokens(&self) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn().query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0)).map_err(db("count tokens"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO audit (at_ms, actor, role, action, status, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![e.at_ms, e.actor, e.role, e.action, e.status, e.outcome, e.detail],
            )
            .map_err(db("append audit"))?;
        Ok(())
    }

    fn list_audit(&self, limit: u32, offset: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at_ms, actor, role, action, status, outcome, detail FROM audit
                 ORDER BY id DESC LIMIT ?1 OFFSET ?2",
            )
            .map_err(db("list audit"))?;
        let rows = stmt
            .query_map([limit, offset], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    actor: r.get(2)?,
                    role: r.get(3)?,
                    action: r.get(4)?,
                    status: r.get(5)?,
                    outcome: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(db("list audit"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list audit"))
    }
}

const DEVICE_COLS: &str =
    "id, labels, hardware, agent_version, created_at_ms, created_by, last_seen_ms, hello, report, report_at_ms";

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let json = |idx: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        Ok(row.get::<_, Option<String>>(idx)?.and_then(|t| serde_json::from_str(&t).ok()))
    };
    Ok(DeviceRecord {
        id: row.get(0)?,
        labels: serde_json::from_str(&row.get::<_, String>(1)?).unwrap_or_default(),
        hardware: serde_json::from_str(&row.get::<_, String>(2)?).unwrap_or_default(),
        agent_version: row.get(3)?,
        created_at_ms: row.get(4)?,
        created_by: row.get(5)?,
        last_seen_ms: row.get(6)?,
        hello: json(7)?,
        report: json(8)?,
        report_at_ms: row.get(9)?,
    })
}

impl SqliteStore {
    fn device_by(&self, column: &str, value: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.conn()
            .query_row(&format!("SELECT {DEVICE_COLS} FROM devices WHERE {column} = ?1"), [value], device_from_row)
            .optional()
            .map_err(db("read device"))
    }
}

impl super::DeviceStore for SqliteStore {
    fn enroll_device(
        &self,
        id: &str,
        labels: &std::collections::BTreeMap<String, String>,
        token_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<DeviceRecord, StoreError> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        self.conn()
            .execute(
                "INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, token_sha256, labels_json, now_ms, created_by],
            )
            .map_err(|e| {
                if is_constraint(&e) {
                    StoreError::Conflict { what: format!("device {id}") }
                } else {
                    db("enroll device")(e)
                }
            })?;
        self.device_by("id", id)?.ok_or_else(|| StoreError::NotFound { what: format!("device {id}") })
    }

    fn device_by_token(&self, token_sha256: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.device_by("token_sha256", token_sha256)
    }

    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.device_by("id", id)
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {DEVICE_COLS} FROM devices ORDER BY id")).map_err(db("list devices"))?;
        let rows = stmt.query_map([], device_from_row).map_err(db("list devices"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list devices"))
    }

    fn remove_device(&self, id: &str) -> Result<(), StoreError> {
        let n = self.conn().execute("DELETE FROM devices WHERE id = ?1", [id]).map_err(db("remove device"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("device {id}") });
        }
        Ok(())
    }

    fn record_hello(
        &self,
        id: &str,
        hello: &serde_json::Value,
        hardware: &[String],
        agent_version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE devices SET hello = ?2, hardware = ?3, agent_version = ?4, last_seen_ms = ?5 WHERE id = ?1",
                params![
                    id,
                    hello.to_string(),
                    serde_json::Value::from(hardware.to_vec()).to_string(),
                    agent_version,
                    now_ms
                ],
            )
            .map_err(db("record hello"))?;
        Ok(())
    }

    fn record_report(
        &self,
        id: &str,
        report: &serde_json::Value,
        events: &[DeviceEvent],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin report"))?;
        tx.execute(
            "UPDATE devices SET report = ?2, last_seen_ms = ?3, report_at_ms = ?3 WHERE id = ?1",
            params![id, report.to_string(), now_ms],
        )
        .map_err(db("record report"))?;
        for e in events {
            tx.execute(
                "INSERT INTO device_events (device_id, at_ms, kind, model, version, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, e.at_ms, e.kind, e.model, e.version, e.reason],
            )
            .map_err(db("record event"))?;
        }
        tx.execute(RECORD_DEPLOYMENT_STATES, params![id, now_ms, report.to_string()])
            .map_err(db("record deployment states"))?;
        tx.commit().map_err(db("commit report"))
    }

    fn touch_device(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE devices SET last_seen_ms = ?2 WHERE id = ?1", params![id, now_ms])
            .map_err(db("touch device"))?;
        Ok(())
    }

    fn deployment_devices(&self, deployment_id: i64) -> Result<Vec<DeploymentDevice>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT device_id, version, state, detail, updated_ms FROM deployment_devices
                 WHERE deployment_id = ?1 ORDER BY device_id",
            )
            .map_err(db("list deployment devices"))?;
        let rows = stmt
            .query_map([deployment_id], |r| {
                Ok(DeploymentDevice {
                    device_id: r.get(0)?,
                    version: r.get(1)?,
                    state: r.get(2)?,
                    detail: r.get(3)?,
                    updated_ms: r.get(4)?,
                })
            })
            .map_err(db("list deployment devices"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list deployment devices"))
    }

    fn device_events(&self, id: &str, limit: u32) -> Result<Vec<DeviceEvent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT at_ms, kind, model, version, reason FROM device_events WHERE device_id = ?1
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(db("list events"))?;
        let rows = stmt
            .query_map(params![id, limit], |r| {
                Ok(DeviceEvent {
                    at_ms: r.get(0)?,
                    kind: r.get(1)?,
                    model: r.get(2)?,
                    version: r.get(3)?,
                    reason: r.get(4)?,
                })
            })
            .map_err(db("list events"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list events"))
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let r: i64 = self
            .conn()
            .query_row("SELECT revision FROM fleet WHERE id = 1", [], |r| r.get(0))
            .map_err(db("read revision"))?;
        Ok(u64::try_from(r).unwrap_or(0))
    }

    fn next_revision(&self) -> Result<u64, StoreError> {
        let r: i64 = self
            .conn()
            .query_row("UPDATE fleet SET revision = revision + 1 WHERE id = 1 RETURNING revision", [], |r| r.get(0))
            .map_err(db("bump revision"))?;
        Ok(u64::try_from(r).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeviceStore;

    fn version(model: &str, version: &str, sha: &str) -> VersionRecord {
        VersionRecord {
            model: model.into(),
            version: version.into(),
            sha256: sha.into(),
            size: 10,
            stage: "staging".into(),
            hardware: vec!["aarch64".into()],
            manifest: vec![1, 2, 3],
            signature: vec![4],
            key_id: "k".into(),
            created_at_ms: 1,
            created_by: "t".into(),
        }
    }

    #[test]
    fn migrations_set_user_version_and_reopen_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let store = SqliteStore::open(&path).expect("open");
        assert_eq!(store.schema_version().expect("version"), i64::try_from(MIGRATIONS.len()).expect("len"));
        store.create_model("m", "", &[], 1).expect("create");
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert!(store.get_model("m").expect("get").is_some());
        let mode: String = store.conn().pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("journal_mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_database_from_a_newer_hub_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        drop(SqliteStore::open(&path).expect("open"));
        Connection::open(&path).expect("raw").pragma_update(None, "user_version", 99).expect("bump");
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn filters_by_stage_and_hardware() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        store.create_model("a", "", &[], 1).expect("a");
        store.create_model("b", "", &[], 1).expect("b");
        store.insert_version(&version("a", "1.0.0", "x"), &[]).expect("v");
        let filter = |stage: Option<&str>, hw: Option<&str>| {
            let f = ModelFilter {
                stage: stage.map(Into::into),
                hardware: hw.map(Into::into),
                limit: 10,
                ..ModelFilter::default()
            };
            store.list_models(&f).expect("list").0.into_iter().map(|m| m.name).collect::<Vec<_>>()
        };
        assert_eq!(filter(None, None), ["a", "b"]);
        assert_eq!(filter(Some("staging"), None), ["a"]);
        assert!(filter(Some("production"), None).is_empty());
        assert_eq!(filter(None, Some("aarch64")), ["a"]);
        assert!(filter(None, Some("aarch")).is_empty(), "tags match whole, not by prefix");
    }

    fn new_deployment(version: &str, kind: &str) -> NewDeployment {
        NewDeployment {
            model: "a".into(),
            version: version.into(),
            target: "site=x".into(),
            kind: kind.into(),
            created_by: "t".into(),
            replaces: None,
            policy: None,
            halt_fraction: 0.2,
            halt_count: Some(3),
            waves: Vec::new(),
        }
    }

    #[test]
    fn a_deployment_halts_once_and_restores_in_the_same_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        let d = store.insert_deployment(&new_deployment("2.0.0", "deploy"), 1).expect("insert");
        let restore = new_deployment("1.0.0", "rollback");
        let HaltOutcome::Halted { restored: Some(r) } =
            store.halt_deployment(d.id, "too many failed", Some(&restore), 2).expect("halt")
        else {
            panic!("the active deployment halts and the earlier version comes back");
        };
        let halted = store.get_deployment(d.id).expect("get").expect("exists");
        assert_eq!((halted.state.as_str(), halted.halt_reason.as_deref()), ("halted", Some("too many failed")));
        assert_eq!(halted.halt_count, Some(3));
        assert_eq!(store.active_deployments("a").expect("active"), [*r]);
        assert_eq!(store.halt_deployment(d.id, "again", None, 3).expect("halt"), HaltOutcome::NotActive);
        assert_eq!(store.active_deployments("a").expect("active").len(), 1);
    }

    fn report_naming(deployments: &[(i64, &str)]) -> serde_json::Value {
        let models: Vec<serde_json::Value> = deployments
            .iter()
            .map(|(id, state)| {
                serde_json::json!({"name": format!("m{id}"), "version": "2.0.0", "state": state,
                    "detail": format!("why {state}"), "deployment_id": id})
            })
            .collect();
        serde_json::json!({"device_id": "d", "applied_revision": 1, "events": [], "models": models})
    }

    #[test]
    fn each_devices_last_state_per_deployment_outlives_later_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        store.enroll_device("d", &Default::default(), "t", "t", 1).expect("enroll");
        let first = store.insert_deployment(&new_deployment("2.0.0", "deploy"), 1).expect("insert").id;
        store.record_report("d", &report_naming(&[(first, "canary"), (0, "serving"), (99, "x")]), &[], 5).expect("r");
        let rows = store.deployment_devices(first).expect("rows");
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].state.as_str(), rows[0].detail.as_str(), rows[0].updated_ms), ("canary", "why canary", 5));
        assert!(store.deployment_devices(99).expect("rows").is_empty(), "a deployment this hub never issued");

        store.record_report("d", &report_naming(&[(first, "rolled_back")]), &[], 6).expect("r");
        let second = store.insert_deployment(&new_deployment("1.0.0", "rollback"), 7).expect("insert").id;
        store.record_report("d", &report_naming(&[(second, "serving")]), &[], 8).expect("r");
        let rows = store.deployment_devices(first).expect("rows");
        assert_eq!((rows[0].state.as_str(), rows[0].updated_ms), ("rolled_back", 6), "kept after moving on");
        assert_eq!(store.deployment_devices(second).expect("rows")[0].state, "serving");

        store.remove_device("d").expect("remove");
        assert!(store.deployment_devices(first).expect("rows").is_empty(), "rows go with the device");
    }

    #[test]
    fn reports_stored_before_schema_4_fill_the_per_deployment_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        {
            let mut conn = Connection::open(&path).expect("raw");
            let tx = conn.transaction().expect("tx");
            for sql in &MIGRATIONS[..3] {
                tx.execute_batch(sql).expect("old migration");
            }
            tx.pragma_update(None, "user_version", 3).expect("user_version");
            tx.execute_batch(
                "INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms, updated_at_ms)
                 VALUES ('m1', '2.0.0', 'site=x', 'deploy', 'active', 't', 1, 1);
                 INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by, report_at_ms, report)
                 VALUES ('d', 't', '{}', 1, 't', 42, 'not json'), ('e', 'u', '{}', 1, 't', 43, NULL);",
            )
            .expect("old rows");
            tx.execute(
                "INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by, report_at_ms, report)
                 VALUES ('f', 'v', '{}', 1, 't', 44, ?1)",
                [report_naming(&[(1, "canary"), (2, "serving")]).to_string()],
            )
            .expect("old report");
            tx.commit().expect("commit");
        }
        let store = SqliteStore::open(&path).expect("migrate");
        let rows = store.deployment_devices(1).expect("rows");
        assert_eq!(rows.len(), 1, "a corrupt or missing report is skipped, not fatal: {rows:?}");
        assert_eq!((rows[0].device_id.as_str(), rows[0].state.as_str(), rows[0].updated_ms), ("f", "canary", 44));
    }

    #[test]
    fn delete_keeps_blobs_shared_with_other_models() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        store.create_model("a", "", &[], 1).expect("a");
        store.create_model("b", "", &[], 1).expect("b");
        store.insert_version(&version("a", "1.0.0", "shared"), &[]).expect("v");
        store.insert_version(&version("a", "2.0.0", "only-a"), &[]).expect("v");
        store.insert_version(&version("b", "1.0.0", "shared"), &[]).expect("v");
        let mut freed = store.delete_model("a", 2).expect("delete");
        freed.sort();
        assert_eq!(freed, ["only-a"]);
        assert!(store.get_version("a", "1.0.0").expect("get").is_none(), "versions cascade");
    }
}
