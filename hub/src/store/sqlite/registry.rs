//! Models and their versions.

use rusqlite::{OptionalExtension as _, Row, params};

use super::devices::bump_revision;
use super::{SqliteStore, db, is_constraint, json_col, u64_col};
use crate::records::DeploymentState;
use crate::store::columns::{hardware_column, hardware_from_column, sort_versions, tags_to_json};
use crate::store::{ModelFilter, ModelRecord, PublisherRecord, RegistryStore, StoreError, VersionRecord};

fn model_from_row(row: &Row<'_>) -> rusqlite::Result<ModelRecord> {
    Ok(ModelRecord {
        name: row.get(0)?,
        description: row.get(1)?,
        // Tags were checked before they were stored: text that no longer
        // parses is a corrupt row, refused rather than read as no tags.
        tags: json_col(2, &row.get::<_, String>(2)?)?,
        created_at_ms: row.get(3)?,
        updated_at_ms: row.get(4)?,
        require_publisher: row.get(5)?,
    })
}

const MODEL_COLS: &str = "name, description, tags, created_at_ms, updated_at_ms, require_publisher";

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

/// The versions active deployments name.
pub(super) fn deployed_versions_on(conn: &rusqlite::Connection) -> Result<Vec<VersionRecord>, StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {VERSION_COLS} FROM versions WHERE (model, version) IN
                 (SELECT model, version FROM deployments WHERE state = ?1)"
        ))
        .map_err(db("list deployed versions"))?;
    let rows =
        stmt.query_map([DeploymentState::Active.as_str()], version_from_row).map_err(db("list deployed versions"))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db("list deployed versions"))
}

impl RegistryStore for SqliteStore {
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
            require_publisher: false,
        })
    }

    fn update_model(
        &self,
        name: &str,
        description: Option<&str>,
        tags: Option<&[String]>,
        require_publisher: Option<bool>,
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError> {
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE models SET description = COALESCE(?2, description), tags = COALESCE(?3, tags),
                 require_publisher = COALESCE(?5, require_publisher), updated_at_ms = ?4 WHERE name = ?1",
                params![name, description, tags.map(tags_to_json), now_ms, require_publisher],
            )
            .map_err(db("update model"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("model {name}") });
        }
        conn.query_row(&format!("SELECT {MODEL_COLS} FROM models WHERE name = ?1"), [name], model_from_row)
            .map_err(db("read model"))
    }

    fn get_model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        self.conn()
            .query_row(&format!("SELECT {MODEL_COLS} FROM models WHERE name = ?1"), [name], model_from_row)
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
                "SELECT m.name, m.description, m.tags, m.created_at_ms, m.updated_at_ms, m.require_publisher FROM models m
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
            "UPDATE deployments SET state = ?3, updated_at_ms = ?2 WHERE model = ?1 AND state = ?4",
            params![name, now_ms, DeploymentState::Cancelled.as_str(), DeploymentState::Active.as_str()],
        )
        .map_err(db("cancel deployments"))?;
        bump_revision(&tx)?;
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

    fn insert_version(
        &self,
        v: &VersionRecord,
        extra_blobs: &[String],
        register: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin insert version"))?;
        if let Some(description) = register {
            tx.execute(
                "INSERT INTO models (name, description, tags, created_at_ms, updated_at_ms) VALUES (?1, ?2, '[]', ?3, ?3)
                 ON CONFLICT (name) DO NOTHING",
                params![v.model, description, v.created_at_ms],
            )
            .map_err(db("register model"))?;
        }
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
        sort_versions(&mut versions);
        Ok(versions)
    }

    fn update_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin update version"))?;
        let n = tx
            .execute(
                "UPDATE versions SET stage = ?3, hardware = ?4, manifest = ?5, signature = ?6, key_id = ?7
                 WHERE model = ?1 AND version = ?2",
                params![v.model, v.version, v.stage, hardware_column(&v.hardware), v.manifest, v.signature, v.key_id],
            )
            .map_err(db("update version"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("version {} of model {}", v.version, v.model) });
        }
        bump_revision(&tx)?;
        tx.commit().map_err(db("commit update version"))
    }

    fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT sha256 FROM versions UNION SELECT sha256 FROM version_blobs")
            .map_err(db("list referenced blobs"))?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(db("list referenced blobs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list referenced blobs"))
    }

    fn publishers(&self) -> Result<Vec<PublisherRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, key_id, public_key, created_at_ms, created_by FROM publishers ORDER BY name")
            .map_err(db("list publishers"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PublisherRecord {
                    name: r.get(0)?,
                    key_id: r.get(1)?,
                    public_key: r.get(2)?,
                    created_at_ms: r.get(3)?,
                    created_by: r.get(4)?,
                })
            })
            .map_err(db("list publishers"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list publishers"))
    }

    fn add_publisher(&self, p: &PublisherRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO publishers (name, key_id, public_key, created_at_ms, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.name, p.key_id, p.public_key, p.created_at_ms, p.created_by],
            )
            .map_err(|e| {
                if is_constraint(&e) {
                    StoreError::Conflict { what: format!("publisher {} or its key {}", p.name, p.key_id) }
                } else {
                    db("insert publisher")(e)
                }
            })?;
        Ok(())
    }

    fn remove_publisher(&self, name: &str) -> Result<(), StoreError> {
        let n =
            self.conn().execute("DELETE FROM publishers WHERE name = ?1", [name]).map_err(db("remove publisher"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("publisher {name}") });
        }
        Ok(())
    }
}
