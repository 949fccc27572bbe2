//! Models and their versions.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::devices::bump_revision;
use super::{PostgresStore, block, db, i64_of, is_unique_violation, json_col, u64_col};
use crate::records::DeploymentState;
use crate::store::columns::{hardware_column, hardware_from_column, sort_versions, tags_to_json};
use crate::store::{ModelFilter, ModelRecord, PublisherRecord, RegistryStore, StoreError, VersionRecord};

const MODEL_COLS: &str = "name, description, tags, created_at_ms, updated_at_ms, require_publisher";

fn model_from_row(row: &Row) -> Result<ModelRecord, StoreError> {
    let op = "read model";
    Ok(ModelRecord {
        name: row.try_get("name").map_err(db(op))?,
        description: row.try_get("description").map_err(db(op))?,
        tags: json_col(op, row, "tags")?,
        created_at_ms: row.try_get("created_at_ms").map_err(db(op))?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(db(op))?,
        require_publisher: row.try_get("require_publisher").map_err(db(op))?,
    })
}

pub(super) const VERSION_COLS: &str =
    "model, version, sha256, size, stage, hardware, manifest, signature, key_id, created_at_ms, created_by";

pub(super) fn version_from_row(row: &Row) -> Result<VersionRecord, StoreError> {
    let op = "read version";
    Ok(VersionRecord {
        model: row.try_get("model").map_err(db(op))?,
        version: row.try_get("version").map_err(db(op))?,
        sha256: row.try_get("sha256").map_err(db(op))?,
        size: u64_col(op, row, "size")?,
        stage: row.try_get("stage").map_err(db(op))?,
        hardware: hardware_from_column(row.try_get("hardware").map_err(db(op))?),
        manifest: row.try_get("manifest").map_err(db(op))?,
        signature: row.try_get("signature").map_err(db(op))?,
        key_id: row.try_get("key_id").map_err(db(op))?,
        created_at_ms: row.try_get("created_at_ms").map_err(db(op))?,
        created_by: row.try_get("created_by").map_err(db(op))?,
    })
}

/// The versions active deployments name.
pub(super) async fn deployed_versions(c: &impl GenericClient) -> Result<Vec<VersionRecord>, StoreError> {
    c.query(
        &format!(
            "SELECT {VERSION_COLS} FROM versions WHERE (model, version) IN
                 (SELECT model, version FROM deployments WHERE state = $1)"
        ),
        &[&DeploymentState::Active.as_str()],
    )
    .await
    .map_err(db("list deployed versions"))?
    .iter()
    .map(version_from_row)
    .collect()
}

impl RegistryStore for PostgresStore {
    fn create_model(
        &self,
        name: &str,
        description: &str,
        tags: &[String],
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError> {
        let c = self.client("insert model")?;
        block(c.execute(
            "INSERT INTO models (name, description, tags, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $4)",
            &[&name, &description, &tags_to_json(tags), &now_ms],
        ))
        .map_err(|e| {
            if is_unique_violation(&e) {
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
        let c = self.client("update model")?;
        let tags = tags.map(tags_to_json);
        let row = block(c.query_opt(
            &format!(
                "UPDATE models SET description = COALESCE($2, description), tags = COALESCE($3, tags),
                 require_publisher = COALESCE($5, require_publisher), updated_at_ms = $4
                 WHERE name = $1 RETURNING {MODEL_COLS}"
            ),
            &[&name, &description, &tags, &now_ms, &require_publisher],
        ))
        .map_err(db("update model"))?;
        match row {
            Some(r) => model_from_row(&r),
            None => Err(StoreError::NotFound { what: format!("model {name}") }),
        }
    }

    fn get_model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        let c = self.client("read model")?;
        block(c.query_opt(&format!("SELECT {MODEL_COLS} FROM models WHERE name = $1"), &[&name]))
            .map_err(db("read model"))?
            .as_ref()
            .map(model_from_row)
            .transpose()
    }

    fn list_models(&self, f: &ModelFilter) -> Result<(Vec<ModelRecord>, u64), StoreError> {
        let c = self.client("list models")?;
        let where_clause = "WHERE ($1::TEXT IS NULL OR strpos(m.name, $1) > 0)
              AND ($2::TEXT IS NULL OR EXISTS (SELECT 1 FROM versions v WHERE v.model = m.name AND v.stage = $2))
              AND ($3::TEXT IS NULL OR EXISTS (SELECT 1 FROM versions v WHERE v.model = m.name
                   AND (v.hardware = '' OR strpos(v.hardware, ',' || $3 || ',') > 0)))";
        let (limit, offset) = (i64::from(f.limit), i64::from(f.offset));
        block(async {
            let total: i64 = c
                .query_one(&format!("SELECT COUNT(*) FROM models m {where_clause}"), &[&f.name, &f.stage, &f.hardware])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db("count models"))?;
            let rows = c
                .query(
                    &format!(
                        "SELECT m.name, m.description, m.tags, m.created_at_ms, m.updated_at_ms, m.require_publisher FROM models m
                         {where_clause} ORDER BY m.name LIMIT $4 OFFSET $5"
                    ),
                    &[&f.name, &f.stage, &f.hardware, &limit, &offset],
                )
                .await
                .map_err(db("list models"))?;
            let models = rows.iter().map(model_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok((models, u64::try_from(total).unwrap_or(0)))
        })
    }

    fn delete_model(&self, name: &str, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut c = self.client("delete model")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin delete"))?;
            let candidates: Vec<String> = tx
                .query(
                    "SELECT sha256 FROM versions WHERE model = $1
                     UNION SELECT sha256 FROM version_blobs WHERE model = $1",
                    &[&name],
                )
                .await
                .map_err(db("list blobs"))?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(db("list blobs"))?;
            let n = tx.execute("DELETE FROM models WHERE name = $1", &[&name]).await.map_err(db("delete model"))?;
            if n == 0 {
                return Err(StoreError::NotFound { what: format!("model {name}") });
            }
            tx.execute(
                "UPDATE deployments SET state = $3, updated_at_ms = $2 WHERE model = $1 AND state = $4",
                &[&name, &now_ms, &DeploymentState::Cancelled.as_str(), &DeploymentState::Active.as_str()],
            )
            .await
            .map_err(db("cancel deployments"))?;
            bump_revision(&tx, &self.replica).await?;
            // Identical bytes may be registered under another model: keep those.
            let mut freed = Vec::new();
            for sha in candidates {
                let still: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM versions WHERE sha256 = $1)
                             OR EXISTS (SELECT 1 FROM version_blobs WHERE sha256 = $1)",
                        &[&sha],
                    )
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(db("check blob references"))?;
                if !still {
                    freed.push(sha);
                }
            }
            tx.commit().await.map_err(db("commit delete"))?;
            Ok(freed)
        })
    }

    fn insert_version(
        &self,
        v: &VersionRecord,
        extra_blobs: &[String],
        register: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut c = self.client("insert version")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin insert version"))?;
            if let Some(description) = register {
                tx.execute(
                    "INSERT INTO models (name, description, tags, created_at_ms, updated_at_ms)
                     VALUES ($1, $2, '[]', $3, $3) ON CONFLICT (name) DO NOTHING",
                    &[&v.model, &description, &v.created_at_ms],
                )
                .await
                .map_err(db("register model"))?;
            }
            tx.execute(
                &format!("INSERT INTO versions ({VERSION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"),
                &[
                    &v.model,
                    &v.version,
                    &v.sha256,
                    &i64_of(v.size),
                    &v.stage,
                    &hardware_column(&v.hardware),
                    &v.manifest,
                    &v.signature,
                    &v.key_id,
                    &v.created_at_ms,
                    &v.created_by,
                ],
            )
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict { what: format!("version {} of model {}", v.version, v.model) }
                } else {
                    db("insert version")(e)
                }
            })?;
            for d in extra_blobs {
                tx.execute(
                    "INSERT INTO version_blobs (model, version, sha256) VALUES ($1, $2, $3)",
                    &[&v.model, &v.version, d],
                )
                .await
                .map_err(db("add version blob"))?;
            }
            tx.commit().await.map_err(db("commit insert version"))
        })
    }

    fn get_version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError> {
        let c = self.client("read version")?;
        block(c.query_opt(
            &format!("SELECT {VERSION_COLS} FROM versions WHERE model = $1 AND version = $2"),
            &[&model, &version],
        ))
        .map_err(db("read version"))?
        .as_ref()
        .map(version_from_row)
        .transpose()
    }

    fn list_versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let c = self.client("list versions")?;
        let rows = block(c.query(
            &format!("SELECT {VERSION_COLS} FROM versions WHERE model = $1 ORDER BY created_at_ms, version"),
            &[&model],
        ))
        .map_err(db("list versions"))?;
        let mut versions = rows.iter().map(version_from_row).collect::<Result<Vec<_>, _>>()?;
        sort_versions(&mut versions);
        Ok(versions)
    }

    fn update_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        let mut c = self.client("update version")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin update version"))?;
            let n = tx
                .execute(
                    "UPDATE versions SET stage = $3, hardware = $4, manifest = $5, signature = $6, key_id = $7
                     WHERE model = $1 AND version = $2",
                    &[
                        &v.model,
                        &v.version,
                        &v.stage,
                        &hardware_column(&v.hardware),
                        &v.manifest,
                        &v.signature,
                        &v.key_id,
                    ],
                )
                .await
                .map_err(db("update version"))?;
            if n == 0 {
                return Err(StoreError::NotFound { what: format!("version {} of model {}", v.version, v.model) });
            }
            bump_revision(&tx, &self.replica).await?;
            tx.commit().await.map_err(db("commit update version"))
        })
    }

    fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        let c = self.client("list referenced blobs")?;
        block(c.query("SELECT sha256 FROM versions UNION SELECT sha256 FROM version_blobs", &[]))
            .map_err(db("list referenced blobs"))?
            .iter()
            .map(|r| r.try_get(0).map_err(db("list referenced blobs")))
            .collect()
    }

    fn publishers(&self) -> Result<Vec<PublisherRecord>, StoreError> {
        let op = "list publishers";
        let c = self.client(op)?;
        block(c.query("SELECT name, key_id, public_key, created_at_ms, created_by FROM publishers ORDER BY name", &[]))
            .map_err(db(op))?
            .iter()
            .map(|r| {
                Ok(PublisherRecord {
                    name: r.try_get(0).map_err(db(op))?,
                    key_id: r.try_get(1).map_err(db(op))?,
                    public_key: r.try_get(2).map_err(db(op))?,
                    created_at_ms: r.try_get(3).map_err(db(op))?,
                    created_by: r.try_get(4).map_err(db(op))?,
                })
            })
            .collect()
    }

    fn add_publisher(&self, p: &PublisherRecord) -> Result<(), StoreError> {
        let c = self.client("insert publisher")?;
        block(c.execute(
            "INSERT INTO publishers (name, key_id, public_key, created_at_ms, created_by) VALUES ($1, $2, $3, $4, $5)",
            &[&p.name, &p.key_id, &p.public_key, &p.created_at_ms, &p.created_by],
        ))
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict { what: format!("publisher {} or its key {}", p.name, p.key_id) }
            } else {
                db("insert publisher")(e)
            }
        })?;
        Ok(())
    }

    fn remove_publisher(&self, name: &str) -> Result<(), StoreError> {
        let c = self.client("remove publisher")?;
        let n = block(c.execute("DELETE FROM publishers WHERE name = $1", &[&name])).map_err(db("remove publisher"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("publisher {name}") });
        }
        Ok(())
    }
}
