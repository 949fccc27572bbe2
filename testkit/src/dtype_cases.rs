//! The dtype test cases of `agent/tests/models/make_dtype_models.py` (models
//! built at test time by public tools, with ONNX Runtime's outputs), shared by
//! the agent's system test (`it/dtypes.rs`) and the worker's engine parity test.

use std::path::Path;

use serde_json::{Value, json};

/// One model with its inputs and ONNX Runtime's outputs for them.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub dir: std::path::PathBuf,
    pub spec: Value,
}

/// Runs the generator into `dir`. A missing Python package fails the test
/// with the generator's message naming what to install.
pub fn make_models(dir: &Path) -> Vec<Case> {
    let script = crate::bins::workspace_root().join("agent/tests/models/make_dtype_models.py");
    let out = std::process::Command::new("python3").arg(&script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "make_dtype_models.py failed (it needs onnx, onnxruntime, scikit-learn, skl2onnx and \
         onnxconverter-common from PyPI; .ci/test installs them):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    cases
        .into_iter()
        .map(|spec| Case { name: spec["name"].as_str().unwrap().to_owned(), dir: dir.to_owned(), spec })
        .collect()
}

impl Case {
    pub fn file(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(key)).unwrap()
    }

    /// Whether `engine` (`tract`, `ort`) can run the case.
    pub fn runs_on(&self, engine: &str) -> bool {
        self.spec["engines"].as_array().is_none_or(|e| e.iter().any(|e| e == engine))
    }
}

/// Little-endian bytes of JSON `data` in a v2 `datatype` (BYTES: each string
/// as a u32 length and its bytes).
pub fn to_binary(datatype: &str, data: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in data {
        match datatype {
            "FP32" => out.extend((v.as_f64().unwrap() as f32).to_le_bytes()),
            "FP64" => out.extend(v.as_f64().unwrap().to_le_bytes()),
            "FP16" => out.extend(half::f16::from_f64(v.as_f64().unwrap()).to_le_bytes()),
            "BF16" => out.extend(half::bf16::from_f64(v.as_f64().unwrap()).to_le_bytes()),
            "INT8" => out.extend(i8::try_from(v.as_i64().unwrap()).unwrap().to_le_bytes()),
            "UINT8" => out.push(u8::try_from(v.as_u64().unwrap()).unwrap()),
            "INT16" => out.extend(i16::try_from(v.as_i64().unwrap()).unwrap().to_le_bytes()),
            "UINT16" => out.extend(u16::try_from(v.as_u64().unwrap()).unwrap().to_le_bytes()),
            "INT32" => out.extend(i32::try_from(v.as_i64().unwrap()).unwrap().to_le_bytes()),
            "UINT32" => out.extend(u32::try_from(v.as_u64().unwrap()).unwrap().to_le_bytes()),
            "INT64" => out.extend(v.as_i64().unwrap().to_le_bytes()),
            "UINT64" => out.extend(v.as_u64().unwrap().to_le_bytes()),
            "BOOL" => out.push(u8::from(v.as_bool().unwrap())),
            "BYTES" => {
                let s = v.as_str().unwrap().as_bytes();
                out.extend(u32::try_from(s.len()).unwrap().to_le_bytes());
                out.extend(s);
            }
            other => panic!("no binary form for {other}"),
        }
    }
    out
}

/// JSON values of binary output bytes in a v2 `datatype`.
pub fn from_binary(datatype: &str, bytes: &[u8]) -> Vec<Value> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    match datatype {
        "FP32" => chunks(bytes).map(|c| json!(f32::from_le_bytes(c))).collect(),
        "FP64" => chunks(bytes).map(|c| json!(f64::from_le_bytes(c))).collect(),
        "FP16" => chunks(bytes).map(|c| json!(half::f16::from_le_bytes(c).to_f64())).collect(),
        "BF16" => chunks(bytes).map(|c| json!(half::bf16::from_le_bytes(c).to_f64())).collect(),
        "INT8" => chunks(bytes).map(|c| json!(i8::from_le_bytes(c))).collect(),
        "UINT8" => bytes.iter().map(|b| json!(b)).collect(),
        "INT16" => chunks(bytes).map(|c| json!(i16::from_le_bytes(c))).collect(),
        "UINT16" => chunks(bytes).map(|c| json!(u16::from_le_bytes(c))).collect(),
        "INT32" => chunks(bytes).map(|c| json!(i32::from_le_bytes(c))).collect(),
        "UINT32" => chunks(bytes).map(|c| json!(u32::from_le_bytes(c))).collect(),
        "INT64" => chunks(bytes).map(|c| json!(i64::from_le_bytes(c))).collect(),
        "UINT64" => chunks(bytes).map(|c| json!(u64::from_le_bytes(c))).collect(),
        "BOOL" => bytes
            .iter()
            .map(|b| {
                assert!(*b <= 1, "BOOL byte {b}");
                json!(*b == 1)
            })
            .collect(),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let (len, tail) = rest.split_at(4);
                let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
                out.push(json!(std::str::from_utf8(&tail[..len]).unwrap()));
                rest = &tail[len..];
            }
            out
        }
        other => panic!("no binary form for {other}"),
    }
}

/// Checks served outputs against ONNX Runtime's: the same names, datatypes,
/// shapes, and values (exact but for floats).
pub fn assert_matches(case: &str, how: &str, got: &[(Value, Vec<Value>)], want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{case} {how}: outputs {got:?}");
    for ((head, values), reference) in got.iter().zip(want) {
        let name = reference["name"].as_str().unwrap();
        let what = format!("{case} {how} output `{name}`");
        assert_eq!(head["name"], reference["name"], "{what}");
        assert_eq!(head["datatype"], reference["datatype"], "{what}");
        assert_eq!(head["shape"], reference["shape"], "{what}");
        let expected = reference["data"].as_array().unwrap();
        assert_eq!(values.len(), expected.len(), "{what}");
        // f32/f64: a few units in the last place of f32. f16: tract
        // computes every op in f16 while ONNX Runtime's CPU kernels widen to
        // f32 inside an op, so each rounding of tract's logits (magnitude
        // 4-8, where an f16 step is 2^-8) becomes, through exp, up to ~0.4%
        // in a probability; 1% bounds it (seen: at most 0.3%).
        let (abs, rel) = match reference["datatype"].as_str().unwrap() {
            "FP32" | "FP64" => (1e-7, 1e-5),
            "FP16" => (1e-4, 1e-2),
            // Exact values here, shown as the f32 they widen to.
            "BF16" => (1e-7, 1e-5),
            _ => (0.0, 0.0),
        };
        let mut worst = 0f64;
        for (i, (g, w)) in values.iter().zip(expected).enumerate() {
            if rel == 0.0 {
                assert_eq!(g, w, "{what} element {i}: served {g}, ONNX Runtime {w}");
            } else {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!((g - w).abs() <= abs + rel * w.abs(), "{what} element {i}: served {g}, ONNX Runtime {w}");
                worst = worst.max((g - w).abs() / w.abs().max(1e-3));
            }
        }
        if rel > 0.0 {
            eprintln!("{what}: largest relative difference from ONNX Runtime {worst:.2e}");
        }
    }
}
