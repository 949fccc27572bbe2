//! What device telemetry costs (issue 17), in process, against the work it
//! rides on:
//! - on the device, per request: `Interval::ok` (a count and two sketch
//!   increments under a mutex) against one inference request's own latency
//!   (digits v1 through a real worker, as the agent serves it, from the
//!   `inference_api` bench's numbers is not assumed: measured here as the
//!   in-process cost of the request path's cheapest part, a JSON decode of
//!   the same request, for scale);
//! - per report: cutting one slot's window and encoding it;
//! - at the hub, per window: `telemetry::accept` and the SQLite upsert of its
//!   fine and coarse buckets.
//!
//! `cargo run --release -p sentinel-benches --bin telemetry_cost`

use std::hint::black_box;
use std::time::{Duration, Instant};

use sentinel_agent::serving::telemetry::{Gauges, Interval};
use sentinel_hub::store::{DeviceStore as _, SqliteStore, TelemetryStore as _};
use sentinel_hub::telemetry::{Retention, accept};
use sentinel_testkit::digits::digit_request;

fn per(n: u32, f: impl FnMut()) -> Duration {
    let mut f = f;
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed() / n
}

fn main() -> anyhow::Result<()> {
    const N: u32 = 1_000_000;
    let mut interval = Interval::starting(0);
    let m = std::sync::Mutex::new(Interval::starting(0));
    let mut i = 0u64;
    let record = per(N, || {
        i += 1;
        let latency = Duration::from_micros(200 + i % 700);
        m.lock().expect("lock").ok(latency, latency / 2);
    });
    let body = serde_json::to_vec(&digit_request(3))?;
    let decode = per(20_000, || {
        black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).expect("json"));
    });
    for k in 0..600u64 {
        interval.ok(Duration::from_micros(200 + k * 13 % 5000), Duration::from_micros(100 + k % 900));
    }
    // Filled first, so only the cut and the encoding are timed.
    let mut filled: Vec<Interval> = (0..10_000)
        .map(|_| {
            let mut fresh = Interval::starting(0);
            for k in 0..600u64 {
                fresh.ok(Duration::from_micros(200 + k * 13 % 5000), Duration::from_micros(100 + k % 900));
            }
            fresh
        })
        .collect();
    let started = Instant::now();
    for (t, fresh) in filled.iter_mut().enumerate() {
        let w = fresh.cut(i64::try_from(t).unwrap_or(0), Gauges::default());
        black_box(prost::Message::encode_to_vec(&w));
    }
    let cut = started.elapsed() / 10_000;
    let window = interval.cut(1_800_000_000_000, Gauges::default());
    let window = sentinel_proto::pb::SlotWindow { model: "digits".into(), version: "1.0.0".into(), ..window };
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("hub.db"))?;
    let retention = Retention::default();
    for d in 0..100 {
        store.enroll_device(&format!("d{d}"), &Default::default(), &format!("t{d}"), "bench", 0)?;
    }
    let mut seq = 0u64;
    let store_one = per(5_000, || {
        seq += 1;
        let w = sentinel_proto::pb::SlotWindow {
            seq,
            end_unix_ms: 1_800_000_000_000 + i64::try_from(seq).unwrap_or(0) * 60_000,
            ..window.clone()
        };
        let (ok, _) = accept(std::slice::from_ref(&w), w.end_unix_ms, w.end_unix_ms, &retention);
        store.record_telemetry(&format!("d{}", seq % 100), 1, &ok, &retention).expect("store");
    });
    println!("device, per request: Interval::ok under a mutex            {:>8.0} ns", record.as_nanos() as f64);
    println!(
        "  for scale, JSON-decoding that digits request             {:>8.0} ns ({:.1}%)",
        decode.as_nanos() as f64,
        100.0 * record.as_secs_f64() / decode.as_secs_f64()
    );
    println!("device, per report and slot: cut + encode a 600-request window {:>6.1} µs", cut.as_secs_f64() * 1e6);
    println!("hub, per window: accept + SQLite fine and coarse upsert     {:>8.1} µs", store_one.as_secs_f64() * 1e6);
    Ok(())
}
