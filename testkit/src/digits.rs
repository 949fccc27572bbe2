//! Digits traffic: the labelled digits test set sent to an agent's KServe v2
//! API by clients running back to back, and what each client saw. The one
//! traffic loop of the system tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::models::{read_f32, read_i64};

/// The test set's inputs: 360 rows of 64 little-endian f32 pixels.
pub const TEST_X: &str = "data/digits_test_x.bin";
/// Their labels, little-endian i64.
pub const TEST_Y: &str = "data/digits_test_y.bin";

/// The digits test set, read once per test binary.
#[derive(Debug)]
pub struct Digits {
    x: Vec<f32>,
    y: Vec<i64>,
}

impl Digits {
    /// The set, read from `models/` on first use.
    pub fn get() -> &'static Self {
        static SET: OnceLock<Digits> = OnceLock::new();
        SET.get_or_init(|| Self { x: read_f32(TEST_X), y: read_i64(TEST_Y) })
    }

    /// How many labelled samples the set has.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the set is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The 64 pixels of sample `i` (modulo the set).
    pub fn pixels(&self, i: usize) -> &[f32] {
        let i = i % self.len();
        &self.x[i * 64..(i + 1) * 64]
    }

    /// The true label of sample `i` (modulo the set).
    pub fn label(&self, i: usize) -> i64 {
        self.y[i % self.len()]
    }
}

/// A KServe v2 JSON request for digits sample `i` (modulo the set).
pub fn digit_request(i: usize) -> Value {
    json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": Digits::get().pixels(i)}]})
}

/// One request as a client saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub sent: Instant,
    pub received: Instant,
    /// The `mark` given to [`Load::start`] was set when this request was sent.
    pub after_mark: bool,
    /// The version that answered, or what went wrong (status and body, or
    /// the connection error).
    pub outcome: Result<String, String>,
    /// The status of the feedback sent for this answer, if any: 200, or 404
    /// when the slot that answered was unloaded (a rollback) before the
    /// feedback arrived, so the agent no longer scores it.
    pub feedback: Option<u16>,
}

impl Seen {
    /// Whether `version` answered this request.
    pub fn served_by(&self, version: &str) -> bool {
        self.outcome.as_deref() == Ok(version)
    }
}

/// Clients sending digits samples back to back to `model` until stopped.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Seen>>>,
}

/// What [`Load`] sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The agent's inference API.
    pub addr: SocketAddr,
    pub model: String,
    pub clients: usize,
    /// Send the true label for every answer, as an application that learns
    /// the ground truth would (and assert the agent takes it, unless the
    /// version that answered has been unloaded since: see [`Seen::feedback`]).
    pub feedback: bool,
    /// A flag the test sets when something happened; each [`Seen`] records
    /// whether it was set when its request was sent.
    pub mark: Arc<AtomicBool>,
}

impl LoadSpec {
    /// `clients` clients on digits at `addr`, without feedback.
    pub fn digits(addr: SocketAddr, clients: usize) -> Self {
        Self { addr, model: "digits".into(), clients, feedback: false, mark: Arc::default() }
    }

    /// The same, sending the true label for every answer.
    pub fn with_feedback(mut self) -> Self {
        self.feedback = true;
        self
    }

    /// Starts the clients.
    pub fn start(self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..self.clients).map(|c| tokio::spawn(client(self.clone(), c, stop.clone()))).collect();
        Load { stop, tasks }
    }
}

async fn client(spec: LoadSpec, first: usize, stop: Arc<AtomicBool>) -> Vec<Seen> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
    let infer = format!("http://{}/v2/models/{}/infer", spec.addr, spec.model);
    let feedback = format!("http://{}/v2/models/{}/feedback", spec.addr, spec.model);
    let mut seen = Vec::new();
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let sample = i;
        i += spec.clients;
        let after_mark = spec.mark.load(Ordering::Relaxed);
        let sent = Instant::now();
        let answer = match http.post(&infer).json(&digit_request(sample)).send().await {
            Ok(r) if r.status().is_success() => Ok(r.json::<Value>().await.unwrap()),
            Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
            Err(e) => Err(e.to_string()),
        };
        let received = Instant::now();
        let outcome = answer.map(|v| (v["model_version"].as_str().unwrap().to_owned(), v["id"].clone()));
        let mut fed = None;
        if spec.feedback
            && let Ok((_, id)) = &outcome
        {
            let f = json!({"id": id, "label": Digits::get().label(sample)});
            let r = http.post(&feedback).json(&f).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            let unloaded = status == 404 && body.contains("no remembered request");
            assert!(status == 200 || unloaded, "feedback refused: {status} {body}");
            fed = Some(status);
        }
        seen.push(Seen { sent, received, after_mark, outcome: outcome.map(|(version, _)| version), feedback: fed });
    }
    seen
}

impl Load {
    /// Stops the clients and returns every request they sent, client by client.
    pub async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

/// The failed requests' errors.
pub fn failures(seen: &[Seen]) -> Vec<&str> {
    seen.iter().filter_map(|s| s.outcome.as_ref().err().map(String::as_str)).collect()
}
