//! `sentinel-agent`: the device side. Until its issue lands it only proves
//! that it builds against the shared wire contract.

use clap::Parser;

/// Sentinel's device agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "sentinel-agent {}: the agent is not implemented yet (manifest format {})",
        env!("CARGO_PKG_VERSION"),
        sentinel_proto::manifest::FORMAT_ONNX
    );
    std::process::exit(69);
}
