//! Sentinel's device agent.
//!
//! The agent subscribes to its hub, verifies every desired state and every
//! model against pinned hub keys, downloads what is missing (resuming cut
//! connections), keeps what it verified on disk, and keeps serving it when
//! the hub is gone.
//!
//! # Layout
//! - [`config`]: the TOML configuration, env overrides, validation (exit 64).
//! - [`store`]: model files and the SQLite state database (desired state, slots, events).
//! - [`download`]: streamed, size-capped, hash-checked, resumable downloads.
//! - [`sync`]: the gRPC subscription as a `watch` of verified states, with backoff.
//! - [`slots`]: the blue/green slot state machine (pure; committed through [`store`]).
//! - [`agent`]: wiring of sync, apply and report; [`agent::start`] runs an agent.
//! - [`supervisor`]: spawning workers under limits and restarting them with backoff ([`supervisor::Supervised`]).
//! - [`control`]: the control socket (`<runtime_dir>/control.sock`) behind `sentinel-agent status`, `models`, `rollback`.
//! - [`cli`]: the operator commands' client side: the control-socket client and the tables.
//! - [`verify`]: offline verification of a model file against its signed manifest.
//! - [`metrics`]: the agent's Prometheus registry and its `/metrics` listener.
//! - [`inference_api`]: the local KServe v2 inference API.
//! - [`worker`]: the seccomp-confined inference worker (`sentinel-worker`) and its stdin/stdout protocol.

pub mod agent;
pub mod apply;
pub mod cli;
pub mod config;
pub mod control;
pub mod download;
pub mod inference_api;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod rollout;
pub mod serving;
pub mod slots;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod transport;
pub mod util;
pub mod verify;
pub mod worker;

pub use agent::{AgentError, AgentHandle, AgentView, start};
pub use config::AgentConfig;
pub use util::{error_chain, now_ms};
