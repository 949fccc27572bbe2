//! The contract between the device agent and its confined `sentinel-worker`.
//!
//! The agent supervises workers; the worker runs an engine under seccomp. The
//! two are different crates so that neither links the other's world: the
//! worker has no async runtime or network stack, and the agent has no engine.
//! What they must agree on lives here, checked by the compiler on both sides.
//!
//! # Layout
//! - [`frame`]: the length-prefixed frames on stdin/stdout and the tensor encoding.
//! - [`launch`]: how a worker is started and how it ends: engines,
//!   confinement, environment, exit codes.
//! - [`check`]: the push-time check the hub runs in `sentinel-worker --check`:
//!   its JSON report and exit codes.

pub mod check;
pub mod frame;
pub mod launch;
