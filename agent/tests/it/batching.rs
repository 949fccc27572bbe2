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
    // With batching off, the same request runs sample by sample.
    let (batch, singles, runs) = batch_and_singles("workers = 1\nmax_batch_size = 1\n", 5).await;
    assert_eq!(runs, 5);
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
