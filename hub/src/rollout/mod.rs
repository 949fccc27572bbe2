//! Rollout policies and staged rollouts: pure values, their validation,
//! and which devices a wave reaches.
//!
//! Where a deployment stands on its devices is [`crate::rollup`]'s; acting
//! on it (halting, widening) is [`crate::service::deployments`]'s.
//!
//! # Layout
//! - [`policy`]: the rollout policy and halt thresholds, and their validation.
//! - [`waves`]: staged rollouts, a percentage of the fleet at a time.

pub mod policy;
pub mod waves;

pub use policy::{DEFAULT_HALT_FRACTION, PolicyError, RolloutPolicy, validate_halt};
