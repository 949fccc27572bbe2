//! Deployments: storing them, superseding, halting and widening. Halts and
//! widenings are conditional `UPDATE`s, so only one replica's wins (see the
//! module above).

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::devices::bump_revision;
use super::{PostgresStore, block, db, json_col, text_col, u32_col};
use crate::records::{DeploymentKind, DeploymentState};
use crate::store::{DeploymentRecord, DeploymentStore, HaltOutcome, NewDeployment, StoreError};

const DEPLOYMENT_COLS: &str = "id, model, version, target, kind, state, created_by, created_at_ms, updated_at_ms, \
     replaces, policy, halt_fraction, halt_count, halt_reason, waves, wave";

fn deployment_from_row(row: &Row) -> Result<DeploymentRecord, StoreError> {
    let op = "read deployment";
    let halt_count: Option<i64> = row.try_get("halt_count").map_err(db(op))?;
    let policy: Option<String> = row.try_get("policy").map_err(db(op))?;
    Ok(DeploymentRecord {
        id: row.try_get("id").map_err(db(op))?,
        model: row.try_get("model").map_err(db(op))?,
        version: row.try_get("version").map_err(db(op))?,
        target: row.try_get("target").map_err(db(op))?,
        kind: text_col(op, row, "kind")?,
        state: text_col(op, row, "state")?,
        created_by: row.try_get("created_by").map_err(db(op))?,
        created_at_ms: row.try_get("created_at_ms").map_err(db(op))?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(db(op))?,
        replaces: row.try_get("replaces").map_err(db(op))?,
        policy: policy.map(|t| serde_json::from_str(&t).map_err(|e| super::corrupt(op, "policy", e))).transpose()?,
        halt_fraction: row.try_get("halt_fraction").map_err(db(op))?,
        halt_count: halt_count
            .map(|n| u32::try_from(n).map_err(|e| super::corrupt(op, "halt_count", e)))
            .transpose()?,
        halt_reason: row.try_get("halt_reason").map_err(db(op))?,
        waves: json_col(op, row, "waves")?,
        wave: u32_col(op, row, "wave")?,
    })
}

/// Active deployments, newest first.
pub(super) async fn active(c: &impl GenericClient) -> Result<Vec<DeploymentRecord>, StoreError> {
    c.query(
        &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE state = $1 ORDER BY id DESC"),
        &[&DeploymentState::Active.as_str()],
    )
    .await
    .map_err(db("list active deployments"))?
    .iter()
    .map(deployment_from_row)
    .collect()
}

/// Marks the active deployments of `model` and `target` older than `below`
/// (all, if `None`) as `replaced_state`.
async fn supersede_in(
    tx: &impl GenericClient,
    model: &str,
    target: &str,
    below: Option<i64>,
    replaced_state: DeploymentState,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE deployments SET state = $3, updated_at_ms = $4
         WHERE model = $1 AND target = $2 AND state = $6 AND ($5::BIGINT IS NULL OR id < $5)",
        &[&model, &target, &replaced_state.as_str(), &now_ms, &below, &DeploymentState::Active.as_str()],
    )
    .await
    .map_err(db("supersede deployments"))?;
    Ok(())
}

/// Supersedes what `d` replaces (unless it starts with a partial wave) and
/// stores `d` as active, inside the caller's transaction.
async fn insert_deployment_in(
    tx: &impl GenericClient,
    d: &NewDeployment,
    replaced_state: DeploymentState,
    now_ms: i64,
) -> Result<DeploymentRecord, StoreError> {
    if d.waves.first().is_none_or(|&p| p >= 100) {
        supersede_in(tx, &d.model, &d.target, None, replaced_state, now_ms).await?;
    }
    let encode = |what| move |e: serde_json::Error| StoreError::Encode { what, source: Box::new(e) };
    let waves = serde_json::to_string(&d.waves).map_err(encode("a deployment's waves"))?;
    let policy = d.policy.as_ref().map(serde_json::to_string).transpose().map_err(encode("a deployment's policy"))?;
    let halt_count = d.halt_count.map(i64::from);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms,
                     updated_at_ms, replaces, policy, halt_fraction, halt_count, waves)
                 VALUES ($1, $2, $3, $4, $12, $5, $6, $6, $7, $8, $9, $10, $11) RETURNING {DEPLOYMENT_COLS}"
            ),
            &[
                &d.model,
                &d.version,
                &d.target,
                &d.kind.as_str(),
                &d.created_by,
                &now_ms,
                &d.replaces,
                &policy,
                &d.halt_fraction,
                &halt_count,
                &waves,
                &DeploymentState::Active.as_str(),
            ],
        )
        .await
        .map_err(db("insert deployment"))?;
    deployment_from_row(&row)
}

impl DeploymentStore for PostgresStore {
    fn insert_deployment(&self, d: &NewDeployment, now_ms: i64) -> Result<DeploymentRecord, StoreError> {
        let mut c = self.client("insert deployment")?;
        let replaced_state = match d.kind {
            DeploymentKind::Rollback => DeploymentState::RolledBack,
            DeploymentKind::Deploy => DeploymentState::Superseded,
        };
        block(async {
            let tx = c.transaction().await.map_err(db("begin deployment"))?;
            let record = insert_deployment_in(&tx, d, replaced_state, now_ms).await?;
            bump_revision(&tx, &self.replica).await?;
            tx.commit().await.map_err(db("commit deployment"))?;
            Ok(record)
        })
    }

    fn get_deployment(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        let c = self.client("read deployment")?;
        block(c.query_opt(&format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = $1"), &[&id]))
            .map_err(db("read deployment"))?
            .as_ref()
            .map(deployment_from_row)
            .transpose()
    }

    fn list_deployments(
        &self,
        model: Option<&str>,
        state: Option<DeploymentState>,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<DeploymentRecord>, u64), StoreError> {
        let c = self.client("list deployments")?;
        let state = state.map(DeploymentState::as_str);
        let where_clause = "WHERE ($1::TEXT IS NULL OR model = $1) AND ($2::TEXT IS NULL OR state = $2)";
        let (limit, offset) = (i64::from(limit), i64::from(offset));
        block(async {
            let total: i64 = c
                .query_one(&format!("SELECT COUNT(*) FROM deployments {where_clause}"), &[&model, &state])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db("count deployments"))?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {DEPLOYMENT_COLS} FROM deployments {where_clause} ORDER BY id DESC LIMIT $3 OFFSET $4"
                    ),
                    &[&model, &state, &limit, &offset],
                )
                .await
                .map_err(db("list deployments"))?;
            let list = rows.iter().map(deployment_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok((list, u64::try_from(total).unwrap_or(0)))
        })
    }

    fn active_deployments(&self, model: &str) -> Result<Vec<DeploymentRecord>, StoreError> {
        Ok(self.list_deployments(Some(model), Some(DeploymentState::Active), u32::MAX, 0)?.0)
    }

    fn set_deployment_state(&self, id: i64, state: DeploymentState, now_ms: i64) -> Result<(), StoreError> {
        let mut c = self.client("update deployment")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin deployment state"))?;
            let n = tx
                .execute(
                    "UPDATE deployments SET state = $2, updated_at_ms = $3 WHERE id = $1",
                    &[&id, &state.as_str(), &now_ms],
                )
                .await
                .map_err(db("update deployment"))?;
            if n == 0 {
                return Err(StoreError::NotFound { what: format!("deployment {id}") });
            }
            bump_revision(&tx, &self.replica).await?;
            tx.commit().await.map_err(db("commit deployment state"))
        })
    }

    fn halt_deployment(
        &self,
        id: i64,
        reason: &str,
        restore: Option<&NewDeployment>,
        now_ms: i64,
    ) -> Result<HaltOutcome, StoreError> {
        let mut c = self.client("halt deployment")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin halt"))?;
            // The row lock makes a racing replica wait, then match nothing.
            let n = tx
                .execute(
                    "UPDATE deployments SET state = $4, halt_reason = $2, updated_at_ms = $3
                     WHERE id = $1 AND state = $5",
                    &[&id, &reason, &now_ms, &DeploymentState::Halted.as_str(), &DeploymentState::Active.as_str()],
                )
                .await
                .map_err(db("halt deployment"))?;
            if n == 0 {
                return Ok(HaltOutcome::NotActive);
            }
            let restored = match restore {
                Some(d) => Some(Box::new(insert_deployment_in(&tx, d, DeploymentState::Superseded, now_ms).await?)),
                None => None,
            };
            bump_revision(&tx, &self.replica).await?;
            tx.commit().await.map_err(db("commit halt"))?;
            Ok(HaltOutcome::Halted { restored })
        })
    }

    fn advance_wave(&self, id: i64, from: u32, now_ms: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        let mut c = self.client("widen deployment")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin widening"))?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE deployments SET wave = wave + 1, updated_at_ms = $3
                         WHERE id = $1 AND state = $4 AND wave = $2 AND wave + 1 < json_array_length(waves::json)
                         RETURNING {DEPLOYMENT_COLS}"
                    ),
                    &[&id, &i64::from(from), &now_ms, &DeploymentState::Active.as_str()],
                )
                .await
                .map_err(db("widen deployment"))?;
            let Some(row) = row else { return Ok(None) };
            let d = deployment_from_row(&row)?;
            if crate::rollout::waves::current_percent(&d.waves, d.wave) >= 100 {
                supersede_in(&tx, &d.model, &d.target, Some(d.id), DeploymentState::Superseded, now_ms).await?;
            }
            bump_revision(&tx, &self.replica).await?;
            tx.commit().await.map_err(db("commit widening"))?;
            Ok(Some(d))
        })
    }
}
