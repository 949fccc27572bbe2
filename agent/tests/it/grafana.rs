//! The Grafana dashboard (`grafana/sentinel.json`) queries only metrics and
//! labels that the hub and the agent really register.
//!
//! The names and label names come from the crates' own registries
//! (`HubMetrics::families`, `AgentMetrics::families`), not from a list kept
//! here, so renaming a metric or a label without updating the dashboard fails
//! this test. Every PromQL expression of every panel (rows' nested panels
//! too), every legend and every template variable query is checked.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use prometheus::proto::MetricType;
use serde_json::{Value, json};

use crate::dashboard::{dashboard, is_name, queries, scan};

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// A registered metric family, as the dashboard may use it.
#[derive(Debug)]
struct Family {
    labels: BTreeSet<String>,
    histogram: bool,
}

/// Every family the hub and the agent register, read from their registries'
/// descriptors: labelled families with no sample yet, which a scrape leaves
/// out, are included.
fn registered() -> BTreeMap<String, Family> {
    let hub = sentinel_hub::metrics::HubMetrics::new().unwrap();
    let agent = sentinel_agent::metrics::AgentMetrics::new();
    hub.families()
        .iter()
        .chain(agent.families())
        .map(|(desc, kind)| {
            let family = Family {
                labels: desc.variable_labels.iter().cloned().collect(),
                histogram: *kind == MetricType::HISTOGRAM,
            };
            (desc.fq_name.clone(), family)
        })
        .collect()
}

/// The family a series name belongs to, and whether it is a histogram's
/// `_bucket` series (the only one with an `le` label).
fn resolve<'a>(name: &str, families: &'a BTreeMap<String, Family>) -> Result<(&'a Family, bool), String> {
    if let Some(f) = families.get(name) {
        if f.histogram {
            return Err(format!("{name} is a histogram: query its _bucket, _sum or _count series"));
        }
        return Ok((f, false));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(f) = families.get(base)
        {
            if !f.histogram {
                return Err(format!("{name}: {base} is not a histogram and has no {suffix} series"));
            }
            return Ok((f, suffix == "_bucket"));
        }
    }
    Err(format!("{name} is not a metric the hub or the agent registers"))
}

fn allowed(label: &str, family: &Family, bucket: bool) -> bool {
    family.labels.contains(label) || TARGET_LABELS.contains(&label) || (bucket && label == "le")
}

/// `$name` and `${name}` references, Grafana's own `$__*` left out.
fn variables_used(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|rest| rest.trim_start_matches('{').chars().take_while(|&c| is_name(c)).collect::<String>())
        .filter(|v| !v.is_empty() && !v.starts_with("__"))
        .collect()
}

/// Everything wrong with the dashboard's queries, one line each.
fn problems(dash: &Value, families: &BTreeMap<String, Family>) -> Vec<String> {
    let defined: BTreeSet<&str> =
        dash["templating"]["list"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    let mut out = Vec::new();
    for q in queries(dash) {
        let mut problem = |what: String| out.push(format!("{}: {what} (in {:?})", q.at, q.expr));
        let refs = match scan(&q.expr) {
            Ok(r) => r,
            Err(e) => {
                problem(e);
                continue;
            }
        };
        if refs.selectors.is_empty() && refs.strays.is_empty() {
            problem("names no Sentinel metric".to_owned());
        }
        for stray in &refs.strays {
            problem(format!("{stray} is not a Sentinel metric"));
        }
        for var in variables_used(&q.expr) {
            if !defined.contains(var.as_str()) {
                problem(format!("${var} is not a template variable"));
            }
        }
        let mut resolved = Vec::new();
        for (name, labels) in &refs.selectors {
            match resolve(name, families) {
                Ok((family, bucket)) => {
                    for label in labels.iter().filter(|l| !allowed(l, family, bucket)) {
                        problem(format!("{name} has no label {label:?}"));
                    }
                    resolved.push((name, family, bucket));
                }
                Err(e) => problem(e),
            }
        }
        // A grouping or legend label must be on every metric it spans.
        for label in refs.grouping.iter().chain(&q.needs) {
            for (name, family, bucket) in &resolved {
                if !allowed(label, family, *bucket) {
                    problem(format!("{name} has no label {label:?} to group or show by"));
                }
            }
        }
    }
    out
}

#[test]
fn dashboard_queries_only_registered_metrics_and_labels() {
    let families = registered();
    // The descriptors include labelled families that have no sample yet.
    assert!(families["sentinel_hub_deployment_devices"].labels.contains("deployment"), "{families:?}");
    assert!(families["sentinel_agent_inference_duration_seconds"].histogram, "{families:?}");

    let dash = dashboard();
    let n = queries(&dash).len();
    assert!(n >= 20, "only {n} queries found: has the dashboard's layout changed?");
    let problems = problems(&dash, &families);
    assert!(problems.is_empty(), "grafana/sentinel.json:\n{}", problems.join("\n"));
}

#[test]
fn dashboard_has_its_uid_and_a_prometheus_datasource_variable() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "sentinel-overview");
    assert_eq!(dash["schemaVersion"], 39);
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["name"] == "DS_PROMETHEUS").expect("a DS_PROMETHEUS variable");
    assert_eq!((&ds["type"], &ds["query"]), (&json!("datasource"), &json!("prometheus")));

    // Every panel and target follows the variable, so picking another data
    // source switches the whole dashboard.
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        for with_source in targets.iter().chain(if targets.is_empty() { None } else { Some(p) }) {
            assert_eq!(with_source["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", p["title"]);
        }
    }
}

/// The checker itself: a dashboard with one mistake per query, including a
/// panel inside a collapsed row, yields exactly one problem for each.
#[test]
fn the_check_catches_misspelt_metrics_and_labels() {
    let target = |id: &str, expr: &str| json!({"refId": id, "expr": expr});
    let dash = json!({
        "panels": [
            {"type": "row", "title": "r", "collapsed": true, "panels": [
                {"type": "timeseries", "title": "nested", "targets": [
                    target("A", "sum(rate(sentinel_agent_inference_request_total[5m]))"),
                ]},
            ]},
            {"type": "timeseries", "title": "flat", "targets": [
                target("A", "rate(sentinel_agent_rollbacks_total{modle=\"x\"}[5m])"),
                target("B", "sum by (reason, kind) (rate(sentinel_agent_rollbacks_total[5m]))"),
                target("C", "sum by (le) (rate(sentinel_agent_rollbacks_total[5m]))"),
                target("D", "rate(sentinel_agent_rollbacks_total_count[5m])"),
                target("E", "rate(sentinal_agent_rollbacks_total[5m])"),
                target("F", "sentinel_agent_inference_duration_seconds"),
                target("G", "sentinel_agent_hub_connected{instance=~\"$agent\"}"),
                {"refId": "H", "expr": "sum by (model) (rate(sentinel_agent_rollbacks_total[5m]))",
                 "legendFormat": "{{slot}}"},
                target("I", "histogram_quantile(0.9, sum by (le, model) \
                             (rate(sentinel_agent_model_compute_seconds_bucket[5m])))"),
            ]},
            {"type": "stat", "title": "empty", "targets": []},
        ],
        "templating": {"list": [
            {"type": "query", "name": "m", "query": {"query": "label_values(sentinel_agent_build_info, model)"}},
        ]},
    });
    let found = problems(&dash, &registered());
    let expected = [
        ("panel \"nested\" target A", "sentinel_agent_inference_request_total is not a metric"),
        ("panel \"flat\" target A", "no label \"modle\""),
        ("panel \"flat\" target B", "no label \"kind\""),
        ("panel \"flat\" target C", "no label \"le\""),
        ("panel \"flat\" target D", "sentinel_agent_rollbacks_total is not a histogram"),
        ("panel \"flat\" target E", "sentinal_agent_rollbacks_total is not a Sentinel metric"),
        ("panel \"flat\" target F", "is a histogram"),
        ("panel \"flat\" target G", "$agent is not a template variable"),
        ("panel \"flat\" target H", "no label \"slot\""),
        ("panel \"empty\"", "names no Sentinel metric"),
        ("variable $m", "sentinel_agent_build_info has no label \"model\""),
    ];
    for (at, what) in expected {
        assert!(
            found.iter().any(|p| p.starts_with(at) && p.contains(what)),
            "no {at}: {what} in\n{}",
            found.join("\n")
        );
    }
    // Target I is correct, and each mistake is reported once.
    assert_eq!(found.len(), expected.len(), "{}", found.join("\n"));
}
