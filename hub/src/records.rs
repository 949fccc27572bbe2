//! The hub's records: models, versions, deployments, tokens, the audit log
//! and devices, as the store keeps them and the layers above read them.
//!
//! Plain data with no behaviour, below the store so that pure logic
//! (targeting, rollups) can read records without depending on storage.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::rollout::RolloutPolicy;

/// A stored or requested value that names no variant of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of {expected}")]
pub struct UnknownValue {
    /// What the value should have named, e.g. `deployment state`.
    pub what: &'static str,
    pub value: String,
    /// The accepted values, comma-separated.
    pub expected: &'static str,
}

/// Defines a text-valued enum: `as_str` gives the stored and serialized text,
/// `FromStr` takes exactly that text back, and `ALL` lists the variants.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text the store keeps and the API shows.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: $what,
                        value: s.to_owned(),
                        expected: concat!($($text, ", "),+).trim_end_matches(", ") as &'static str,
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Where a deployment stands.
    DeploymentState, "deployment state", {
        /// Devices it targets should run its version.
        Active => "active",
        /// A later deployment of the same model to the same target replaced it.
        Superseded => "superseded",
        /// A rollback deployment replaced it.
        RolledBack => "rolled_back",
        /// The hub halted it: too many devices rolled back or failed.
        Halted => "halted",
        /// An operator cancelled it.
        Cancelled => "cancelled",
    }
);

text_enum!(
    /// Why a deployment was made.
    DeploymentKind, "deployment kind", {
        /// A version sent out on purpose.
        Deploy => "deploy",
        /// An earlier version brought back (by an operator, or by a halt).
        Rollback => "rollback",
    }
);

text_enum!(
    /// How an audited request ended.
    AuditOutcome, "audit outcome", {
        /// A 2xx or 3xx answer.
        Ok => "ok",
        /// Refused for want of a token or a role (401, 403).
        Denied => "denied",
        /// Any other error answer.
        Failed => "failed",
    }
);

text_enum!(
    /// Where a deployment stands on one device, in rollout order.
    DeviceState, "device state", {
        /// Targeted, and no report names the deployment yet.
        Pending => "pending",
        Downloading => "downloading",
        Validating => "validating",
        /// Trying the version out (the agent's `shadow` or `canary`).
        Canary => "canary",
        Serving => "serving",
        RolledBack => "rolled_back",
        /// Failed or refused on the device.
        Failed => "failed",
    }
);

impl DeviceState {
    /// Maps what an agent reports to a deployment state. `shadow` counts as
    /// `canary` (the version is trying out), `refused` as `failed`; anything
    /// else (e.g. `removed`, or a state a newer agent invents) as `pending`.
    pub fn from_agent(agent_state: &str) -> Self {
        match agent_state {
            "downloading" => Self::Downloading,
            "validating" => Self::Validating,
            "canary" | "shadow" => Self::Canary,
            "serving" => Self::Serving,
            "rolled_back" => Self::RolledBack,
            "failed" | "refused" => Self::Failed,
            _ => Self::Pending,
        }
    }

    /// Whether the state counts against the deployment.
    pub fn is_bad(self) -> bool {
        matches!(self, Self::RolledBack | Self::Failed)
    }
}

/// A registered model name and its metadata.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Every new version must carry a publisher signature.
    pub require_publisher: bool,
}

/// A publisher key an admin registered: pushes signed with it (OpenSSF
/// model-signing bundles) are accepted as that publisher's.
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherRecord {
    pub name: String,
    /// Hex SHA-256 of the PEM: model-signing's key hint.
    pub key_id: String,
    /// The public key, PEM.
    pub public_key: String,
    pub created_at_ms: i64,
    pub created_by: String,
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
    pub kind: DeploymentKind,
    pub state: DeploymentState,
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
    pub kind: DeploymentKind,
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
    pub outcome: AuditOutcome,
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
    /// What a rollout decision saw (`RolloutEvidence` as JSON), on
    /// `rollout_phase` and `rolled_back` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: FromStr<Err = UnknownValue> + Copy + PartialEq + fmt::Debug + Serialize>(
        all: &[T],
        as_str: fn(T) -> &'static str,
    ) {
        for &v in all {
            assert_eq!(as_str(v).parse::<T>(), Ok(v));
            // The JSON the API shows is the stored text.
            assert_eq!(serde_json::to_string(&v).expect("serialize"), format!("\"{}\"", as_str(v)));
        }
    }

    #[test]
    fn deployment_states_round_trip_and_name_the_choices_when_unknown() {
        round_trips(DeploymentState::ALL, DeploymentState::as_str);
        assert_eq!(DeploymentState::RolledBack.as_str(), "rolled_back");
        let e = "paused".parse::<DeploymentState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown deployment state "paused"; expected one of active, superseded, rolled_back, halted, cancelled"#
        );
    }

    #[test]
    fn deployment_kinds_round_trip_and_name_the_choices_when_unknown() {
        round_trips(DeploymentKind::ALL, DeploymentKind::as_str);
        let e = "Deploy".parse::<DeploymentKind>().unwrap_err();
        assert_eq!(e.to_string(), r#"unknown deployment kind "Deploy"; expected one of deploy, rollback"#);
    }

    #[test]
    fn audit_outcomes_round_trip_and_name_the_choices_when_unknown() {
        round_trips(AuditOutcome::ALL, AuditOutcome::as_str);
        let e = "".parse::<AuditOutcome>().unwrap_err();
        assert_eq!(e.to_string(), r#"unknown audit outcome ""; expected one of ok, denied, failed"#);
    }

    #[test]
    fn device_states_round_trip_and_map_what_agents_report() {
        round_trips(DeviceState::ALL, DeviceState::as_str);
        let mapped: Vec<&str> = ["downloading", "validating", "shadow", "canary", "serving", "rolled_back", "refused"]
            .iter()
            .map(|s| DeviceState::from_agent(s).as_str())
            .collect();
        assert_eq!(mapped, ["downloading", "validating", "canary", "canary", "serving", "rolled_back", "failed"]);
        assert_eq!(DeviceState::from_agent("removed"), DeviceState::Pending, "unknown to the rollup: pending");
        assert_eq!(DeviceState::from_agent("a state from a newer agent"), DeviceState::Pending);
        let bad: Vec<DeviceState> = DeviceState::ALL.iter().copied().filter(|s| s.is_bad()).collect();
        assert_eq!(bad, [DeviceState::RolledBack, DeviceState::Failed]);
    }
}
