//! Migrations on a real PostgreSQL database: the rig's (`SENTINEL_TEST_POSTGRES`,
//! set by `.ci/test` in its PostgreSQL half); without it each test says it
//! skipped.

use super::PostgresStore;
use super::migrations::{MIGRATION_RING, MIGRATIONS};

/// A fresh database on the rig at schema version `version`, with `rows`
/// written there; its URL.
fn database_at(admin: &str, version: usize, rows: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let url = sentinel_testkit::backend::fresh_database(admin).await;
        let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        let connection = tokio::spawn(connection);
        let tx = client.transaction().await.expect("tx");
        tx.batch_execute("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)")
            .await
            .expect("schema_migrations");
        for (i, sql) in MIGRATIONS[..version].iter().enumerate() {
            tx.batch_execute(sql).await.expect("old migration");
            let v = i64::try_from(i + 1).expect("version");
            tx.execute("INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, 0)", &[&v])
                .await
                .expect("record");
        }
        tx.batch_execute(rows).await.expect("old rows");
        tx.commit().await.expect("commit");
        drop(client);
        let _ = connection.await;
        url
    })
}

/// A database at the schema before the label key `stage` became `ring`
/// (wherever that migration sits in the list) is rewritten on open.
#[test]
fn the_ring_migration_renames_stage_in_labels_hellos_and_targets() {
    let Some(admin) = sentinel_testkit::backend::postgres() else {
        eprintln!(
            "SKIPPED store::postgres::migration_tests::the_ring_migration_renames_stage_in_labels_hellos_and_targets: \
                   needs the PostgreSQL rig"
        );
        return;
    };
    let before = MIGRATIONS.iter().position(|m| *m == MIGRATION_RING).expect("the ring migration is listed");
    let url = database_at(&admin, before, crate::store::ring_migration_tests::OLD_ROWS);
    let store = PostgresStore::open(&url, "test", None).expect("migrate");
    assert_eq!(store.schema_version().expect("version"), i64::try_from(MIGRATIONS.len()).expect("len"));
    crate::store::ring_migration_tests::check(&store);
}
