//! Autonomous blue/green rollout: the pure part.
//!
//! While a green candidate runs beside the blue active version, the agent
//! records every outcome of both slots in a [`window::SlotWindow`] and, every
//! tick, feeds the two [`window::SlotMetrics`] snapshots to
//! [`decision::decide`], which says whether to promote green to the next
//! phase, hold, or roll back and why. Neither module reads a clock or does
//! I/O: callers pass `now` and the elapsed phase time, so tests can drive
//! time by hand.
//!
//! # Layout
//! - [`window`]: per-slot metrics over a sliding window bounded by age and count.
//! - [`decision`]: the rollout policy, its validation, and the decision function.

pub mod controller;
pub mod decision;
pub mod window;
