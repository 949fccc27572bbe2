//! Writes the fuzz targets' seed corpora, `corpus/<target>/`, from the repo's
//! own models (`models/`), data (`models/data/`) and documented configuration
//! (`README.md`), through the same encoders the hub and agent use:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus
//! ```
//!
//! Each file is one valid input (or, where noted, one refused for a reason
//! worth starting from); the fuzzer mutates from there. Signatures come from
//! a key made for the run, so seeds that carry one change on every run; the
//! targets re-sign what they decode, so that does not matter to them.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message as _;
use sentinel_fuzz::{DEVICE_ID, LAST_REVISION, NOW_UNIX_MS};
use sentinel_hub::onnx::{SignatureLimits, read_signature};
use sentinel_proto::pb::{
    self, DesiredState, HubMessage, ModelAssignment, ModelManifest, RolloutPolicy, Stage, hub_message,
};
use sentinel_proto::{sign_manifest, sign_state};
use sentinel_worker_protocol::frame::{
    Ready, Tensor, encode_error_response, encode_ok_response, encode_ok_timed, encode_ready, encode_request,
    encode_rows_request,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> Vec<u8> {
    let path = repo().join(rel);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Replaces `corpus/<target>/` with `seeds`.
fn write(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = repo().join("fuzz/corpus").join(target);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating the corpus directory");
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes).expect("writing a seed");
    }
    println!("{target}: {} seeds", seeds.len());
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest the hub would sign for a model file in the repo.
fn manifest_for(rel: &str, name: &str, version: &str, validation: bool) -> ModelManifest {
    let bytes = read(rel);
    let signature = read_signature(&repo().join(rel), SignatureLimits::default()).expect("a repo model reads");
    let blob = |rel: &str| {
        let b = read(rel);
        pb::BlobRef { sha256: sha256_hex(&b), size: b.len() as u64 }
    };
    ModelManifest {
        name: name.into(),
        version: version.into(),
        sha256: sha256_hex(&bytes),
        size: bytes.len() as u64,
        format: "onnx".into(),
        inputs: signature.inputs,
        outputs: signature.outputs,
        accuracy: Some(pb::Accuracy { metric: "top1".into(), value: 0.9694, dataset: "digits-test".into() }),
        hardware: vec!["x86_64".into(), "aarch64".into()],
        stage: Stage::Production as i32,
        created_at_unix_ms: NOW_UNIX_MS - 86_400_000,
        key_id: String::new(),
        tags: vec!["mlp".into()],
        validation: validation.then(|| pb::ValidationSet {
            inputs: Some(blob("models/data/digits_test_x.bin")),
            labels: Some(blob("models/data/digits_test_y.bin")),
            count: 360,
        }),
        serving_shapes: Vec::new(),
        engine: String::new(),
        check_skipped: String::new(),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

/// One length-prefixed frame, as `write_frame` puts it on the pipe.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    markdown.split("```toml\n").skip(1).filter_map(|b| b.split_once("```").map(|(t, _)| t.to_owned())).collect()
}

fn multipart(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn main() {
    let keys = sentinel_fuzz::keys();
    let digits = manifest_for("models/digits/digits_mlp_v1.onnx", "digits", "1.0.0", true);
    let degraded = manifest_for("models/digits/digits_mlp_v2_degraded.onnx", "digits", "2.0.0", false);
    let vision = manifest_for("models/vision/ch_ppocr_mobile_v2.0_cls_infer.onnx", "textcls", "0.2.0", false);

    // signed_manifest: the hub's JSON and protobuf forms, and bare payloads.
    let mut seeds = Vec::new();
    for (name, m) in [("digits-1.0.0", &digits), ("digits-2.0.0", &degraded), ("textcls-0.2.0", &vision)] {
        let signed = sign_manifest(&keys.signer, m);
        let json = format!(
            "{{\"manifest\":\"{}\",\"signature\":\"{}\",\"key_id\":\"{}\"}}",
            B64.encode(&signed.manifest),
            B64.encode(&signed.signature),
            signed.key_id
        );
        seeds.push((format!("{name}.json"), json.into_bytes()));
        seeds.push((format!("{name}.signed.pb"), signed.encode_to_vec()));
        seeds.push((format!("{name}.manifest.pb"), signed.manifest));
    }
    write("signed_manifest", &seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect::<Vec<_>>());

    // desired_state: payloads a hub signs, and one as it arrives on the stream.
    let assignment = |m: &ModelManifest, policy: Option<RolloutPolicy>| ModelAssignment {
        manifest: Some(sign_manifest(&keys.signer, m)),
        artifact_url: format!("https://hub.example:8080/api/v1/models/{}/versions/{}/artifact", m.name, m.version),
        policy,
        deployment_id: 7,
        validation_inputs_url: String::new(),
        validation_labels_url: String::new(),
    };
    let canary = RolloutPolicy {
        phases: vec!["shadow".into(), "canary:10".into(), "full".into()],
        bake_seconds: 300,
        min_samples: 500,
        max_latency_ratio: 1.5,
        max_error_rate: 0.05,
        min_accuracy: 0.9,
        min_shadow_agreement: 0.95,
        ..Default::default()
    };
    let state = |revision: u64, models: Vec<ModelAssignment>| DesiredState {
        device_id: DEVICE_ID.into(),
        revision,
        issued_at_unix_ms: NOW_UNIX_MS - 1000,
        expires_at_unix_ms: NOW_UNIX_MS + 3_600_000,
        models,
        labels: [("site".to_owned(), "a".to_owned())].into(),
    };
    let empty = state(LAST_REVISION, vec![]);
    let one = state(LAST_REVISION + 1, vec![assignment(&digits, None)]);
    let two = state(LAST_REVISION + 2, vec![assignment(&degraded, Some(canary)), assignment(&vision, None)]);
    let on_stream = HubMessage { kind: Some(hub_message::Kind::State(sign_state(&keys.signer, &two))) };
    write(
        "desired_state",
        &[
            ("empty.state.pb", empty.encode_to_vec()),
            ("digits.state.pb", one.encode_to_vec()),
            ("canary-and-textcls.state.pb", two.encode_to_vec()),
            ("on-stream.hub-message.pb", on_stream.encode_to_vec()),
        ],
    );

    // worker_frames: what a worker writes (ready, responses) and reads (requests).
    let x = f32s(&read("models/data/digits_test_x.bin"));
    let y = i64s(&read("models/data/digits_test_y.bin"));
    let request = encode_request(&[Tensor::from_f32(vec![4, 64], &x[..4 * 64])]);
    let response = encode_ok_response(&[Tensor::from_i64(vec![4], &y[..4])]);
    let timed = encode_ok_timed(
        &[Tensor::from_i64(vec![2], &y[..2]), Tensor::from_f32(vec![2, 10], &[0.1; 20])],
        std::time::Duration::from_micros(42),
    );
    let ready = encode_ready(&Ready { ready: true, confined: true, reason: None, max_batch: 1 });
    let unconfined =
        encode_ready(&Ready { ready: true, confined: false, reason: Some("seccomp off".into()), max_batch: 64 });
    let session = [frame(&ready), frame(&timed), frame(&encode_error_response("input 0 has shape [1, 63]"))].concat();
    // One tensor of every dtype the protocol carries, strings included.
    let every_dtype = encode_request(&[
        Tensor::from_f32(vec![1], &[1.5]),
        Tensor::from_values::<u8>(vec![1, 3], &[0, 128, 255]),
        Tensor::from_values::<i8>(vec![2], &[-128, 127]),
        Tensor::from_values::<u16>(vec![1], &[65535]),
        Tensor::from_values::<i16>(vec![2], &[-1, 1]),
        Tensor::from_values::<i32>(vec![1], &[-7]),
        Tensor::from_i64(vec![1], &[-9]),
        Tensor::from_strings(vec![2], &["", "héllo"]),
        Tensor::from_values(vec![2], &[true, false]),
        Tensor::from_values(vec![2], &[half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]),
        Tensor::from_values::<f64>(vec![1], &[0.25]),
        Tensor::from_values::<u32>(vec![1], &[7]),
        Tensor::from_values::<u64>(vec![1], &[u64::MAX]),
        Tensor::from_values(vec![2], &[half::bf16::from_f32(0.5), half::bf16::from_f32(4.0)]),
    ]);
    // A rows request (the dynamic batcher's), with a string input cut per sample.
    let rows = encode_rows_request(&[
        Tensor::from_f32(vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        Tensor::from_strings(vec![3, 1], &["a", "", "héllo"]),
    ]);
    write(
        "worker_frames",
        &[
            ("session-whole-reads", [vec![63], session.clone()].concat()),
            ("session-3-byte-reads", [vec![2], session].concat()),
            ("unconfined-ready", [vec![7], frame(&unconfined)].concat()),
            ("request-4x64", [vec![63], frame(&request)].concat()),
            ("response-4", [vec![15], frame(&response)].concat()),
            ("request-every-dtype", [vec![63], frame(&every_dtype)].concat()),
            ("request-rows-strings", [vec![63], frame(&rows)].concat()),
        ],
    );

    // agent_config: the README's configuration, with a real key and its rollout block.
    let readme = String::from_utf8(read("README.md")).expect("README.md is UTF-8");
    let blocks = toml_blocks(&readme);
    let config = blocks.iter().find(|b| b.contains("device_id")).expect("the README documents the agent config");
    let policy = blocks.iter().find(|b| b.starts_with("phases")).expect("the README documents a rollout policy");
    let pinned = keys.signer.public_key_base64();
    let config = config.replace("HMY/NU8+avTx...=", &pinned);
    let with_rollout = format!("{config}[rollout]\n{policy}");
    let minimal: String = config.lines().take(6).map(|l| format!("{l}\n")).collect();
    let env = format!(
        "{minimal}\0SENTINEL_AGENT_DEVICE_ID=edge-2\nSENTINEL_AGENT_LISTEN=\nRUNTIME_DIRECTORY=/run/a:/run/b\n"
    );
    // Hub replicas: URL lists, in the file and in the environment.
    let replicas: String = minimal
        .lines()
        .filter(|l| !l.starts_with("grpc_url"))
        .map(|l| {
            if l.starts_with("hub_url") {
                "hub_url = [\"https://hub-a.example:8080\", \"https://hub-b.example:8080/\"]\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let replicas_env =
        format!("{replicas}\0SENTINEL_AGENT_GRPC_URL=https://hub-a.example:8081, https://hub-b.example:8081\n");
    write(
        "agent_config",
        &[
            ("readme.toml", config.clone().into_bytes()),
            ("readme-with-rollout.toml", with_rollout.into_bytes()),
            ("minimal.toml", minimal.into_bytes()),
            ("minimal-with-env", env.into_bytes()),
            ("replicas-with-env", replicas_env.into_bytes()),
        ],
    );

    // upload_multipart: the CLI's bodies, with small real files (each part
    // under the target's 4 KiB cap except where the cap is the point).
    let boundary = "sentinel-fuzz-boundary";
    let content_type = format!("multipart/form-data; boundary={boundary}\n");
    let model = read("models/broken/unsupported_op.onnx");
    let inputs = &read("models/data/digits_test_x.bin")[..2 * 64 * 4];
    let labels = &read("models/data/digits_test_y.bin")[..2 * 8];
    let body = |step: u8, parts: &[(&str, &[u8])]| {
        [vec![step], content_type.clone().into_bytes(), multipart(boundary, parts)].concat()
    };
    write(
        "upload_multipart",
        &[
            ("model-only", body(127, &[("model", &model)])),
            (
                "model-and-validation",
                body(31, &[("model", &model), ("validation_inputs", inputs), ("validation_labels", labels)]),
            ),
            (
                "validation-first",
                body(5, &[("validation_labels", labels), ("validation_inputs", inputs), ("model", &model)]),
            ),
            ("model-over-cap", body(127, &[("model", &read("models/data/digits_test_y.bin"))])),
        ],
    );

    // v2_request: the bodies the tests and tritonclient send, JSON and binary.
    let rows: Vec<Vec<f32>> = x.chunks(64).take(2).map(<[f32]>::to_vec).collect();
    let flat: Vec<f32> = rows.concat();
    let json_flat = serde_json::json!({
        "id": "req-1",
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": flat}],
    });
    let json_nested = serde_json::json!({
        "inputs": [
            {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": rows},
            {"name": "labels", "shape": [4], "datatype": "INT64", "data": &y[..4]},
        ],
        "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": false}}],
        "parameters": {"sequence_id": 0},
    });
    let head = serde_json::json!({
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                    "parameters": {"binary_data_size": 2 * 64 * 4}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": true}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let binary: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let small = serde_json::json!({
        "id": "r",
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &flat[..4]}],
    });
    // Every v2 datatype in JSON, and BYTES and BOOL in binary.
    let json_every = serde_json::json!({"inputs": [
        {"name": "h", "shape": [2], "datatype": "FP16", "data": [1.5, -2]},
        {"name": "b", "shape": [2], "datatype": "BF16", "data": [0.5, 4]},
        {"name": "d", "shape": [1], "datatype": "FP64", "data": [0.25]},
        {"name": "u", "shape": [1, 3], "datatype": "UINT8", "data": [[0, 128, 255]]},
        {"name": "i", "shape": [2], "datatype": "INT8", "data": [-128, 127]},
        {"name": "s", "shape": [2], "datatype": "INT16", "data": [-1, 1]},
        {"name": "w", "shape": [1], "datatype": "UINT16", "data": [65535]},
        {"name": "n", "shape": [1], "datatype": "INT32", "data": [-7]},
        {"name": "m", "shape": [1], "datatype": "UINT32", "data": [7]},
        {"name": "q", "shape": [1], "datatype": "UINT64", "data": [u64::MAX]},
        {"name": "t", "shape": [2], "datatype": "BOOL", "data": [true, false]},
        {"name": "x", "shape": [2], "datatype": "BYTES", "data": ["", "héllo"]},
    ]});
    let strings = Tensor::from_strings(vec![2], &["", "héllo"]).data;
    let head_strings = serde_json::json!({"inputs": [
        {"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": strings.len()}},
        {"name": "t", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
    ]})
    .to_string();
    let binary_strings = [strings, vec![1, 0]].concat();
    write(
        "v2_request",
        &[
            ("json-flat", [vec![0], json_flat.to_string().into_bytes()].concat()),
            ("json-nested-two-inputs", [vec![0], json_nested.to_string().into_bytes()].concat()),
            ("binary", [vec![1], format!("{}\n{head}", head.len()).into_bytes(), binary].concat()),
            ("tight-limits", [vec![2], small.to_string().into_bytes()].concat()),
            ("json-every-datatype", [vec![0], json_every.to_string().into_bytes()].concat()),
            (
                "binary-bytes-and-bool",
                [vec![1], format!("{}\n{head_strings}", head_strings.len()).into_bytes(), binary_strings].concat(),
            ),
        ],
    );

    // onnx_signature: small repo models whole, and the vision model's
    // declarations without its weights and nodes (the whole file is 585 KB).
    let mut vision_decl =
        tract_onnx::pb::ModelProto::decode(read("models/vision/ch_ppocr_mobile_v2.0_cls_infer.onnx").as_slice())
            .expect("the vision model decodes");
    if let Some(g) = vision_decl.graph.as_mut() {
        g.node.clear();
        g.initializer.clear();
        g.value_info.clear();
    }
    write(
        "onnx_signature",
        &[
            ("digits_mlp_v1.onnx", read("models/digits/digits_mlp_v1.onnx")),
            ("unsupported_op.onnx", read("models/broken/unsupported_op.onnx")),
            ("ppocr_cls_declarations.onnx", vision_decl.encode_to_vec()),
        ],
    );
}
