//! The agent database's schema, one step per entry, applied in order and
//! never edited once released (`PRAGMA user_version` counts the applied ones).

pub(super) const MIGRATIONS: &[&str] = &[
    "CREATE TABLE desired (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL,
        signed BLOB NOT NULL,
        verified_at_ms INTEGER NOT NULL
     );
     CREATE TABLE models (
        name TEXT PRIMARY KEY,
        active_version TEXT,
        active_sha256 TEXT,
        active_deployment INTEGER,
        standby_version TEXT,
        standby_sha256 TEXT,
        status TEXT NOT NULL,
        status_version TEXT NOT NULL,
        detail TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL
     );
     CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        reason TEXT NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0
     );",
    // 2: blue/green slot pairs, one committed row per model.
    "CREATE TABLE slots (
        model TEXT PRIMARY KEY,
        pair TEXT NOT NULL,
        committed_at_ms INTEGER NOT NULL
     );",
    // 3: the signed manifest of each stored model file.
    "CREATE TABLE manifests (
        sha256 TEXT PRIMARY KEY,
        signed BLOB NOT NULL
     );",
    // 4: which deployment a status is about; versions rolled back on the device.
    "ALTER TABLE models ADD COLUMN status_deployment INTEGER;
     CREATE TABLE rejected (
        model TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        version TEXT NOT NULL,
        revision INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (model, sha256, version)
     );",
    // 5: a rollout decision's evidence (protobuf `RolloutEvidence`), beside the reason.
    "ALTER TABLE events ADD COLUMN evidence BLOB;",
];
