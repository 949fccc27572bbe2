//! The hub's state and the services over it: what the adapters (REST, gRPC,
//! web, metrics endpoint) call, and what calls nothing above itself.
//!
//! [`HubState`] owns the stores, the signing keys, the connected fleet, the
//! change feed and the metrics. Services return [`ServiceError`]; the HTTP
//! error type converts from it, never the other way round.
//!
//! # Layout
//! - [`deployments`]: deploying, rolling back, halting and widening, and
//!   watching what devices report.
//! - [`fleet`]: connected devices, their signed desired state, and pushing it.
//! - [`events`]: the change feed the web interface watches, and the tickets
//!   that open its stream.
//! - [`metrics`]: the hub's Prometheus registry and metric handles.
//! - [`registry`]: receiving an upload and registering a new version from it
//!   (inspection, the signed manifest, the commit).
//! - [`telemetry`]: device telemetry series for the API, and pruning them.
//! - [`replicas`]: what hub replicas on one shared database tell each other
//!   (deployment changes, key rotations), and the keys they share.

pub mod deployments;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod registry;
pub mod replicas;
pub mod telemetry;

use std::sync::{Arc, RwLock};

use crate::config::HubConfig;
use crate::inspect::Inspector;
use crate::keys::{Keyring, KeyringError};
use crate::store::{BlobError, BlobStore, MetadataStore, StoreError};

/// Failures of the services. The HTTP boundary maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Keys(#[from] KeyringError),
    /// A blocking task did not finish: cancelled at shutdown, or panicked.
    #[error("{context} did not finish")]
    Join {
        context: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Everything the services and adapters reach.
#[derive(Debug)]
pub struct HubState {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    keys: RwLock<Keyring>,
    config: HubConfig,
    fleet: fleet::Fleet,
    /// The change feed and event-stream tickets.
    events: events::Live,
    /// Base URL devices download from; set once the listener is bound.
    public_url: RwLock<String>,
    /// This hub's Prometheus registry and metric handles.
    metrics: metrics::HubMetrics,
    /// Inspects uploads in confined, bounded child processes.
    inspector: Inspector,
    /// Every connection of the REST, gRPC and metrics listeners, under one
    /// cap and its timeouts; its counts are exported as metrics.
    connections: sentinel_net::Connections,
    /// The shared database's notices and keys, when this hub is one of
    /// several replicas; `None` on the embedded defaults.
    replicas: Option<replicas::Shared>,
}

pub type SharedState = Arc<HubState>;

/// What a hub state is built from; [`HubState::new`] adds the fleet and
/// the change feed, which start empty.
#[derive(Debug)]
pub struct Parts {
    pub meta: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub keys: Keyring,
    pub config: HubConfig,
    pub metrics: metrics::HubMetrics,
    pub inspector: Inspector,
    pub connections: sentinel_net::Connections,
    pub replicas: Option<replicas::Shared>,
}

impl HubState {
    pub fn new(p: Parts) -> SharedState {
        Arc::new(Self {
            meta: p.meta,
            blobs: p.blobs,
            keys: RwLock::new(p.keys),
            config: p.config,
            fleet: fleet::Fleet::default(),
            events: events::Live::default(),
            public_url: RwLock::new(String::new()),
            metrics: p.metrics,
            inspector: p.inspector,
            connections: p.connections,
            replicas: p.replicas,
        })
    }

    /// Runs a metadata operation on a blocking thread.
    pub async fn meta<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn MetadataStore) -> Result<T, StoreError> + Send + 'static,
    {
        let meta = Arc::clone(&self.meta);
        let joined = tokio::task::spawn_blocking(move || f(meta.as_ref())).await;
        match joined {
            Ok(result) => result.map_err(ServiceError::from),
            Err(source) => Err(ServiceError::Join { context: "metadata task", source }),
        }
    }

    /// Runs a blob operation on a blocking thread.
    pub async fn blobs<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn BlobStore) -> Result<T, BlobError> + Send + 'static,
    {
        let blobs = Arc::clone(&self.blobs);
        let joined = tokio::task::spawn_blocking(move || f(blobs.as_ref())).await;
        match joined {
            Ok(result) => result.map_err(ServiceError::from),
            Err(source) => Err(ServiceError::Join { context: "blob task", source }),
        }
    }

    /// The metadata store, for callers already on a blocking thread.
    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.meta
    }

    /// Base URL of this hub's REST API, as devices should reach it.
    pub fn public_url(&self) -> String {
        self.public_url.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sets the base URL devices download from, once the listener is bound.
    pub fn set_public_url(&self, url: String) {
        *self.public_url.write().unwrap_or_else(std::sync::PoisonError::into_inner) = url;
    }

    /// Reads the keyring. The lock is never held across an await.
    pub fn keyring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the keyring (key rotation). The lock is never held across an await.
    pub fn keyring_mut(&self) -> std::sync::RwLockWriteGuard<'_, Keyring> {
        self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn fleet(&self) -> &fleet::Fleet {
        &self.fleet
    }

    /// The change feed and event-stream tickets.
    pub fn events(&self) -> &events::Live {
        &self.events
    }

    pub fn metrics(&self) -> &metrics::HubMetrics {
        &self.metrics
    }

    pub fn inspector(&self) -> &Inspector {
        &self.inspector
    }

    pub fn connections(&self) -> &sentinel_net::Connections {
        &self.connections
    }

    /// The shared database's notices and keys, for a replica.
    pub fn replicas(&self) -> Option<&replicas::Shared> {
        self.replicas.as_ref()
    }
}
