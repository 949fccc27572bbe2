//! ONNX Runtime for the tests that run the worker's `ort` engine.

use std::path::PathBuf;

/// How to get the library, said by every failure below.
const HOW: &str = "the worker's `ort` engine is built in by default, so the tests need ONNX Runtime 1.32: run \
                   `export ORT_DYLIB_PATH=\"$(.ci/install-onnxruntime)\"` (pip installs the onnxruntime==1.32.0 \
                   wheel under target/ and prints its libonnxruntime.so path; `.ci/test` does it), or build \
                   the worker without it (`--no-default-features`)";

/// The ONNX Runtime library named by `ORT_DYLIB_PATH`. A test that needs it
/// fails rather than skips without it, so CI cannot go green without having
/// run ONNX Runtime.
pub fn library() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        None => panic!("ORT_DYLIB_PATH is not set; {HOW}"),
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "ORT_DYLIB_PATH={} is not a file; {HOW}", path.display());
            path
        }
    }
}

/// Whether the process `pid` has ONNX Runtime's library mapped: proof that
/// a worker really runs it, not only that it was asked to.
pub fn mapped_in(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.contains("libonnxruntime"))
}
