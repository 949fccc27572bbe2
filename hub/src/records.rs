//! The hub's records: models, versions, deployments, tokens, the audit log
//! and devices, as the store keeps them and the layers above read them.
//!
//! Plain data with no behaviour, below the store so that pure logic
//! (targeting, rollups) can read records without depending on storage.

use serde::Serialize;

use crate::rollout::RolloutPolicy;

/// A registered model name and its metadata.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One stored model version. `manifest`/`signature`/`key_id` are the signed
/// manifest exactly as served; the other columns are copies for filtering.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub stage: String,
    pub hardware: Vec<String>,
    pub manifest: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_id: String,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// A deployment: a model version sent to the devices a selector matches.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeploymentRecord {
    pub id: i64,
    pub model: String,
    pub version: String,
    pub target: String,
    /// `deploy` or `rollback`.
    pub kind: String,
    /// `active`, `superseded`, `rolled_back`, `halted` or `cancelled`.
    pub state: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// For a rollback: the deployment it replaced.
    pub replaces: Option<i64>,
    /// How devices move traffic to the version; `None`: the agent's defaults.
    pub policy: Option<RolloutPolicy>,
    /// Halt when more than this fraction of targeted devices rolled back or failed.
    pub halt_fraction: f64,
    /// Halt when at least this many targeted devices rolled back or failed.
    pub halt_count: Option<u32>,
    /// Why the hub halted the deployment (state `halted`).
    pub halt_reason: Option<String>,
    /// Staged rollout: cumulative percentages of the targeted devices, the
    /// last 100; empty: every targeted device at once.
    pub waves: Vec<u8>,
    /// Index of the current wave in `waves`.
    pub wave: u32,
}

/// A new deployment. Storing it supersedes every active deployment of the
/// same model to the same target, in one transaction.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub model: String,
    pub version: String,
    pub target: String,
    pub kind: String,
    pub created_by: String,
    pub replaces: Option<i64>,
    pub policy: Option<RolloutPolicy>,
    pub halt_fraction: f64,
    pub halt_count: Option<u32>,
    /// See [`DeploymentRecord::waves`]. A deployment whose first wave is
    /// below 100% leaves the deployments it replaces active, for the devices
    /// outside its wave, until its last wave.
    pub waves: Vec<u8>,
}

/// An API token as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenRecord {
    pub id: i64,
    pub name: String,
    pub role: String,
    #[serde(skip)]
    pub secret_sha256: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub revoked: bool,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    /// Token name, or `anonymous` when no valid token was given.
    pub actor: String,
    pub role: String,
    /// e.g. `POST /api/v1/models/digits/versions`.
    pub action: String,
    pub status: u16,
    /// `ok`, `denied` (401/403) or `failed`.
    pub outcome: String,
    pub detail: String,
}

/// An enrolled device and what it last told the hub.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    /// Labels set at enrolment; they decide which deployments target the device.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Hardware tags from the device's last hello.
    pub hardware: Vec<String>,
    pub agent_version: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub last_seen_ms: Option<i64>,
    /// The last `Hello`, as JSON.
    pub hello: Option<serde_json::Value>,
    /// The last `AgentReport`, as JSON.
    pub report: Option<serde_json::Value>,
    /// When the hub received the last report.
    pub report_at_ms: Option<i64>,
}

/// Something a device reported happening.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceEvent {
    pub at_ms: i64,
    pub kind: String,
    pub model: String,
    pub version: String,
    pub reason: String,
}

/// A device's last reported state for one deployment. It is kept after the
/// device moves on, so a halted or superseded deployment still shows how far
/// it got on each device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentDevice {
    pub device_id: String,
    pub version: String,
    /// As the agent reported it (`canary`, `rolled_back`, ...).
    pub state: String,
    pub detail: String,
    /// When the hub received the last report naming this deployment.
    pub updated_ms: i64,
}
