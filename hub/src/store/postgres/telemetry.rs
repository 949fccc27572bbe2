//! Device telemetry buckets, delivered windows and deployment state changes.
//!
//! A report's windows are added under a lock on its device's row, so two
//! replicas never add the same device's windows at once: the sequence check
//! and the read-modify-write of each bucket see one order.

use deadpool_postgres::GenericClient;
use futures_util::{StreamExt as _, pin_mut};
use sentinel_proto::telemetry::Sketch;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, block, db, i64_of, u64_col};
use crate::store::{
    Bucket, Resolution, Retention, StoreError, TelemetryQuery, TelemetryStore, TelemetryWindow, Transition, bits_u64,
    u64_bits,
};
use crate::telemetry::Counts;

const BUCKET_COLS: &str = "device_id, model, version, resolution, bucket_ms, requests, errors, feedback_correct, \
     feedback_total, agreement_agreed, agreement_total, restarts, validation_accuracy, validation_samples, \
     rss_max_bytes, latency, compute";

fn bucket_from_row(row: &Row) -> Result<Bucket, StoreError> {
    let op = "read telemetry";
    let code: i32 = row.try_get("resolution").map_err(db(op))?;
    let resolution = Resolution::from_code(i64::from(code))
        .ok_or_else(|| super::corrupt(op, "resolution", format!("unknown resolution {code}")))?;
    let sketch = |column: &str| -> Result<Sketch, StoreError> {
        let bytes: Vec<u8> = row.try_get(column).map_err(db(op))?;
        Ok(Sketch::from_bytes(&bytes).unwrap_or_else(|| {
            tracing::warn!(column, "unreadable latency sketch in the telemetry table; read as empty");
            Sketch::new()
        }))
    };
    let accuracy: Option<f64> = row.try_get("validation_accuracy").map_err(db(op))?;
    let samples = u64_col(op, row, "validation_samples")?;
    Ok(Bucket {
        device_id: row.try_get("device_id").map_err(db(op))?,
        model: row.try_get("model").map_err(db(op))?,
        version: row.try_get("version").map_err(db(op))?,
        resolution,
        bucket_ms: row.try_get("bucket_ms").map_err(db(op))?,
        counts: Counts {
            requests: u64_col(op, row, "requests")?,
            errors: u64_col(op, row, "errors")?,
            feedback_correct: u64_col(op, row, "feedback_correct")?,
            feedback_total: u64_col(op, row, "feedback_total")?,
            agreement_agreed: u64_col(op, row, "agreement_agreed")?,
            agreement_total: u64_col(op, row, "agreement_total")?,
            restarts: u64_col(op, row, "restarts")?,
        },
        validation: accuracy.filter(|_| samples > 0).map(|a| (a, samples)),
        rss_max_bytes: u64_col(op, row, "rss_max_bytes")?,
        latency: sketch("latency")?,
        compute: sketch("compute")?,
    })
}

fn code(r: Resolution) -> i32 {
    match r {
        Resolution::Fine => 0,
        Resolution::Coarse => 1,
    }
}

async fn write_bucket(c: &impl GenericClient, b: &Bucket) -> Result<(), StoreError> {
    let x = &b.counts;
    let (latency, compute) = (b.latency.to_bytes(), b.compute.to_bytes());
    let values: [&(dyn ToSql + Sync); 17] = [
        &b.device_id,
        &b.model,
        &b.version,
        &code(b.resolution),
        &b.bucket_ms,
        &i64_of(x.requests),
        &i64_of(x.errors),
        &i64_of(x.feedback_correct),
        &i64_of(x.feedback_total),
        &i64_of(x.agreement_agreed),
        &i64_of(x.agreement_total),
        &i64_of(x.restarts),
        &b.validation.map(|v| v.0),
        &i64_of(b.validation.map_or(0, |v| v.1)),
        &i64_of(b.rss_max_bytes),
        &latency,
        &compute,
    ];
    c.execute(
        &format!(
            "INSERT INTO telemetry ({BUCKET_COLS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (resolution, bucket_ms, device_id, model, version) DO UPDATE SET
                 requests = excluded.requests, errors = excluded.errors,
                 feedback_correct = excluded.feedback_correct, feedback_total = excluded.feedback_total,
                 agreement_agreed = excluded.agreement_agreed, agreement_total = excluded.agreement_total,
                 restarts = excluded.restarts, validation_accuracy = excluded.validation_accuracy,
                 validation_samples = excluded.validation_samples, rss_max_bytes = excluded.rss_max_bytes,
                 latency = excluded.latency, compute = excluded.compute"
        ),
        &values,
    )
    .await
    .map_err(db("write telemetry bucket"))?;
    Ok(())
}

impl TelemetryStore for PostgresStore {
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
        let mut c = self.client("record telemetry")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin telemetry"))?;
            let Some(row) = tx
                .query_opt("SELECT telemetry_run, telemetry_seq FROM devices WHERE id = $1 FOR UPDATE", &[&device_id])
                .await
                .map_err(db("read telemetry cursor"))?
            else {
                return Err(StoreError::NotFound { what: format!("device {device_id}") });
            };
            let stored_run = bits_u64(row.try_get(0).map_err(db("read telemetry cursor"))?);
            let stored_seq = bits_u64(row.try_get(1).map_err(db("read telemetry cursor"))?);
            let fresh: Vec<&TelemetryWindow> =
                windows.iter().filter(|w| run != stored_run || w.seq > stored_seq).collect();
            for w in &fresh {
                for resolution in [Resolution::Fine, Resolution::Coarse] {
                    let at = retention.bucket_of(resolution, w.at_ms);
                    let found = tx
                        .query_opt(
                            &format!(
                                "SELECT {BUCKET_COLS} FROM telemetry WHERE device_id = $1 AND model = $2
                                 AND resolution = $3 AND bucket_ms = $4 AND version = $5"
                            ),
                            &[&device_id, &w.model, &code(resolution), &at, &w.version],
                        )
                        .await
                        .map_err(db("read telemetry bucket"))?;
                    let mut b = match found {
                        Some(row) => bucket_from_row(&row)?,
                        None => Bucket::empty(device_id, w, resolution, retention),
                    };
                    b.absorb(w);
                    write_bucket(&tx, &b).await?;
                }
            }
            let seq = fresh.iter().map(|w| w.seq).max().unwrap_or(0);
            let seq = if run == stored_run { seq.max(stored_seq) } else { seq };
            tx.execute(
                "UPDATE devices SET telemetry_run = $2, telemetry_seq = $3 WHERE id = $1",
                &[&device_id, &u64_bits(run), &u64_bits(seq)],
            )
            .await
            .map_err(db("write telemetry cursor"))?;
            tx.commit().await.map_err(db("commit telemetry"))?;
            Ok(fresh.len())
        })
    }

    fn visit_telemetry(&self, q: &TelemetryQuery, visit: &mut dyn FnMut(Bucket)) -> Result<(), StoreError> {
        let c = self.client("read telemetry")?;
        let resolution = code(q.resolution);
        let params: [&(dyn ToSql + Sync); 6] = [&resolution, &q.from_ms, &q.to_ms, &q.model, &q.version, &q.devices];
        block(async {
            let rows = c
                .query_raw(
                    &format!(
                        "SELECT {BUCKET_COLS} FROM telemetry
                         WHERE resolution = $1 AND bucket_ms >= $2 AND bucket_ms <= $3
                           AND ($4::text IS NULL OR model = $4) AND ($5::text IS NULL OR version = $5)
                           AND ($6::text[] IS NULL OR device_id = ANY($6))"
                    ),
                    params,
                )
                .await
                .map_err(db("read telemetry"))?;
            pin_mut!(rows);
            while let Some(row) = rows.next().await {
                visit(bucket_from_row(&row.map_err(db("read telemetry"))?)?);
            }
            Ok(())
        })
    }

    fn deployment_transitions(&self, deployment_id: i64) -> Result<Vec<Transition>, StoreError> {
        let c = self.client("read transitions")?;
        let op = "read transitions";
        block(c.query(
            "SELECT device_id, state, at_ms FROM deployment_transitions WHERE deployment_id = $1 ORDER BY at_ms, id",
            &[&deployment_id],
        ))
        .map_err(db(op))?
        .iter()
        .map(|r| {
            Ok(Transition {
                device_id: r.try_get(0).map_err(db(op))?,
                state: r.try_get(1).map_err(db(op))?,
                at_ms: r.try_get(2).map_err(db(op))?,
            })
        })
        .collect()
    }

    fn prune_telemetry(&self, retention: &Retention, now_ms: i64) -> Result<u64, StoreError> {
        let mut c = self.client("prune telemetry")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin prune"))?;
            let mut deleted = 0;
            for r in [Resolution::Fine, Resolution::Coarse] {
                deleted += tx
                    .execute(
                        "DELETE FROM telemetry WHERE resolution = $1 AND bucket_ms < $2",
                        &[&code(r), &retention.cutoff(r, now_ms)],
                    )
                    .await
                    .map_err(db("prune telemetry"))?;
            }
            deleted += tx
                .execute(
                    "DELETE FROM deployment_transitions AS t WHERE at_ms < $1 AND EXISTS (
                         SELECT 1 FROM deployment_transitions AS later
                         WHERE later.deployment_id = t.deployment_id AND later.device_id = t.device_id
                           AND later.at_ms > t.at_ms)",
                    &[&retention.cutoff(Resolution::Coarse, now_ms)],
                )
                .await
                .map_err(db("prune transitions"))?;
            tx.commit().await.map_err(db("commit prune"))?;
            Ok(deleted)
        })
    }
}
