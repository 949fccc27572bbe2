//! Hub replicas on one shared database (PostgreSQL): what they tell each
//! other, and the signing keys they share.
//!
//! Every change to deployments sends a notice in its own transaction (see
//! `store::postgres`). Each replica keeps one connection listening and, on a
//! notice from another replica:
//! - `deployments`: pushes its own device streams their states at the new
//!   revision, and tells its web change feed;
//! - `keys`: reloads the keyring (another replica rotated the signing key);
//! - `resync` (its listening connection came back, so notices may have been
//!   lost): both.
//!
//! A notice is only a prompt: each replica reads what changed from the
//! database. The fleet snapshot also names the active key, so a replica that
//! has not seen a rotation's notice yet reloads before it signs.

use std::sync::Arc;

use super::events::ChangeKind;
use super::fleet::Fleet;
use super::{ServiceError, SharedState};
use crate::keys::{Kek, Keyring, generate_sealed};
use crate::store::postgres::{DEPLOYMENTS, KEYS, RESYNC};
use crate::store::{KeyStore, PostgresStore};

/// What a replica shares with the others.
#[derive(Debug, Clone)]
pub struct Shared {
    pub store: Arc<PostgresStore>,
    pub kek: Arc<Kek>,
    /// The latest device this replica heard from, for the other replicas'
    /// web change feeds (see [`device_changed`]).
    pub devices: Arc<tokio::sync::watch::Sender<String>>,
}

impl Shared {
    pub fn new(store: Arc<PostgresStore>, kek: Arc<Kek>) -> Self {
        Self { store, kek, devices: Arc::new(tokio::sync::watch::channel(String::new()).0) }
    }
}

/// The notice kind for a device that connected or reported: `device ID`.
const DEVICE: &str = "device ";

/// How often at most a replica tells the others that its devices reported.
/// A burst costs one notice, always naming the latest device: the web page
/// refetches what it shows on any change, so only *that* matters.
const DEVICE_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Tells this replica's web change feed that device `id` connected or
/// reported, and the other replicas' feeds too (coalesced).
pub fn device_changed(state: &SharedState, id: &str) {
    state.events().notify(ChangeKind::Device, id);
    if let Some(shared) = state.replicas() {
        shared.devices.send_replace(id.to_owned());
    }
}

/// Sends the coalesced device notices until the hub stops.
async fn announce_devices(shared: Shared) {
    let mut rx = shared.devices.subscribe();
    while rx.changed().await.is_ok() {
        let id = rx.borrow_and_update().clone();
        let store = shared.store.clone();
        let sent = tokio::task::spawn_blocking(move || store.announce(&format!("{DEVICE}{id}"))).await;
        if let Ok(Err(e)) = sent {
            tracing::warn!(error = %e, "telling the other replicas about a device report failed");
        }
        tokio::time::sleep(DEVICE_NOTICE_EVERY).await;
    }
}

impl Shared {
    /// The keyring as the database holds it now. Blocking.
    pub fn load_keyring(&self) -> Result<Keyring, ServiceError> {
        let records = self.store.signing_keys()?;
        Ok(Keyring::from_sealed(&records, &self.kek)?)
    }

    /// Loads the keyring, first storing a new key when the database has none
    /// (of replicas starting together, one key wins and all load it). Blocking.
    pub fn open_keyring(&self) -> Result<Keyring, ServiceError> {
        if self.store.signing_keys()?.is_empty() {
            let key = generate_sealed(&self.kek, crate::now_ms())?;
            if self.store.add_first_key(&key)? {
                tracing::info!(key_id = %key.key_id, "first start on this database: made the signing key");
            }
        }
        self.load_keyring()
    }
}

/// Reloads the keyring from the shared database.
pub async fn reload_keys(state: &SharedState) -> Result<(), ServiceError> {
    let Some(shared) = state.replicas().cloned() else { return Ok(()) };
    let ring = tokio::task::spawn_blocking(move || shared.load_keyring())
        .await
        .map_err(|source| ServiceError::Join { context: "reloading keys", source })??;
    let id = ring.active().key_id().to_owned();
    *state.keyring_mut() = ring;
    tracing::info!(key_id = %id, "reloaded the signing keys from the database");
    Ok(())
}

/// Rotates the signing key of every replica: a new key, sealed, stored as
/// the active one; the others reload on the notice. Returns its id.
pub async fn rotate(state: &SharedState, shared: Shared) -> Result<String, ServiceError> {
    let id = tokio::task::spawn_blocking(move || -> Result<String, ServiceError> {
        let key = generate_sealed(&shared.kek, crate::now_ms())?;
        shared.store.add_active_key(&key)?;
        Ok(key.key_id)
    })
    .await
    .map_err(|source| ServiceError::Join { context: "rotating the key", source })??;
    reload_keys(state).await?;
    Ok(id)
}

/// Follows the other replicas' notices until the hub stops.
pub async fn follow(state: SharedState) {
    let Some(shared) = state.replicas().cloned() else { return };
    let mut notices = match shared.store.listen() {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow the other replicas' changes");
            return;
        }
    };
    let announcer = tokio::spawn(announce_devices(shared.clone()));
    while let Some(kind) = notices.recv().await {
        if let Some(device) = kind.strip_prefix(DEVICE) {
            state.events().notify(ChangeKind::Device, device);
            continue;
        }
        if (kind == KEYS || kind == RESYNC)
            && let Err(e) = reload_keys(&state).await
        {
            tracing::error!(error = %e, "reloading the signing keys failed");
        }
        if kind == DEPLOYMENTS || kind == RESYNC {
            if let Err(e) = Fleet::publish(&state).await {
                tracing::error!(error = %e, "pushing another replica's change failed; devices get it when they reconnect");
            }
            state.events().notify(ChangeKind::Deployments, "");
        }
    }
    announcer.abort();
}
