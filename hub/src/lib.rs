//! The Sentinel hub: a versioned, signed registry of ONNX models.
//!
//! The hub stores every version of every model with the facts that decide
//! where it may run, signs a manifest for each, records deployments, and
//! serves all of it over a REST API under `/api/v1`. The `sentinel` CLI is a
//! client of that API and lives here too, next to the types it speaks.
//!
//! # Layout
//! - [`config`]: hub settings (data dir, listen address, upload cap).
//! - [`store`]: narrow storage interfaces and their embedded implementations:
//!   SQLite metadata ([`store::sqlite`]) and a content-addressed blob store on
//!   local disk ([`store::blobs`]).
//! - [`keys`]: the hub's Ed25519 signing keys (generation, rotation, pinning).
//! - [`onnx`]: reading an uploaded ONNX file's signature, cheaply and bounded.
//! - [`inspect`]: inspecting an upload: the signature here, the engine's load
//!   and probe in a confined `sentinel-worker --check` child with limits.
//! - [`auth`]: API tokens, roles, and the first-start admin token.
//! - [`selector`]: deployment target selectors (`stage=production,site=a`).
//! - [`api`]: the axum router, one module per resource.
//! - [`fleet`]: connected devices, their desired state, and pushing it.
//! - [`grpc`]: the `AgentSync` gRPC service devices subscribe to.
//! - [`rollout`]: rollout policies, per-device deployment status, and
//!   halting a deployment too many devices rolled back or failed.
//! - [`metrics`]: the hub's Prometheus metrics and its `/metrics` endpoint.
//! - [`server`]: opening a hub and serving it until shutdown.
//! - [`tls`]: the TLS listener for the REST API.
//! - [`cli`]: the `sentinel` command-line client.
//! - [`web`]: the web interface the hub serves at `/ui/`, and its live event stream.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod grpc;
pub mod inspect;
pub mod keys;
pub mod metrics;
pub mod onnx;
pub mod rollout;
pub mod selector;
pub mod server;
pub mod store;
pub mod tls;
pub mod web;

pub use config::HubConfig;
pub use server::Hub;

/// Installs ring as rustls' process-wide crypto provider. Every HTTP or TLS
/// client in the workspace goes through rustls with ring (no aws-lc build);
/// call this before building one. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
