//! Enrolled devices, what they report, the fleet revision and change notices.

use deadpool_postgres::GenericClient;
use futures_util::StreamExt as _;
use tokio_postgres::{AsyncMessage, IsolationLevel, Row};

use super::{CHANNEL, DEPLOYMENTS, PostgresStore, RESYNC, block, db, is_unique_violation, json_col, notice};
use crate::store::{DeploymentDevice, DeviceEvent, DeviceRecord, DeviceStore, FleetSnapshot, StoreError};

const DEVICE_COLS: &str =
    "id, labels, hardware, agent_version, created_at_ms, created_by, last_seen_ms, hello, report, report_at_ms";

fn device_from_row(row: &Row) -> Result<DeviceRecord, StoreError> {
    let op = "read device";
    // As in the SQLite store: a corrupt hello or report reads as absent (the
    // device's next message rewrites it); corrupt labels refuse the row.
    let json = |column: &str| -> Result<Option<serde_json::Value>, StoreError> {
        let Some(text) = row.try_get::<_, Option<String>>(column).map_err(db(op))? else { return Ok(None) };
        match serde_json::from_str(&text) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let device: String = row.try_get("id").map_err(db(op))?;
                tracing::warn!(device, column, error = %e, "corrupt JSON in the devices table; read as absent");
                Ok(None)
            }
        }
    };
    Ok(DeviceRecord {
        id: row.try_get("id").map_err(db(op))?,
        labels: json_col(op, row, "labels")?,
        hardware: json_col(op, row, "hardware")?,
        agent_version: row.try_get("agent_version").map_err(db(op))?,
        created_at_ms: row.try_get("created_at_ms").map_err(db(op))?,
        created_by: row.try_get("created_by").map_err(db(op))?,
        last_seen_ms: row.try_get("last_seen_ms").map_err(db(op))?,
        hello: json("hello")?,
        report: json("report")?,
        report_at_ms: row.try_get("report_at_ms").map_err(db(op))?,
    })
}

fn event_from_row(r: &Row) -> Result<DeviceEvent, StoreError> {
    let op = "list events";
    Ok(DeviceEvent {
        at_ms: r.try_get("at_ms").map_err(db(op))?,
        kind: r.try_get("kind").map_err(db(op))?,
        model: r.try_get("model").map_err(db(op))?,
        version: r.try_get("version").map_err(db(op))?,
        reason: r.try_get("reason").map_err(db(op))?,
        // Written by this hub from a decoded message; unreadable reads as none.
        evidence: r
            .try_get::<_, Option<String>>("evidence")
            .map_err(db(op))?
            .and_then(|t| serde_json::from_str(&t).ok()),
    })
}

/// Bumps the fleet revision inside the caller's transaction and tells the
/// other replicas at commit. The `fleet` row's lock orders concurrent
/// changes, so revisions and changes pair one to one.
pub(super) async fn bump_revision(tx: &impl GenericClient, replica: &str) -> Result<(), StoreError> {
    tx.execute("UPDATE fleet SET revision = revision + 1 WHERE id = 1", &[]).await.map_err(db("bump revision"))?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice(replica, DEPLOYMENTS)])
        .await
        .map_err(db("announce change"))?;
    Ok(())
}

/// One model's state from a report's `models` entry, when it names a
/// deployment and carries a version and a state (as the SQLite store's
/// `RECORD_DEPLOYMENT_STATES` reads them).
fn deployment_state(m: &serde_json::Value) -> Option<(i64, &str, &str, &str)> {
    let id = m.get("deployment_id")?.as_i64()?;
    let version = m.get("version")?.as_str()?;
    let state = m.get("state")?.as_str()?;
    let detail = m.get("detail").and_then(serde_json::Value::as_str).unwrap_or("");
    Some((id, version, state, detail))
}

async fn device_on(c: &impl GenericClient, column: &str, value: &str) -> Result<Option<DeviceRecord>, StoreError> {
    c.query_opt(&format!("SELECT {DEVICE_COLS} FROM devices WHERE {column} = $1"), &[&value])
        .await
        .map_err(db("read device"))?
        .as_ref()
        .map(device_from_row)
        .transpose()
}

async fn events_on(c: &impl GenericClient, id: &str, limit: u32) -> Result<Vec<DeviceEvent>, StoreError> {
    c.query(
        "SELECT at_ms, kind, model, version, reason, evidence FROM device_events WHERE device_id = $1
         ORDER BY id DESC LIMIT $2",
        &[&id, &i64::from(limit)],
    )
    .await
    .map_err(db("list events"))?
    .iter()
    .map(event_from_row)
    .collect()
}

/// A read-only transaction whose reads all see one moment.
async fn snapshot(c: &mut deadpool_postgres::Object) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    c.build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db("begin snapshot"))
}

impl DeviceStore for PostgresStore {
    fn enroll_device(
        &self,
        id: &str,
        labels: &std::collections::BTreeMap<String, String>,
        token_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<DeviceRecord, StoreError> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let c = self.client("enroll device")?;
        block(async {
            c.execute(
                "INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by) VALUES ($1, $2, $3, $4, $5)",
                &[&id, &token_sha256, &labels_json, &now_ms, &created_by],
            )
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict { what: format!("device {id}") }
                } else {
                    db("enroll device")(e)
                }
            })?;
            device_on(&c, "id", id).await?.ok_or_else(|| StoreError::NotFound { what: format!("device {id}") })
        })
    }

    fn device_by_token(&self, token_sha256: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let c = self.client("read device")?;
        block(device_on(&c, "token_sha256", token_sha256))
    }

    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let c = self.client("read device")?;
        block(device_on(&c, "id", id))
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let c = self.client("list devices")?;
        block(c.query(&format!("SELECT {DEVICE_COLS} FROM devices ORDER BY id"), &[]))
            .map_err(db("list devices"))?
            .iter()
            .map(device_from_row)
            .collect()
    }

    fn remove_device(&self, id: &str) -> Result<(), StoreError> {
        let c = self.client("remove device")?;
        let n = block(c.execute("DELETE FROM devices WHERE id = $1", &[&id])).map_err(db("remove device"))?;
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
        let c = self.client("record hello")?;
        block(c.execute(
            "UPDATE devices SET hello = $2, hardware = $3, agent_version = $4, last_seen_ms = $5 WHERE id = $1",
            &[
                &id,
                &hello.to_string(),
                &serde_json::Value::from(hardware.to_vec()).to_string(),
                &agent_version,
                &now_ms,
            ],
        ))
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
        let mut c = self.client("record report")?;
        block(async {
            let tx = c.transaction().await.map_err(db("begin report"))?;
            tx.execute(
                "UPDATE devices SET report = $2, last_seen_ms = $3, report_at_ms = $3 WHERE id = $1",
                &[&id, &report.to_string(), &now_ms],
            )
            .await
            .map_err(db("record report"))?;
            for e in events {
                tx.execute(
                    "INSERT INTO device_events (device_id, at_ms, kind, model, version, reason, evidence)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &id,
                        &e.at_ms,
                        &e.kind,
                        &e.model,
                        &e.version,
                        &e.reason,
                        &e.evidence.as_ref().map(ToString::to_string),
                    ],
                )
                .await
                .map_err(db("record event"))?;
            }
            let models = report.get("models").and_then(serde_json::Value::as_array).map_or(&[][..], Vec::as_slice);
            for (deployment, version, state, detail) in models.iter().filter_map(deployment_state) {
                // Skipped: a deployment this hub never issued, and a state for
                // another version than the deployment's (an agent reporting a
                // download under the deployment it is leaving). `updated_ms`
                // moves only when the state does, not with every heartbeat.
                // A change of state is kept as a transition first.
                tx.execute(
                    "INSERT INTO deployment_transitions (deployment_id, device_id, state, at_ms)
                     SELECT $1, $2, $4, $5
                     WHERE EXISTS (SELECT 1 FROM deployments WHERE id = $1 AND version = $3)
                       AND NOT EXISTS (SELECT 1 FROM deployment_devices
                                       WHERE deployment_id = $1 AND device_id = $2 AND state = $4)",
                    &[&deployment, &id, &version, &state, &now_ms],
                )
                .await
                .map_err(db("record transitions"))?;
                tx.execute(
                    "INSERT INTO deployment_devices (deployment_id, device_id, version, state, detail, updated_ms)
                     SELECT $1, $2, $3, $4, $5, $6
                     WHERE EXISTS (SELECT 1 FROM deployments WHERE id = $1 AND version = $3)
                     ON CONFLICT (deployment_id, device_id) DO UPDATE SET
                         version = excluded.version, state = excluded.state, detail = excluded.detail,
                         updated_ms = CASE WHEN deployment_devices.state = excluded.state
                                            AND deployment_devices.version = excluded.version
                                            AND deployment_devices.detail = excluded.detail
                                      THEN deployment_devices.updated_ms ELSE excluded.updated_ms END",
                    &[&deployment, &id, &version, &state, &detail, &now_ms],
                )
                .await
                .map_err(db("record deployment states"))?;
            }
            tx.commit().await.map_err(db("commit report"))
        })
    }

    fn touch_device(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let c = self.client("touch device")?;
        block(c.execute("UPDATE devices SET last_seen_ms = $2 WHERE id = $1", &[&id, &now_ms]))
            .map_err(db("touch device"))?;
        Ok(())
    }

    fn deployment_devices(&self, deployment_id: i64) -> Result<Vec<DeploymentDevice>, StoreError> {
        let c = self.client("list deployment devices")?;
        let op = "list deployment devices";
        block(c.query(
            "SELECT device_id, version, state, detail, updated_ms FROM deployment_devices
             WHERE deployment_id = $1 ORDER BY device_id",
            &[&deployment_id],
        ))
        .map_err(db(op))?
        .iter()
        .map(|r| {
            Ok(DeploymentDevice {
                device_id: r.try_get("device_id").map_err(db(op))?,
                version: r.try_get("version").map_err(db(op))?,
                state: r.try_get("state").map_err(db(op))?,
                detail: r.try_get("detail").map_err(db(op))?,
                updated_ms: r.try_get("updated_ms").map_err(db(op))?,
            })
        })
        .collect()
    }

    fn device_events(&self, id: &str, limit: u32) -> Result<Vec<DeviceEvent>, StoreError> {
        let c = self.client("list events")?;
        block(events_on(&c, id, limit))
    }

    fn device_with_events(&self, id: &str, limit: u32) -> Result<Option<(DeviceRecord, Vec<DeviceEvent>)>, StoreError> {
        let mut c = self.client("read device")?;
        block(async {
            // One snapshot for both reads.
            let tx = snapshot(&mut c).await?;
            let Some(device) = device_on(&tx, "id", id).await? else { return Ok(None) };
            let events = events_on(&tx, id, limit).await?;
            Ok(Some((device, events)))
        })
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let c = self.client("read revision")?;
        let r: i64 = block(c.query_one("SELECT revision FROM fleet WHERE id = 1", &[]))
            .and_then(|r| r.try_get(0))
            .map_err(db("read revision"))?;
        Ok(u64::try_from(r).unwrap_or(0))
    }

    fn fleet_snapshot(&self) -> Result<FleetSnapshot, StoreError> {
        let mut c = self.client("read fleet snapshot")?;
        block(async {
            let tx = snapshot(&mut c).await?;
            let revision: i64 = tx
                .query_one("SELECT revision FROM fleet WHERE id = 1", &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db("read revision"))?;
            let active_key: Option<String> = tx
                .query_opt("SELECT key_id FROM signing_keys WHERE active", &[])
                .await
                .map_err(db("read active key"))?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(db("read active key"))?;
            Ok(FleetSnapshot {
                revision: u64::try_from(revision).unwrap_or(0),
                active: super::deployments::active(&tx).await?,
                versions: super::registry::deployed_versions(&tx).await?,
                active_key,
            })
        })
    }
}

/// Keeps one connection in `LISTEN` on [`CHANNEL`] and forwards the kinds of
/// other replicas' notices. Sends [`RESYNC`] each time it starts listening
/// (notices sent while nobody listened are lost), and reconnects with a
/// growing pause after a failure. Ends when the receiver is gone.
pub(super) async fn listen_loop(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    me: String,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                // The connection yields notices only while it is polled, so
                // it is polled here, and the LISTEN sent beside it.
                let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listen_sql = format!("LISTEN {CHANNEL}");
                let listen = client.batch_execute(&listen_sql);
                tokio::pin!(listen);
                let mut listening = false;
                loop {
                    tokio::select! {
                        done = &mut listen, if !listening => {
                            if let Err(e) = done {
                                tracing::warn!(error = %e, "LISTEN failed");
                                break;
                            }
                            listening = true;
                            pause = std::time::Duration::from_millis(100);
                            // Notices sent while no connection listened are lost.
                            if tx.send(RESYNC.to_owned()).is_err() {
                                return;
                            }
                        }
                        msg = stream.next() => match msg {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let mut parts = n.payload().splitn(2, ' ');
                                let (from, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                                if from != me && tx.send(kind.to_owned()).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "the change-notice connection failed; reconnecting");
                                break;
                            }
                            None => break,
                        },
                        () = tx.closed() => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the change-notice connection; retrying"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}
