//! The signing keys every replica shares, sealed (see `keys::Kek`).

use tokio_postgres::Row;

use super::migrations::BOOTSTRAP_LOCK;
use super::{KEYS, PostgresStore, block, db, notice};
use crate::store::{KeyStore, SigningKeyRecord, StoreError};

fn key_from_row(r: &Row) -> Result<SigningKeyRecord, StoreError> {
    let op = "read signing key";
    Ok(SigningKeyRecord {
        key_id: r.try_get("key_id").map_err(db(op))?,
        public_key: r.try_get("public_key").map_err(db(op))?,
        sealed_pkcs8: r.try_get("sealed_pkcs8").map_err(db(op))?,
        created_at_ms: r.try_get("created_at_ms").map_err(db(op))?,
        active: r.try_get("active").map_err(db(op))?,
    })
}

const INSERT_KEY: &str =
    "INSERT INTO signing_keys (key_id, public_key, sealed_pkcs8, created_at_ms, active) VALUES ($1, $2, $3, $4, TRUE)";

impl KeyStore for PostgresStore {
    fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let c = self.client("list signing keys")?;
        block(c.query(
            "SELECT key_id, public_key, sealed_pkcs8, created_at_ms, active FROM signing_keys ORDER BY created_at_ms, key_id",
            &[],
        ))
        .map_err(db("list signing keys"))?
        .iter()
        .map(key_from_row)
        .collect()
    }

    fn add_active_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError> {
        let mut c = self.client("add signing key")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin key rotation"))?;
            tx.execute("UPDATE signing_keys SET active = FALSE WHERE active", &[])
                .await
                .map_err(db("retire signing key"))?;
            tx.execute(INSERT_KEY, &[&key.key_id, &key.public_key, &key.sealed_pkcs8, &key.created_at_ms])
                .await
                .map_err(db("add signing key"))?;
            tx.execute("SELECT pg_notify($1, $2)", &[&super::CHANNEL, &notice(&self.replica, KEYS)])
                .await
                .map_err(db("announce key rotation"))?;
            tx.commit().await.map_err(db("commit key rotation"))
        })
    }

    fn add_first_key(&self, key: &SigningKeyRecord) -> Result<bool, StoreError> {
        let mut c = self.client("add first signing key")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin first key"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK])
                .await
                .map_err(db("lock for first key"))?;
            let any: bool = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM signing_keys)", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db("count signing keys"))?;
            if any {
                return Ok(false);
            }
            tx.execute(INSERT_KEY, &[&key.key_id, &key.public_key, &key.sealed_pkcs8, &key.created_at_ms])
                .await
                .map_err(db("add signing key"))?;
            tx.commit().await.map_err(db("commit first key"))?;
            Ok(true)
        })
    }
}
