//! Push-time inspection is bounded: a model that asks the engine for more
//! memory or time than the hub allows is refused with "exceeds the inspection
//! limit" while the hub's own memory stays where it was, a graph over the
//! node limit is refused before any engine sees it, and nothing of a refused
//! upload is stored. The hostile models are built at test time with PyPI
//! `onnx` (tests/models/make_onnx.py).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// Builds a model with `tests/models/make_onnx.py KIND OUT ARGS...`.
fn make_onnx(kind: &str, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("{kind}.onnx"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models/make_onnx.py");
    let run = std::process::Command::new("python3").arg(&script).arg(kind).arg(&out).args(args).output().unwrap();
    assert!(
        run.status.success(),
        "make_onnx.py {kind} failed (python3 -m pip install onnx; .ci/test does): {}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(out).unwrap()
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS, so a later
/// reading is the peak of what happened in between. The hub runs inside the
/// test process, so this is the hub's memory.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM (Linux >= 4.0)");
}

async fn versions(hub: &TestHub, name: &str) -> Value {
    hub.get(&format!("/api/v1/models/{name}/versions"), &hub.admin).await.json().await.unwrap()
}

/// Asserts that the hub still takes a good push after refusing bad ones.
async fn still_serving(hub: &TestHub) {
    let r = hub.upload("bomb", "9.0.0", model_bytes(V1), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_fold_bombs_exceed_the_memory_limit_in_the_child_not_in_the_hub() {
    let hub = TestHub::start().await;
    hub.register("bomb").await;
    // 4 GB of f32 to fold, from a file of a few hundred bytes; three at once,
    // as in the attack that took an unbounded hub to 3 GB.
    let bomb = make_onnx("bomb", &["1000,1000,1000"]);
    assert!(bomb.len() < 400, "the bomb is {} bytes", bomb.len());
    let rss_before = status_kib("VmRSS:");
    reset_peak_rss();
    let versions_pushed: Vec<String> = (0..3).map(|i| format!("1.0.{i}")).collect();
    let pushes = versions_pushed.iter().map(|v| hub.upload("bomb", v, bomb.clone(), ""));
    for r in futures_util::future::join_all(pushes).await {
        let msg = expect_error(r, 422).await;
        assert!(msg.contains("exceeds the inspection limit of 1024 MiB of memory"), "{msg}");
        assert!(msg.contains("nothing was stored"), "{msg}");
    }
    let peak = status_kib("VmHWM:");
    let rss_after = status_kib("VmRSS:");
    eprintln!("hub (test process) RSS {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB in between");
    // The bomb folds 4 GB; the hub's peak moved by far less than one of them.
    assert!(peak < rss_before + 256 * 1024, "peak RSS {peak} KiB, from {rss_before} KiB before the bombs");
    assert_eq!(versions(&hub, "bomb").await["versions"], serde_json::json!([]), "nothing was registered");
    assert_eq!(hub.stored_blobs().await.len(), 0, "nothing was stored, not even a staging file");
    still_serving(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issues_one_gigabyte_bomb_is_refused_under_a_lower_memory_limit() {
    // The attack as reported: ConstantOfShape [1000,1000,250] -> ReduceSum,
    // 1.0 GB to fold. It fits the default 1024 MiB; a hub that allows less
    // refuses it, naming its own limit.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = sentinel_hub::HubConfig::new(tmp.path());
    config.inspect.memory_limit_bytes = 512 * 1024 * 1024;
    let hub = TestHub::start_with(config).await;
    hub.register("bomb").await;
    let bomb = make_onnx("bomb", &["1000,1000,250"]);
    reset_peak_rss();
    let before = status_kib("VmRSS:");
    let msg = expect_error(hub.upload("bomb", "1.0.0", bomb, "").await, 422).await;
    assert!(msg.contains("exceeds the inspection limit of 512 MiB of memory"), "{msg}");
    let peak = status_kib("VmHWM:");
    assert!(peak < before + 256 * 1024, "peak RSS {peak} KiB, from {before} KiB");
    assert_eq!(hub.stored_blobs().await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_outlasts_the_time_limit_is_killed_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = sentinel_hub::HubConfig::new(tmp.path());
    // No machine loads a 15,000-node graph in 50 ms (tract takes seconds).
    config.inspect.timeout = Duration::from_millis(50);
    let hub = TestHub::start_with(config).await;
    hub.register("bomb").await;
    let msg = expect_error(hub.upload("bomb", "1.0.0", make_onnx("relu_chain", &["15000"]), "").await, 422).await;
    assert!(msg.contains("exceeds the inspection limit of 50 ms of time"), "{msg}");
    assert_eq!(versions(&hub, "bomb").await["versions"], serde_json::json!([]));
    assert_eq!(hub.stored_blobs().await.len(), 0);
    assert!(
        std::fs::read_dir(tmp.path().join("inspect")).unwrap().next().is_none(),
        "the killed check's private directory was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphs_over_the_node_limit_are_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = sentinel_hub::HubConfig::new(tmp.path());
    config.inspect.max_nodes = 1000;
    let hub = TestHub::start_with(config).await;
    hub.register("chain").await;
    let msg = expect_error(hub.upload("chain", "1.0.0", make_onnx("relu_chain", &["1001"]), "").await, 422).await;
    assert!(msg.contains("1001 nodes") && msg.contains("limit of 1000 nodes"), "{msg}");
    assert!(msg.contains("--inspect-max-nodes"), "{msg}");
    let r = hub.upload("chain", "1.0.1", make_onnx("relu_chain", &["1000"]), "").await;
    assert_eq!(r.status(), 201, "exactly at the limit is fine: {}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_node_limit_refuses_the_superlinear_chain_at_once() {
    let hub = TestHub::start().await;
    hub.register("chain").await;
    // 20,001 nodes: 8 s of tract optimisation before the limit existed.
    let msg = expect_error(hub.upload("chain", "1.0.0", make_onnx("relu_chain", &["20001"]), "").await, 422).await;
    assert!(msg.contains("20001 nodes") && msg.contains("limit of 20000 nodes"), "{msg}");
    assert_eq!(hub.stored_blobs().await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_operator_is_refused_with_the_engines_reason() {
    let hub = TestHub::start().await;
    hub.register("odd").await;
    let msg = expect_error(hub.upload("odd", "1.0.0", make_onnx("unknown_op", &[]), "").await, 422).await;
    assert!(msg.contains("does not load") && msg.contains("NoSuchOperator"), "{msg}");
    assert_eq!(hub.stored_blobs().await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_operator_is_refused_with_a_hint_naming_step_operator_domain_and_ort() {
    let hub = TestHub::start().await;
    hub.register("odd").await;
    let bytes = std::fs::read(model_path("broken/unsupported_op.onnx")).unwrap();
    let msg = expect_error(hub.upload("odd", "1.0.0", bytes, "").await, 422).await;
    assert!(msg.contains("Unimplemented(SentinelNoSuchOp)"), "the engine's reason: {msg}");
    assert!(
        msg.contains("failed at every load step: as declared; ignoring value_info and output shapes"),
        "the steps: {msg}"
    );
    assert!(msg.contains("operator SentinelNoSuchOp (domain com.example.sentinel)"), "op and domain: {msg}");
    // This hub has no ONNX Runtime library (its worker has the engine).
    assert!(msg.contains("ONNX Runtime is not available on this hub"), "the ORT verdict: {msg}");
    assert_eq!(hub.stored_blobs().await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_info_conflict_like_paddle_exports_passes_through_the_fallback() {
    let hub = TestHub::start().await;
    hub.register("paddle").await;
    let r = hub.upload("paddle", "1.0.0", make_onnx("paddle_value_info", &[]), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_models_pass_the_check() {
    let hub = TestHub::start().await;
    hub.register("vision").await;
    let r = hub.upload("vision", "1.0.0", model_bytes(VISION), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["inputs"][0]["shape"][1], 3, "{v}");
    // A uint8 input (carried since issue 12) is dry-run and probed like any
    // other.
    let r = hub.upload("vision", "1.0.1", make_onnx("uint8_input", &[]), "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["inputs"][0]["dtype"], "uint8", "{v}");
}

#[tokio::test]
async fn a_hub_without_a_worker_refuses_to_start_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", tmp.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--worker")
        .arg(tmp.path().join("no-such-worker"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "a configuration error: {stderr}");
    assert!(stderr.contains("no-such-worker") && stderr.contains("--worker"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_shapes_at_push_are_checked_against_the_model_and_bounded() {
    let hub = TestHub::start().await;
    hub.register("hw").await;
    let model = make_onnx("symbolic_hw", &[]);
    // Each bad shape: its status and what the message says; nothing is stored.
    for (query, status, says) in [
        ("&input_shapes=x", 422, "is not NAME=D0,D1"),
        ("&input_shapes=x=1,3,0,8", 422, "must be a whole number from 1 to"),
        ("&input_shapes=x=1,3,8,99999999999", 422, "must be a whole number from 1 to"),
        ("&input_shapes=x=1,3,8,8;x=1,3,4,4", 422, "given twice"),
        (&format!("&input_shapes=x={}", vec!["1"; 17].join(",")), 422, "the limit is 16"),
        ("&input_shapes=x=1,3,%2B8,8", 422, "dim \"+8\" must be a whole number"),
        ("&input_shapes=x=1,3,%208,8", 422, "dim \" 8\" must be a whole number"),
        ("&input_shapes=x%00=1,3,8,8", 422, "none of them control characters"),
        ("&input_shapes=x=1,3,8,8;", 422, "\"\" is not NAME=D0,D1"),
        ("&input_shapes=y=1,4", 422, "`y`, which is no input of the model (its inputs: x)"),
        ("&input_shapes=x=1,3,8", 422, "does not fit the declared [N, 3, H, W]"),
        ("&input_shapes=x=1,4,8,8", 422, "does not fit the declared [N, 3, H, W]"),
    ] {
        let msg = expect_error(hub.upload("hw", "1.0.0", model.clone(), query).await, status).await;
        assert!(msg.contains(says), "{query}: {msg}");
        assert_eq!(hub.stored_blobs().await.len(), 0, "{query}");
    }
    let r = hub.upload("hw", "1.0.0", model.clone(), "&input_shapes=x=2,3,16,24").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["serving_shapes"]["x"], serde_json::json!([2, 3, 16, 24]), "{v}");
    assert!(v.get("warnings").is_none(), "{v}");
    let r = hub.upload("hw", "1.0.1", model, "").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert!(v["warnings"][0].as_str().unwrap().contains("--input-shape x="), "marked: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pushes_input_shapes_and_prints_the_open_dims_warning() {
    let hub = TestHub::start().await;
    let admin = hub.admin.clone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hw.onnx");
    std::fs::write(&path, make_onnx("symbolic_hw", &[])).unwrap();
    let path = path.to_str().unwrap();
    let r = sentinel(&hub, &admin, &["model", "push", path, "--name", "hw", "--version", "1.0.0"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("warning: input `x` has symbolic dims [N, 3, H, W]"), "{}", r.stdout);
    let args = ["model", "push", path, "--name", "hw", "--version", "2.0.0", "--input-shape", " x = 1, 3,8 ,8 "];
    // Spaces a shell user types are dropped by the CLI; the hub's grammar has none.
    let r = sentinel(&hub, &admin, &args).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("warning:"), "{}", r.stdout);
    let v = versions(&hub, "hw").await;
    let shapes: Vec<_> =
        v["versions"].as_array().unwrap().iter().map(|v| v["manifest"]["serving_shapes"].clone()).collect();
    assert!(shapes.contains(&serde_json::json!({"x": [1, 3, 8, 8]})), "{v}");
    // Deploying the version with open dims warns again; the one with a shape does not.
    let r = sentinel(&hub, &admin, &["model", "deploy", "hw", "1.0.0", "--target", "*"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("warning: input `x` has symbolic dims [N, 3, H, W]"), "{}", r.stdout);
    let r = sentinel(&hub, &admin, &["model", "deploy", "hw", "2.0.0", "--target", "*"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("warning:"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_this_hub_lacks_skips_the_check_visibly_rather_than_passing_it() {
    let hub = TestHub::start().await;
    let admin = hub.admin.clone();
    hub.register("digits").await;
    let msg = expect_error(hub.upload("digits", "1.0.0", model_bytes(V1), "&engine=cuda").await, 422).await;
    assert!(msg.contains("engine \"cuda\""), "{msg}");
    // This hub has no ONNX Runtime library (its worker has the engine).
    let r = hub.upload("digits", "1.0.0", model_bytes(V1), "&engine=ort").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["engine"], "ort", "signed: {v}");
    assert!(v["manifest"]["check_skipped"].as_str().unwrap().contains("check was skipped"), "{v}");
    assert!(v["warnings"][0].as_str().unwrap().contains("check was skipped"), "push response: {v}");
    let listed = versions(&hub, "digits").await;
    assert!(listed["versions"][0]["warnings"][0].as_str().unwrap().contains("check was skipped"), "{listed}");
    let path = model_path(V1);
    let args = ["model", "push", path.to_str().unwrap(), "--name", "digits", "--version", "1.0.1", "--engine", "ort"];
    let r = sentinel(&hub, &admin, &args).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("warning: the push-time check was skipped"), "CLI: {}", r.stdout);
    // tract (the default) is checked as before: no note.
    let r = hub.upload("digits", "1.0.2", model_bytes(V1), "&engine=tract").await;
    let v: Value = r.json().await.unwrap();
    assert!(v.get("warnings").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_onnx_runtime_checks_ort_pushes_and_names_its_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = sentinel_testkit::ort::library();
    let hub = TestHub::start_at(tmp.path(), |c| c.inspect.ort_library = Some(lib)).await;
    hub.register("digits").await;
    let r = hub.upload("digits", "1.0.0", model_bytes(V1), "&engine=ort").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifest"]["engine"], "ort", "{v}");
    assert!(v["manifest"].get("check_skipped").is_none_or(Value::is_null), "checked, not skipped: {v}");
    assert!(v.get("warnings").is_none(), "{v}");
    // A model neither engine runs: ONNX Runtime's own refusal is in the hint.
    hub.register("odd").await;
    let bytes = std::fs::read(model_path("broken/unsupported_op.onnx")).unwrap();
    let msg = expect_error(hub.upload("odd", "1.0.0", bytes, "").await, 422).await;
    assert!(msg.contains("ONNX Runtime refuses it too"), "the ORT verdict: {msg}");
    assert_eq!(hub.stored_blobs().await.len(), 1, "only the digits version");
}
