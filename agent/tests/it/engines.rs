//! The engine behind each model's workers, chosen in the agent's config:
//! `engine = "ort"` and `"auto"` (with and without the library) serve with
//! the engine that status and the v2 metadata name, and the worker process
//! really has ONNX Runtime loaded when they say `ort`.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_agent::store::EventKind;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sentinel-agent");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ort_and_auto_serve_with_the_engine_that_status_and_metadata_name() {
    let lib = sentinel_testkit::ort::library();
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let lib = lib.display();
    // (device, [serving] text, the engine it must resolve to). The test
    // agents' environment has no ORT_DYLIB_PATH: `auto` without
    // `ort_library` finds no library.
    let cases = [
        ("auto-with-lib", format!("engine = \"auto\"\nort_library = \"{lib}\"\nworkers = 1\n"), "ort"),
        ("auto-without", "engine = \"auto\"\nworkers = 1\n".to_owned(), "tract"),
        (
            "ort-per-model",
            format!("ort_library = \"{lib}\"\nworkers = 1\n[serving.models.digits]\nengine = \"ort\"\n"),
            "ort",
        ),
    ];
    let mut agents = Vec::new();
    for (device, serving, _) in &cases {
        let extra = format!("[serving]\n{serving}");
        agents.push(start_agent_with(&tmp.path().join(device), &hub, device, &[("site", "a")], &extra).await);
    }
    hub.deploy("digits", "1.0.0", "site=a").await;
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for ((device, _, engine), agent) in cases.iter().zip(&agents) {
        agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
        let addr = agent.inference_addr.unwrap();
        let meta: Value =
            http.get(format!("http://{addr}/v2/models/digits")).send().await.unwrap().json().await.unwrap();
        assert_eq!(meta["engine"], *engine, "{device}: {meta}");
        assert_eq!(meta["workers"], 1, "{device}: {meta}");

        let config = tmp.path().join(device).join("agent.toml");
        let out = std::process::Command::new(BIN)
            .args(["status", "--json", "--config", config.to_str().unwrap()])
            .env_remove("RUNTIME_DIRECTORY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let worker = &status["models"][0]["slots"].as_array().unwrap().iter().find(|s| s["state"] == "active").unwrap()
            ["worker"];
        assert_eq!(worker["engine"], *engine, "{device}: {status}");
        assert_eq!(worker["confined"], true, "{device}: an ONNX Runtime worker is confined too");
        let pid = u32::try_from(worker["pid"].as_u64().unwrap()).unwrap();
        assert_eq!(sentinel_testkit::ort::mapped_in(pid), *engine == "ort", "{device}: pid {pid}");

        let mut labels = Vec::new();
        for i in 0..20 {
            let r = http.post(format!("http://{addr}/v2/models/digits/infer")).json(&digit_request(i)).send().await;
            let v: Value = r.unwrap().json().await.unwrap();
            let label = v["outputs"].as_array().unwrap().iter().find(|o| o["datatype"] == "INT64").unwrap();
            labels.push(label["data"][0].as_i64().unwrap());
        }
        answers.push(labels);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "both engines label the samples alike: {answers:?}");
    for agent in agents {
        agent.shutdown().await;
    }
}

/// PyPI's ONNX Runtime is a CPU build: asking it for CUDA fails the load with
/// an error naming the provider and the library, unless the model's config
/// lets the worker fall back to the next provider, when it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_execution_provider_is_refused_or_falls_back_as_configured() {
    let lib = sentinel_testkit::ort::library();
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let serving = |fallback: bool| {
        format!(
            "[serving]\nengine = \"ort\"\nort_library = \"{}\"\nworkers = 1\n[serving.models.digits]\n\
             execution_providers = [\"cuda\", \"cpu\"]\nprovider_fallback = {fallback}\n",
            lib.display()
        )
    };
    // Two deployments: one device failing to load halts a deployment (and
    // takes the version off its devices) when it is half of the fleet.
    let strict = start_agent_with(&tmp.path().join("strict"), &hub, "strict", &[("site", "a")], &serving(false)).await;
    let lenient =
        start_agent_with(&tmp.path().join("lenient"), &hub, "lenient", &[("site", "b")], &serving(true)).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    hub.deploy("digits", "1.0.0", "site=b").await;

    let failed = eventually("the load failed", WAIT, async || strict.last_event(EventKind::LoadFailed).unwrap()).await;
    for want in ["no cuda execution provider", &lib.display().to_string(), "provider_fallback"] {
        assert!(failed.reason.contains(want), "`{want}` missing from: {}", failed.reason);
    }
    assert!(strict.route("digits").and_then(|r| r.active.clone()).is_none(), "nothing serves on the strict device");

    lenient.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = lenient.inference_addr.unwrap();
    let r = reqwest::Client::new().post(format!("http://{addr}/v2/models/digits/infer")).json(&digit_request(0)).send();
    let r = r.await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let slot = lenient.route("digits").unwrap().active.clone().unwrap();
    assert_eq!(slot.worker.engine().name(), "ort", "it fell back to ONNX Runtime's CPU kernels, not to tract");
    strict.shutdown().await;
    lenient.shutdown().await;
}
