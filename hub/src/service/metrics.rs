//! Prometheus metrics of one hub: its registry, the handles of its metrics,
//! and rendering them; [`crate::metrics`] serves them at `/metrics`.
//!
//! Each hub owns its [`Registry`] (never the process-wide default one), so
//! several hubs in one process, as in tests, keep their figures apart. Event
//! counters are bumped where the event happens (HTTP middleware, upload
//! handler, report handler, halt logic); figures that are state, not events
//! (connected devices, deployments by state, where each live deployment
//! stands on its devices) are read from the fleet and the store at scrape
//! time, so they can never drift from the truth. Whether those store reads
//! succeeded is itself a figure, `sentinel_hub_database_up`: each scrape is
//! a cheap check that the metadata database answers, with no timer of its own.
//!
//! `/metrics` is served on its own listener (`--metrics-listen`), in plain
//! text: the figures carry no tokens and no model bytes, and keeping them off
//! the REST port keeps them out of the API's authentication and audit log.
//!
//! Label values are bounded: the HTTP `route` label is the matched route
//! template (`/api/v1/models/{name}`), never the raw path, and
//! `sentinel_hub_deployment_devices` covers only active and halted deployments.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricType;
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::HubState;
use crate::rollup::rollup;
use crate::store::{DeploymentState, MetadataStore, StoreError};

/// Every state a deployment can be in, each exported even when zero.
pub const DEPLOYMENT_STATES: [DeploymentState; 5] = [
    DeploymentState::Active,
    DeploymentState::Halted,
    DeploymentState::Superseded,
    DeploymentState::RolledBack,
    DeploymentState::Cancelled,
];

/// Why the hub closed a connection, as `sentinel_hub_connections_dropped_total`'s
/// `reason`, in the order of `sentinel_net::Stats`' counts.
const CONNECTION_DROPS: [&str; 3] = ["evicted", "refused", "timed_out"];

/// Request latency buckets, in seconds: API calls take milliseconds, uploads
/// of large models up to a minute.
const LATENCY_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Device latency buckets, in seconds: models answer in microseconds to seconds.
const FLEET_LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The hub's registry and the handles of its metrics.
#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    connected_devices: IntGauge,
    model_pushes: IntCounterVec,
    /// Bytes of model files accepted by uploads.
    pub model_push_bytes: IntCounter,
    deployments: IntGaugeVec,
    deployment_devices: IntGaugeVec,
    /// Deployments the hub halted because too many devices gave up on them.
    pub deployment_halts: IntCounter,
    /// Device reports received and stored.
    pub device_reports: IntCounter,
    fleet_requests: IntCounterVec,
    fleet_errors: IntCounterVec,
    fleet_feedback: IntCounterVec,
    fleet_latency: HistogramVec,
    telemetry_windows: IntCounterVec,
    connections_open: IntGauge,
    connections_dropped: IntCounterVec,
    database_up: IntGauge,
    /// What was registered, for [`HubMetrics::families`].
    families: Vec<(Desc, MetricType)>,
    /// Serialises scrapes: each resets and refills the scrape-time gauges.
    scrape: Mutex<()>,
}

impl HubMetrics {
    /// Creates the metrics in a fresh registry of their own.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "sentinel_hub_http_requests_total",
                "REST API requests answered, by route template, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "sentinel_hub_http_request_duration_seconds",
                "Time from a REST API request's arrival to its response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method"],
        )?;
        let connected_devices =
            IntGauge::new("sentinel_hub_connected_devices", "Devices with an open Subscribe stream")?;
        let model_pushes = IntCounterVec::new(
            Opts::new("sentinel_hub_model_pushes_total", "Model version uploads, by result (ok or refused)"),
            &["result"],
        )?;
        let model_push_bytes =
            IntCounter::new("sentinel_hub_model_push_bytes_total", "Bytes of model files accepted by uploads")?;
        let deployments = IntGaugeVec::new(Opts::new("sentinel_hub_deployments", "Deployments by state"), &["state"])?;
        let deployment_devices = IntGaugeVec::new(
            Opts::new(
                "sentinel_hub_deployment_devices",
                "Targeted devices of each active or halted deployment, by rollout state",
            ),
            &["deployment", "state"],
        )?;
        let deployment_halts = IntCounter::new(
            "sentinel_hub_deployment_halts_total",
            "Deployments halted because too many devices rolled back or failed",
        )?;
        let device_reports =
            IntCounter::new("sentinel_hub_device_reports_total", "Device reports received and stored")?;
        let model_version = &["model", "version"];
        let fleet_requests = IntCounterVec::new(
            Opts::new(
                "sentinel_hub_fleet_requests_total",
                "Inference requests the devices served, summed over the fleet from their telemetry windows",
            ),
            model_version,
        )?;
        let fleet_errors = IntCounterVec::new(
            Opts::new("sentinel_hub_fleet_request_errors_total", "Inference requests the devices failed, fleet-wide"),
            model_version,
        )?;
        let fleet_feedback = IntCounterVec::new(
            Opts::new(
                "sentinel_hub_fleet_feedback_total",
                "Ground-truth feedback on the devices' answers, fleet-wide, by whether the answer was right",
            ),
            &["model", "version", "outcome"],
        )?;
        let fleet_latency = HistogramVec::new(
            HistogramOpts::new(
                "sentinel_hub_fleet_request_duration_seconds",
                "End-to-end inference latency on the devices, fleet-wide (each request counted at its \
                 telemetry bucket's value, within 4.4%)",
            )
            .buckets(FLEET_LATENCY_BUCKETS.to_vec()),
            model_version,
        )?;
        let telemetry_windows = IntCounterVec::new(
            Opts::new(
                "sentinel_hub_telemetry_windows_total",
                "Device telemetry windows: stored, or refused as malformed or too old",
            ),
            &["outcome"],
        )?;
        for outcome in ["stored", "refused"] {
            telemetry_windows.with_label_values(&[outcome]);
        }
        let connections_open = IntGauge::new(
            "sentinel_hub_connections_open",
            "Connections open on the REST, gRPC and metrics listeners together",
        )?;
        let connections_dropped = IntCounterVec::new(
            Opts::new(
                "sentinel_hub_connections_dropped_total",
                "Connections closed by the hub: evicted at the cap (silent or idle first), refused at the cap \
                 (all busy), or timed out (header-read or idle)",
            ),
            &["reason"],
        )?;
        let database_up = IntGauge::new(
            "sentinel_hub_database_up",
            "1 if the metadata database answered this scrape's reads, 0 if they failed",
        )?;
        for reason in CONNECTION_DROPS {
            connections_dropped.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new("sentinel_hub_build_info", "Always 1; labelled with the hub's version"),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for model_push in ["ok", "refused"] {
            model_pushes.with_label_values(&[model_push]);
        }

        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(connected_devices.clone()),
            Box::new(model_pushes.clone()),
            Box::new(model_push_bytes.clone()),
            Box::new(deployments.clone()),
            Box::new(deployment_devices.clone()),
            Box::new(deployment_halts.clone()),
            Box::new(device_reports.clone()),
            Box::new(fleet_requests.clone()),
            Box::new(fleet_errors.clone()),
            Box::new(fleet_feedback.clone()),
            Box::new(fleet_latency.clone()),
            Box::new(telemetry_windows.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_dropped.clone()),
            Box::new(database_up.clone()),
            Box::new(build_info),
        ];
        let mut families = Vec::new();
        for c in collectors {
            // Each of these collectors is one family: one descriptor, and
            // one collected family that carries the type.
            let kinds = c.collect().into_iter().map(|f| f.get_field_type());
            let described: Vec<_> = c.desc().into_iter().cloned().zip(kinds).collect();
            registry.register(c)?;
            families.extend(described);
        }
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            connected_devices,
            model_pushes,
            model_push_bytes,
            deployments,
            deployment_devices,
            deployment_halts,
            device_reports,
            fleet_requests,
            fleet_errors,
            fleet_feedback,
            fleet_latency,
            telemetry_windows,
            connections_open,
            connections_dropped,
            database_up,
            families,
            scrape: Mutex::new(()),
        })
    }

    /// The descriptor (name, label names) and type of every registered
    /// metric family, including labelled ones that have no sample yet and
    /// so are absent from a scrape. Lets a dashboard or alert rule be
    /// checked against the real definitions (`agent/tests/it/grafana.rs`).
    pub fn families(&self) -> &[(Desc, MetricType)] {
        &self.families
    }

    /// Adds stored telemetry windows to the fleet-wide figures. Labels are
    /// model and version only: never one series per device.
    pub fn telemetry_windows(&self, stored: &[crate::telemetry::Window], refused: usize) {
        self.telemetry_windows.with_label_values(&["stored"]).inc_by(stored.len() as u64);
        self.telemetry_windows.with_label_values(&["refused"]).inc_by(refused as u64);
        for w in stored {
            let labels = [w.model.as_str(), w.version.as_str()];
            self.fleet_requests.with_label_values(&labels).inc_by(w.counts.requests);
            self.fleet_errors.with_label_values(&labels).inc_by(w.counts.errors);
            let wrong = w.counts.feedback_total.saturating_sub(w.counts.feedback_correct);
            for (outcome, n) in [("correct", w.counts.feedback_correct), ("wrong", wrong)] {
                if n > 0 {
                    self.fleet_feedback.with_label_values(&[labels[0], labels[1], outcome]).inc_by(n);
                }
            }
            let histogram = self.fleet_latency.with_label_values(&labels);
            for (value, n) in w.latency.buckets() {
                let seconds = value.as_secs_f64();
                for _ in 0..n {
                    histogram.observe(seconds);
                }
            }
        }
    }

    /// Counts one upload by whether it was accepted.
    pub fn model_push(&self, accepted: bool) {
        self.model_pushes.with_label_values(&[if accepted { "ok" } else { "refused" }]).inc();
    }

    /// Refreshes the scrape-time figures and renders everything in the text
    /// exposition format. Blocking: reads the store.
    pub(crate) fn render(&self, state: &HubState) -> Result<String, prometheus::Error> {
        let _one_scrape = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.connected_devices.set(i64::try_from(state.fleet.connected_count()).unwrap_or(i64::MAX));
        let c = state.connections.stats();
        self.connections_open.set(i64::try_from(c.open).unwrap_or(i64::MAX));
        for (reason, total) in CONNECTION_DROPS.into_iter().zip([c.evicted, c.refused, c.timed_out]) {
            // Counted by sentinel-net; brought up to its total (scrapes are serialised).
            let counter = self.connections_dropped.with_label_values(&[reason]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.refresh_from_store(state.meta.as_ref());
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    /// Refills the figures read from the metadata database, and records in
    /// `sentinel_hub_database_up` whether it answered.
    fn refresh_from_store(&self, meta: &dyn MetadataStore) {
        // Reset first, so a deployment that stopped being live disappears.
        self.deployments.reset();
        self.deployment_devices.reset();
        let read = self.read_deployments(meta);
        self.database_up.set(i64::from(read.is_ok()));
        if let Err(e) = read {
            // The rest of the figures are still worth serving; the deployment
            // gauges are left absent rather than stale.
            self.deployments.reset();
            self.deployment_devices.reset();
            tracing::error!(error = %e, "reading deployments for /metrics failed");
        }
    }

    fn read_deployments(&self, meta: &dyn MetadataStore) -> Result<(), StoreError> {
        for s in DEPLOYMENT_STATES {
            let (_, total) = meta.list_deployments(None, Some(s), 0, 0)?;
            self.deployments.with_label_values(&[s.as_str()]).set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        let mut live = meta.list_deployments(None, Some(DeploymentState::Active), u32::MAX, 0)?.0;
        live.extend(meta.list_deployments(None, Some(DeploymentState::Halted), u32::MAX, 0)?.0);
        if live.is_empty() {
            return Ok(());
        }
        let devices = meta.list_devices()?;
        for d in &live {
            let id = d.id.to_string();
            for (s, n) in rollup(d, &devices, &meta.deployment_devices(d.id)?).counts {
                self.deployment_devices
                    .with_label_values(&[id.as_str(), s.as_str()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        Ok(())
    }

    /// Counts and times one REST request by its route template, method
    /// label and status.
    pub(crate) fn observe_http(&self, route: &str, method: &str, status: &str, elapsed: Duration) {
        self.http_duration.with_label_values(&[route, method]).observe(elapsed.as_secs_f64());
        self.http_requests.with_label_values(&[route, method, status]).inc();
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    #[test]
    fn metrics_register_without_clashes_and_render_build_info() {
        let m = HubMetrics::new().expect("valid metric definitions");
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).expect("encodes");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains(&format!("sentinel_hub_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
    }

    fn gauge(m: &HubMetrics, name: &str) -> Option<i64> {
        let families = m.registry.gather();
        let family = families.iter().find(|f| f.name() == name)?;
        family.get_metric().first().map(|s| s.get_gauge().get_value() as i64)
    }

    /// `sentinel_hub_database_up` follows the outcome of the scrape's store
    /// reads: 1 while they succeed, 0 once the database answers them with an
    /// error (here a table renamed behind the hub's back), and the deployment
    /// figures are then absent rather than stale.
    #[test]
    fn database_up_follows_the_store_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let store = crate::store::sqlite::SqliteStore::open(&path).expect("open");
        let m = HubMetrics::new().expect("valid metric definitions");
        m.refresh_from_store(&store);
        assert_eq!(gauge(&m, "sentinel_hub_database_up"), Some(1));
        assert_eq!(m.deployments.with_label_values(&["active"]).get(), 0);
        assert!(gauge(&m, "sentinel_hub_deployments").is_some());

        let other = rusqlite::Connection::open(&path).expect("a second connection");
        other.execute_batch("ALTER TABLE deployments RENAME TO moved_away").expect("rename");
        m.refresh_from_store(&store);
        assert_eq!(gauge(&m, "sentinel_hub_database_up"), Some(0));
        assert_eq!(gauge(&m, "sentinel_hub_deployments"), None);
    }
}
