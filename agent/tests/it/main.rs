//! One binary for the agent's system tests: a real hub, real agents, worker processes and models.
//!
//! Each file under `tests/it/` is one area. They share one binary, so a clean
//! build links once instead of once per file (each link pulls in tract, tonic
//! and axum). Run one area with `cargo test -p sentinel-agent --test it AREA::`.

#[path = "../common/mod.rs"]
mod common;

mod batching;
mod control;
mod dashboard;
mod deploy_reaches_agent;
mod device_isolation;
mod dtypes;
mod engines;
mod fleet_halt;
mod grafana;
mod hostile_requests;
mod hygiene;
mod inference_api;
mod kill_mid_download;
mod layers;
mod load_failures;
mod metrics;
mod offline_restart;
mod prometheus;
mod publishers;
mod refusals;
mod replicas;
mod resume_download;
mod rollback;
mod serving;
mod supervisor;
mod tampered_artifact;
mod telemetry;
mod tls;
mod wild_models;
