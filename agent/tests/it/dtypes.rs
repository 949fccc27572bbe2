//! Every ONNX tensor dtype the engines produce, end to end. The models are
//! built at test time by public tools (`tests/models/make_dtype_models.py`:
//! onnx, scikit-learn + skl2onnx, onnxconverter-common) and ONNX Runtime's
//! Python package computes the reference outputs. Each model is pushed to a
//! real hub (which dry-runs it in a confined worker), deployed to a real
//! agent, validated on the device when it brings a validation set, and
//! served over the v2 API in JSON and in binary, by hand and by the real
//! `tritonclient[http]` (`tests/tritonclient_dtypes.py`): the outputs must
//! equal ONNX Runtime's (exactly for integers, booleans and strings, to a few
//! units in the last place for f32/f64, within 1% for f16).
//!
//! | dtype    | v2     | carried by (case: tensors)                                  |
//! |----------|--------|-------------------------------------------------------------|
//! | float32  | FP32   | sklearn_*: `X`, `probabilities`; uint8_image: `scaled`      |
//! | float16  | FP16   | fp16_classifier: `x`, `probabilities`, validation set       |
//! | float64  | FP64   | numbers: `x_f64`, `y_f64`, `i32_as_f64`                     |
//! | int8     | INT8   | numbers: `x_i8`, `y_i8`                                     |
//! | uint8    | UINT8  | uint8_image: `x`, `inverted`                                |
//! | int16    | INT16  | numbers: `x_i16`, `y_i16`                                   |
//! | uint16   | UINT16 | numbers: `x_u16`, `y_u16`                                   |
//! | int32    | INT32  | numbers: `x_i32`, `y_i32`; booleans: `a_as_i32`             |
//! | uint32   | UINT32 | numbers: `x_u32`, `y_u32`                                   |
//! | int64    | INT64  | numbers: `x_i64`, `y_i64`; sklearn_*: `label` (a TDim in tract for sklearn_mlp); strings: `shape` (a TDim in tract) |
//! | uint64   | UINT64 | numbers: `x_u64`, `y_u64`                                   |
//! | bool     | BOOL   | booleans: `a`, `b`, `not_a`, `a_and_b`                      |
//! | string   | BYTES  | strings: `text`, `same`                                     |
//!
//! bfloat16 (BF16) has no tract tensor type, so no tract device can serve it;
//! the protocol and decoder unit tests carry it, and ONNX Runtime workers do.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::dtype_cases::{Case, assert_matches, from_binary, make_models, to_binary};
use common::*;
use serde_json::{Value, json};

/// Pushes `case` as `version`, with its validation set and `accuracy`.
async fn push(hub: &TestHub, case: &Case, version: &str, accuracy: Option<f64>) -> reqwest::Response {
    let _ = hub
        .client
        .post(format!("{}/api/v1/models", hub.url))
        .bearer_auth(&hub.admin)
        .json(&json!({"name": case.name}))
        .send()
        .await;
    let model = case.file(case.spec["model"].as_str().unwrap());
    let mut form =
        reqwest::multipart::Form::new().part("model", reqwest::multipart::Part::bytes(model).file_name("m.onnx"));
    let validation = &case.spec["validation"];
    if !validation.is_null() {
        form = form
            .part(
                "validation_inputs",
                reqwest::multipart::Part::bytes(case.file(validation["inputs"].as_str().unwrap())),
            )
            .part(
                "validation_labels",
                reqwest::multipart::Part::bytes(case.file(validation["labels"].as_str().unwrap())),
            );
    }
    let query = accuracy.map(|a| format!("&accuracy={a}&metric=top1")).unwrap_or_default();
    hub.client
        .post(format!("{}/api/v1/models/{}/versions?version={version}{query}", hub.url, case.name))
        .bearer_auth(&hub.admin)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dtype_is_pushed_served_and_validated_as_onnx_runtime_computes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (cases, ort_only): (Vec<Case>, Vec<Case>) =
        make_models(&tmp.path().join("models")).into_iter().partition(|c| c.runs_on("tract"));
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "uint8_image",
            "numbers",
            "booleans",
            "strings",
            "sklearn_logreg",
            "sklearn_forest",
            "sklearn_mlp",
            "fp16_classifier"
        ]
    );
    assert_eq!(ort_only.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["bfloat16"]);
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    let agent = start_agent(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")]).await;
    let base = format!("http://{}", agent.inference_addr.unwrap());
    let http = reqwest::Client::new();

    // Push (the hub dry-runs each in a confined worker, the probe included)
    // and deploy every case; the ones with a validation set declare the
    // accuracy ONNX Runtime measured on it.
    for case in &cases {
        let accuracy = case.spec["validation"]["accuracy"].as_f64();
        let r = push(&hub, case, "1.0.0", accuracy).await;
        assert_eq!(r.status(), 201, "{}: {}", case.name, r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        let declared: Vec<&str> =
            v["manifest"]["inputs"].as_array().unwrap().iter().map(|i| i["dtype"].as_str().unwrap()).collect();
        assert!(!declared.is_empty(), "{}: {v}", case.name);
        hub.deploy(&case.name, "1.0.0", "site=a").await;
    }
    for case in &cases {
        let v = agent
            .wait_for(WAIT, |v| {
                active(v, &case.name).as_deref() == Some("1.0.0")
                    || status(v, &case.name).is_some_and(|s| s.0 == "failed")
            })
            .await
            .unwrap();
        assert_eq!(active(&v, &case.name).as_deref(), Some("1.0.0"), "{}: {:?}", case.name, status(&v, &case.name));
    }

    for case in &cases {
        let inputs = case.spec["inputs"].as_array().unwrap();
        let outputs = case.spec["outputs"].as_array().unwrap();

        // Metadata advertises the v2 datatypes.
        let meta: Value =
            http.get(format!("{base}/v2/models/{}", case.name)).send().await.unwrap().json().await.unwrap();
        for (m, i) in meta["inputs"].as_array().unwrap().iter().zip(inputs) {
            assert_eq!((&m["name"], &m["datatype"]), (&i["name"], &i["datatype"]), "{}: {meta}", case.name);
        }
        for (m, o) in meta["outputs"].as_array().unwrap().iter().zip(outputs) {
            assert_eq!((&m["name"], &m["datatype"]), (&o["name"], &o["datatype"]), "{}: {meta}", case.name);
        }

        // JSON in, JSON out.
        let r = http
            .post(format!("{base}/v2/models/{}/infer", case.name))
            .json(&json!({"inputs": inputs}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}: {}", case.name, r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        let got: Vec<(Value, Vec<Value>)> = v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o.clone(), o["data"].as_array().unwrap().clone()))
            .collect();
        assert_matches(&case.name, "JSON", &got, outputs);

        // Binary in, binary out.
        let mut tail = Vec::new();
        let heads: Vec<Value> = inputs
            .iter()
            .map(|i| {
                let bytes = to_binary(i["datatype"].as_str().unwrap(), i["data"].as_array().unwrap());
                let head = json!({"name": i["name"], "shape": i["shape"], "datatype": i["datatype"],
                                  "parameters": {"binary_data_size": bytes.len()}});
                tail.extend(bytes);
                head
            })
            .collect();
        let head = json!({"inputs": heads, "parameters": {"binary_data_output": true}}).to_string();
        let r = http
            .post(format!("{base}/v2/models/{}/infer", case.name))
            .header("Inference-Header-Content-Length", head.len())
            .body([head.as_bytes(), &tail].concat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", case.name);
        let n: usize = r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
        let body = r.bytes().await.unwrap();
        let v: Value = serde_json::from_slice(&body[..n]).unwrap();
        let mut at = n;
        let got: Vec<(Value, Vec<Value>)> = v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
                let values = from_binary(o["datatype"].as_str().unwrap(), &body[at..at + size]);
                at += size;
                (o.clone(), values)
            })
            .collect();
        assert_eq!(at, body.len(), "{}: binary outputs fill the body", case.name);
        assert_matches(&case.name, "binary", &got, outputs);

        // Validation ran on the device, on inputs in the model's dtype
        // (float16 for fp16_classifier), and agrees with ONNX Runtime.
        let validation = &case.spec["validation"];
        if !validation.is_null() {
            let slot = agent.route(&case.name).unwrap().active.clone().unwrap();
            let measured = slot.validation_accuracy.read().unwrap().expect("validation accuracy measured");
            let expected = validation["accuracy"].as_f64().unwrap();
            assert!((measured - expected).abs() < 1e-9, "{}: device {measured}, ONNX Runtime {expected}", case.name);
        }
    }

    // The real tritonclient[http] sends and reads every dtype unmodified.
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    let out = tokio::process::Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_dtypes.py"))
        .arg(agent.inference_addr.unwrap().to_string())
        .arg(tmp.path().join("models/cases.json"))
        .args(&names)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tritonclient_dtypes.py failed (python3 -m pip install \"tritonclient[http]\"; .ci/test does):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("tritonclient agrees with ONNX Runtime").count(), cases.len(), "{stdout}");

    // A datatype other than the model's is a 400 naming both, and a BOOL
    // byte other than 0 or 1 is refused before it reaches the worker.
    let x = json!({"inputs": [{"name": "x", "shape": [1, 2, 2, 3], "datatype": "FP32", "data": vec![0.0; 12]}]});
    let r = http.post(format!("{base}/v2/models/uint8_image/infer")).json(&x).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let err = r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
    assert!(err.contains("must be uint8, got float32"), "{err}");
    let head = json!({"inputs": [{"name": "a", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": 4}},
                                 {"name": "b", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": 4}}]})
    .to_string();
    let r = http
        .post(format!("{base}/v2/models/booleans/infer"))
        .header("Inference-Header-Content-Length", head.len())
        .body([head.as_bytes(), &[1, 0, 1, 0, 0, 2, 0, 0]].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err = r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
    assert_eq!(err, "input `b`: BOOL element 1 is byte 2; booleans are 0 or 1");

    // Strings must be UTF-8 for the engines: other bytes are a 400 and the
    // worker serves on.
    let head = json!({"inputs": [{"name": "text", "shape": [1, 3], "datatype": "BYTES", "parameters": {"binary_data_size": 13}}]})
        .to_string();
    let strings = [&0u32.to_le_bytes()[..], &1u32.to_le_bytes(), b"a", &0u32.to_le_bytes()[..]].concat();
    let not_utf8 = [&0u32.to_le_bytes()[..], &1u32.to_le_bytes(), &[0xff], &0u32.to_le_bytes()[..]].concat();
    for (body, status) in [(not_utf8, 400), (strings, 200)] {
        let r = http
            .post(format!("{base}/v2/models/strings/infer"))
            .header("Inference-Header-Content-Length", head.len())
            .body([head.as_bytes(), &body].concat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        let v: Value = r.json().await.unwrap();
        if status == 400 {
            assert!(v["error"].as_str().unwrap().contains("string element 1 is not UTF-8"), "{v}");
        } else {
            assert_eq!(v["outputs"][0]["data"], json!(["", "a", ""]), "{v}");
        }
    }

    // A bfloat16 model, which tract (the hub's and these devices' engine)
    // cannot run, is refused at push with the reason.
    let r = push(&hub, &ort_only[0], "1.0.0", None).await;
    let code = r.status();
    let text = r.text().await.unwrap();
    eprintln!("bfloat16 push: {code} {text}");
    assert_eq!(code, 422, "{text}");
    assert!(text.to_lowercase().contains("bfloat16"), "{text}");

    // Validation is not vacuous for float16 inputs: the same fp16 model
    // declaring 100% is refused on the device with the accuracy it measured.
    let fp16 = cases.iter().find(|c| c.name == "fp16_classifier").unwrap();
    let r = push(&hub, fp16, "1.0.1", Some(1.0)).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    hub.deploy("fp16_classifier", "1.0.1", "site=a").await;
    let v = agent
        .wait_for(WAIT, |v| status(v, "fp16_classifier").is_some_and(|s| s.0 == "failed" && s.1 == "1.0.1"))
        .await
        .unwrap();
    let (_, _, detail) = status(&v, "fp16_classifier").unwrap();
    let expected = fp16.spec["validation"]["accuracy"].as_f64().unwrap();
    assert!(detail.contains(&format!("accuracy {expected:.4} on the 45-sample validation set")), "{detail}");
    assert_eq!(active(&v, "fp16_classifier").as_deref(), Some("1.0.0"));
    agent.shutdown().await;
}
