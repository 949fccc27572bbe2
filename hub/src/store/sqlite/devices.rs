//! Enrolled devices, what they report, and the fleet revision.

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use super::migrations::{RECORD_DEPLOYMENT_STATES, RECORD_TRANSITIONS};
use super::{SqliteStore, db, is_constraint, json_col};
use crate::store::{DeploymentDevice, DeviceEvent, DeviceRecord, DeviceStore, FleetSnapshot, StoreError};

const DEVICE_COLS: &str =
    "id, labels, hardware, agent_version, created_at_ms, created_by, last_seen_ms, hello, report, report_at_ms";

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    // What the device last said. Unlike labels, a corrupt hello or report
    // changes no decision, and the device's next message rewrites it; refusing
    // the row would lock the device out of its own stream. So it reads as
    // absent, and says so in the log.
    let json = |idx: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        let Some(text) = row.get::<_, Option<String>>(idx)? else { return Ok(None) };
        match serde_json::from_str(&text) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let device: String = row.get(0)?;
                let column = DEVICE_COLS.split(", ").nth(idx).unwrap_or("?");
                tracing::warn!(device, column, error = %e, "corrupt JSON in the devices table; read as absent");
                Ok(None)
            }
        }
    };
    Ok(DeviceRecord {
        id: row.get(0)?,
        // Corrupt labels would silently change which deployments target the
        // device: the row is refused, as is corrupt hardware.
        labels: json_col(1, &row.get::<_, String>(1)?)?,
        hardware: json_col(2, &row.get::<_, String>(2)?)?,
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
        device_on(&self.conn(), column, value)
    }
}

impl DeviceStore for SqliteStore {
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
                "INSERT INTO device_events (device_id, at_ms, kind, model, version, reason, evidence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    e.at_ms,
                    e.kind,
                    e.model,
                    e.version,
                    e.reason,
                    e.evidence.as_ref().map(ToString::to_string)
                ],
            )
            .map_err(db("record event"))?;
        }
        tx.execute(RECORD_TRANSITIONS, params![id, now_ms, report.to_string()]).map_err(db("record transitions"))?;
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
        events_on(&self.conn(), id, limit)
    }

    fn device_with_events(&self, id: &str, limit: u32) -> Result<Option<(DeviceRecord, Vec<DeviceEvent>)>, StoreError> {
        // One lock for both reads: every write takes the same connection.
        let conn = self.conn();
        let Some(device) = device_on(&conn, "id", id)? else {
            return Ok(None);
        };
        Ok(Some((device, events_on(&conn, id, limit)?)))
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let r: i64 = self
            .conn()
            .query_row("SELECT revision FROM fleet WHERE id = 1", [], |r| r.get(0))
            .map_err(db("read revision"))?;
        Ok(u64::try_from(r).unwrap_or(0))
    }

    fn fleet_snapshot(&self) -> Result<FleetSnapshot, StoreError> {
        // One lock for every read: every write takes the same connection.
        let conn = self.conn();
        let revision: i64 =
            conn.query_row("SELECT revision FROM fleet WHERE id = 1", [], |r| r.get(0)).map_err(db("read revision"))?;
        Ok(FleetSnapshot {
            revision: u64::try_from(revision).unwrap_or(0),
            active: super::deployments::active_on(&conn)?,
            versions: super::registry::deployed_versions_on(&conn)?,
            // Keys live in the data dir, beside this one hub.
            active_key: None,
        })
    }
}

/// Bumps the fleet revision inside the caller's transaction (see
/// [`DeviceStore::current_revision`]).
pub(super) fn bump_revision(conn: &Connection) -> Result<(), StoreError> {
    conn.execute("UPDATE fleet SET revision = revision + 1 WHERE id = 1", []).map_err(db("bump revision"))?;
    Ok(())
}

/// The device whose `column` is `value`.
fn device_on(conn: &Connection, column: &str, value: &str) -> Result<Option<DeviceRecord>, StoreError> {
    conn.query_row(&format!("SELECT {DEVICE_COLS} FROM devices WHERE {column} = ?1"), [value], device_from_row)
        .optional()
        .map_err(db("read device"))
}

/// The newest `limit` events of device `id`, newest first.
fn events_on(conn: &Connection, id: &str, limit: u32) -> Result<Vec<DeviceEvent>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT at_ms, kind, model, version, reason, evidence FROM device_events WHERE device_id = ?1
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
                // Written by this hub from a decoded message; unreadable reads as none.
                evidence: r.get::<_, Option<String>>(5)?.and_then(|t| serde_json::from_str(&t).ok()),
            })
        })
        .map_err(db("list events"))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db("list events"))
}
