//! How big the hub's database grows with device telemetry (issue 17): a
//! fleet of simulated devices, each reporting one window every 15 s, for a
//! simulated week under the default retention (fine 1 min buckets kept a
//! day, coarse 1 h kept 30 days), through the same code the hub runs on
//! each report (`telemetry::accept`, then `SqliteStore::record_telemetry`)
//! and its pruning every 10 minutes, on a real SQLite file. Time is
//! simulated: the clock is an argument of both, so a week takes minutes.
//!
//! Each device serves 1.0.0 for three days, then 2.0.0 (a rollout), at 10
//! requests a second with latencies spread over about 15 sketch buckets.
//! Prints the database size (file + WAL, and pages in use) every 6
//! simulated hours.
//!
//! `cargo run --release -p sentinel-benches --bin telemetry_growth -- [DEVICES] [DAYS] [STEP_SECS]`
//! (defaults 1000, 7, 15).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sentinel_hub::store::{DeviceStore as _, SqliteStore, TelemetryStore as _};
use sentinel_hub::telemetry::{Retention, accept};
use sentinel_proto::pb::SlotWindow;
use sentinel_proto::telemetry::Sketch;

const T0: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    std::env::args().nth(n).map_or(Ok(default), |a| a.parse().with_context(|| format!("argument {n}: {a:?}")))
}

/// A window of `requests` answers, latencies spread like a real model's.
fn window(version: &str, seq: u64, end: i64, step_ms: i64, device: u64) -> SlotWindow {
    let requests = u64::try_from(step_ms / 100).unwrap_or(1).max(1);
    let (mut latency, mut compute) = (Sketch::new(), Sketch::new());
    for i in 0..requests {
        // 1.5 ms to ~6 ms, with a tail; differs a little per device.
        let us = 1500 + (i * 37 + device * 11) % 3000 + if i % 50 == 0 { 20_000 } else { 0 };
        latency.record(Duration::from_micros(us));
        compute.record(Duration::from_micros(us * 2 / 3));
    }
    SlotWindow {
        model: "digits".into(),
        version: version.into(),
        slot: "blue".into(),
        role: "active".into(),
        seq,
        start_unix_ms: end - step_ms,
        end_unix_ms: end,
        requests,
        errors: u64::from(seq.is_multiple_of(97)),
        latency: Some(latency.to_pb()),
        compute: Some(compute.to_pb()),
        feedback_correct: requests / 20,
        feedback_total: requests / 19,
        validation_accuracy: 0.96,
        validation_samples: 1797,
        rss_bytes: 80 << 20,
        ..SlotWindow::default()
    }
}

fn size(path: &std::path::Path) -> u64 {
    let len = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    len(path.to_path_buf()) + len(path.with_extension("db-wal"))
}

fn main() -> anyhow::Result<()> {
    let devices = arg(1, 1000)?;
    let days = arg(2, 7)?;
    let step_ms = i64::try_from(arg(3, 15)?)? * 1000;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path)?;
    let retention = Retention::default();
    for d in 0..devices {
        store.enroll_device(&format!("edge-{d:05}"), &Default::default(), &format!("t{d}"), "bench", T0)?;
    }
    let conn = rusqlite_pages(&path);
    println!("{devices} devices, one window every {} s, {days} simulated days, default retention", step_ms / 1000);
    println!("{:>6} {:>12} {:>12} {:>12} {:>10}", "hours", "file+wal MB", "in use MB", "rows", "wall s");
    let started = Instant::now();
    let end = T0 + i64::try_from(days)? * 24 * HOUR;
    let mut seq = 0u64;
    let mut t = T0;
    let mut next_prune = T0;
    let mut next_print = T0;
    while t <= end {
        seq += 1;
        let version = if t < T0 + 72 * HOUR { "1.0.0" } else { "2.0.0" };
        for d in 0..devices {
            let (ok, refused) = accept(&[window(version, seq, t, step_ms, d)], t, t, &retention);
            anyhow::ensure!(refused.is_empty(), "{refused:?}");
            store.record_telemetry(&format!("edge-{d:05}"), 1, &ok, &retention)?;
        }
        if t >= next_prune {
            store.prune_telemetry(&retention, t)?;
            next_prune += 10 * 60_000;
        }
        if t >= next_print {
            let (in_use, rows) = conn(&path)?;
            println!(
                "{:>6} {:>12.1} {:>12.1} {:>12} {:>10.0}",
                (t - T0) / HOUR,
                size(&path) as f64 / 1e6,
                in_use as f64 / 1e6,
                rows,
                started.elapsed().as_secs_f64()
            );
            next_print += 6 * HOUR;
        }
        t += step_ms;
    }
    read_back(&store, devices, end)?;
    Ok(())
}

/// What a device page and a deployment page read at the end: the last hour
/// of fine buckets for one device, and for every device combined per
/// version (the same store read and combine the hub's API runs).
fn read_back(store: &SqliteStore, devices: u64, now: i64) -> anyhow::Result<()> {
    use sentinel_hub::store::{Resolution, TelemetryQuery};
    use sentinel_hub::telemetry::Series;
    let all: Vec<String> = (0..devices).map(|d| format!("edge-{d:05}")).collect();
    for (what, ids) in [("one device", vec![all[0].clone()]), ("every device", all)] {
        let q = TelemetryQuery {
            devices: Some(ids),
            model: Some("digits".into()),
            version: None,
            resolution: Resolution::Fine,
            from_ms: now - HOUR,
            to_ms: now,
        };
        let mut times = Vec::new();
        let mut rows = 0u64;
        for _ in 0..5 {
            let started = Instant::now();
            let mut s = Series::default();
            rows = 0;
            store.visit_telemetry(&q, &mut |b| {
                rows += 1;
                s.add(&b);
            })?;
            std::hint::black_box(s.to_json(60_000));
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "last hour, {what}: {rows} buckets read and combined in {:.1} ms (median of 5)",
            times[2].as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// Bytes in pages that hold data (not free), and telemetry rows, read on a
/// second connection.
fn rusqlite_pages(_: &std::path::Path) -> impl Fn(&std::path::Path) -> anyhow::Result<(u64, u64)> {
    |path| {
        let c = rusqlite::Connection::open(path)?;
        let page: u64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let count: u64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free: u64 = c.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let rows: u64 = c.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0))?;
        Ok(((count - free) * page, rows))
    }
}
