//! A batch of samples in one request runs as one batch on the worker (or in
//! chunks of `max_batch_size`), and answers what the same samples sent one by
//! one answer: the same labels, and probabilities equal to f32 rounding (the
//! engines pick other kernels for one row than for several, so the last bits
//! may differ; see `LoadedModel::run` in the worker).

#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_testkit::digits::Digits;
use serde_json::{Value, json};

/// The digits samples `0..n` as one request.
fn batch_request(n: usize) -> Value {
    let data: Vec<f32> = (0..n).flat_map(|i| Digits::get().pixels(i).to_vec()).collect();
    json!({"inputs": [{"name": "input", "shape": [n, 64], "datatype": "FP32", "data": data}]})
}

/// Each output's datatype, shape and data, in order.
fn outputs(v: &Value) -> Vec<(String, Vec<u64>, Vec<Value>)> {
    v["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs: {v}"))
        .iter()
        .map(|o| {
            let shape = o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            (o["datatype"].as_str().unwrap().to_owned(), shape, o["data"].as_array().unwrap().clone())
        })
        .collect()
}

/// The batch's outputs are the single requests' outputs, in order: integers
/// exactly, floats to f32 rounding (relative 1e-5).
fn assert_same(dtype: &str, batch: &[Value], singles: &[Value]) {
    assert_eq!(batch.len(), singles.len(), "{dtype}");
    for (i, (b, s)) in batch.iter().zip(singles).enumerate() {
        let same = match (b.as_i64(), s.as_i64(), b.as_f64(), s.as_f64()) {
            (Some(b), Some(s), _, _) => b == s,
            (_, _, Some(b), Some(s)) => (b - s).abs() <= 1e-5 * s.abs().max(1e-30) + 1e-12,
            _ => b == s,
        };
        assert!(same, "{dtype} element {i}: the batch gave {b}, single requests {s}");
    }
}

async fn infer(addr: std::net::SocketAddr, body: &Value) -> Value {
    let r = reqwest::Client::new().post(format!("http://{addr}/v2/models/digits/infer")).json(body).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Starts an agent serving digits 1.0.0 with `serving`, sends a batch of `n`
/// and the same `n` samples one by one, and returns (batch outputs, the
/// singles' outputs joined, worker runs the batch took).
async fn batch_and_singles(serving: &str, n: usize) -> (Vec<(String, Vec<u64>, Vec<Value>)>, Vec<Vec<Value>>, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let extra = format!("[serving]\n{serving}");
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], &extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let slot = agent.route("digits").unwrap().active.clone().unwrap();
    let answered = async || slot.worker.workers().await.iter().map(|w| w.answered).sum::<u64>();

    let before = answered().await;
    let batch = outputs(&infer(addr, &batch_request(n)).await);
    let runs = answered().await - before;
    let mut joined: Vec<Vec<Value>> = vec![Vec::new(); batch.len()];
    for i in 0..n {
        let single = outputs(&infer(addr, &digit_request(i)).await);
        for (acc, (dtype, shape, data)) in joined.iter_mut().zip(single) {
            assert_eq!(shape[0], 1, "{dtype} {shape:?}");
            acc.extend(data);
        }
    }
    agent.shutdown().await;
    (batch, joined, runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_64_runs_once_and_equals_64_single_requests() {
    // Configured, so the worker does not time whether batching pays here.
    let (batch, singles, runs) = batch_and_singles("workers = 1\nmax_batch_size = 64\n", 64).await;
    assert_eq!(runs, 1, "the batch of 64 ran as one");
    for ((dtype, shape, data), single) in batch.iter().zip(&singles) {
        assert_eq!(shape[0], 64, "{dtype}");
        assert_same(dtype, data, single);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_max_batch_size_runs_in_chunks_across_the_pool() {
    let (batch, singles, runs) = batch_and_singles("workers = 2\nmax_batch_size = 16\n", 40).await;
    assert_eq!(runs, 3, "40 samples in chunks of 16, 16 and 8");
    for ((dtype, shape, data), single) in batch.iter().zip(&singles) {
        assert_eq!(shape[0], 40, "{dtype}");
        assert_same(dtype, data, single);
    }
    // With batching off, the same request goes to the worker in one frame
    // that runs sample by sample: bit for bit what single requests get.
    let (batch, singles, runs) = batch_and_singles("workers = 1\nmax_batch_size = 1\n", 5).await;
    assert_eq!(runs, 1);
    assert_eq!(batch.iter().map(|(_, _, d)| d.clone()).collect::<Vec<_>>(), singles);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_runtime_runs_a_batch_as_one_with_the_same_labels() {
    let lib = sentinel_testkit::ort::library();
    let serving = format!("workers = 1\nmax_batch_size = 64\nengine = \"ort\"\nort_library = \"{}\"\n", lib.display());
    let (batch, singles, runs) = batch_and_singles(&serving, 64).await;
    assert_eq!(runs, 1);
    for ((dtype, shape, data), single) in batch.iter().zip(&singles) {
        assert_eq!(shape[0], 64, "{dtype}");
        assert_same(dtype, data, single);
    }
}

/// A bad sample in one chunk of a large batch fails the request with 400 and
/// costs no worker: the other chunks run to their end rather than being
/// dropped mid-exchange (which kills the worker). With digits the other
/// chunk usually finishes first anyway, so this shows the outcome, not the
/// race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sample_in_one_chunk_is_a_400_and_kills_no_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let extra = "[serving]\nworkers = 2\nmax_batch_size = 16\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let addr = agent.inference_addr.unwrap();
    let slot = agent.route("digits").unwrap().active.clone().unwrap();
    let pids = pool_pids(&slot).await;

    // JSON has no NaN: a value past f32's range decodes to infinity, which
    // the worker refuses. Sample 0 sits in the first chunk of 16, which
    // fails while the second runs on the other worker.
    let mut body = batch_request(48);
    body["inputs"][0]["data"][3] = json!(1e300);
    let r = reqwest::Client::new().post(format!("http://{addr}/v2/models/digits/infer")).json(&body).send().await;
    let r = r.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 400, "{text}");
    assert_eq!(slot.worker.restarts(), 0, "{text}");
    assert_eq!(pool_pids(&slot).await, pids, "every worker still runs");
    let r = infer(addr, &batch_request(48)).await;
    assert_eq!(outputs(&r)[0].1[0], 48, "and the next batch is served");
    agent.shutdown().await;
}

/// Starts an agent serving digits 1.0.0 twice, under the names `joined` and
/// `alone`, with `serving` (which sets dynamic batching for `joined`).
async fn joined_and_alone(tmp: &std::path::Path, serving: &str) -> (TestHub, sentinel_agent::AgentHandle) {
    let hub = TestHub::start_at(&tmp.join("hub"), |_| {}).await;
    for model in ["joined", "alone"] {
        hub.push(model, "1.0.0", V1, "").await;
    }
    let agent = start_agent_with(&tmp.join("agent"), &hub, "edge-1", &[("site", "a")], serving).await;
    for model in ["joined", "alone"] {
        hub.deploy(model, "1.0.0", "site=a").await;
    }
    agent
        .wait_for(WAIT, |v| ["joined", "alone"].iter().all(|m| active(v, m).as_deref() == Some("1.0.0")))
        .await
        .unwrap();
    (hub, agent)
}

async fn infer_model(addr: std::net::SocketAddr, model: &str, body: &Value) -> reqwest::Response {
    let url = format!("http://{addr}/v2/models/{model}/infer");
    reqwest::Client::new().post(url).json(body).send().await.unwrap()
}

/// Sends the digits samples `0..n` to `joined` at once, one request each,
/// and returns their responses (status, body) and the worker exchanges they took.
async fn concurrently(agent: &sentinel_agent::AgentHandle, bodies: Vec<Value>) -> (Vec<(u16, Value)>, u64) {
    let addr = agent.inference_addr.unwrap();
    let slot = agent.route("joined").unwrap().active.clone().unwrap();
    let answered = async || slot.worker.workers().await.iter().map(|w| w.answered).sum::<u64>();
    let before = answered().await;
    let sent = bodies.iter().map(|body| async move {
        let r = infer_model(addr, "joined", body).await;
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    let responses = futures_util::future::join_all(sent).await;
    (responses, answered().await - before)
}

/// Eight concurrent single requests fill a batch of 8 (the 1 s queue delay
/// is a bound the test never reaches: the eighth request completes the
/// batch) and run in one worker exchange; each request's outputs are bit
/// for bit those of the same sample sent alone to the same model file
/// without dynamic batching (tract runs a joined batch row by row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_batching_joins_concurrent_requests_and_answers_each_bit_for_bit_as_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let serving = "[serving]\nworkers = 1\nengine = \"tract\"\n\
                   [serving.models.joined]\nmax_batch_size = 8\nmax_queue_delay_us = 1000000\n";
    let (_hub, agent) = joined_and_alone(tmp.path(), serving).await;
    let addr = agent.inference_addr.unwrap();
    let (responses, runs) = concurrently(&agent, (0..8).map(digit_request).collect()).await;
    assert_eq!(runs, 1, "8 requests, one exchange");
    for (i, (status, joined)) in responses.iter().enumerate() {
        assert_eq!(*status, 200, "{joined}");
        let alone = infer_model(addr, "alone", &digit_request(i)).await.json::<Value>().await.unwrap();
        assert_eq!(outputs(joined), outputs(&alone), "sample {i}: joined and alone differ");
        assert_eq!(joined["outputs"][0]["shape"][0], 1, "each request gets its own sample back");
    }
    // Each request keeps its own id, for feedback.
    let ids: std::collections::BTreeSet<&str> = responses.iter().map(|(_, v)| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 8);
    let metadata: Value = reqwest::get(format!("http://{addr}/v2/models/joined")).await.unwrap().json().await.unwrap();
    assert_eq!(metadata["dynamic_batching"], json!({"max_batch_size": 8, "max_queue_delay_us": 1_000_000}));
    let plain: Value = reqwest::get(format!("http://{addr}/v2/models/alone")).await.unwrap().json().await.unwrap();
    assert_eq!(plain["dynamic_batching"], Value::Null);
    let metrics = reqwest::get(format!("http://{}/metrics", agent.metrics_addr.unwrap())).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    for line in [
        "sentinel_agent_batch_requests_count{model=\"joined\"} 1",
        "sentinel_agent_batch_requests_sum{model=\"joined\"} 8",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in\n{metrics}");
    }
    agent.shutdown().await;
}

/// A request the worker refuses (an infinity in its pixels) does not fail
/// the requests it was joined with: the batch runs again request by
/// request, the bad one gets its 400, the others their outputs, and no
/// worker restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_in_a_joined_batch_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let serving = "[serving]\nworkers = 1\n[serving.models.joined]\nmax_batch_size = 4\nmax_queue_delay_us = 1000000\n";
    let (_hub, agent) = joined_and_alone(tmp.path(), serving).await;
    let addr = agent.inference_addr.unwrap();
    let mut bodies: Vec<Value> = (0..4).map(digit_request).collect();
    bodies[2]["inputs"][0]["data"][5] = json!(1e300);
    let (responses, runs) = concurrently(&agent, bodies).await;
    assert_eq!(runs, 1 + 4, "the joined exchange, then each request alone");
    for (i, (status, body)) in responses.iter().enumerate() {
        if i == 2 {
            assert_eq!(*status, 400, "{body}");
            assert!(body["error"].as_str().unwrap().contains("finite"), "{body}");
        } else {
            assert_eq!(*status, 200, "{body}");
            let alone = infer_model(addr, "alone", &digit_request(i)).await.json::<Value>().await.unwrap();
            assert_eq!(outputs(body), outputs(&alone), "sample {i}");
        }
    }
    assert_eq!(agent.route("joined").unwrap().active.clone().unwrap().worker.restarts(), 0);
    agent.shutdown().await;
}

/// With ONNX Runtime, whose workers run batches as one, a joined batch is one
/// batched run: each request's outputs equal its lone run's to f32 rounding,
/// with the same label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_runtime_runs_a_joined_batch_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = sentinel_testkit::ort::library();
    let serving = format!(
        "[serving]\nworkers = 1\nengine = \"ort\"\nort_library = \"{}\"\nmax_batch_size = 8\n\
         [serving.models.joined]\nmax_queue_delay_us = 1000000\n",
        lib.display()
    );
    let (_hub, agent) = joined_and_alone(tmp.path(), &serving).await;
    let addr = agent.inference_addr.unwrap();
    let (responses, runs) = concurrently(&agent, (0..8).map(digit_request).collect()).await;
    assert_eq!(runs, 1);
    for (i, (status, joined)) in responses.iter().enumerate() {
        assert_eq!(*status, 200, "{joined}");
        let alone = infer_model(addr, "alone", &digit_request(i)).await.json::<Value>().await.unwrap();
        for ((dtype, shape, data), (_, alone_shape, alone_data)) in outputs(joined).iter().zip(outputs(&alone)) {
            assert_eq!(shape, &alone_shape, "{dtype}");
            assert_same(dtype, data, &alone_data);
        }
    }
    agent.shutdown().await;
}
