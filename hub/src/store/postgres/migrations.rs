//! The schema: numbered migrations, recorded in `schema_migrations`.

use deadpool_postgres::Object;

use super::db;
use crate::store::StoreError;

/// The advisory lock every schema change and the first admin token are made
/// under ("sentinel" in ASCII), so replicas starting together take turns.
pub(super) const BOOTSTRAP_LOCK: i64 = 0x73_65_6e_74_69_6e_65_6c;

/// Each entry moves the schema from version `i` to `i + 1`. Never edit an
/// entry that has shipped; append a new one. Version 1 is the schema the
/// SQLite store reached at its version 5, in PostgreSQL's types.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the registry, deployments, tokens, audit, devices and the fleet revision.
    "CREATE TABLE models (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL
     );
     CREATE TABLE versions (
        model TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        stage TEXT NOT NULL,
        hardware TEXT NOT NULL,
        manifest BYTEA NOT NULL,
        signature BYTEA NOT NULL,
        key_id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY (model, version)
     );
     CREATE INDEX versions_sha256 ON versions(sha256);
     CREATE TABLE version_blobs (
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
     );
     CREATE INDEX version_blobs_sha256 ON version_blobs(sha256);
     CREATE TABLE deployments (
        id BIGSERIAL PRIMARY KEY,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        replaces BIGINT,
        policy TEXT,
        halt_fraction DOUBLE PRECISION NOT NULL DEFAULT 0.2,
        halt_count BIGINT,
        halt_reason TEXT,
        waves TEXT NOT NULL DEFAULT '[]',
        wave BIGINT NOT NULL DEFAULT 0
     );
     CREATE INDEX deployments_model_state ON deployments(model, state);
     CREATE TABLE tokens (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT FALSE
     );
     CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
     );
     CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        labels TEXT NOT NULL,
        hardware TEXT NOT NULL DEFAULT '[]',
        agent_version TEXT NOT NULL DEFAULT '',
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        last_seen_ms BIGINT,
        hello TEXT,
        report TEXT,
        report_at_ms BIGINT
     );
     CREATE TABLE device_events (
        id BIGSERIAL PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        reason TEXT NOT NULL
     );
     CREATE INDEX device_events_device ON device_events(device_id, id);
     CREATE TABLE fleet (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision BIGINT NOT NULL
     );
     INSERT INTO fleet (id, revision) VALUES (1, 1);
     CREATE TABLE deployment_devices (
        deployment_id BIGINT NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL,
        updated_ms BIGINT NOT NULL,
        PRIMARY KEY (deployment_id, device_id)
     );",
    // 2: the signing keys every replica shares, each private key sealed with
    // the key-encryption key; at most one active.
    "CREATE TABLE signing_keys (
        key_id TEXT PRIMARY KEY,
        public_key BYTEA NOT NULL,
        sealed_pkcs8 BYTEA NOT NULL,
        created_at_ms BIGINT NOT NULL,
        active BOOLEAN NOT NULL DEFAULT FALSE
     );
     CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys(active) WHERE active;",
    // 3 (SQLite 6): publisher keys, and models that require a publisher signature.
    "ALTER TABLE models ADD COLUMN require_publisher BOOLEAN NOT NULL DEFAULT FALSE;
     CREATE TABLE publishers (
        name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        public_key TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL
     );",
    // 4 (SQLite 7): device telemetry kept as fine and coarse buckets (keyed
    // by time first: reads and pruning are time ranges); which
    // windows each device's agent run has delivered; devices' state changes
    // under each deployment; rollout evidence on events.
    "CREATE TABLE telemetry (
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        resolution INTEGER NOT NULL,
        bucket_ms BIGINT NOT NULL,
        requests BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        feedback_correct BIGINT NOT NULL,
        feedback_total BIGINT NOT NULL,
        agreement_agreed BIGINT NOT NULL,
        agreement_total BIGINT NOT NULL,
        restarts BIGINT NOT NULL,
        validation_accuracy DOUBLE PRECISION,
        validation_samples BIGINT NOT NULL,
        rss_max_bytes BIGINT NOT NULL,
        latency BYTEA NOT NULL,
        compute BYTEA NOT NULL,
        PRIMARY KEY (resolution, bucket_ms, device_id, model, version)
     );
     ALTER TABLE devices ADD COLUMN telemetry_run BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN telemetry_seq BIGINT NOT NULL DEFAULT 0;
     CREATE TABLE deployment_transitions (
        id BIGSERIAL PRIMARY KEY,
        deployment_id BIGINT NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        at_ms BIGINT NOT NULL
     );
     CREATE INDEX deployment_transitions_deployment ON deployment_transitions(deployment_id, at_ms);
     INSERT INTO deployment_transitions (deployment_id, device_id, state, at_ms)
     SELECT deployment_id, device_id, state, updated_ms FROM deployment_devices;
     ALTER TABLE device_events ADD COLUMN evidence TEXT;",
    MIGRATION_RING,
];

/// 5 (SQLite 8): the device-label key `stage` (deployment rings) is now
/// `ring`; a model version's stage keeps its name. Renamed in enrolment
/// labels, in the labels of each device's last hello, and in deployment
/// targets, which are rewritten in the order selectors print (labels by key
/// in byte order, hence `COLLATE "C"`, then hardware tags), so a target
/// stays equal to the same selector parsed anew. Labels or a target that
/// name a `ring` already are left as they were. The JSON columns are text:
/// one that does not parse is skipped (in a block of its own, as a failed
/// cast would abort the migration), and reading it fails as it did before.
pub(super) const MIGRATION_RING: &str = r#"DO $$
     DECLARE
        d RECORD;
        lj JSONB;
        hj JSONB;
     BEGIN
        FOR d IN SELECT id, devices.labels AS l, devices.hello AS h FROM devices
                 WHERE devices.labels LIKE '%"stage"%' OR devices.hello LIKE '%"stage"%' LOOP
            BEGIN
                lj := d.l::jsonb;
                IF jsonb_typeof(lj) = 'object' AND lj ? 'stage' AND NOT lj ? 'ring' THEN
                    UPDATE devices SET labels = ((lj - 'stage') || jsonb_build_object('ring', lj -> 'stage'))::text
                     WHERE id = d.id;
                END IF;
            EXCEPTION WHEN invalid_text_representation THEN NULL;
            END;
            BEGIN
                hj := d.h::jsonb;
                IF jsonb_typeof(hj -> 'labels') = 'object' AND (hj -> 'labels') ? 'stage'
                   AND NOT (hj -> 'labels') ? 'ring' THEN
                    UPDATE devices
                       SET hello = jsonb_set(hj, '{labels}', ((hj -> 'labels') - 'stage')
                                   || jsonb_build_object('ring', hj -> 'labels' -> 'stage'))::text
                     WHERE id = d.id;
                END IF;
            EXCEPTION WHEN invalid_text_representation THEN NULL;
            END;
        END LOOP;
     END $$;
     UPDATE deployments
        SET target = (
            SELECT string_agg(part, ',' ORDER BY part LIKE 'hardware=%', split_part(part, '=', 1) COLLATE "C",
                              part COLLATE "C")
            FROM (SELECT CASE WHEN p LIKE 'stage=%' THEN 'ring=' || substr(p, 7) ELSE p END AS part
                  FROM unnest(string_to_array(deployments.target, ',')) AS p) AS parts)
      WHERE (',' || target || ',') LIKE '%,stage=%' AND (',' || target || ',') NOT LIKE '%,ring=%';"#;

/// Applies the migrations the database has not had yet, in one transaction
/// under [`BOOTSTRAP_LOCK`]; refuses a database from a newer hub.
pub(super) async fn migrate(client: &mut Object, url: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK]).await.map_err(db("lock for migration"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
    )
    .await
    .map_err(db("create schema_migrations"))?;
    let found: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db("read schema version"))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if found > known {
        return Err(StoreError::SchemaTooNew { path: url.to_owned(), found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(sql).await.map_err(db("apply migration"))?;
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
            &[&version, &crate::now_ms()],
        )
        .await
        .map_err(db("record migration"))?;
        tracing::info!(version, "applied a database migration");
    }
    tx.commit().await.map_err(db("commit migration"))
}
