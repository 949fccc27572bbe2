//! The repository's test models and their labelled samples (`models/`, each
//! with its provenance in `models/README.md`).

use std::path::{Path, PathBuf};

use sentinel_worker_protocol::frame::Tensor;

/// The good digits model (8x8 scikit-learn digits, MLP).
pub const V1: &str = "digits/digits_mlp_v1.onnx";
/// The degraded digits model: same inputs, worse accuracy.
pub const V2: &str = "digits/digits_mlp_v2_degraded.onnx";
/// The slow digits model: same answers as v1, more compute.
pub const V3: &str = "digits/digits_mlp_v3_slow.onnx";
/// The MobileNetV3 text-direction classifier.
pub const VISION: &str = "vision/ch_ppocr_mobile_v2.0_cls_infer.onnx";

/// The repository's `models/` folder.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A file under `models/`.
pub fn model_path(rel: &str) -> PathBuf {
    models_dir().join(rel)
}

/// The bytes of a file under `models/`.
pub fn model_bytes(rel: &str) -> Vec<u8> {
    let path = model_path(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A raw little-endian f32 data file under `models/`.
pub fn read_f32(rel: &str) -> Vec<f32> {
    model_bytes(rel).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A raw little-endian i64 data file under `models/`.
pub fn read_i64(rel: &str) -> Vec<i64> {
    model_bytes(rel).chunks_exact(8).map(|c| i64::from_le_bytes(std::array::from_fn(|i| c[i]))).collect()
}

/// The 64 pixels of test digit `i` of `x` (`digits/test_x.f32`) as a `[1, 64]` input.
pub fn digit(x: &[f32], i: usize) -> Tensor {
    Tensor::from_f32(vec![1, 64], &x[i * 64..(i + 1) * 64])
}
