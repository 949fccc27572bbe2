//! Tests of the SQLite store.

use super::migrations::{MIGRATION_RING, MIGRATIONS};
use super::*;
use crate::store::{
    AccessStore as _, AuditEntry, AuditOutcome, DeploymentKind, DeploymentStore as _, DeviceStore as _, HaltOutcome,
    ModelFilter, NewDeployment, RegistryStore as _, StoreError, VersionRecord,
};

fn version(model: &str, version: &str, sha: &str) -> VersionRecord {
    VersionRecord {
        model: model.into(),
        version: version.into(),
        sha256: sha.into(),
        size: 10,
        stage: "staging".into(),
        hardware: vec!["aarch64".into()],
        manifest: vec![1, 2, 3],
        signature: vec![4],
        key_id: "k".into(),
        created_at_ms: 1,
        created_by: "t".into(),
    }
}

#[test]
fn migrations_set_user_version_and_reopen_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).expect("open");
    assert_eq!(store.schema_version().expect("version"), i64::try_from(MIGRATIONS.len()).expect("len"));
    store.create_model("m", "", &[], 1).expect("create");
    drop(store);
    let store = SqliteStore::open(&path).expect("reopen");
    assert!(store.get_model("m").expect("get").is_some());
    let mode: String = store.conn().pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("journal_mode");
    assert_eq!(mode, "wal");
}

#[test]
fn a_database_from_a_newer_hub_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    drop(SqliteStore::open(&path).expect("open"));
    Connection::open(&path).expect("raw").pragma_update(None, "user_version", 99).expect("bump");
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }), "{err}");
}

#[test]
fn filters_by_stage_and_hardware() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
    store.create_model("a", "", &[], 1).expect("a");
    store.create_model("b", "", &[], 1).expect("b");
    store.insert_version(&version("a", "1.0.0", "x"), &[], None).expect("v");
    let filter = |stage: Option<&str>, hw: Option<&str>| {
        let f = ModelFilter {
            stage: stage.map(Into::into),
            hardware: hw.map(Into::into),
            limit: 10,
            ..ModelFilter::default()
        };
        store.list_models(&f).expect("list").0.into_iter().map(|m| m.name).collect::<Vec<_>>()
    };
    assert_eq!(filter(None, None), ["a", "b"]);
    assert_eq!(filter(Some("staging"), None), ["a"]);
    assert!(filter(Some("production"), None).is_empty());
    assert_eq!(filter(None, Some("aarch64")), ["a"]);
    assert!(filter(None, Some("aarch")).is_empty(), "tags match whole, not by prefix");
}

fn new_deployment(version: &str, kind: DeploymentKind) -> NewDeployment {
    NewDeployment {
        model: "a".into(),
        version: version.into(),
        target: "site=x".into(),
        kind,
        created_by: "t".into(),
        replaces: None,
        policy: None,
        halt_fraction: 0.2,
        halt_count: Some(3),
        waves: Vec::new(),
    }
}

#[test]
fn a_deployment_halts_once_and_restores_in_the_same_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
    let d = store.insert_deployment(&new_deployment("2.0.0", DeploymentKind::Deploy), 1).expect("insert");
    let restore = new_deployment("1.0.0", DeploymentKind::Rollback);
    let HaltOutcome::Halted { restored: Some(r) } =
        store.halt_deployment(d.id, "too many failed", Some(&restore), 2).expect("halt")
    else {
        panic!("the active deployment halts and the earlier version comes back");
    };
    let halted = store.get_deployment(d.id).expect("get").expect("exists");
    assert_eq!((halted.state.as_str(), halted.halt_reason.as_deref()), ("halted", Some("too many failed")));
    assert_eq!(halted.halt_count, Some(3));
    assert_eq!(store.active_deployments("a").expect("active"), [*r]);
    assert_eq!(store.halt_deployment(d.id, "again", None, 3).expect("halt"), HaltOutcome::NotActive);
    assert_eq!(store.active_deployments("a").expect("active").len(), 1);
}

fn report_naming(deployments: &[(i64, &str)]) -> serde_json::Value {
    report_of("2.0.0", deployments)
}

fn report_of(version: &str, deployments: &[(i64, &str)]) -> serde_json::Value {
    let models: Vec<serde_json::Value> = deployments
        .iter()
        .map(|(id, state)| {
            serde_json::json!({"name": format!("m{id}"), "version": version, "state": state,
                "detail": format!("why {state}"), "deployment_id": id})
        })
        .collect();
    serde_json::json!({"device_id": "d", "applied_revision": 1, "events": [], "models": models})
}

#[test]
fn each_devices_last_state_per_deployment_outlives_later_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
    store.enroll_device("d", &Default::default(), "t", "t", 1).expect("enroll");
    let first = store.insert_deployment(&new_deployment("2.0.0", DeploymentKind::Deploy), 1).expect("insert").id;
    store.record_report("d", &report_naming(&[(first, "canary"), (0, "serving"), (99, "x")]), &[], 5).expect("r");
    let rows = store.deployment_devices(first).expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].state.as_str(), rows[0].detail.as_str(), rows[0].updated_ms), ("canary", "why canary", 5));
    assert!(store.deployment_devices(99).expect("rows").is_empty(), "a deployment this hub never issued");

    store.record_report("d", &report_naming(&[(first, "rolled_back")]), &[], 6).expect("r");
    let second = store.insert_deployment(&new_deployment("1.0.0", DeploymentKind::Rollback), 7).expect("insert").id;
    // A state for another version than the deployment's is not its state.
    store.record_report("d", &report_naming(&[(second, "downloading")]), &[], 8).expect("r");
    assert!(store.deployment_devices(second).expect("rows").is_empty(), "2.0.0 is not the rollback's version");
    store.record_report("d", &report_of("1.0.0", &[(second, "serving")]), &[], 8).expect("r");
    let rows = store.deployment_devices(first).expect("rows");
    assert_eq!((rows[0].state.as_str(), rows[0].updated_ms), ("rolled_back", 6), "kept after moving on");
    assert_eq!(store.deployment_devices(second).expect("rows")[0].state, "serving");

    store.remove_device("d").expect("remove");
    assert!(store.deployment_devices(first).expect("rows").is_empty(), "rows go with the device");
}

#[test]
fn reports_stored_before_schema_4_fill_the_per_deployment_states() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    {
        let mut conn = Connection::open(&path).expect("raw");
        let tx = conn.transaction().expect("tx");
        for sql in &MIGRATIONS[..3] {
            tx.execute_batch(sql).expect("old migration");
        }
        tx.pragma_update(None, "user_version", 3).expect("user_version");
        tx.execute_batch(
            "INSERT INTO deployments (model, version, target, kind, state, created_by, created_at_ms, updated_at_ms)
             VALUES ('m1', '2.0.0', 'site=x', 'deploy', 'active', 't', 1, 1);
             INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by, report_at_ms, report)
             VALUES ('d', 't', '{}', 1, 't', 42, 'not json'), ('e', 'u', '{}', 1, 't', 43, NULL);",
        )
        .expect("old rows");
        tx.execute(
            "INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by, report_at_ms, report)
             VALUES ('f', 'v', '{}', 1, 't', 44, ?1)",
            [report_naming(&[(1, "canary"), (2, "serving")]).to_string()],
        )
        .expect("old report");
        tx.commit().expect("commit");
    }
    let store = SqliteStore::open(&path).expect("migrate");
    let rows = store.deployment_devices(1).expect("rows");
    assert_eq!(rows.len(), 1, "a corrupt or missing report is skipped, not fatal: {rows:?}");
    assert_eq!((rows[0].device_id.as_str(), rows[0].state.as_str(), rows[0].updated_ms), ("f", "canary", 44));
}

#[test]
fn delete_keeps_blobs_shared_with_other_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
    store.create_model("a", "", &[], 1).expect("a");
    store.create_model("b", "", &[], 1).expect("b");
    store.insert_version(&version("a", "1.0.0", "shared"), &[], None).expect("v");
    store.insert_version(&version("a", "2.0.0", "only-a"), &[], None).expect("v");
    store.insert_version(&version("b", "1.0.0", "shared"), &[], None).expect("v");
    let mut freed = store.delete_model("a", 2).expect("delete");
    freed.sort();
    assert_eq!(freed, ["only-a"]);
    assert!(store.get_version("a", "1.0.0").expect("get").is_none(), "versions cascade");
}

/// Runs `sql` on the store's database behind its back, as corruption would.
fn corrupt(path: &std::path::Path, sql: &str) {
    Connection::open(path).expect("raw").execute_batch(sql).expect("corrupt");
}

#[test]
fn a_deployment_state_or_kind_this_hub_does_not_know_is_an_error_not_a_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).expect("open");
    let d = store.insert_deployment(&new_deployment("2.0.0", DeploymentKind::Deploy), 1).expect("insert");
    corrupt(&path, &format!("UPDATE deployments SET state = 'paused' WHERE id = {}", d.id));
    let e = store.get_deployment(d.id).unwrap_err();
    assert!(matches!(e, StoreError::Database { .. }), "{e}");
    let chain = crate::error_chain(&e);
    assert!(chain.contains(r#"unknown deployment state "paused""#), "{chain}");
    corrupt(&path, &format!("UPDATE deployments SET state = 'active', kind = 'redeploy' WHERE id = {}", d.id));
    assert!(store.list_deployments(None, None, 10, 0).is_err());
}

#[test]
fn an_audit_outcome_this_hub_does_not_know_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).expect("open");
    let entry = AuditEntry {
        id: 0,
        at_ms: 1,
        actor: "t".into(),
        role: "admin".into(),
        action: "POST /x".into(),
        status: 200,
        outcome: AuditOutcome::Denied,
        detail: String::new(),
    };
    store.append_audit(&entry).expect("append");
    assert_eq!(store.list_audit(&Default::default(), 10, 0).expect("list")[0].outcome, AuditOutcome::Denied);
    corrupt(&path, "UPDATE audit SET outcome = 'maybe'");
    assert!(store.list_audit(&Default::default(), 10, 0).is_err());
}

#[test]
fn corrupt_labels_hardware_or_tags_are_errors_not_empty_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).expect("open");
    corrupt(
        &path,
        "INSERT INTO devices (id, token_sha256, labels, created_at_ms, created_by) VALUES ('d', 't', '{}', 1, 't');
         INSERT INTO models (name, description, tags, created_at_ms, updated_at_ms) VALUES ('m', '', '[]', 1, 1);",
    );
    assert_eq!(store.list_devices().expect("clean").len(), 1);
    corrupt(&path, "UPDATE devices SET labels = 'not json'");
    assert!(store.list_devices().is_err(), "corrupt labels would change what targets the device");
    corrupt(&path, "UPDATE devices SET labels = '{}', hardware = '[1,'");
    assert!(store.list_devices().is_err());
    // A corrupt hello or report changes no decision and the next message
    // rewrites it: it reads as absent (with a warning), so the device can
    // still connect.
    corrupt(&path, "UPDATE devices SET hardware = '[]', report = '{\"models\":', hello = 'x'");
    let devices = store.list_devices().expect("a corrupt report does not refuse the device");
    assert_eq!((devices[0].report.is_none(), devices[0].hello.is_none()), (true, true));
    assert!(store.get_model("m").expect("clean").is_some());
    corrupt(&path, "UPDATE models SET tags = 'x'");
    assert!(store.get_model("m").is_err());
}

/// A device and its events come from one read, so a view never pairs a
/// report's events with the report before it (a device page once showed a
/// `rolled_back` event beside the model still `canary`).
#[test]
fn a_device_is_read_with_its_events_at_one_moment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
    assert!(store.device_with_events("d", 10).expect("read").is_none(), "not enrolled");
    store.enroll_device("d", &Default::default(), "t", "t", 1).expect("enroll");
    let event = crate::store::DeviceEvent {
        at_ms: 6,
        kind: "rolled_back".into(),
        model: "m1".into(),
        version: "2.0.0".into(),
        reason: "why".into(),
        evidence: Some(serde_json::json!({"kind": "latency", "switch_us": 42})),
    };
    store.record_report("d", &report_naming(&[(1, "rolled_back")]), &[event], 6).expect("r");
    let (device, events) = store.device_with_events("d", 10).expect("read").expect("enrolled");
    assert_eq!(device.report.expect("a report")["models"][0]["state"], "rolled_back");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "rolled_back");
    assert_eq!(events[0].evidence, Some(serde_json::json!({"kind": "latency", "switch_us": 42})), "kept as given");
}

/// A database at the schema before the label key `stage` became `ring`
/// (wherever that migration sits in the list) is rewritten on open.
#[test]
fn the_ring_migration_renames_stage_in_labels_hellos_and_targets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.db");
    let before = MIGRATIONS.iter().position(|m| *m == MIGRATION_RING).expect("the ring migration is listed");
    {
        let mut conn = Connection::open(&path).expect("raw");
        let tx = conn.transaction().expect("tx");
        for sql in &MIGRATIONS[..before] {
            tx.execute_batch(sql).expect("old migration");
        }
        tx.pragma_update(None, "user_version", before).expect("user_version");
        tx.execute_batch(crate::store::ring_migration_tests::OLD_ROWS).expect("old rows");
        tx.commit().expect("commit");
    }
    let store = SqliteStore::open(&path).expect("migrate");
    crate::store::ring_migration_tests::check(&store);
}
