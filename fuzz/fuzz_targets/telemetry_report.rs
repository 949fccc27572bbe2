//! A device's report as the hub decodes it, with its telemetry windows:
//! `telemetry::accept` checks each window and turns its sketches into
//! buckets, which are added and combined into the API's series. Devices are
//! authenticated, but a compromised or buggy one must not crash the hub or
//! make it allocate by a size it chose.
//!
//! Input: the protobuf bytes of an `AgentReport`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sentinel_hub::telemetry::{Bucket, Resolution, Retention, Series, accept};
use sentinel_proto::pb::AgentReport;
use sentinel_proto::telemetry::Sketch;

const NOW: i64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = AgentReport::decode(data) else { return };
    let retention = Retention::default();
    let (windows, refused) = accept(&report.windows, report.sent_at_unix_ms, NOW, &retention);
    assert!(windows.len() + refused.len() <= report.windows.len().max(1));
    let mut series = Series::default();
    for w in &windows {
        assert!(w.counts.errors <= w.counts.requests);
        let mut b = Bucket::empty("d", w, Resolution::Fine, &retention);
        b.absorb(w);
        b.absorb(w);
        // What the store writes, it reads back the same.
        assert_eq!(Sketch::from_bytes(&b.latency.to_bytes()).as_ref(), Some(&b.latency));
        series.add(&b);
    }
    let _ = series.to_json(retention.width_ms(Resolution::Fine));
});
