//! What Sentinel's system tests share across packages.
//!
//! Test support: a panic here is a failed test, so it may unwrap.
//!
//! # Layout
//! - [`backend`]: which storage back end test hubs run on (SQLite and local
//!   disk, or the rig's PostgreSQL and S3 server), chosen by the environment.
//! - [`bins`]: the workspace's binaries (`sentinel-agent`, `sentinel-worker`,
//!   `sentinel-hub`, `sentinel`), built on demand into this test's profile.
//! - [`digits`]: the digits test set sent by clients back to back to an
//!   agent's inference API, and what each client saw.
//! - [`dtype_cases`]: models of every tensor element type, made at test time
//!   by public tools, with ONNX Runtime's outputs.
//! - [`hub`]: [`hub::TestHub`], a real hub in the test's process.
//! - [`mlflow`]: a real MLflow tracking server, and versions registered in it
//!   by MLflow's own client.
//! - [`wait`]: [`wait::eventually`], the one bounded poll loop.
//! - [`models`]: the repository's test models and samples, and their readers.
//! - [`ort`]: the ONNX Runtime library for tests of the `ort` engine.
//! - [`signing`]: publisher keys and OpenSSF model-signing bundles made by the real tool.

#![allow(clippy::unwrap_used)]

pub mod backend;
pub mod bins;
pub mod digits;
pub mod dtype_cases;
pub mod hub;
pub mod mlflow;
pub mod models;
pub mod ort;
pub mod signing;
pub mod telemetry;
pub mod wait;

/// A loopback port the kernel just handed out and took back, for a server
/// that takes a port number rather than a listening socket (MLflow,
/// Prometheus, s3s-fs), or for a URL where nothing listens. Another process
/// taking it in between fails that server's start, loudly.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
