//! Prometheus metrics of one agent; [`endpoint`] is the `/metrics` listener
//! that serves them.
//!
//! Each agent owns its [`Registry`] (never the process-wide default one), so
//! several agents in one process, as in tests, keep their figures apart.
//! Event counters are bumped where the event happens (a request in
//! [`crate::serving::Serving::infer`], a rollback in the rollout controller,
//! a download in the apply loop, a refused state in
//! [`crate::state::Shared::refused_state`]); figures that are state, not
//! events (the hub connection, each worker's resident memory) are read at
//! scrape time by [`endpoint`], so they can never drift from the truth.
//!
//! The registry sits below serving and names nothing above it: callers pass
//! label values and outcomes, not their own types.
//!
//! `/metrics` is served on its own listener (`[serving] metrics_listen`, by
//! default loopback only), in plain text: the figures carry no tokens and no
//! model bytes. Label values are bounded: model names come from the signed
//! desired state, slots are `blue` or `green`, and outcomes and kinds are
//! fixed sets.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricType;
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::sync::watch;

use crate::supervisor::{InferError, Pool, SlotState as WorkerState, Supervised};

pub mod endpoint;

/// How one inference request that reached a slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Answered; `compute` is the model's time as the worker measured it.
    Ok { compute: Duration },
    /// Refused as bad input (a 400).
    BadInput,
    /// The slot could not answer.
    Unavailable,
}

/// One running worker's resident memory, read at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerMemory {
    pub model: String,
    pub slot: &'static str,
    pub version: String,
    /// The worker's place in its slot's pool (0 for the first).
    pub worker: usize,
    pub rss_bytes: u64,
}

/// End-to-end request latency buckets, in seconds: the digits MLP answers in
/// tens of microseconds, a large vision model in seconds.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Requests per dynamically joined batch: powers of two up to the largest
/// `max_batch_size`.
const BATCH_BUCKETS: [f64; 13] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// The agent's registry and the handles of its metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    inference_requests: IntCounterVec,
    inference_duration: HistogramVec,
    compute_duration: HistogramVec,
    rollbacks: IntCounterVec,
    /// Model and validation-set bytes received from the hub.
    pub download_bytes: IntCounter,
    download_failures: IntCounterVec,
    verification_failures: IntCounterVec,
    worker_restarts: IntCounterVec,
    sandbox_violations: IntCounterVec,
    hub_connected: IntGauge,
    worker_resident: IntGaugeVec,
    batch_requests: HistogramVec,
    /// What was registered, for [`AgentMetrics::families`].
    families: Vec<(Desc, MetricType)>,
    /// Serialises scrapes: each resets and refills the scrape-time gauges.
    scrape: Mutex<()>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Creates the metrics in a fresh registry of their own.
    pub fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable_metric(name, &e))
        };
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["model", "slot", "version"],
            )
            .unwrap_or_else(|e| unreachable_metric(name, &e))
        };
        let mut m = AgentMetrics {
            registry: Registry::new(),
            inference_requests: counter(
                "sentinel_agent_inference_requests_total",
                "Inference requests that reached a slot, by model, slot, version and outcome (ok, bad_input, unavailable)",
                &["model", "slot", "version", "outcome"],
            ),
            inference_duration: histogram(
                "sentinel_agent_inference_duration_seconds",
                "Time from picking a slot to having its outputs, including the worker round trip",
            ),
            compute_duration: histogram(
                "sentinel_agent_model_compute_seconds",
                "The model's compute time per request, as the worker measured it around the model alone",
            ),
            rollbacks: counter(
                "sentinel_agent_rollbacks_total",
                "Versions rolled back on this device, by model and reason kind",
                &["model", "reason"],
            ),
            download_bytes: IntCounter::new(
                "sentinel_agent_download_bytes_total",
                "Bytes of model files and validation sets downloaded from the hub and verified",
            )
            .unwrap_or_else(|e| unreachable_metric("sentinel_agent_download_bytes_total", &e)),
            download_failures: counter(
                "sentinel_agent_download_failures_total",
                "Downloads that failed or were refused, by kind (hash_mismatch, too_large, no_space, refused, unreachable, io)",
                &["kind"],
            ),
            verification_failures: counter(
                "sentinel_agent_verification_failures_total",
                "Desired states and model files that failed verification, by kind (signature, replayed, hash_mismatch, ...)",
                &["kind"],
            ),
            worker_restarts: counter(
                "sentinel_agent_worker_restarts_total",
                "Replacement workers started after a worker died, by model and slot",
                &["model", "slot"],
            ),
            sandbox_violations: counter(
                "sentinel_agent_sandbox_violations_total",
                "Workers killed by their seccomp filter (SIGSYS), by model",
                &["model"],
            ),
            hub_connected: IntGauge::new(
                "sentinel_agent_hub_connected",
                "1 while the agent holds a subscription to its hub, else 0",
            )
            .unwrap_or_else(|e| unreachable_metric("sentinel_agent_hub_connected", &e)),
            worker_resident: IntGaugeVec::new(
                Opts::new("sentinel_agent_worker_resident_bytes", "Resident memory of each running worker, at scrape"),
                &["model", "slot", "version", "worker"],
            )
            .unwrap_or_else(|e| unreachable_metric("sentinel_agent_worker_resident_bytes", &e)),
            batch_requests: HistogramVec::new(
                HistogramOpts::new(
                    "sentinel_agent_batch_requests",
                    "Requests the dynamic batcher sent to a worker in one exchange, by model",
                )
                .buckets(BATCH_BUCKETS.to_vec()),
                &["model"],
            )
            .unwrap_or_else(|e| unreachable_metric("sentinel_agent_batch_requests", &e)),
            families: Vec::new(),
            scrape: Mutex::new(()),
        };
        let build = IntGaugeVec::new(
            Opts::new("sentinel_agent_build_info", "Always 1; the agent's version is in the label"),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable_metric("sentinel_agent_build_info", &e));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.inference_requests.clone()),
            Box::new(m.inference_duration.clone()),
            Box::new(m.compute_duration.clone()),
            Box::new(m.rollbacks.clone()),
            Box::new(m.download_bytes.clone()),
            Box::new(m.download_failures.clone()),
            Box::new(m.verification_failures.clone()),
            Box::new(m.worker_restarts.clone()),
            Box::new(m.sandbox_violations.clone()),
            Box::new(m.hub_connected.clone()),
            Box::new(m.worker_resident.clone()),
            Box::new(m.batch_requests.clone()),
            Box::new(build),
        ];
        for c in collectors {
            // Each of these collectors is one family: one descriptor, and
            // one collected family that carries the type.
            let kinds = c.collect().into_iter().map(|f| f.get_field_type());
            let described: Vec<_> = c.desc().into_iter().cloned().zip(kinds).collect();
            // Names are distinct constants and the registry is fresh, so
            // registration cannot fail; should it, the agent runs without
            // that metric rather than not at all.
            match m.registry.register(c) {
                Ok(()) => m.families.extend(described),
                Err(e) => tracing::error!(error = %e, "registering a metric failed"),
            }
        }
        m
    }

    /// The descriptor (name, label names) and type of every registered
    /// metric family, including labelled ones that have no sample yet and
    /// so are absent from a scrape. Lets a dashboard or alert rule be
    /// checked against the real definitions (`agent/tests/it/grafana.rs`).
    pub fn families(&self) -> &[(Desc, MetricType)] {
        &self.families
    }

    /// Records one request that reached a slot (`labels`: model, slot
    /// colour, version): its outcome, end-to-end time, and on success the
    /// model's compute time.
    pub fn inference(&self, labels: [&str; 3], outcome: RequestOutcome, elapsed: Duration) {
        let outcome = match outcome {
            RequestOutcome::Ok { compute } => {
                self.compute_duration.with_label_values(&labels).observe(compute.as_secs_f64());
                "ok"
            }
            RequestOutcome::BadInput => "bad_input",
            RequestOutcome::Unavailable => "unavailable",
        };
        self.inference_duration.with_label_values(&labels).observe(elapsed.as_secs_f64());
        let [model, color, version] = labels;
        self.inference_requests.with_label_values(&[model, color, version, outcome]).inc();
    }

    /// The dynamic batcher of `model` sent `requests` requests to a worker in one exchange.
    pub fn joined(&self, model: &str, requests: usize) {
        self.batch_requests.with_label_values(&[model]).observe(requests as f64);
    }

    /// A version rolled back; `reason` is the decision's kind (`accuracy`, `operator`, ...).
    pub fn rollback(&self, model: &str, reason: &str) {
        self.rollbacks.with_label_values(&[model, reason]).inc();
    }

    /// A failed or refused download; one whose bytes did not match the
    /// signed manifest also counts as a verification failure.
    pub fn download_failed(&self, kind: &str) {
        self.download_failures.with_label_values(&[kind]).inc();
        if matches!(kind, "hash_mismatch" | "too_large") {
            self.verification_failed(kind);
        }
    }

    /// A desired state, manifest or file refused by verification.
    pub fn verification_failed(&self, kind: &str) {
        self.verification_failures.with_label_values(&[kind]).inc();
    }

    /// Counts the restarts and sandbox violations of each worker of one
    /// slot's pool, by watching its state: a `Running` with a new pid is a
    /// restart; a worker failed by a seccomp kill is a violation. Holds only
    /// the state receivers, so the tasks end when the slot is dropped.
    pub fn watch_pool(&self, model: &str, slot: &str, pool: &Pool) {
        for worker in pool.members() {
            self.watch_worker(model, slot, worker);
        }
    }

    /// Like [`AgentMetrics::watch_pool`], for one worker.
    pub fn watch_worker(&self, model: &str, slot: &str, worker: &Supervised) {
        let restarts = self.worker_restarts.with_label_values(&[model, slot]);
        let violations = self.sandbox_violations.with_label_values(&[model]);
        let violation = InferError::SandboxViolation.to_string();
        let mut rx: watch::Receiver<WorkerState> = worker.subscribe();
        tokio::spawn(async move {
            let mut last_pid: Option<u32> = None;
            loop {
                match &*rx.borrow_and_update() {
                    WorkerState::Running { pid, .. } => {
                        if last_pid.is_some_and(|p| p != *pid) {
                            restarts.inc();
                        }
                        last_pid = Some(*pid);
                    }
                    WorkerState::Failed(reason) => {
                        if reason.contains(&violation) {
                            violations.inc();
                        }
                        return;
                    }
                    WorkerState::Starting { .. } => {}
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// The text exposition of every metric, with the scrape-time figures
    /// (the hub link and each running worker's resident memory) set first.
    pub fn render(&self, hub_connected: bool, resident: Vec<WorkerMemory>) -> Result<String, prometheus::Error> {
        let families = {
            let _guard = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
            self.hub_connected.set(i64::from(hub_connected));
            self.worker_resident.reset();
            for w in resident {
                self.worker_resident
                    .with_label_values(&[w.model.as_str(), w.slot, w.version.as_str(), w.worker.to_string().as_str()])
                    .set(i64::try_from(w.rss_bytes).unwrap_or(i64::MAX));
            }
            self.registry.gather()
        };
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Metric construction fails only on an invalid name or label set, which
/// are constants here: a programming error caught by the unit test below.
fn unreachable_metric<T>(name: &str, e: &prometheus::Error) -> T {
    panic!("metric {name} is malformed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_under_a_conventional_name() {
        let m = AgentMetrics::new();
        m.download_failed("hash_mismatch");
        m.rollback("digits", "operator");
        let names: Vec<String> = m.registry.gather().iter().map(|f| f.name().to_owned()).collect();
        for name in [
            "sentinel_agent_build_info",
            "sentinel_agent_download_bytes_total",
            "sentinel_agent_download_failures_total",
            "sentinel_agent_verification_failures_total",
            "sentinel_agent_rollbacks_total",
            "sentinel_agent_hub_connected",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        assert_eq!(m.verification_failures.with_label_values(&["hash_mismatch"]).get(), 1);
        assert_eq!(m.download_failures.with_label_values(&["hash_mismatch"]).get(), 1);
    }
}
