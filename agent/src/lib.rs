//! Sentinel's device agent.
//!
//! The agent subscribes to its hub, verifies every desired state and every
//! model against pinned hub keys, downloads what is missing (resuming cut
//! connections), keeps what it verified on disk, and keeps serving it when
//! the hub is gone.
//!
//! # Layout
//! Layers from the bottom up. A module names (`crate::…`) only modules of a
//! lower layer, or of its own layer inside its own top-level module; the
//! test `layers::no_module_imports_a_layer_above_it` (`agent/tests/it/layers.rs`)
//! holds this table and fails on an upward import.
//!
//! 1. Leaves, pure or self-contained:
//!    [`util`] (`now_ms`, `error_chain`), [`slots`] (the blue/green state
//!    machine), the pure [`rollout`] part ([`rollout::policy`],
//!    [`rollout::window`], [`rollout::decision`], [`rollout::progress`]),
//!    [`verify`] (a model file
//!    against its signed manifest), [`download`] (streamed, size-capped,
//!    hash-checked, resumable) and [`notify`] (systemd).
//! 2. [`supervisor`] (spawning `sentinel-worker` processes under limits,
//!    restarting them; the worker is its own crate, and the agent links only
//!    `sentinel-worker-protocol`, its frames and launch flags) and
//!    [`config`] (TOML, env overrides, validation; exit 64).
//! 3. [`store`] (model files and the SQLite state), [`metrics`] (the
//!    Prometheus registry) and [`transport`] (the hub endpoint and HTTP client).
//! 4. [`serving`]: each model's slots and workers at run time; install,
//!    validation, routing, feedback.
//! 5. [`state`]: the state the agent's tasks share, and its view.
//! 6. Services on the state: [`rollout::controller`] (runs and owns each
//!    rollout), [`sync`] (the hub subscription as a `watch` of verified
//!    states), [`report`] (the report loop).
//! 7. [`apply`]: the apply loop, which makes the device match the desired state.
//! 8. Adapters: [`control`] (the control socket), [`inference_api`] (KServe
//!    v2), [`metrics::endpoint`] (`/metrics`).
//! 9. [`cli`]: the operator commands' client of the control socket.
//! 10. [`agent`]: the composition root; [`agent::start`] runs an agent and
//!     nothing imports it.

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

pub use agent::{AgentError, AgentHandle, AgentView, start};
pub use config::AgentConfig;
pub use util::{error_chain, now_ms};
