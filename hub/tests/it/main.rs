//! One binary for the hub's system tests: real hub processes and routers,
//! real SQLite files and blobs, real agents where a test needs a device.
//!
//! Each file under `tests/it/` is one area. They share one binary, so a clean
//! build links once instead of once per file (each link pulls in tract, tonic
//! and axum). Run one area with `cargo test -p sentinel-hub --test it AREA::`.

#[path = "../common/mod.rs"]
mod common;

mod artifact_download;
mod bad_input;
mod cli;
mod connections;
mod demo;
mod device_enroll;
mod disk_full;
mod hardening;
mod inspection;
mod layers;
mod metrics;
mod mlflow;
mod persistence;
mod publishers;
mod quickstart;
mod rbac;
mod registry_api;
mod replicas;
mod ring_label;
mod rollout;
mod s3;
mod telemetry;
mod web;
mod web_e2e;
