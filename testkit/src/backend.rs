//! The storage back end test hubs run on.
//!
//! By default a test hub keeps everything in its data dir (SQLite, local
//! disk): the embedded defaults. `.ci/test` runs the hub's whole suite a
//! second time on a rig it starts (a throwaway PostgreSQL cluster), telling
//! the tests through the environment:
//! - `SENTINEL_TEST_POSTGRES`: the rig's admin URL
//!   (`postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable`), and
//!   `SENTINEL_TEST_POSTGRES_CA`, the CA of its TLS certificate. Each hub gets a fresh
//!   database of its own, remembered in its data dir so a restart finds it.
//! - `SENTINEL_TEST_S3` (the endpoint), `SENTINEL_TEST_S3_BUCKET`,
//!   `SENTINEL_TEST_S3_KEY`, `SENTINEL_TEST_S3_SECRET`: the rig's S3 server
//!   (s3s-fs). Each hub gets a fresh prefix in the bucket, remembered likewise.
//!
//! A hub whose config names a back end already keeps it.

use std::path::Path;

use sentinel_hub::HubConfig;
use sentinel_hub::config::{BlobsUrl, DatabaseUrl};

/// The file in a test hub's data dir that names its rig database.
const DATABASE_FILE: &str = "test-database.url";
/// The file in a test hub's data dir that names its prefix in the rig's bucket.
const PREFIX_FILE: &str = "test-blobs.prefix";
/// The key-encryption key of a test hub on the rig.
pub const KEK_FILE: &str = "test.kek";

/// The rig's PostgreSQL admin URL, when the suite runs on the rig.
pub fn postgres() -> Option<String> {
    std::env::var("SENTINEL_TEST_POSTGRES").ok().filter(|s| !s.is_empty())
}

/// The rig's S3 server, when the suite runs on it.
pub fn s3() -> Option<S3Rig> {
    let var = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    Some(S3Rig {
        endpoint: var("SENTINEL_TEST_S3")?,
        bucket: var("SENTINEL_TEST_S3_BUCKET")?,
        key: var("SENTINEL_TEST_S3_KEY")?,
        secret: var("SENTINEL_TEST_S3_SECRET")?,
    })
}

/// Where the rig's S3 server is, and how to sign in.
#[derive(Debug, Clone)]
pub struct S3Rig {
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
    pub secret: String,
}

impl S3Rig {
    /// Settings that reach the rig's server.
    pub fn settings(&self) -> sentinel_hub::config::S3Settings {
        sentinel_hub::config::S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(self.key.clone()),
            secret_access_key: Some(self.secret.clone()),
        }
    }
}

/// A name for the back end, for messages.
pub fn name() -> &'static str {
    if postgres().is_some() { "postgres" } else { "sqlite" }
}

/// A prefix no other test hub uses.
pub fn fresh_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t{}-{n}-{nanos}/", std::process::id())
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
    with_database(admin, &name)
}

/// `url` naming database `name` instead, its query (`?sslmode=...`) kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
    let (base, _) = path.rsplit_once('/').unwrap();
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// What hub replicas share, made fresh: a database on the rig and a
/// key-encryption key at `dir/kek`. `None` when the suite is not on the rig.
pub async fn shared_database(dir: &Path) -> Option<(String, std::path::PathBuf)> {
    let url = fresh_database(&postgres()?).await;
    let kek = dir.join("kek");
    write_kek(&kek);
    Some((url, kek))
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
/// names no back end of its own.
pub async fn apply(config: &mut HubConfig) {
    if let Some(rig) = s3()
        && config.blobs.is_none()
    {
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let file = config.data_dir.join(PREFIX_FILE);
        let prefix = std::fs::read_to_string(&file).unwrap_or_else(|_| {
            let p = fresh_prefix();
            std::fs::write(&file, &p).unwrap();
            p
        });
        config.blobs = Some(BlobsUrl::S3 { bucket: rig.bucket.clone(), prefix });
        config.s3 = rig.settings();
    }
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
