//! The worker's system tests: the real `sentinel-worker` binary, built with
//! its `test-probes` feature, on real models. One binary for all areas, so a
//! clean build links tract once. Run one area with
//! `cargo test -p sentinel-worker --test it AREA::`.

mod check;
mod sandbox;
