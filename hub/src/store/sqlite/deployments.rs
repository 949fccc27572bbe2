//! Deployments: storing them, superseding, halting and widening.

use rusqlite::{OptionalExtension as _, Row, params};

use super::devices::bump_revision;
use super::{SqliteStore, db, json_col, text_col};
use crate::records::{DeploymentKind, DeploymentState};
use crate::store::{DeploymentRecord, DeploymentStore, HaltOutcome, NewDeployment, StoreError};

const DEPLOYMENT_COLS: &str = "id, model, version, target, kind, state, created_by, created_at_ms, updated_at_ms, \
     replaces, policy, halt_fraction, halt_count, halt_reason, waves, wave";

fn deployment_from_row(row: &Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: row.get(0)?,
        model: row.get(1)?,
        version: row.get(2)?,
        target: row.get(3)?,
        // A kind or state this hub does not know is a corrupt row.
        kind: text_col(4, &row.get::<_, String>(4)?)?,
        state: text_col(5, &row.get::<_, String>(5)?)?,
        created_by: row.get(6)?,
        created_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        replaces: row.get(9)?,
        // The policy was validated before it was stored: one that no longer
        // parses is a corrupt row, refused rather than read as the defaults.
        policy: row.get::<_, Option<String>>(10)?.map(|t| json_col(10, &t)).transpose()?,
        halt_fraction: row.get(11)?,
        halt_count: row.get(12)?,
        halt_reason: row.get(13)?,
        // Refused when corrupt: read as empty, it would mean "every device at once".
        waves: json_col(14, &row.get::<_, String>(14)?)?,
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
    replaced_state: DeploymentState,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE deployments SET state = ?3, updated_at_ms = ?4
         WHERE model = ?1 AND target = ?2 AND state = ?6 AND (?5 IS NULL OR id < ?5)",
        params![model, target, replaced_state.as_str(), now_ms, below, DeploymentState::Active.as_str()],
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
    replaced_state: DeploymentState,
    now_ms: i64,
) -> Result<DeploymentRecord, StoreError> {
    if d.waves.first().is_none_or(|&p| p >= 100) {
        supersede_in(tx, &d.model, &d.target, None, replaced_state, now_ms)?;
    }
    let encode = |what| move |e: serde_json::Error| StoreError::Encode { what, source: Box::new(e) };
    let waves = serde_json::to_string(&d.waves).map_err(encode("a deployment's waves"))?;
    let policy = d.policy.as_ref().map(serde_json::to_string).transpose().map_err(encode("a deployment's policy"))?;
    tx.execute(
        "INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms, updated_at_ms,
             replaces, policy, halt_fraction, halt_count, waves)
         VALUES (?1, ?2, ?3, ?4, ?12, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            d.model,
            d.version,
            d.target,
            d.kind.as_str(),
            d.created_by,
            now_ms,
            d.replaces,
            policy,
            d.halt_fraction,
            d.halt_count,
            waves,
            DeploymentState::Active.as_str()
        ],
    )
    .map_err(db("insert deployment"))?;
    let id = tx.last_insert_rowid();
    bump_revision(tx)?;
    Ok(DeploymentRecord {
        id,
        model: d.model.clone(),
        version: d.version.clone(),
        target: d.target.clone(),
        kind: d.kind,
        state: DeploymentState::Active,
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

/// Active deployments, newest first.
pub(super) fn active_on(conn: &rusqlite::Connection) -> Result<Vec<DeploymentRecord>, StoreError> {
    let mut stmt = conn
        .prepare(&format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE state = ?1 ORDER BY id DESC"))
        .map_err(db("list active deployments"))?;
    let rows = stmt
        .query_map([DeploymentState::Active.as_str()], deployment_from_row)
        .map_err(db("list active deployments"))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db("list active deployments"))
}

impl DeploymentStore for SqliteStore {
    fn insert_deployment(&self, d: &NewDeployment, now_ms: i64) -> Result<DeploymentRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin deployment"))?;
        let replaced_state = match d.kind {
            DeploymentKind::Rollback => DeploymentState::RolledBack,
            DeploymentKind::Deploy => DeploymentState::Superseded,
        };
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
        state: Option<DeploymentState>,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<DeploymentRecord>, u64), StoreError> {
        let conn = self.conn();
        let state = state.map(DeploymentState::as_str);
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
        Ok(self.list_deployments(Some(model), Some(DeploymentState::Active), u32::MAX, 0)?.0)
    }

    fn set_deployment_state(&self, id: i64, state: DeploymentState, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin deployment state"))?;
        let n = tx
            .execute(
                "UPDATE deployments SET state = ?2, updated_at_ms = ?3 WHERE id = ?1",
                params![id, state.as_str(), now_ms],
            )
            .map_err(db("update deployment"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("deployment {id}") });
        }
        bump_revision(&tx)?;
        tx.commit().map_err(db("commit deployment state"))
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
                "UPDATE deployments SET state = ?4, halt_reason = ?2, updated_at_ms = ?3
                 WHERE id = ?1 AND state = ?5",
                params![id, reason, now_ms, DeploymentState::Halted.as_str(), DeploymentState::Active.as_str()],
            )
            .map_err(db("halt deployment"))?;
        if n == 0 {
            return Ok(HaltOutcome::NotActive);
        }
        bump_revision(&tx)?;
        let restored = restore
            .map(|d| insert_deployment_in(&tx, d, DeploymentState::Superseded, now_ms).map(Box::new))
            .transpose()?;
        tx.commit().map_err(db("commit halt"))?;
        Ok(HaltOutcome::Halted { restored })
    }

    fn advance_wave(&self, id: i64, from: u32, now_ms: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin widening"))?;
        let n = tx
            .execute(
                "UPDATE deployments SET wave = wave + 1, updated_at_ms = ?3
                 WHERE id = ?1 AND state = ?4 AND wave = ?2 AND wave + 1 < json_array_length(waves)",
                params![id, from, now_ms, DeploymentState::Active.as_str()],
            )
            .map_err(db("widen deployment"))?;
        if n == 0 {
            return Ok(None);
        }
        let d = tx
            .query_row(&format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = ?1"), [id], deployment_from_row)
            .map_err(db("read deployment"))?;
        if crate::rollout::waves::current_percent(&d.waves, d.wave) >= 100 {
            supersede_in(&tx, &d.model, &d.target, Some(d.id), DeploymentState::Superseded, now_ms)?;
        }
        bump_revision(&tx)?;
        tx.commit().map_err(db("commit widening"))?;
        Ok(Some(d))
    }
}
