//! Autonomous blue/green rollout: a pure part and its controller.
//!
//! While a green candidate runs beside the blue active version, the agent
//! records every outcome of both slots in a [`window::SlotWindow`] and, every
//! tick, feeds the two [`window::SlotMetrics`] snapshots to
//! [`decision::decide`], which says whether to promote green to the next
//! phase, hold, or roll back and why. The pure modules ([`policy`],
//! [`window`], [`decision`], [`progress`]) read no clock and do no I/O: callers pass `now`
//! and the elapsed phase time, so tests can drive time by hand.
//!
//! # Layout
//! - [`window`]: per-slot metrics over a sliding window bounded by age and count.
//! - [`policy`]: the rollout policy, its validation, and parsing a deployment's policy.
//! - [`decision`]: the decision function over one observation of both slots.
//! - [`progress`]: one rollout's phase and the step each tick decides.
//! - [`controller`]: the async part above the agent's state: it runs one
//!   rollout per model on these decisions, owns those tasks, and rolls back.

pub mod controller;
pub mod decision;
pub mod policy;
pub mod progress;
pub mod window;
