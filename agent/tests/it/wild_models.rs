//! Models from the wild: a file whose `value_info` types an intermediate
//! value with a symbol that conflicts with the fixed input facts (as
//! PaddlePaddle→ONNX exports do) is pushed, deployed and served, loaded
//! through the worker's fallback. Built at test time with PyPI `onnx`
//! (`hub/tests/models/make_onnx.py`). A model with symbolic H and W is
//! refused by a device that cannot fix them, and served with a shape signed
//! at push or set per device.
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
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
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

/// The `[1, 3, h, w]` request for the symbolic-H/W model, all ones.
fn hw_request(h: usize, w: usize) -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 3, h, w], "datatype": "FP32", "data": vec![1.0f32; 3 * h * w]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_hw_is_refused_without_a_shape_and_served_with_one_from_push_or_device() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_onnx("symbolic_hw", tmp.path());
    let model = model.to_str().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("hw", "1.0.0", model, "").await;
    let v = hub.admin_get("/api/v1/models/hw/versions/1.0.0").await;
    let warning = v["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("input `x`") && warning.contains("--input-shape x="), "marked at push: {v}");
    hub.push("hw", "2.0.0", model, "&input_shapes=x=1,3,8,8").await;
    let v = hub.admin_get("/api/v1/models/hw/versions/2.0.0").await;
    assert_eq!(v["manifest"]["serving_shapes"]["x"], json!([1, 3, 8, 8]), "signed: {v}");
    assert!(v.get("warnings").is_none(), "nothing left open: {v}");

    // Without a shape: refused on the device, naming both ways to fix it.
    let a = start_agent(&tmp.path().join("a"), &hub, "edge-a", &[("site", "a")]).await;
    let d = hub.deploy("hw", "1.0.0", "site=a").await;
    assert!(d["warnings"][0].as_str().unwrap_or_default().contains("--input-shape x="), "warned at deploy: {d}");
    let view = a.wait_for(WAIT, |v| status(v, "hw").is_some_and(|s| s.0 == "failed")).await.unwrap();
    let (_, version, detail) = status(&view, "hw").unwrap();
    assert_eq!(version, "1.0.0");
    assert!(detail.contains("--input-shape") && detail.contains("serving.input_shapes"), "{detail}");
    assert_eq!(active(&view, "hw"), None, "nothing serves a guessed shape");
    let device = hub.wait_device("edge-a", |v| v.to_string().contains("load_failed")).await;
    assert!(device.to_string().contains("--input-shape"), "the hub hears why: {device}");

    // With the shape signed at push: served, and the metadata says so.
    let d = hub.deploy("hw", "2.0.0", "site=a").await;
    assert!(d.get("warnings").is_none(), "{d}");
    a.wait_for(WAIT, |v| active(v, "hw").as_deref() == Some("2.0.0")).await.unwrap();
    let addr = a.inference_addr.unwrap();
    let client = reqwest::Client::new();
    let meta: Value = client.get(format!("http://{addr}/v2/models/hw")).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, 8, 8]), "{meta}");
    let r = client.post(format!("http://{addr}/v2/models/hw/infer")).json(&hw_request(8, 8)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["outputs"][0]["shape"], json!([1, 4]), "{out}");

    // A per-device override serves 1.0.0 at the device's own shape.
    let b = start_agent_with(
        &tmp.path().join("b"),
        &hub,
        "edge-b",
        &[("site", "b")],
        "[serving.input_shapes]\nhw = [\"1,3,6,6\"]\n",
    )
    .await;
    hub.deploy("hw", "1.0.0", "site=b").await;
    b.wait_for(WAIT, |v| active(v, "hw").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = b.inference_addr.unwrap();
    let meta: Value = client.get(format!("http://{addr}/v2/models/hw")).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, 6, 6]), "{meta}");
    let r = client.post(format!("http://{addr}/v2/models/hw/infer")).json(&hw_request(6, 6)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}
