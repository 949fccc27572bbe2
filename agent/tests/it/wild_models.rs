//! Models from the wild: a file whose `value_info` types an intermediate
//! value with a symbol that conflicts with the fixed input facts (as
//! PaddlePaddle→ONNX exports do) is pushed, deployed and served, loaded
//! through the worker's fallback. Built at test time with PyPI `onnx`
//! (`hub/tests/models/make_onnx.py`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::*;

/// Builds a model with the hub's `tests/models/make_onnx.py KIND OUT`.
fn make_onnx(kind: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{kind}.onnx"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/tests/models/make_onnx.py");
    let run = std::process::Command::new("python3").arg(&script).arg(kind).arg(&out).output().unwrap();
    assert!(run.status.success(), "make_onnx.py {kind} (python3 -m pip install onnx): {run:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paddle_style_value_info_conflict_is_pushed_deployed_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_onnx("paddle_value_info", tmp.path());
    let hub = TestHub::start(&tmp.path().join("hub"), |_| {}).await;
    // `push` asserts 201: the hub's check loaded it through the fallback.
    hub.push("paddle", "1.0.0", model.to_str().unwrap(), "").await;
    let agent = start_agent(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")]).await;
    hub.deploy("paddle", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "paddle").as_deref() == Some("1.0.0")).await.unwrap();

    // y = relu(x · w), w[i][j] = ((7i + 3j) mod 11 - 5) / 10, as make_onnx.py builds it.
    let x: Vec<f32> = (0..64).map(|i| (i % 5) as f32 / 4.0).collect();
    let expected: Vec<f32> = (0..10)
        .map(|j| {
            let dot: f32 = (0..64).map(|i| x[i] * (((i * 7 + j * 3) % 11) as f32 - 5.0) / 10.0).sum();
            dot.max(0.0)
        })
        .collect();
    let addr = agent.inference_addr.unwrap();
    let body = json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}]});
    let r =
        reqwest::Client::new().post(format!("http://{addr}/v2/models/paddle/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let got: Vec<f32> =
        v["outputs"][0]["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap() as f32).collect();
    assert_eq!(got.len(), 10, "{v}");
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-4, "got {got:?}, expected {expected:?}");
    }
}
