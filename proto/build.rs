//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so the build
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/sentinel/v1/manifest.proto", "proto/sentinel/v1/agent_sync.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let mut config = tonic_prost_build::configure();
    // What devices report is stored and served by the hub as JSON.
    for ty in [
        "Hello",
        "RunningModel",
        "AgentReport",
        "ModelStatus",
        "AgentEvent",
        "SlotWindow",
        "LatencySketch",
        "RolloutEvidence",
        "WindowMetrics",
    ] {
        // `default`: JSON stored before a field existed still reads.
        config = config.type_attribute(
            format!(".sentinel.v1.{ty}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        );
    }
    // Labels encode in key order, so equal states encode to equal bytes.
    config = config.btree_map(".sentinel.v1.DesiredState.labels");
    config.build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
