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
use std::path::Path;

use prometheus::proto::MetricType;
use serde_json::{Value, json};

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// PromQL words that are neither metrics nor followed by `(`: aggregations
/// written `sum by (...) (...)`, binary operators and modifiers.
const KEYWORDS: [&str; 23] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
    "by",
];

/// Clauses whose parenthesised list names labels.
const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

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

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/sentinel.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One PromQL expression of the dashboard, where it is, and the labels its
/// result must carry (named by a legend or by `label_values`).
#[derive(Debug)]
struct Query {
    at: String,
    expr: String,
    needs: Vec<String>,
}

/// Every query of the dashboard: panel targets, found recursively (a
/// collapsed row holds its panels), and template variable queries.
fn queries(dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    panel_queries(dash["panels"].as_array().map_or(&[][..], Vec::as_slice), &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        // Grafana 10 stores the query as an object; older models as a string.
        let texts = [&var["query"], &var["query"]["query"], &var["definition"]];
        for text in texts.into_iter().filter_map(Value::as_str) {
            let at = format!("variable ${name}");
            // label_values(selector, label): the label must be on the metric.
            let inner = text.trim().strip_prefix("label_values(").and_then(|t| t.strip_suffix(')'));
            match inner.and_then(|i| i.rsplit_once(',')) {
                Some((expr, label)) => {
                    out.push(Query { at, expr: expr.to_owned(), needs: vec![label.trim().to_owned()] });
                }
                None => out.push(Query { at, expr: text.to_owned(), needs: Vec::new() }),
            }
        }
    }
    out
}

fn panel_queries(panels: &[Value], out: &mut Vec<Query>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or("untitled");
        let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
        if targets.is_empty() && !matches!(p["type"].as_str(), Some("row" | "text")) {
            // Reported as a query naming no metric: a panel that shows nothing.
            out.push(Query { at: format!("panel {title:?}"), expr: String::new(), needs: Vec::new() });
        }
        for t in targets {
            let at = format!("panel {title:?} target {}", t["refId"].as_str().unwrap_or("?"));
            let legend = t["legendFormat"].as_str().unwrap_or("");
            let expr = t["expr"].as_str().unwrap_or("").to_owned();
            out.push(Query { at, expr, needs: legend_labels(legend) });
        }
        panel_queries(p["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
    }
}

/// The label names of a legend format's `{{label}}` placeholders.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|rest| rest.split_once("}}").map(|(name, _)| name.trim().to_owned()))
        .collect()
}

/// What one PromQL expression refers to.
#[derive(Debug, Default)]
struct Refs {
    /// Each `sentinel_*` name with the label names its `{...}` matches on.
    selectors: Vec<(String, Vec<String>)>,
    /// The label names of `by`, `without`, `on`, `ignoring` and `group_*` lists.
    grouping: Vec<String>,
    /// Bare names that are neither Sentinel metrics nor PromQL words: a
    /// misspelt prefix (`sentinal_`) or another exporter's metric.
    strays: Vec<String>,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

fn skip_ws(s: &[char], mut i: usize) -> usize {
    while s.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

fn read_name(s: &[char], start: usize) -> (String, usize) {
    let mut i = start;
    while s.get(i).is_some_and(|&c| is_name(c)) {
        i += 1;
    }
    (s[start..i].iter().collect(), i)
}

/// The index just past the string literal that opens at `i`.
fn skip_string(s: &[char], mut i: usize) -> Result<usize, String> {
    let quote = s[i];
    i += 1;
    while let Some(&c) = s.get(i) {
        if c == '\\' && quote != '`' {
            i += 2;
        } else if c == quote {
            return Ok(i + 1);
        } else {
            i += 1;
        }
    }
    Err("unterminated string".to_owned())
}

/// The index just past the first `close` at or after `i`.
fn skip_past(s: &[char], i: usize, close: char) -> Result<usize, String> {
    s[i..].iter().position(|&c| c == close).map(|p| i + p + 1).ok_or_else(|| format!("no closing {close:?}"))
}

/// The label names of the matchers in the `{...}` that opens at `i`.
fn matchers(s: &[char], mut i: usize) -> Result<(Vec<String>, usize), String> {
    let mut labels = Vec::new();
    i = skip_ws(s, i + 1);
    if s.get(i) == Some(&'}') {
        return Ok((labels, i + 1));
    }
    loop {
        let (label, next) = read_name(s, skip_ws(s, i));
        if label.is_empty() {
            return Err("a matcher without a label name".to_owned());
        }
        labels.push(label);
        i = skip_ws(s, next);
        let op: String = s[i..].iter().take(2).collect();
        i += if op == "=~" || op == "!~" || op == "!=" {
            2
        } else if op.starts_with('=') {
            1
        } else {
            return Err(format!("no matcher operator after label {:?}", labels.last()));
        };
        i = skip_ws(s, i);
        if !matches!(s.get(i), Some('"' | '\'' | '`')) {
            return Err("a matcher value that is not a string".to_owned());
        }
        i = skip_ws(s, skip_string(s, i)?);
        match s.get(i) {
            Some(',') => i += 1,
            Some('}') => return Ok((labels, i + 1)),
            _ => return Err("a selector that does not close".to_owned()),
        }
    }
}

/// The label names of the `(a, b)` list that opens at `i`.
fn label_list(s: &[char], i: usize) -> Result<(Vec<String>, usize), String> {
    let end = skip_past(s, i, ')')?;
    let inner: String = s[i + 1..end - 1].iter().collect();
    let labels = inner.split(',').map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect();
    Ok((labels, end))
}

/// Reads the metric names and label names out of one PromQL expression.
/// Grafana's `$variables` and range durations are skipped.
fn scan(expr: &str) -> Result<Refs, String> {
    let s: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&s, i)?;
        } else if c == '$' {
            i = if s.get(i + 1) == Some(&'{') { skip_past(&s, i, '}')? } else { read_name(&s, i + 1).1 };
        } else if c == '[' {
            // A range or subquery: durations and $__rate_interval.
            i = skip_past(&s, i, ']')?;
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`0.95`, `5m`, `1e3`).
            while s.get(i).is_some_and(|&d| d.is_ascii_alphanumeric() || d == '.') {
                i += 1;
            }
        } else if c == '{' {
            return Err("a selector without a metric name".to_owned());
        } else if is_name_start(c) {
            let (word, next) = read_name(&s, i);
            let after = skip_ws(&s, next);
            i = next;
            match s.get(after) {
                Some('{') => {
                    let (labels, end) = matchers(&s, after)?;
                    if word.starts_with("sentinel_") {
                        refs.selectors.push((word, labels));
                    } else {
                        refs.strays.push(word);
                    }
                    i = end;
                }
                Some('(') if GROUPING.contains(&word.as_str()) => {
                    let (labels, end) = label_list(&s, after)?;
                    refs.grouping.extend(labels);
                    i = end;
                }
                // A function call or a parenthesised aggregation.
                Some('(') => {}
                _ if word.starts_with("sentinel_") => refs.selectors.push((word, Vec::new())),
                _ if KEYWORDS.contains(&word.as_str()) => {}
                _ => refs.strays.push(word),
            }
        } else {
            i += 1;
        }
    }
    Ok(refs)
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
