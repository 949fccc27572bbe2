//! API tokens and the audit log.

use rusqlite::{OptionalExtension as _, Row, params};

use super::{SqliteStore, db, text_col};
use crate::store::{AccessStore, AuditEntry, AuditFilter, AuditOutcome, StoreError, TokenRecord};

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

impl AccessStore for SqliteStore {
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

    fn insert_first_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let conn = self.conn();
        // One statement: SQLite runs it alone, so the check and the insert are one.
        let n = conn
            .execute(
                "INSERT INTO tokens (name, role, secret_sha256, created_at_ms, created_by)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS (SELECT 1 FROM tokens)",
                params![name, role, secret_sha256, now_ms, created_by],
            )
            .map_err(db("insert token"))?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(TokenRecord {
            id: conn.last_insert_rowid(),
            name: name.to_owned(),
            role: role.to_owned(),
            secret_sha256: secret_sha256.to_owned(),
            created_at_ms: now_ms,
            created_by: created_by.to_owned(),
            revoked: false,
        }))
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
                params![e.at_ms, e.actor, e.role, e.action, e.status, e.outcome.as_str(), e.detail],
            )
            .map_err(db("append audit"))?;
        Ok(())
    }

    fn list_audit(&self, f: &AuditFilter, limit: u32, offset: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at_ms, actor, role, action, status, outcome, detail FROM audit
                 WHERE (?3 IS NULL OR actor = ?3) AND (?4 IS NULL OR instr(action, ?4) > 0)
                   AND (?5 IS NULL OR outcome = ?5)
                 ORDER BY id DESC LIMIT ?1 OFFSET ?2",
            )
            .map_err(db("list audit"))?;
        let outcome = f.outcome.map(AuditOutcome::as_str);
        let rows = stmt
            .query_map(params![limit, offset, f.actor, f.action, outcome], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    actor: r.get(2)?,
                    role: r.get(3)?,
                    action: r.get(4)?,
                    status: r.get(5)?,
                    outcome: text_col(6, &r.get::<_, String>(6)?)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(db("list audit"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list audit"))
    }
}
