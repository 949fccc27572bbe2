//! Storage behind two narrow interfaces, so a hub that outgrows one machine
//! can swap SQLite for PostgreSQL and local disk for object storage without
//! touching the API layer.
//!
//! - [`MetadataStore`]: models and versions ([`RegistryStore`]), deployments
//!   ([`DeploymentStore`]), tokens and the audit log ([`AccessStore`]), devices
//!   and the fleet revision ([`DeviceStore`]).
//! - [`BlobStore`]: model bytes, addressed by their SHA-256.
//!
//! Both are synchronous: the service layer calls them from `spawn_blocking`, which keeps
//! the trait object-safe and the SQLite implementation simple.

pub mod blobs;
mod columns;
pub mod postgres;
#[cfg(test)]
mod ring_migration_tests;
pub mod s3;
pub mod sqlite;

pub use blobs::{Blob, BlobBody, BlobError, BlobStore, LocalBlobStore, StagedBlob};
pub use postgres::PostgresStore;
pub use s3::S3BlobStore;
pub use sqlite::SqliteStore;

pub use crate::keys::SigningKeyRecord;
pub use crate::records::{
    AuditEntry, AuditOutcome, DeploymentDevice, DeploymentKind, DeploymentRecord, DeploymentState, DeviceEvent,
    DeviceRecord, ModelRecord, NewDeployment, PublisherRecord, TokenRecord, VersionRecord,
};
pub use crate::telemetry::{Bucket, Resolution, Retention, Transition, Window as TelemetryWindow};

/// The error an implementation's database gave, kept as the source of a
/// [`StoreError`] so that no SQLite type shows in the store's interface.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Failures of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("database operation `{op}` failed")]
    Database {
        op: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("opening the database at {path} failed")]
    Open {
        path: String,
        #[source]
        source: BackendError,
    },
    /// A value that could not be encoded for its column (nothing was written).
    #[error("encoding {what} for the database failed")]
    Encode {
        what: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("database at {path} has schema version {found}, newer than this hub knows ({known})")]
    SchemaTooNew { path: String, found: i64, known: i64 },
}

/// Filters for listing models. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct ModelFilter {
    /// Substring of the model name.
    pub name: Option<String>,
    /// Only models with at least one version at this stage.
    pub stage: Option<String>,
    /// Only models with at least one version that runs on this hardware tag
    /// (a version that declares no hardware runs anywhere).
    pub hardware: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

/// Filters for reading the audit log. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// The token name that acted, exactly.
    pub actor: Option<String>,
    /// Substring of the action (`METHOD /path`).
    pub action: Option<String>,
    pub outcome: Option<AuditOutcome>,
}

/// What [`MetadataStore::halt_deployment`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum HaltOutcome {
    /// The deployment was no longer active (already halted, superseded, ...): nothing changed.
    NotActive,
    /// The deployment is now `halted`; `restored` is the deployment that
    /// brings the previous version back, if there was one.
    Halted { restored: Option<Box<DeploymentRecord>> },
}

/// Enrolled devices, what they report, and the fleet's desired-state revision.
pub trait DeviceStore: Send + Sync {
    fn enroll_device(
        &self,
        id: &str,
        labels: &std::collections::BTreeMap<String, String>,
        token_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<DeviceRecord, StoreError>;
    fn device_by_token(&self, token_sha256: &str) -> Result<Option<DeviceRecord>, StoreError>;
    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError>;
    fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    fn remove_device(&self, id: &str) -> Result<(), StoreError>;
    fn record_hello(
        &self,
        id: &str,
        hello: &serde_json::Value,
        hardware: &[String],
        agent_version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Stores a report, appends its events and records each model's state
    /// under the deployment it names (if that deployment exists), in one
    /// transaction.
    fn record_report(
        &self,
        id: &str,
        report: &serde_json::Value,
        events: &[DeviceEvent],
        now_ms: i64,
    ) -> Result<(), StoreError>;
    fn touch_device(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Every device's last reported state for `deployment_id`, by device id.
    fn deployment_devices(&self, deployment_id: i64) -> Result<Vec<DeploymentDevice>, StoreError>;
    /// Newest first.
    fn device_events(&self, id: &str, limit: u32) -> Result<Vec<DeviceEvent>, StoreError>;
    /// A device with its newest `limit` events, read at one moment: a report
    /// stored in between cannot pair new events with the old report.
    fn device_with_events(&self, id: &str, limit: u32) -> Result<Option<(DeviceRecord, Vec<DeviceEvent>)>, StoreError>;
    /// The revision of the fleet's desired state. Every change to what
    /// devices should run (a deployment stored, halted, widened, cancelled or
    /// re-stated; a version's manifest re-signed; a model deleted) bumps it in
    /// the change's own transaction, so one revision always means one content,
    /// whichever hub replica computes it.
    fn current_revision(&self) -> Result<u64, StoreError>;
    /// The revision with the active deployments and their versions, read at
    /// one moment: what every device's desired state is computed from.
    fn fleet_snapshot(&self) -> Result<FleetSnapshot, StoreError>;
}

/// What the fleet's desired state is computed from, read at one moment
/// ([`DeviceStore::fleet_snapshot`]).
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    pub revision: u64,
    /// Active deployments, newest first.
    pub active: Vec<DeploymentRecord>,
    /// The versions the active deployments name (a deleted one is absent).
    pub versions: Vec<VersionRecord>,
    /// The id of the active signing key, where the database keeps the keys
    /// ([`KeyStore`]): a replica whose keyring is older reloads it first.
    pub active_key: Option<String>,
}

/// Signing keys kept in a shared database, so every replica signs with the
/// same active key (see `keys::Kek` for the sealing).
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError>;
    /// Stores `key` as the one active key (the others stay, inactive) in one
    /// transaction, and tells the other replicas.
    fn add_active_key(&self, key: &SigningKeyRecord) -> Result<(), StoreError>;
    /// Stores `key` only when the database holds no key yet (replicas
    /// starting together make one); `false` when one existed.
    fn add_first_key(&self, key: &SigningKeyRecord) -> Result<bool, StoreError>;
}

/// Registered models and their versions.
pub trait RegistryStore: Send + Sync {
    fn create_model(
        &self,
        name: &str,
        description: &str,
        tags: &[String],
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError>;
    fn update_model(
        &self,
        name: &str,
        description: Option<&str>,
        tags: Option<&[String]>,
        require_publisher: Option<bool>,
        now_ms: i64,
    ) -> Result<ModelRecord, StoreError>;
    fn get_model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError>;
    /// Returns one page of models and the total count matching the filter.
    fn list_models(&self, filter: &ModelFilter) -> Result<(Vec<ModelRecord>, u64), StoreError>;
    /// Deletes the model, its versions and cancels its deployments, in one
    /// transaction. Returns the digests of blobs no version references any more.
    fn delete_model(&self, name: &str, now_ms: i64) -> Result<Vec<String>, StoreError>;

    /// Stores a version and the digests of its extra blobs (validation set,
    /// signature bundle) in one transaction, so a crash never leaves a
    /// version half-registered. With `register` (a description), the model is
    /// registered in the same transaction when it does not exist yet: a push
    /// that fails registers nothing.
    fn insert_version(
        &self,
        v: &VersionRecord,
        extra_blobs: &[String],
        register: Option<&str>,
    ) -> Result<(), StoreError>;
    fn get_version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError>;
    fn list_versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError>;
    /// Replaces a version's signed manifest and its filter columns, and bumps
    /// the fleet revision (devices running it get the new manifest).
    fn update_version(&self, v: &VersionRecord) -> Result<(), StoreError>;
    /// Digests of every blob some version references (model or validation set).
    fn referenced_blobs(&self) -> Result<Vec<String>, StoreError>;

    /// The registered publisher keys, by name.
    fn publishers(&self) -> Result<Vec<PublisherRecord>, StoreError>;
    /// Registers a publisher key; `Conflict` when the name or the key is taken.
    fn add_publisher(&self, p: &PublisherRecord) -> Result<(), StoreError>;
    /// Removes a publisher key; `NotFound` when no key has that name. Versions
    /// it signed keep their manifests.
    fn remove_publisher(&self, name: &str) -> Result<(), StoreError>;
}

/// Deployments: storing them, their states, halts and waves.
pub trait DeploymentStore: Send + Sync {
    fn insert_deployment(&self, d: &NewDeployment, now_ms: i64) -> Result<DeploymentRecord, StoreError>;
    fn get_deployment(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError>;
    fn list_deployments(
        &self,
        model: Option<&str>,
        state: Option<DeploymentState>,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<DeploymentRecord>, u64), StoreError>;
    /// Active deployments of a model, newest first.
    fn active_deployments(&self, model: &str) -> Result<Vec<DeploymentRecord>, StoreError>;
    fn set_deployment_state(&self, id: i64, state: DeploymentState, now_ms: i64) -> Result<(), StoreError>;
    /// Marks an active deployment `halted` with `reason` and, in the same
    /// transaction, stores `restore` (the deployment that brings the previous
    /// version back). Does nothing when the deployment is no longer active,
    /// so concurrent callers halt it at most once.
    fn halt_deployment(
        &self,
        id: i64,
        reason: &str,
        restore: Option<&NewDeployment>,
        now_ms: i64,
    ) -> Result<HaltOutcome, StoreError>;
    /// Moves active deployment `id` from wave `from` to the next, in one
    /// transaction; reaching the last wave supersedes the older active
    /// deployments of its model and target. `None` if it was no longer
    /// active or no longer at `from` (another report widened it first).
    fn advance_wave(&self, id: i64, from: u32, now_ms: i64) -> Result<Option<DeploymentRecord>, StoreError>;
}

/// API tokens and the audit log.
pub trait AccessStore: Send + Sync {
    fn insert_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<TokenRecord, StoreError>;
    /// Stores the token only when there is none yet, atomically: of hubs
    /// starting together on one empty database, exactly one creates the
    /// first admin token. `None` when a token existed.
    fn insert_first_token(
        &self,
        name: &str,
        role: &str,
        secret_sha256: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<Option<TokenRecord>, StoreError>;
    fn find_token(&self, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError>;
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    fn revoke_token(&self, id: i64) -> Result<(), StoreError>;
    fn count_tokens(&self) -> Result<u64, StoreError>;

    fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError>;
    /// Newest first.
    /// One page of the audit entries `filter` keeps, newest first.
    fn list_audit(&self, filter: &AuditFilter, limit: u32, offset: u32) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Which stored telemetry buckets to read. Empty filters do not filter.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryQuery {
    /// Only these devices; `None`: every device.
    pub devices: Option<Vec<String>>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub resolution: Resolution,
    /// Buckets starting at or after this instant...
    pub from_ms: i64,
    /// ...and at or before this one.
    pub to_ms: i64,
}

/// Device telemetry as a bounded time series (see [`crate::telemetry`]).
pub trait TelemetryStore: Send + Sync {
    /// Adds the windows of one report from `device_id`'s agent run `run` to
    /// their fine and coarse buckets, in one transaction, skipping windows
    /// whose sequence number that run already delivered (a report sent again
    /// after a lost answer). Returns how many were added.
    fn record_telemetry(
        &self,
        device_id: &str,
        run: u64,
        windows: &[TelemetryWindow],
        retention: &Retention,
    ) -> Result<usize, StoreError>;

    /// Calls `visit` with each stored bucket matching `q`, in no set order,
    /// without holding them all at once.
    fn visit_telemetry(&self, q: &TelemetryQuery, visit: &mut dyn FnMut(Bucket)) -> Result<(), StoreError>;

    /// The state changes recorded under a deployment, oldest first.
    fn deployment_transitions(&self, deployment_id: i64) -> Result<Vec<Transition>, StoreError>;

    /// Deletes buckets past their series' retention at `now_ms`, and state
    /// changes past the coarse retention that a later change of the same
    /// device and deployment supersedes. Returns the rows deleted.
    fn prune_telemetry(&self, retention: &Retention, now_ms: i64) -> Result<u64, StoreError>;
}

/// Models, versions, deployments, tokens, the audit log, devices and their
/// telemetry: the whole metadata store, as the hub holds it.
pub trait MetadataStore:
    RegistryStore + DeploymentStore + AccessStore + DeviceStore + TelemetryStore + std::fmt::Debug
{
}

impl<T> MetadataStore for T where
    T: RegistryStore + DeploymentStore + AccessStore + DeviceStore + TelemetryStore + std::fmt::Debug
{
}

/// A `u64` kept in a signed 64-bit column, bit for bit.
pub(crate) fn u64_bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// Reads back [`u64_bits`].
pub(crate) fn bits_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}
