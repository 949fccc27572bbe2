//! The Sentinel hub: a versioned, signed registry of ONNX models.
//!
//! The hub stores every version of every model with the facts that decide
//! where it may run, signs a manifest for each, records deployments, and
//! serves all of it over a REST API under `/api/v1`. The `sentinel` CLI is a
//! client of that API and lives here too, next to the types it speaks.
//!
//! # Layout
//!
//! Layers, bottom to top; each imports only from the layers below it, and
//! `tests/it/layers.rs` fails the build of any import that points up.
//!
//! 1. Leaves: pure values and rules, no storage.
//!    - [`selector`]: deployment target selectors (`ring=production,site=a`).
//!    - [`rollout`]: rollout policies, halt thresholds and staged waves.
//!    - [`keys`]: the hub's Ed25519 signing keys (generation, rotation, pinning).
//!    - [`auth`]: API tokens, roles, and who a caller is.
//!    - [`onnx`]: reading an uploaded ONNX file's signature, cheaply and bounded.
//!    - [`tls`]: the TLS server configuration.
//!    - [`telemetry`]: device telemetry windows, their buckets and series.
//!    - [`config`]: hub settings (data dir, listen address, upload cap).
//!    - [`records`]: the records the store keeps (models, versions, deployments, ...).
//!    - [`inspect`]: inspecting an upload: the signature here, the engine's load
//!      and probe in a confined `sentinel-worker --check` child with limits.
//!    - [`targeting`]: which devices a deployment reaches, and what each should run.
//!    - [`rollup`]: where a deployment stands on its devices, and the halt rule.
//! 2. [`store`]: narrow storage interfaces and their embedded implementations:
//!    SQLite metadata ([`store::sqlite`]) and a content-addressed blob store on
//!    local disk ([`store::blobs`]). It imports only leaves.
//! 3. [`service`]: the hub's state and its services (registry, deployments,
//!    fleet, change events, metrics registry), with their own error type.
//! 4. Adapters over the services:
//!    - [`api`]: the REST API under `/api/v1`, one module per resource.
//!    - [`grpc`]: the `AgentSync` gRPC service devices subscribe to.
//!    - [`metrics`]: the `/metrics` endpoint and request metrics.
//!    - [`web`]: the web interface the hub serves at `/ui/` (over [`api`]).
//! 5. [`cli`]: the `sentinel` command-line client (it reaches a hub over HTTP).
//! 6. [`server`]: the one composition root: opening a hub and serving it
//!    until shutdown. Nothing imports it.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod inspect;
pub mod keys;
pub mod metrics;
pub mod onnx;
pub mod records;
pub mod rollout;
pub mod rollup;
pub mod selector;
pub mod server;
pub mod service;
pub mod store;
pub mod targeting;
pub mod telemetry;
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

/// An error and its sources, `: `-separated: what a log line or a CLI
/// message shows of it.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    chain
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A string schema with a pattern, as a named component: for list items
/// and fields whose rules a plain `String` does not carry.
#[macro_export]
macro_rules! string_schema {
    ($(#[$meta:meta])* $name:ident, $pattern:expr $(, max_length = $max:expr)?) => {
        $(#[$meta])*
        #[derive(Debug)]
        pub struct $name;
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some($pattern))
                    $(.max_length(Some($max)))?
                    .into()
            }
        }
        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }
    };
}
