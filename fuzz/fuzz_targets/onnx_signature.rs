//! The hub's in-process read of an uploaded ONNX file's signature
//! (`hub/src/onnx.rs`, `read_signature_from`): a protobuf walk that skips
//! what it does not need. Never the engine load, which runs confined in a
//! child process and is slow by design.
//!
//! Input: the file's bytes. Where the walk succeeds and a full protobuf
//! decode of the same bytes does too, both must name the same inputs and
//! outputs.
#![no_main]

use std::collections::HashSet;
use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sentinel_hub::onnx::{SignatureLimits, read_signature_from};

fuzz_target!(|data: &[u8]| {
    let limits = SignatureLimits::default();
    let Ok(sig) = read_signature_from(Cursor::new(data), data.len() as u64, limits) else { return };
    assert!(!sig.inputs.is_empty() && !sig.outputs.is_empty(), "a signature has inputs and outputs");
    assert!(sig.nodes <= limits.max_nodes, "the node limit holds");
    assert_eq!(sig.default_input_shapes().len(), sig.inputs.len());
    // The walk against a full decode (prost, as tract decodes ONNX).
    let Ok(model) = tract_onnx::pb::ModelProto::decode(data) else { return };
    let graph = model.graph.unwrap_or_default();
    let weights: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&str> = graph.input.iter().map(|vi| vi.name.as_str()).filter(|n| !weights.contains(n)).collect();
    let outputs: Vec<&str> = graph.output.iter().map(|vi| vi.name.as_str()).collect();
    assert_eq!(sig.inputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), inputs, "input names");
    assert_eq!(sig.outputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), outputs, "output names");
});
