//! Inference traffic for the demo: the digits test set sent through the
//! agent's KServe v2 API, with ground-truth feedback, tallied by version.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{DemoError, s};

/// 360 test images of 8x8 digits, 64 little-endian f32 each.
const TEST_X: &[u8] = include_bytes!("../../../../models/data/digits_test_x.bin");
/// Their labels, little-endian i64.
const TEST_Y: &[u8] = include_bytes!("../../../../models/data/digits_test_y.bin");

/// A client of the agent's KServe v2 API with the digits test set.
#[derive(Debug)]
pub(super) struct Agent {
    http: reqwest::Client,
    base: String,
    x: Vec<f32>,
    y: Vec<i64>,
}

impl Agent {
    pub(super) fn new(base: &str) -> Self {
        let x = TEST_X.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let y = TEST_Y
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Self { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_owned(), x, y }
    }

    /// Sends test image `i` (modulo the set) and records the answer; with
    /// `feedback`, then tells the agent the true label, as an application
    /// that learns the ground truth later would. An answer other than 200
    /// counts as a failed request; an agent that cannot be reached ends the demo.
    pub(super) async fn request(&self, i: usize, feedback: bool, traffic: &mut Traffic) -> Result<(), DemoError> {
        let n = i % self.y.len();
        let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                      "data": &self.x[n * 64..(n + 1) * 64]}]});
        let number = traffic.total() + 1;
        let step = || format!("inference request {number}");
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/v2/models/digits/infer", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|source| DemoError::Agent { step: step(), source })?;
        if !resp.status().is_success() {
            traffic.failed += 1;
            return Ok(());
        }
        let v: Value = resp.json().await.map_err(|source| DemoError::Agent { step: step(), source })?;
        let latency = started.elapsed();
        let outputs = v["outputs"].as_array().cloned().unwrap_or_default();
        let label = outputs.iter().find(|o| o["name"] == "label").and_then(|o| o["data"][0].as_i64());
        let stats = traffic.by_version.entry(s(&v["model_version"])).or_default();
        stats.served += 1;
        stats.correct += usize::from(label == Some(self.y[n]));
        stats.latencies.push(latency);
        if feedback {
            let fb = json!({"id": v["id"], "label": self.y[n]});
            let sent = self.http.post(format!("{}/v2/models/digits/feedback", self.base)).json(&fb).send().await;
            sent.map_err(|source| DemoError::Agent { step: format!("feedback for {}", step()), source })?;
        }
        Ok(())
    }
}

/// What the agent answered, by version.
#[derive(Debug, Default)]
pub(super) struct Traffic {
    by_version: BTreeMap<String, Stats>,
    pub(super) failed: usize,
}

#[derive(Debug, Default)]
struct Stats {
    served: usize,
    correct: usize,
    latencies: Vec<Duration>,
}

impl Traffic {
    pub(super) fn total(&self) -> usize {
        self.by_version.values().map(|s| s.served).sum::<usize>() + self.failed
    }

    pub(super) fn served(&self, version: &str) -> usize {
        self.by_version.get(version).map_or(0, |s| s.served)
    }

    /// `200 requests on 1.0.0: 97% correct, p50 0.4 ms`.
    pub(super) fn line(&self, version: &str) -> String {
        let Some(stats) = self.by_version.get(version).filter(|s| s.served > 0) else {
            return format!("0 requests on {version}");
        };
        let mut l = stats.latencies.clone();
        l.sort();
        let p50 = l[l.len() / 2].as_secs_f64() * 1000.0;
        let correct = stats.correct as f64 * 100.0 / stats.served as f64;
        format!("{} requests on {version}: {correct:.0}% correct, p50 {p50:.1} ms", stats.served)
    }
}
