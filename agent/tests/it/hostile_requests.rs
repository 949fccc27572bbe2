//! The attack pass of issue 11 against a real agent's v2 API, each as it was
//! reported: one request must never take the device down.
//! - a ~100-byte body claiming a [1e9, 64] tensor (it aborted the agent);
//! - 4 MB request ids (they were remembered, 20,000 at a time);
//! - a burst of 32 large JSON bodies (15x their size held in memory), and
//!   the in-flight budget that now answers 503 with `Retry-After`;
//! - silent, slowloris and idle connections against the listener's cap.
//!
//! Each bad input gets its 4xx with the reason, and the same worker keeps
//! serving afterwards.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_agent::AgentHandle;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn serving_digits(tmp: &std::path::Path, extra: &str) -> (TestHub, AgentHandle, String) {
    let hub = TestHub::start_at(&tmp.join("hub"), |_| {}).await;
    let agent = start_agent_with(&tmp.join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let base = format!("http://{}", agent.inference_addr.unwrap());
    (hub, agent, base)
}

/// A digits request of `rows` test samples, padded with JSON whitespace to
/// exactly `size` bytes when given.
fn digits_body(rows: usize, size: Option<usize>) -> Vec<u8> {
    let x = read_f32("data/digits_test_x.bin");
    let data: Vec<f32> = x.iter().copied().cycle().take(rows * 64).collect();
    let mut body =
        json!({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": data}]}).to_string();
    if let Some(size) = size {
        assert!(body.len() <= size, "{} > {size}", body.len());
        body.push_str(&" ".repeat(size - body.len()));
    }
    body.into_bytes()
}

async fn infer_ok(http: &reqwest::Client, base: &str) {
    let r = http.post(format!("{base}/v2/models/digits/infer")).body(digits_body(1, None)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn error_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(text.len() < 1024, "a {}-byte error body echoes the request", text.len());
    let v: Value = serde_json::from_str(&text).unwrap();
    (status, v["error"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_shape_or_a_huge_id_gets_a_400_and_the_device_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hub, agent, base) = serving_digits(tmp.path(), "").await;
    let http = reqwest::Client::new();
    let before = active_pid(&agent, "digits").expect("the active worker runs");
    let infer = |body: Vec<u8>| http.post(format!("{base}/v2/models/digits/infer")).body(body).send();

    // Finding 1: this body aborted the agent ("memory allocation of
    // 512000000000 bytes failed"), and every model on the device with it.
    let huge = br#"{"inputs":[{"name":"input","shape":[1000000000,64],"datatype":"FP32","data":[1]}]}"#;
    let (status, msg) = error_of(infer(huge.to_vec()).await.unwrap()).await;
    assert_eq!(
        (status, msg.as_str()),
        (400, "input `input`: shape [1000000000, 64] needs 64000000000 elements, got 1")
    );
    // The binary form of the same lie.
    let head = r#"{"inputs":[{"name":"input","shape":[1000000000,64],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
    let r = http
        .post(format!("{base}/v2/models/digits/infer"))
        .header("Inference-Header-Content-Length", head.len())
        .body([head.as_bytes(), &[0u8; 4]].concat())
        .send()
        .await
        .unwrap();
    let (status, msg) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(msg.contains("needs 64000000000 elements (256000000000 bytes), binary_data_size is 4"), "{msg}");

    // Finding 2: 4 MB ids were kept; now refused, without being echoed.
    let long_id = "i".repeat(4 << 20);
    let body = json!({"id": long_id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
    let (status, msg) = error_of(infer(body.to_string().into_bytes()).await.unwrap()).await;
    assert_eq!((status, msg.as_str()), (400, "request id is 4194304 bytes; at most 256 are allowed"));
    let r = http
        .post(format!("{base}/v2/models/digits/feedback"))
        .json(&json!({"id": long_id, "label": 1}))
        .send()
        .await
        .unwrap();
    let (status, msg) = error_of(r).await;
    assert_eq!((status, msg.as_str()), (400, "request id is 4194304 bytes; at most 256 are allowed"));

    // A 1 MB input name is quoted back clipped.
    let name = "n".repeat(1 << 20);
    let body = json!({"inputs": [{"name": name, "shape": [1], "datatype": "FP32"}]});
    let (status, msg) = error_of(infer(body.to_string().into_bytes()).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(msg.ends_with("… (1048576 bytes)` has no data"), "{msg}");

    // An id at the cap still works, and feedback finds it.
    let id = "k".repeat(256);
    let body =
        json!({"id": id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
    let r = infer(body.to_string().into_bytes()).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.post(format!("{base}/v2/models/digits/feedback")).json(&json!({"id": id, "label": 0})).send();
    assert_eq!(r.await.unwrap().status(), 200);

    infer_ok(&http, &base).await;
    assert_eq!(active_pid(&agent, "digits"), Some(before), "no hostile request cost the worker");
    agent.shutdown().await;
}

/// A request whose headers announced `size` bytes and whose body is held back
/// after its first byte: it holds its share of the in-flight budget.
async fn stalled(addr: std::net::SocketAddr, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..1]).await.unwrap();
    s
}

async fn finish(mut s: TcpStream, body: &[u8]) -> String {
    s.write_all(&body[1..]).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_in_flight_budget_get_503_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[serving]\nmax_body_bytes = 1048576\nmax_inflight_bytes = 2097152\n";
    let (_hub, agent, base) = serving_digits(tmp.path(), extra).await;
    let http = reqwest::Client::new();
    let addr = agent.inference_addr.unwrap();
    let body = digits_body(1, Some(1 << 20));
    // Two stalled 1 MiB bodies spend the 2 MiB budget.
    let a = stalled(addr, &body).await;
    let b = stalled(addr, &body).await;
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            let r =
                http.post(format!("{base}/v2/models/digits/infer")).body(digits_body(1, None)).send().await.unwrap();
            if r.status() == 503 {
                return r;
            }
            assert_eq!(r.status(), 200, "before the stalled bodies are admitted");
        }
    })
    .await
    .expect("the third request is refused once both stalled bodies hold the budget");
    assert_eq!(refused.headers()["retry-after"], "1");
    let (_, msg) = error_of(refused).await;
    assert_eq!(msg, "the agent is at its limit of 2097152 bytes of requests in flight; retry shortly");
    // The held requests complete normally, and the budget is free again.
    for s in [a, b] {
        let reply = finish(s, &body).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    infer_ok(&http, &base).await;
    agent.shutdown().await;
}

/// The reported burst: 32 concurrent ~5.8 MB JSON bodies (21,500 digits
/// each). Every one is answered 200 or 503 with `Retry-After`; the agent
/// serves on afterwards with the same worker. Peak RSS is measured by the
/// `inference_api` benchmark, not here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_bodies_is_answered_and_the_agent_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[serving]\nmax_body_bytes = 8388608\nmax_inflight_bytes = 16777216\nrequest_timeout_ms = 60000\n";
    let (_hub, agent, base) = serving_digits(tmp.path(), extra).await;
    let before = active_pid(&agent, "digits").expect("the active worker runs");
    let body = bytes::Bytes::from(digits_body(21_500, None));
    assert!(body.len() > 5 << 20, "{} bytes", body.len());
    let http = reqwest::Client::new();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (http, url, body) = (http.clone(), format!("{base}/v2/models/digits/infer"), body.clone());
        burst.spawn(async move {
            let r = http.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let text = r.text().await.unwrap();
            (status, retry, text)
        });
    }
    let mut answered = (0, 0);
    while let Some(r) = burst.join_next().await {
        match r.unwrap() {
            (200, _, text) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["outputs"][0]["shape"][0], 21_500);
                answered.0 += 1;
            }
            (503, Some(retry), text) => {
                assert_eq!(retry, "1");
                assert!(text.contains("requests in flight"), "{text}");
                answered.1 += 1;
            }
            other => panic!("neither served nor refused for load: {other:?}"),
        }
    }
    assert_eq!(answered.0 + answered.1, 32);
    assert!(answered.0 >= 1, "the budget admits two bodies at once: {answered:?}");
    infer_ok(&http, &base).await;
    assert_eq!(active_pid(&agent, "digits"), Some(before));
    agent.shutdown().await;
}

/// Reads until the peer closes (EOF or reset); panics if it never does.
async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the agent closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_idle_connections_cannot_starve_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[serving]\nmax_connections = 20\nheader_read_timeout_secs = 1\nidle_timeout_secs = 2\n";
    let (_hub, agent, base) = serving_digits(tmp.path(), extra).await;
    let addr = agent.inference_addr.unwrap();

    // 100 silent connections against a cap of 20: a real client still gets
    // through (the oldest silent ones make room), on both listeners.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let http = reqwest::Client::new();
    infer_ok(&http, &base).await;
    let metrics = format!("http://{}/metrics", agent.metrics_addr.unwrap());
    assert_eq!(http.get(&metrics).send().await.unwrap().status(), 200);
    closed_by_peer(&mut silent[0]).await;

    // Slowloris: half a request head, then nothing: closed by the
    // header-read timeout.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n").await.unwrap();
    closed_by_peer(&mut slow).await;

    // Idle keep-alive after one answered request: closed by the idle timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    closed_by_peer(&mut idle).await;

    agent.shutdown().await;
}
