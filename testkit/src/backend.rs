//! The storage back end test hubs run on.
//!
//! By default a test hub keeps everything in its data dir (SQLite, local
//! disk): the embedded defaults. `.ci/test` runs the hub's whole suite a
//! second time on a rig it starts (a throwaway PostgreSQL cluster), telling
//! the tests through the environment:
//! - `SENTINEL_TEST_POSTGRES`: the rig's admin URL
//!   (`postgres://postgres@127.0.0.1:PORT/postgres`). Each hub gets a fresh
//!   database of its own, remembered in its data dir so a restart finds it.
//!
//! A hub whose config names a back end already keeps it.

use std::path::Path;

use sentinel_hub::HubConfig;
use sentinel_hub::config::DatabaseUrl;

/// The file in a test hub's data dir that names its rig database.
const DATABASE_FILE: &str = "test-database.url";
/// The key-encryption key of a test hub on the rig.
pub const KEK_FILE: &str = "test.kek";

/// The rig's PostgreSQL admin URL, when the suite runs on the rig.
pub fn postgres() -> Option<String> {
    std::env::var("SENTINEL_TEST_POSTGRES").ok().filter(|s| !s.is_empty())
}

/// A name for the back end, for messages.
pub fn name() -> &'static str {
    if postgres().is_some() { "postgres" } else { "sqlite" }
}

/// Creates an empty database on the rig and returns its URL.
pub async fn fresh_database(admin: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let name = format!("t{}_{}_{n}_{nanos}", std::process::id(), std::thread::current().name().map_or(0, str::len));
    let (client, connection) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(connection);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    drop(client);
    let _ = conn.await;
    let (base, _) = admin.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// Writes a fresh key-encryption key to `path` (mode 0600).
pub fn write_kek(path: &Path) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ (std::process::id() as u8)).collect();
    f.write_all(&key).unwrap();
}

/// Points `config` at the rig when the suite runs on it and the config
/// names no database of its own.
pub async fn apply(config: &mut HubConfig) {
    let Some(admin) = postgres() else { return };
    if config.database.is_some() {
        return;
    }
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(DATABASE_FILE);
    let url = match std::fs::read_to_string(&file) {
        Ok(url) => url,
        Err(_) => {
            let url = fresh_database(&admin).await;
            std::fs::write(&file, &url).unwrap();
            write_kek(&dir.join(KEK_FILE));
            url
        }
    };
    config.database = Some(DatabaseUrl::Postgres(url));
    if config.key_encryption_key_file.is_none() {
        config.key_encryption_key_file = Some(dir.join(KEK_FILE));
    }
}
