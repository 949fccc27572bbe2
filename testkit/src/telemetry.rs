//! Reading the hub's telemetry answers (`GET …/telemetry`) in tests.

use serde_json::Value;

/// Every point of one version's series in a telemetry answer, in order.
pub fn points<'a>(answer: &'a Value, version: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    answer["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |s| s["version"] == version)
        .flat_map(|s| s["points"].as_array().into_iter().flatten())
}

/// The sum of a count at `pointer` (e.g. `/requests`, `/feedback/total`)
/// over one version's points.
pub fn total(answer: &Value, version: &str, pointer: &str) -> u64 {
    points(answer, version).map(|p| p.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)).sum()
}
