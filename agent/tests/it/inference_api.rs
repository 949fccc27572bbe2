//! The agent's KServe v2 API: health, metadata, inference in JSON and binary
//! form, the version in every response, and a 400 with the reason for each
//! kind of bad input while the worker keeps running. Compatibility is proved
//! with the real `tritonclient[http]` Python package.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_api_serves_and_refuses_bad_input_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    let agent = start_agent(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")]).await;
    let base = format!("http://{}", agent.inference_addr.unwrap());
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    assert_eq!(get("/v2/health/live").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/digits/ready").await.unwrap().status(), 404, "not deployed yet");
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    assert_eq!(get("/v2/health/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/digits/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/digits/versions/1.0.0/ready").await.unwrap().status(), 200);
    let meta: Value = get("/v2/models/digits").await.unwrap().json().await.unwrap();
    assert_eq!(meta["versions"], json!(["1.0.0"]));
    assert_eq!(meta["inputs"][0], json!({"name": "input", "datatype": "FP32", "shape": [-1, 64]}));
    assert_eq!(meta["outputs"][1]["datatype"], "INT64");

    // A batch of 8 in one request, in JSON: labels as the test set says (mostly).
    let x = read_f32("data/digits_test_x.bin");
    let y = read_i64("data/digits_test_y.bin");
    let body = json!({"id": "b8", "inputs": [{"name": "input", "shape": [8, 64], "datatype": "FP32", "data": x[..8 * 64]}],
                      "outputs": [{"name": "label"}]});
    let r = http.post(format!("{base}/v2/models/digits/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sentinel-model-version"], "1.0.0");
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["id"].as_str(), v["model_version"].as_str()), (Some("b8"), Some("1.0.0")));
    assert_eq!(v["outputs"][0]["shape"], json!([8]));
    let labels: Vec<i64> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    assert!(labels.iter().zip(&y).filter(|(a, b)| a == b).count() >= 7, "{labels:?} vs {:?}", &y[..8]);

    // Binary tensor extension: the same sample in raw bytes, answer in raw bytes.
    let head = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
                      "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut raw = head.clone().into_bytes();
    raw.extend(x[..64].iter().flat_map(|f| f.to_le_bytes()));
    let r = http
        .post(format!("{base}/v2/models/digits/infer"))
        .header("Inference-Header-Content-Length", head.len())
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let n: usize = r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = r.bytes().await.unwrap();
    let v: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 40);
    let probs: Vec<f32> = bytes[n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{probs:?}");

    // Bad input: a 400 naming the problem, and the same worker keeps serving.
    let before = active_pid(&agent, "digits").expect("the active worker runs");
    let tensor = |shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]});
    let mut nan_body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]})
        .to_string()
        .into_bytes();
    let nan_head = nan_body.len();
    nan_body.extend((0..64).flat_map(|i| if i == 5 { f32::NAN } else { 1.0 }.to_le_bytes()));
    let cases: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
        ("wrong shape", http.post(format!("{base}/v2/models/digits/infer")).json(&tensor(json!([1, 63]), "FP32", json!(vec![0.0; 63]))), "has shape [1, 63]"),
        ("wrong dtype", http.post(format!("{base}/v2/models/digits/infer")).json(&tensor(json!([1, 64]), "INT64", json!(vec![0; 64]))), "must be float32, got int64"),
        ("missing input", http.post(format!("{base}/v2/models/digits/infer")).json(&json!({"inputs": []})), "missing input `input`"),
        ("unknown input", http.post(format!("{base}/v2/models/digits/infer")).json(&json!({"inputs": [{"name": "pixels", "shape": [1, 1], "datatype": "FP32", "data": [0]}]})), "missing input `input`"),
        ("data count", http.post(format!("{base}/v2/models/digits/infer")).json(&tensor(json!([1, 64]), "FP32", json!([1, 2]))), "needs 64 elements, got 2"),
        ("not JSON", http.post(format!("{base}/v2/models/digits/infer")).body("{inputs"), "request JSON"),
        ("oversize body", http.post(format!("{base}/v2/models/digits/infer")).body(vec![b' '; 17 << 20]), "over the limit of 16777216 bytes"),
        ("NaN", http.post(format!("{base}/v2/models/digits/infer")).header("Inference-Header-Content-Length", nan_head).body(nan_body), "element 5 is NaN"),
        ("unknown output", http.post(format!("{base}/v2/models/digits/infer")).json(&json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}], "outputs": [{"name": "logits"}]})), "unknown output `logits`"),
    ];
    for (what, req, want) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400, "{what}");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(want), "{what}: {msg}");
    }
    assert_eq!(active_pid(&agent, "digits"), Some(before), "bad input never costs the worker");
    let r = http
        .post(format!("{base}/v2/models/nope/infer"))
        .json(&tensor(json!([1]), "FP32", json!([0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{base}/v2/models/digits/versions/9.9.9/infer"))
        .json(&tensor(json!([1]), "FP32", json!([0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    agent.shutdown().await;
}

/// The real `tritonclient[http]` (installed by `.ci/run`) talks to the agent
/// unmodified: health, metadata, and inference with binary and JSON tensors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_works_unmodified() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    let agent = start_agent(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")]).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let script = model_path("../agent/tests/tritonclient_check.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(addr.to_string())
        .arg(model_path("data"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tritonclient check failed (pip install 'tritonclient[http]' numpy):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("accuracy 0.9"), "{stdout}");
    agent.shutdown().await;
}
