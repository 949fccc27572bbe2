//! `sentinel model deploy` with a rollout policy, and the rollout view of
//! `sentinel deployments show`.
//!
//! The CLI does not validate the policy itself: it sends what the file and
//! flags say, and the hub answers which field is wrong (exit code 65). One
//! set of rules, in one place.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::CliError;
use super::args::DeployArgs;
use super::commands::{s, time, wrapped_table};
use crate::records::DeviceState;

/// Halt thresholds and waves: top-level fields of the deploy request, but a
/// policy file may hold them next to the policy.
const TOP_LEVEL_FIELDS: [&str; 3] = ["halt_fraction", "halt_count", "waves"];

/// A policy file's text that is not the format it was read as.
#[derive(Debug, thiserror::Error)]
enum PolicyFormatError {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A file of no known extension: both readings failed, both are said.
    #[error("neither JSON ({json}) nor TOML ({toml})")]
    Neither { json: serde_json::Error, toml: Box<PolicyFormatError> },
}

fn parse_toml(text: &str) -> Result<Value, PolicyFormatError> {
    let table: toml::Table = toml::from_str(text)?;
    Ok(serde_json::to_value(table)?)
}

/// Reads a policy file: TOML for `.toml`, JSON for `.json`, otherwise JSON
/// and then TOML.
fn read_policy_file(path: &Path) -> Result<Map<String, Value>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CliError::LocalFile { path: path.display().to_string(), source })?;
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let parsed = match ext.as_deref() {
        Some("toml") => parse_toml(&text),
        Some("json") => serde_json::from_str(&text).map_err(PolicyFormatError::from),
        _ => serde_json::from_str(&text).or_else(|json_err| {
            parse_toml(&text)
                .map_err(|toml_err| PolicyFormatError::Neither { json: json_err, toml: Box::new(toml_err) })
        }),
    }
    .map_err(|e| CliError::Usage(format!("--policy {}: {e}", path.display())))?;
    match parsed {
        Value::Object(map) => Ok(map),
        _ => Err(CliError::Usage(format!(
            "--policy {}: the file must hold an object of policy fields, e.g. {{\"phases\": [\"canary:10\", \"full\"]}}",
            path.display()
        ))),
    }
}

/// The JSON body of `POST /models/{name}/deploy`: the file's fields, each
/// flag overriding the field of the same name.
pub fn deploy_body(a: &DeployArgs) -> Result<Value, CliError> {
    let version =
        a.version.clone().or_else(|| a.version_flag.clone()).ok_or_else(|| {
            CliError::Usage("the version to deploy is required, e.g. `model deploy digits 1.2.0`".into())
        })?;
    let mut policy = match &a.policy {
        Some(path) => read_policy_file(path)?,
        None => Map::new(),
    };
    let mut body = Map::new();
    body.insert("version".into(), json!(version));
    // Checked here too, so the usage error comes before any request; an
    // empty --target is the hub's to refuse.
    let target = a.target.clone().ok_or_else(|| {
        CliError::Usage(
            "--target is required: a selector such as `--target ring=production`, or `--target '*'` for every device"
                .into(),
        )
    })?;
    body.insert("target".into(), json!(target));
    for field in TOP_LEVEL_FIELDS {
        if let Some(v) = policy.remove(field) {
            body.insert(field.into(), v);
        }
    }
    let flags = [
        (
            "phases",
            a.phases.as_ref().map(|p| json!(p.split(',').map(str::trim).filter(|p| !p.is_empty()).collect::<Vec<_>>())),
        ),
        ("bake_seconds", a.bake_secs.map(|v| json!(v))),
        ("min_samples", a.min_samples.map(|v| json!(v))),
        ("max_latency_ratio", a.max_latency_ratio.map(|v| json!(v))),
        ("min_accuracy", a.min_accuracy.map(|v| json!(v))),
        ("max_accuracy_drop", a.max_accuracy_drop.map(|v| json!(v))),
        ("latency_slo_ms", a.latency_slo_ms.map(|v| json!(v))),
        ("max_error_rate", a.max_error_rate.map(|v| json!(v))),
        ("min_shadow_agreement", a.min_shadow_agreement.map(|v| json!(v))),
        ("min_accuracy_samples", a.min_accuracy_samples.map(|v| json!(v))),
        ("standby_bake_seconds", a.standby_bake_secs.map(|v| json!(v))),
        ("max_restarts", a.max_restarts.map(|v| json!(v))),
    ];
    for (field, value) in flags {
        if let Some(v) = value {
            policy.insert(field.into(), v);
        }
    }
    if let Some(f) = a.halt_fraction {
        body.insert("halt_fraction".into(), json!(f));
    }
    if let Some(n) = a.halt_count {
        body.insert("halt_count".into(), json!(n));
    }
    if !a.waves.is_empty() {
        body.insert("waves".into(), json!(a.waves));
    }
    if !policy.is_empty() {
        body.insert("policy".into(), Value::Object(policy));
    }
    Ok(Value::Object(body))
}

/// Policy fields in the order of the wire `RolloutPolicy`, for display.
const POLICY_FIELDS: [&str; 12] = [
    "phases",
    "bake_seconds",
    "min_samples",
    "max_latency_ratio",
    "latency_slo_ms",
    "max_error_rate",
    "min_accuracy",
    "max_accuracy_drop",
    "min_shadow_agreement",
    "standby_bake_seconds",
    "min_accuracy_samples",
    "max_restarts",
];

fn policy_text(policy: &Value) -> String {
    let set: Vec<String> =
        POLICY_FIELDS.iter().filter(|f| !policy[**f].is_null()).map(|f| format!("{f} {}", s(&policy[*f]))).collect();
    if set.is_empty() { "the agent's defaults".into() } else { set.join("; ") }
}

/// The policy of a deploy request body as devices will apply it, every
/// default filled in ([`crate::rollout::RolloutPolicy::effective`]), for a
/// version declaring `declared` accuracy; `None` when the body's policy is
/// not one the hub would take (the hub's answer then says why).
pub fn effective_policy_text(body: &Value, declared: Option<f64>) -> Option<String> {
    let policy: crate::rollout::RolloutPolicy = match body.get("policy") {
        None => crate::rollout::RolloutPolicy::default(),
        Some(p) => serde_json::from_value(p.clone()).ok()?,
    };
    let effective = serde_json::to_value(policy.effective(declared)).ok()?;
    Some(policy_text(&effective))
}

/// Policy, halt thresholds, halt reason, per-state counts and one row per
/// targeted device of a `GET /deployments/{id}` answer.
pub fn deployment_text(v: &Value) -> String {
    let mut out = format!("policy: {}\n", policy_text(&v["policy"]));
    if v["effective_policy"].is_object() {
        out.push_str(&format!("effective policy: {}\n", policy_text(&v["effective_policy"])));
    }
    let fraction = v["halt_fraction"].as_f64().unwrap_or(0.2);
    out.push_str(&format!("halts when more than {:.0}% of targeted devices", fraction * 100.0));
    if let Some(n) = v["halt_count"].as_u64() {
        out.push_str(&format!(", or at least {n},"));
    }
    out.push_str(" rolled back or failed\n");
    if let Some(waves) = v["waves"].as_array().filter(|w| !w.is_empty()) {
        let steps: Vec<String> = waves.iter().map(|p| format!("{}%", s(p))).collect();
        let now = waves.get(usize::try_from(v["wave"].as_u64().unwrap_or(0)).unwrap_or(0)).map(s).unwrap_or_default();
        let waiting = v["status"]["waiting"].as_u64().map(|n| format!(" ({n} devices waiting)")).unwrap_or_default();
        out.push_str(&format!("waves: {}; now {now}%{waiting}\n", steps.join(" -> ")));
    }
    if v["state"] == "halted" {
        out.push_str(&format!("state: halted: {}\n", s(&v["halt_reason"])));
    }
    let status = &v["status"];
    if status.is_object() {
        let counts: Vec<String> = DeviceState::ALL
            .iter()
            .map(|st| format!("{} {}", st.as_str(), s(&status["counts"][st.as_str()])))
            .collect();
        out.push_str(&format!("targeted {}: {}\n", s(&status["targeted"]), counts.join(", ")));
        let rows = status["devices"]
            .as_array()
            .map(|devices| {
                devices
                    .iter()
                    .map(|d| {
                        vec![s(&d["device"]), s(&d["state"]), s(&d["version"]), s(&d["detail"]), time(&d["updated_ms"])]
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&wrapped_table(&["DEVICE", "STATE", "VERSION", "DETAIL", "UPDATED"], rows).to_string());
    }
    out
}

/// One version's totals over a telemetry answer's buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionTotals {
    pub version: String,
    pub requests: u64,
    pub errors: u64,
    pub feedback_correct: u64,
    pub feedback_total: u64,
    /// The worst p95 latency of any one bucket, milliseconds.
    pub worst_p95_ms: Option<f64>,
    /// The most devices that reported in one bucket.
    pub devices: u64,
}

/// Totals per version of a `GET …/telemetry` answer, in its series' order.
pub fn telemetry_totals(v: &Value) -> Vec<VersionTotals> {
    let mut out: Vec<VersionTotals> = Vec::new();
    for series in v["series"].as_array().into_iter().flatten() {
        let version = s(&series["version"]);
        let at = match out.iter().position(|t| t.version == version) {
            Some(i) => i,
            None => {
                out.push(VersionTotals { version, ..VersionTotals::default() });
                out.len() - 1
            }
        };
        let t = &mut out[at];
        for p in series["points"].as_array().into_iter().flatten() {
            let n = |x: &Value| x.as_u64().unwrap_or(0);
            t.requests += n(&p["requests"]);
            t.errors += n(&p["errors"]);
            t.feedback_correct += n(&p["feedback"]["correct"]);
            t.feedback_total += n(&p["feedback"]["total"]);
            t.devices = t.devices.max(n(&p["devices"]));
            if let Some(p95) = p["latency_ms"]["p95"].as_f64() {
                t.worst_p95_ms = Some(t.worst_p95_ms.map_or(p95, |w| w.max(p95)));
            }
        }
    }
    out
}

/// A deployment's telemetry as a table: one row per version.
pub fn telemetry_text(v: &Value) -> String {
    let totals = telemetry_totals(v);
    if totals.is_empty() {
        return "telemetry: none reported yet (devices report every heartbeat)\n".into();
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let rows = totals
        .iter()
        .map(|t| {
            let pct = |a: u64, b: u64| if b == 0 { "-".into() } else { format!("{:.1}%", 100.0 * a as f64 / b as f64) };
            vec![
                t.version.clone(),
                t.requests.to_string(),
                pct(t.errors, t.requests),
                if t.feedback_total == 0 {
                    "-".into()
                } else {
                    format!("{} of {}", pct(t.feedback_correct, t.feedback_total), t.feedback_total)
                },
                t.worst_p95_ms.map_or_else(|| "-".into(), |p| format!("{p:.2} ms")),
                t.devices.to_string(),
            ]
        })
        .collect();
    let width = v["bucket_ms"].as_i64().unwrap_or(0) / 1000;
    format!(
        "telemetry since {} ({} s buckets, percentiles merged over devices):\n{}",
        time(&v["from_ms"]),
        width,
        wrapped_table(&["VERSION", "REQUESTS", "ERRORS", "ACCURACY (FEEDBACK)", "WORST P95", "DEVICES"], rows)
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Cli;
    use crate::cli::args::{Command, ModelCommand};

    fn args(extra: &[&str], file: &Path) -> DeployArgs {
        let mut argv =
            vec!["sentinel", "model", "deploy", "digits", "2.0.0", "--target", "*", "--policy", file.to_str().unwrap()];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Model(ModelCommand::Deploy(a)) => *a,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn flags_override_the_toml_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            "phases = [\"shadow\", \"full\"]\nbake_seconds = 30\nmin_accuracy = 0.8\nhalt_count = 2\n",
        )
        .unwrap();
        let body = deploy_body(&args(&["--phases", "canary:10,full", "--min-accuracy", "0.9"], &file)).unwrap();
        assert_eq!(body["version"], "2.0.0");
        assert_eq!(body["policy"]["phases"], json!(["canary:10", "full"]));
        assert_eq!(body["policy"]["bake_seconds"], 30);
        assert_eq!(body["policy"]["min_accuracy"], 0.9);
        assert_eq!(body["halt_count"], 2, "halt thresholds move to the top level");
        assert!(body["policy"].get("halt_count").is_none());
    }

    /// Issue 17: every policy field is a flag, named as the API names it
    /// (`--bake-secs` and `--standby-bake-secs` excepted: seconds).
    #[test]
    fn every_policy_field_is_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "").unwrap();
        let flags = [
            "--phases=shadow,full",
            "--bake-secs=5",
            "--min-samples=10",
            "--max-latency-ratio=2",
            "--latency-slo-ms=50",
            "--max-error-rate=0.1",
            "--min-accuracy=0.9",
            "--max-accuracy-drop=0.01",
            "--min-shadow-agreement=0.95",
            "--standby-bake-secs=120",
            "--min-accuracy-samples=20",
            "--max-restarts=5",
        ];
        let body = deploy_body(&args(&flags, &file)).unwrap();
        let set: Vec<&str> = body["policy"].as_object().unwrap().keys().map(String::as_str).collect();
        let mut every = POLICY_FIELDS.to_vec();
        every.sort_unstable();
        assert_eq!(set, every, "{body}");
    }

    #[test]
    fn a_json_file_without_extension_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy");
        std::fs::write(&file, r#"{"max_latency_ratio": 1.5, "halt_fraction": 0.5}"#).unwrap();
        let body = deploy_body(&args(&["--halt-fraction", "0.3"], &file)).unwrap();
        assert_eq!(body["policy"], json!({"max_latency_ratio": 1.5}));
        assert_eq!(body["halt_fraction"], 0.3);
        std::fs::write(&file, "phases = ").unwrap();
        assert!(matches!(deploy_body(&args(&[], &file)), Err(CliError::Usage(_))));
    }

    #[test]
    fn waves_come_from_the_file_or_the_flag_and_show_where_the_rollout_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "waves = [10, 100]\nbake_seconds = 5\n").unwrap();
        let body = deploy_body(&args(&[], &file)).unwrap();
        assert_eq!((body["waves"].clone(), body["policy"].clone()), (json!([10, 100]), json!({"bake_seconds": 5})));
        let body = deploy_body(&args(&["--waves", "5,50,100"], &file)).unwrap();
        assert_eq!(body["waves"], json!([5, 50, 100]), "the flag wins");

        let shown = deployment_text(&json!({"waves": [5, 50, 100], "wave": 1, "status": {"waiting": 7}}));
        assert!(shown.contains("waves: 5% -> 50% -> 100%; now 50% (7 devices waiting)\n"), "{shown}");
        assert!(!deployment_text(&json!({"waves": []})).contains("waves"));
    }

    #[test]
    fn telemetry_totals_add_each_versions_points() {
        let v = json!({"bucket_ms": 60000, "from_ms": 0, "series": [
            {"version": "2.0.0", "points": [
                {"requests": 10, "errors": 1, "devices": 2, "feedback": {"correct": 6, "total": 8}, "latency_ms": {"p95": 3.0}},
                {"requests": 5, "errors": 0, "devices": 3, "feedback": {"correct": 1, "total": 2}, "latency_ms": {"p95": null}}]},
            {"version": "1.0.0", "points": []}]});
        let t = telemetry_totals(&v);
        assert_eq!(
            t[0],
            VersionTotals {
                version: "2.0.0".into(),
                requests: 15,
                errors: 1,
                feedback_correct: 7,
                feedback_total: 10,
                worst_p95_ms: Some(3.0),
                devices: 3,
            }
        );
        assert_eq!(t[1].requests, 0);
        let text = telemetry_text(&v);
        assert!(text.contains("70.0% of 10") && text.contains("3.00 ms") && text.contains("6.7%"), "{text}");
        assert!(telemetry_text(&json!({"series": []})).contains("none reported yet"));
    }
}
