//! API tokens and the audit log.

use tokio_postgres::Row;

use super::migrations::BOOTSTRAP_LOCK;
use super::{PostgresStore, block, db, text_col};
use crate::store::{AccessStore, AuditEntry, AuditFilter, AuditOutcome, StoreError, TokenRecord};

const TOKEN_COLS: &str = "id, name, role, secret_sha256, created_at_ms, created_by, revoked";

fn token_from_row(row: &Row) -> Result<TokenRecord, StoreError> {
    let op = "read token";
    Ok(TokenRecord {
        id: row.try_get("id").map_err(db(op))?,
        name: row.try_get("name").map_err(db(op))?,
        role: row.try_get("role").map_err(db(op))?,
        secret_sha256: row.try_get("secret_sha256").map_err(db(op))?,
        created_at_ms: row.try_get("created_at_ms").map_err(db(op))?,
        created_by: row.try_get("created_by").map_err(db(op))?,
        revoked: row.try_get("revoked").map_err(db(op))?,
    })
}

const INSERT_TOKEN: &str = "INSERT INTO tokens (name, role, secret_sha256, created_at_ms, created_by)
     VALUES ($1, $2, $3, $4, $5) RETURNING id, name, role, secret_sha256, created_at_ms, created_by, revoked";

impl AccessStore for PostgresStore {
    fn insert_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<TokenRecord, StoreError> {
        let c = self.client("insert token")?;
        let row = block(c.query_one(INSERT_TOKEN, &[&name, &role, &secret_sha256, &now_ms, &created_by]))
            .map_err(db("insert token"))?;
        token_from_row(&row)
    }

    fn insert_first_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut c = self.client("insert first token")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin first token"))?;
            // Replicas starting together take turns: only the first finds no token.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK])
                .await
                .map_err(db("lock for first token"))?;
            let any: bool = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM tokens)", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db("count tokens"))?;
            if any {
                return Ok(None);
            }
            let row = tx
                .query_one(INSERT_TOKEN, &[&name, &role, &secret_sha256, &now_ms, &created_by])
                .await
                .map_err(db("insert token"))?;
            let token = token_from_row(&row)?;
            tx.commit().await.map_err(db("commit first token"))?;
            Ok(Some(token))
        })
    }

    fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        let c = self.client("find token")?;
        block(c.query_opt(
            &format!("SELECT {TOKEN_COLS} FROM tokens WHERE secret_sha256 = $1 AND NOT revoked"),
            &[&secret_sha256],
        ))
        .map_err(db("find token"))?
        .as_ref()
        .map(token_from_row)
        .transpose()
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let c = self.client("list tokens")?;
        block(c.query(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY id"), &[]))
            .map_err(db("list tokens"))?
            .iter()
            .map(token_from_row)
            .collect()
    }

    fn revoke_token(&self, id: i64) -> Result<(), StoreError> {
        let c = self.client("revoke token")?;
        let n =
            block(c.execute("UPDATE tokens SET revoked = TRUE WHERE id = $1", &[&id])).map_err(db("revoke token"))?;
        if n == 0 {
            return Err(StoreError::NotFound { what: format!("token {id}") });
        }
        Ok(())
    }

    fn count_tokens(&self) -> Result<u64, StoreError> {
        let c = self.client("count tokens")?;
        let n: i64 = block(c.query_one("SELECT COUNT(*) FROM tokens", &[]))
            .and_then(|r| r.try_get(0))
            .map_err(db("count tokens"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let c = self.client("append audit")?;
        block(c.execute(
            "INSERT INTO audit (at_ms, actor, role, action, status, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&e.at_ms, &e.actor, &e.role, &e.action, &i32::from(e.status), &e.outcome.as_str(), &e.detail],
        ))
        .map_err(db("append audit"))?;
        Ok(())
    }

    fn list_audit(&self, f: &AuditFilter, limit: u32, offset: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let c = self.client("list audit")?;
        let op = "list audit";
        let outcome = f.outcome.map(AuditOutcome::as_str);
        block(c.query(
            "SELECT id, at_ms, actor, role, action, status, outcome, detail FROM audit
             WHERE ($3::TEXT IS NULL OR actor = $3) AND ($4::TEXT IS NULL OR strpos(action, $4) > 0)
               AND ($5::TEXT IS NULL OR outcome = $5)
             ORDER BY id DESC LIMIT $1 OFFSET $2",
            &[&i64::from(limit), &i64::from(offset), &f.actor, &f.action, &outcome],
        ))
        .map_err(db(op))?
        .iter()
        .map(|r| {
            let status: i32 = r.try_get("status").map_err(db(op))?;
            Ok(AuditEntry {
                id: r.try_get("id").map_err(db(op))?,
                at_ms: r.try_get("at_ms").map_err(db(op))?,
                actor: r.try_get("actor").map_err(db(op))?,
                role: r.try_get("role").map_err(db(op))?,
                action: r.try_get("action").map_err(db(op))?,
                status: u16::try_from(status).map_err(|e| super::corrupt(op, "status", e))?,
                outcome: text_col(op, r, "outcome")?,
                detail: r.try_get("detail").map_err(db(op))?,
            })
        })
        .collect()
    }
}
