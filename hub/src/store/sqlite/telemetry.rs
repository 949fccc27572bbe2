//! Device telemetry buckets, delivered windows and deployment state changes.

use rusqlite::{Connection, OptionalExtension as _, Row, params};
use sentinel_proto::telemetry::Sketch;

use super::{SqliteStore, db, u64_col};
use crate::store::{
    Bucket, Resolution, Retention, StoreError, TelemetryQuery, TelemetryStore, TelemetryWindow, Transition, bits_u64,
    u64_bits,
};
use crate::telemetry::Counts;

const BUCKET_COLS: &str = "device_id, model, version, resolution, bucket_ms, requests, errors, feedback_correct, \
     feedback_total, agreement_agreed, agreement_total, restarts, validation_accuracy, validation_samples, \
     rss_max_bytes, latency, compute";

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored sketch this hub wrote; unreadable bytes (a damaged row) read as
/// empty, with a warning, rather than hiding the bucket's counts.
fn sketch(row: &Row<'_>, idx: usize) -> rusqlite::Result<Sketch> {
    let bytes: Vec<u8> = row.get(idx)?;
    Ok(Sketch::from_bytes(&bytes).unwrap_or_else(|| {
        tracing::warn!(column = idx, "unreadable latency sketch in the telemetry table; read as empty");
        Sketch::new()
    }))
}

fn bucket_from_row(row: &Row<'_>) -> rusqlite::Result<Bucket> {
    let resolution = Resolution::from_code(row.get(3)?).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Integer, "unknown resolution".into())
    })?;
    let accuracy: Option<f64> = row.get(12)?;
    let samples = u64_col(row, 13)?;
    Ok(Bucket {
        device_id: row.get(0)?,
        model: row.get(1)?,
        version: row.get(2)?,
        resolution,
        bucket_ms: row.get(4)?,
        counts: Counts {
            requests: u64_col(row, 5)?,
            errors: u64_col(row, 6)?,
            feedback_correct: u64_col(row, 7)?,
            feedback_total: u64_col(row, 8)?,
            agreement_agreed: u64_col(row, 9)?,
            agreement_total: u64_col(row, 10)?,
            restarts: u64_col(row, 11)?,
        },
        validation: accuracy.filter(|_| samples > 0).map(|a| (a, samples)),
        rss_max_bytes: u64_col(row, 14)?,
        latency: sketch(row, 15)?,
        compute: sketch(row, 16)?,
    })
}

fn write_bucket(conn: &Connection, b: &Bucket) -> Result<(), StoreError> {
    let c = &b.counts;
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO telemetry ({BUCKET_COLS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ),
        params![
            b.device_id,
            b.model,
            b.version,
            b.resolution.code(),
            b.bucket_ms,
            i(c.requests),
            i(c.errors),
            i(c.feedback_correct),
            i(c.feedback_total),
            i(c.agreement_agreed),
            i(c.agreement_total),
            i(c.restarts),
            b.validation.map(|v| v.0),
            i(b.validation.map_or(0, |v| v.1)),
            i(b.rss_max_bytes),
            b.latency.to_bytes(),
            b.compute.to_bytes(),
        ],
    )
    .map_err(db("write telemetry bucket"))?;
    Ok(())
}

impl TelemetryStore for SqliteStore {
    fn record_telemetry(
        &self,
        device_id: &str,
        run: u64,
        windows: &[TelemetryWindow],
        retention: &Retention,
    ) -> Result<usize, StoreError> {
        if windows.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin telemetry"))?;
        let Some((stored_run, stored_seq)) = tx
            .query_row("SELECT telemetry_run, telemetry_seq FROM devices WHERE id = ?1", [device_id], |r| {
                Ok((bits_u64(r.get(0)?), bits_u64(r.get(1)?)))
            })
            .optional()
            .map_err(db("read telemetry cursor"))?
        else {
            return Err(StoreError::NotFound { what: format!("device {device_id}") });
        };
        let fresh: Vec<&TelemetryWindow> = windows.iter().filter(|w| run != stored_run || w.seq > stored_seq).collect();
        for w in &fresh {
            for resolution in [Resolution::Fine, Resolution::Coarse] {
                let at = retention.bucket_of(resolution, w.at_ms);
                let mut b = tx
                    .query_row(
                        &format!(
                            "SELECT {BUCKET_COLS} FROM telemetry WHERE device_id = ?1 AND model = ?2
                             AND resolution = ?3 AND bucket_ms = ?4 AND version = ?5"
                        ),
                        params![device_id, w.model, resolution.code(), at, w.version],
                        bucket_from_row,
                    )
                    .optional()
                    .map_err(db("read telemetry bucket"))?
                    .unwrap_or_else(|| Bucket::empty(device_id, w, resolution, retention));
                b.absorb(w);
                write_bucket(&tx, &b)?;
            }
        }
        let seq = fresh.iter().map(|w| w.seq).max().unwrap_or(0);
        let seq = if run == stored_run { seq.max(stored_seq) } else { seq };
        tx.execute(
            "UPDATE devices SET telemetry_run = ?2, telemetry_seq = ?3 WHERE id = ?1",
            params![device_id, u64_bits(run), u64_bits(seq)],
        )
        .map_err(db("write telemetry cursor"))?;
        tx.commit().map_err(db("commit telemetry"))?;
        Ok(fresh.len())
    }

    fn visit_telemetry(&self, q: &TelemetryQuery, visit: &mut dyn FnMut(Bucket)) -> Result<(), StoreError> {
        let conn = self.conn();
        let devices = q.devices.as_ref().map(|d| serde_json::to_string(d).unwrap_or_else(|_| "[]".into()));
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {BUCKET_COLS} FROM telemetry
                 WHERE resolution = ?1 AND bucket_ms >= ?2 AND bucket_ms <= ?3
                   AND (?4 IS NULL OR model = ?4) AND (?5 IS NULL OR version = ?5)
                   AND (?6 IS NULL OR device_id IN (SELECT value FROM json_each(?6)))"
            ))
            .map_err(db("read telemetry"))?;
        let rows = stmt
            .query_map(params![q.resolution.code(), q.from_ms, q.to_ms, q.model, q.version, devices], bucket_from_row)
            .map_err(db("read telemetry"))?;
        for row in rows {
            visit(row.map_err(db("read telemetry"))?);
        }
        Ok(())
    }

    fn deployment_transitions(&self, deployment_id: i64) -> Result<Vec<Transition>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT device_id, state, at_ms FROM deployment_transitions WHERE deployment_id = ?1
                 ORDER BY at_ms, rowid",
            )
            .map_err(db("read transitions"))?;
        let rows = stmt
            .query_map([deployment_id], |r| Ok(Transition { device_id: r.get(0)?, state: r.get(1)?, at_ms: r.get(2)? }))
            .map_err(db("read transitions"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("read transitions"))
    }

    fn prune_telemetry(&self, retention: &Retention, now_ms: i64) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin prune"))?;
        let mut deleted = 0;
        for r in [Resolution::Fine, Resolution::Coarse] {
            deleted += tx
                .execute(
                    "DELETE FROM telemetry WHERE resolution = ?1 AND bucket_ms < ?2",
                    params![r.code(), retention.cutoff(r, now_ms)],
                )
                .map_err(db("prune telemetry"))?;
        }
        deleted += tx
            .execute(
                "DELETE FROM deployment_transitions AS t WHERE at_ms < ?1 AND EXISTS (
                     SELECT 1 FROM deployment_transitions AS later
                     WHERE later.deployment_id = t.deployment_id AND later.device_id = t.device_id
                       AND later.at_ms > t.at_ms)",
                [retention.cutoff(Resolution::Coarse, now_ms)],
            )
            .map_err(db("prune transitions"))?;
        tx.commit().map_err(db("commit prune"))?;
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }
}
