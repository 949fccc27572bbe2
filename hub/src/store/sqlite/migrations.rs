//! The schema: migrations driven by `PRAGMA user_version`.

use std::path::Path;

use rusqlite::Connection;

use super::db;
use crate::store::StoreError;

/// Each entry moves the schema from version `i` to `i + 1`. Never edit an
/// entry that has shipped; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the registry.
    "CREATE TABLE models (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
     );
     CREATE TABLE versions (
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        stage TEXT NOT NULL,
        hardware TEXT NOT NULL,
        manifest BLOB NOT NULL,
        signature BLOB NOT NULL,
        key_id TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY (model, version)
     );
     CREATE TABLE version_blobs (
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
     );
     CREATE TABLE deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        replaces INTEGER
     );
     CREATE INDEX deployments_model_state ON deployments(model, state);
     CREATE TABLE tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
     );",
    // 2: devices and the fleet-wide desired-state revision.
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        labels TEXT NOT NULL,
        hardware TEXT NOT NULL DEFAULT '[]',
        agent_version TEXT NOT NULL DEFAULT '',
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        last_seen_ms INTEGER,
        hello TEXT,
        report TEXT
     );
     CREATE TABLE device_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        reason TEXT NOT NULL
     );
     CREATE INDEX device_events_device ON device_events(device_id, id);
     CREATE TABLE fleet (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL
     );
     INSERT INTO fleet (id, revision) VALUES (1, 1);",
    // 3: rollout policies, halt thresholds and halts; when each report arrived.
    "ALTER TABLE deployments ADD COLUMN policy TEXT;
     ALTER TABLE deployments ADD COLUMN halt_fraction REAL NOT NULL DEFAULT 0.2;
     ALTER TABLE deployments ADD COLUMN halt_count INTEGER;
     ALTER TABLE deployments ADD COLUMN halt_reason TEXT;
     ALTER TABLE devices ADD COLUMN report_at_ms INTEGER;",
    // 4: each device's last state per deployment, kept when it moves on, so
    // halted and superseded deployments keep their rollup; filled from the
    // reports stored so far.
    "CREATE TABLE deployment_devices (
        deployment_id INTEGER NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (deployment_id, device_id)
     ) WITHOUT ROWID;
     INSERT INTO deployment_devices (deployment_id, device_id, version, state, detail, updated_ms)
     SELECT json_extract(m.value, '$.deployment_id'), d.id, json_extract(m.value, '$.version'),
            json_extract(m.value, '$.state'), COALESCE(json_extract(m.value, '$.detail'), ''),
            COALESCE(d.report_at_ms, d.last_seen_ms, 0)
     FROM devices AS d,
          json_each(CASE WHEN json_valid(d.report) THEN d.report ELSE '{}' END, '$.models') AS m
     WHERE json_extract(m.value, '$.deployment_id') IN (SELECT id FROM deployments)
       AND json_type(m.value, '$.version') = 'text' AND json_type(m.value, '$.state') = 'text';",
    MIGRATION_WAVES,
    // 6: publisher keys, and models that require a publisher signature.
    "ALTER TABLE models ADD COLUMN require_publisher INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE publishers (
        name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        public_key TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL
     );",
    // 7: device telemetry kept as fine and coarse buckets (keyed by time
    // first: reads and pruning are time ranges, and a second index would cost
    // a sixth of each row); which windows each
    // device's agent run has delivered; devices' state changes under each
    // deployment; rollout evidence on events.
    "CREATE TABLE telemetry (
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        resolution INTEGER NOT NULL,
        bucket_ms INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        feedback_correct INTEGER NOT NULL,
        feedback_total INTEGER NOT NULL,
        agreement_agreed INTEGER NOT NULL,
        agreement_total INTEGER NOT NULL,
        restarts INTEGER NOT NULL,
        validation_accuracy REAL,
        validation_samples INTEGER NOT NULL,
        rss_max_bytes INTEGER NOT NULL,
        latency BLOB NOT NULL,
        compute BLOB NOT NULL,
        PRIMARY KEY (resolution, bucket_ms, device_id, model, version)
     ) WITHOUT ROWID;
     ALTER TABLE devices ADD COLUMN telemetry_run INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN telemetry_seq INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE deployment_transitions (
        deployment_id INTEGER NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     );
     CREATE INDEX deployment_transitions_deployment ON deployment_transitions(deployment_id, at_ms);
     INSERT INTO deployment_transitions (deployment_id, device_id, state, at_ms)
     SELECT deployment_id, device_id, state, updated_ms FROM deployment_devices;
     ALTER TABLE device_events ADD COLUMN evidence TEXT;",
    MIGRATION_RING,
];

/// 8: the device-label key `stage` (deployment rings) is now `ring`; a
/// model version's stage keeps its name. Renamed in enrolment labels, in the
/// labels of each device's last hello, and in deployment targets, which are
/// rewritten in the order selectors print (labels by key, then hardware
/// tags), so a target stays equal to the same selector parsed anew. Labels
/// or a target that name a `ring` already are left as they were; a corrupt
/// JSON column or target is skipped (reading it fails as it did before).
/// `GLOB`, not `LIKE`: label keys are case-sensitive.
pub(super) const MIGRATION_RING: &str = r#"UPDATE devices
        SET labels = json_set(json_remove(labels, '$.stage'), '$.ring', json_extract(labels, '$.stage'))
      WHERE json_valid(labels) AND json_type(labels, '$.stage') IS NOT NULL AND json_type(labels, '$.ring') IS NULL;
     UPDATE devices
        SET hello = json_set(json_remove(hello, '$.labels.stage'), '$.labels.ring',
                             json_extract(hello, '$.labels.stage'))
      WHERE json_valid(hello) AND json_type(hello, '$.labels.stage') IS NOT NULL
        AND json_type(hello, '$.labels.ring') IS NULL;
     UPDATE deployments
        SET target = (
            SELECT group_concat(part, ',' ORDER BY part GLOB 'hardware=*', substr(part, 1, instr(part, '=') - 1), part)
            FROM (SELECT CASE WHEN p.value GLOB 'stage=*' THEN 'ring=' || substr(p.value, 7) ELSE p.value END AS part
                  FROM json_each('["' || replace(deployments.target, ',', '","') || '"]') AS p))
      WHERE (',' || target || ',') GLOB '*,stage=*' AND NOT (',' || target || ',') GLOB '*,ring=*'
        AND json_valid('["' || replace(target, ',', '","') || '"]');"#;

/// 5: staged rollouts.
const MIGRATION_WAVES: &str = "ALTER TABLE deployments ADD COLUMN waves TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE deployments ADD COLUMN wave INTEGER NOT NULL DEFAULT 0;";

/// Records a transition for each model of a report (`?3`, JSON) from device
/// `?1` at `?2` whose state differs from the last one recorded for its
/// deployment; run before [`RECORD_DEPLOYMENT_STATES`], with the same filter.
pub(super) const RECORD_TRANSITIONS: &str =
    "INSERT INTO deployment_transitions (deployment_id, device_id, state, at_ms)
         SELECT json_extract(m.value, '$.deployment_id'), ?1, json_extract(m.value, '$.state'), ?2
         FROM json_each(?3, '$.models') AS m
         WHERE EXISTS (SELECT 1 FROM deployments AS d WHERE d.id = json_extract(m.value, '$.deployment_id')
                                                      AND d.version = json_extract(m.value, '$.version'))
           AND json_type(m.value, '$.version') = 'text' AND json_type(m.value, '$.state') = 'text'
           AND NOT EXISTS (SELECT 1 FROM deployment_devices AS dd
                           WHERE dd.deployment_id = json_extract(m.value, '$.deployment_id')
                             AND dd.device_id = ?1 AND dd.state = json_extract(m.value, '$.state'))";

/// Records each model of a report (`?3`, JSON) from device `?1` at `?2`
/// under the deployment it names. Skipped: models naming no stored
/// deployment (0 for none, or an id this hub never issued), and states for
/// another version than the deployment's (an agent reporting a download
/// under the deployment it is leaving). `updated_ms` moves only when the
/// state does, not with every heartbeat.
pub(super) const RECORD_DEPLOYMENT_STATES: &str =
    "INSERT INTO deployment_devices (deployment_id, device_id, version, state, detail, updated_ms)
         SELECT json_extract(m.value, '$.deployment_id'), ?1, json_extract(m.value, '$.version'),
                json_extract(m.value, '$.state'), COALESCE(json_extract(m.value, '$.detail'), ''), ?2
         FROM json_each(?3, '$.models') AS m
         WHERE EXISTS (SELECT 1 FROM deployments AS d WHERE d.id = json_extract(m.value, '$.deployment_id')
                                                      AND d.version = json_extract(m.value, '$.version'))
           AND json_type(m.value, '$.version') = 'text' AND json_type(m.value, '$.state') = 'text'
         ON CONFLICT (deployment_id, device_id) DO UPDATE SET
             version = excluded.version, state = excluded.state, detail = excluded.detail,
             updated_ms = CASE WHEN deployment_devices.state = excluded.state
                                AND deployment_devices.version = excluded.version
                                AND deployment_devices.detail = excluded.detail
                          THEN deployment_devices.updated_ms ELSE excluded.updated_ms END";

/// Applies the migrations `conn` has not had yet, each in its own
/// transaction; refuses a database from a newer hub.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db("read user_version"))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if found > known {
        return Err(StoreError::SchemaTooNew { path: path.display().to_string(), found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        let tx = conn.transaction().map_err(db("begin migration"))?;
        tx.execute_batch(sql).map_err(db("apply migration"))?;
        tx.pragma_update(None, "user_version", i + 1).map_err(db("set user_version"))?;
        tx.commit().map_err(db("commit migration"))?;
    }
    Ok(())
}
