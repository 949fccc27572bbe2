//! Reading `grafana/sentinel.json`: the dashboard's PromQL expressions
//! (every panel target, rows' nested panels too, and the template variable
//! queries), and the metric and label names one expression refers to.
//!
//! Shared by `grafana.rs` (the names against the registries) and
//! `prometheus.rs` (the expressions on a real Prometheus).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::Value;

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

pub(crate) fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/sentinel.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One PromQL expression of the dashboard, where it is, and the labels its
/// result must carry (named by a legend or by `label_values`).
#[derive(Debug)]
pub(crate) struct Query {
    pub(crate) at: String,
    pub(crate) expr: String,
    pub(crate) needs: Vec<String>,
}

/// Every query of the dashboard: panel targets, found recursively (a
/// collapsed row holds its panels), and template variable queries.
pub(crate) fn queries(dash: &Value) -> Vec<Query> {
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
pub(crate) struct Refs {
    /// Each `sentinel_*` name with the label names its `{...}` matches on.
    pub(crate) selectors: Vec<(String, Vec<String>)>,
    /// The label names of `by`, `without`, `on`, `ignoring` and `group_*` lists.
    pub(crate) grouping: Vec<String>,
    /// Bare names that are neither Sentinel metrics nor PromQL words: a
    /// misspelt prefix (`sentinal_`) or another exporter's metric.
    pub(crate) strays: Vec<String>,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

pub(crate) fn is_name(c: char) -> bool {
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
pub(crate) fn scan(expr: &str) -> Result<Refs, String> {
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
