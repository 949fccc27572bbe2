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
    while let Some(kind) = notices.recv().await {
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
}
