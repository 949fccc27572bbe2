//! The Grafana dashboard and the alert rules on a real Prometheus.
//!
//! A real hub and agent serve traffic (pushes, deploys, inferences, a
//! rollback, a tampered download); a Prometheus of our own (Debian's
//! `prometheus`, installed by `.ci/install-prometheus`) scrapes both and
//! loads `monitoring/alerts.yml`. Every PromQL expression of
//! `grafana/sentinel.json` is then evaluated through its query API with the
//! dashboard's variables filled in as Grafana would: each must parse, and
//! those about the traffic made here must return series. `promtool` lints
//! both `/metrics` bodies and checks and unit-tests the alert rules.
//! `grafana.rs` checks the same expressions' names against the registries.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{Value, json};

use crate::dashboard::{dashboard, is_name, queries, scan};

/// Grafana's `$__rate_interval` here: 30 scrapes at the 1s interval below,
/// so a rate has samples to work with even if some scrapes come late.
const RATE_INTERVAL: &str = "30s";

/// Metrics the test gives samples to. A dashboard expression naming only
/// these must return at least one series; the others (worker restarts,
/// sandbox violations: nothing here kills a worker) are printed with their
/// counts but may be empty. Histograms are named by their `_bucket` series,
/// as the dashboard queries them.
const FED: [&str; 20] = [
    "sentinel_hub_http_requests_total",
    "sentinel_hub_http_request_duration_seconds_bucket",
    "sentinel_hub_connected_devices",
    "sentinel_hub_model_pushes_total",
    "sentinel_hub_model_push_bytes_total",
    "sentinel_hub_deployments",
    "sentinel_hub_deployment_devices",
    "sentinel_hub_deployment_halts_total",
    "sentinel_hub_device_reports_total",
    "sentinel_hub_build_info",
    "sentinel_agent_hub_connected",
    "sentinel_agent_build_info",
    "sentinel_agent_inference_requests_total",
    "sentinel_agent_inference_duration_seconds_bucket",
    "sentinel_agent_model_compute_seconds_bucket",
    "sentinel_agent_worker_resident_bytes",
    "sentinel_agent_rollbacks_total",
    "sentinel_agent_download_bytes_total",
    "sentinel_agent_download_failures_total",
    "sentinel_agent_verification_failures_total",
];

/// The path of `name` on `PATH`; fails the test, saying how to install it,
/// when it is missing.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} is not installed (not on PATH). Run .ci/install-prometheus: it installs Debian's \
             prometheus package (prometheus and promtool) without starting a service; .ci/test runs it"
        )
    })
}

/// Runs `promtool` with `args` (and `stdin`, if any) and returns its exit
/// status and its stdout and stderr together.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(tool("promtool"))
        .args(args)
        .current_dir(sentinel_testkit::bins::workspace_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "monitoring/alerts.yml"], None);
    println!("$ promtool check rules monitoring/alerts.yml\n{out}");
    assert!(ok, "promtool check rules monitoring/alerts.yml:\n{out}");
    let alerts = alert_names().len();
    assert!(out.contains(&format!("SUCCESS: {alerts} rules found")), "{alerts} alerts in the file:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "monitoring/alerts.test.yml"], None);
    println!("$ promtool test rules monitoring/alerts.test.yml\n{out}");
    assert!(ok, "promtool test rules monitoring/alerts.test.yml:\n{out}");
    // Every alert has at least one test that expects it to fire.
    let tests =
        std::fs::read_to_string(sentinel_testkit::bins::workspace_root().join("monitoring/alerts.test.yml")).unwrap();
    for name in alert_names() {
        assert!(tests.contains(&format!("alertname: {name}\n")), "{name} has no test in alerts.test.yml");
    }
}

/// The `- alert: NAME` entries of `monitoring/alerts.yml`.
fn alert_names() -> Vec<String> {
    let text = std::fs::read_to_string(sentinel_testkit::bins::workspace_root().join("monitoring/alerts.yml")).unwrap();
    text.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|n| n.trim().to_owned()).collect()
}

/// A Prometheus server of the test's own, on a loopback port, with its data
/// in a temp dir. Killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus on `config` (a prometheus.yml) with its storage and
    /// log under `dir`.
    fn start(dir: &Path, config: &str) -> Self {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // Prometheus cannot report the port of a `:0` listen address.
        let port = sentinel_testkit::free_loopback_port();
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("prometheus.stderr")).unwrap())
            .spawn()
            .unwrap();
        Self { child, url: format!("http://127.0.0.1:{port}"), log, http: reqwest::Client::new() }
    }

    /// What Prometheus has logged, for a failure message.
    fn logs(&self) -> String {
        let dir = self.log.parent().unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        format!("{}{}", read("prometheus.log"), read("prometheus.stderr"))
    }

    /// The URL of `/api/v1/{path}` with `query` encoded.
    fn endpoint(&self, path: &str, query: &[(&str, &str)]) -> reqwest::Url {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/{path}", self.url)).unwrap();
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// `GET /api/v1/{path}`'s `data`, or `None` while Prometheus does not
    /// answer yet.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let r = self.http.get(self.endpoint(path, query)).send().await.ok()?;
        let body: Value = r.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// Evaluates one PromQL expression now: its result, or the error
    /// Prometheus gave (a parse error names the position).
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = self.http.get(self.endpoint("query", &[("query", expr)])).send().await;
        let body: Value = r.unwrap().json().await.unwrap();
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(data["result"].as_array().unwrap().clone()),
            // A scalar or a string is one value.
            _ => Ok(vec![data["result"].clone()]),
        }
    }

    /// Waits until `check` holds of Prometheus, printing its log if not.
    async fn wait_for(&self, what: &str, mut check: impl AsyncFnMut(&Self) -> Option<()>) {
        if within(WAIT, async || check(self).await).await.is_none() {
            panic!("{what}: not within {WAIT:?}; Prometheus' log:\n{}", self.logs());
        }
    }
}

/// The text of a `/metrics` endpoint.
async fn scrape(url: &str) -> String {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.text().await.unwrap()
}

/// An `instance` label value as Grafana writes a selected variable value
/// into a regex matcher: regex-escaped, inside a PromQL string.
fn grafana_regex(instance: &str) -> String {
    instance.replace('.', "\\\\.")
}

/// `expr` with every `$name` and `${name}` replaced by `values[name]`;
/// a variable not in `values` fails the test.
fn substitute(expr: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (braced, body) = match after.strip_prefix('{') {
            Some(b) => (true, b),
            None => (false, after),
        };
        let len = body.find(|c: char| !is_name(c)).unwrap_or(body.len());
        let name = &body[..len];
        let value = values.get(name).unwrap_or_else(|| panic!("no value for ${name} in {expr:?}"));
        out.push_str(value);
        rest = if braced { body[len..].strip_prefix('}').unwrap() } else { &body[len..] };
    }
    out.push_str(rest);
    out
}

/// The hub and the agent doing what an operator's dashboard shows: pushes
/// (one refused), a deploy, inferences (one bad), a second version, an
/// operator rollback, a tampered artifact the agent refuses, a 404.
async fn traffic(tmp: &Path) -> (TestHub, sentinel_agent::AgentHandle) {
    let hub = TestHub::start_at(&tmp.join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    assert_eq!(hub.upload("digits", "1.0.0", model_bytes(V1), "").await.status(), 409);
    assert_eq!(hub.get("/api/v1/models/no-such-model", &hub.admin).await.status(), 404);
    // A standby kept warm for an hour, so the operator rollback below has one.
    let extra = "[rollout]\nstandby_bake_seconds = 3600\n";
    let agent = start_agent_with(&tmp.join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0") && v.connected).await.unwrap();

    let http = reqwest::Client::new();
    let url = format!("http://{}/v2/models/digits/infer", agent.inference_addr.unwrap());
    let ok = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64]}]});
    let bad = json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.5; 63]}]});
    let infer = async |n: usize| {
        for _ in 0..n {
            assert_eq!(http.post(&url).json(&ok).send().await.unwrap().status(), 200);
        }
        assert_eq!(http.post(&url).json(&bad).send().await.unwrap().status(), 400);
    };
    infer(20).await;

    hub.deploy("digits", "2.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| v.models.iter().any(|m| m.standby_version.as_deref() == Some("1.0.0"))).await.unwrap();
    infer(20).await;
    let socket = agent.control_socket.clone();
    let done = tokio::task::spawn_blocking(move || sentinel_agent::cli::rollback(&socket, "digits")).await.unwrap();
    assert_eq!(done.unwrap(), "digits: 2.0.0 rolled back; 1.0.0 is active again");
    infer(5).await;

    // One flipped byte in the hub's copy of another model: the agent's
    // download and its verification fail.
    hub.push("tampered", "1.0.0", V3, "").await;
    let blob = hub.blob_path(&sha256_hex(&model_bytes(V3)));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    hub.deploy("tampered", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| status(v, "tampered").is_some_and(|s| s.0 == "refused")).await.unwrap();
    (hub, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_rule_works_on_a_real_prometheus() {
    // Fail before starting anything when the tools are missing.
    tool("prometheus");
    tool("promtool");
    let tmp = tempfile::tempdir().unwrap();
    let (hub, agent) = traffic(tmp.path()).await;
    let hub_target = hub.metrics_url.strip_prefix("http://").unwrap().to_owned();
    let agent_target = agent.metrics_addr.unwrap().to_string();

    // promtool's lint of both expositions: names, units, help, types.
    for (who, url) in
        [("hub", format!("{}/metrics", hub.metrics_url)), ("agent", format!("http://{agent_target}/metrics"))]
    {
        let text = scrape(&url).await;
        let (ok, out) = promtool(&["check", "metrics"], Some(&text));
        println!("$ curl -s {url} | promtool check metrics   # the {who}: exit {}\n{out}", i32::from(!ok));
        assert!(ok && out.trim().is_empty(), "promtool check metrics on the {who}'s /metrics:\n{out}\n{text}");
    }

    let rules = sentinel_testkit::bins::workspace_root().join("monitoring/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: [{rules:?}]\n\
         scrape_configs:\n\
         \x20 - job_name: sentinel-hub\n    static_configs: [{{targets: [{hub_target:?}]}}]\n\
         \x20 - job_name: sentinel-agent\n    static_configs: [{{targets: [{agent_target:?}]}}]\n",
        rules = rules.display().to_string(),
    );
    let prom_dir = tmp.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = Prometheus::start(&prom_dir, &config);

    prom.wait_for("both targets up", async |p| {
        let targets = p.api("targets", &[]).await?;
        let active = targets["activeTargets"].as_array()?;
        (active.len() == 2 && active.iter().all(|t| t["health"] == "up")).then_some(())
    })
    .await;
    // Enough scrapes of each target inside the rate window for every rate()
    // and increase() to have samples.
    let scraped = format!("min(count_over_time(up[{RATE_INTERVAL}]))");
    prom.wait_for("5 scrapes of each target in the rate window", async |p| {
        let r = p.query(&scraped).await.ok()?;
        let n: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
        (n >= 5.0).then_some(())
    })
    .await;

    // The dashboard's variables as Grafana fills them in with one hub, one
    // agent and one model selected.
    let values: BTreeMap<&str, String> = [
        ("hub", grafana_regex(&hub_target)),
        ("instance", grafana_regex(&agent_target)),
        ("model", "digits".to_owned()),
        ("__rate_interval", RATE_INTERVAL.to_owned()),
        ("__interval", "1s".to_owned()),
        // The dashboard's time range: longer than the test.
        ("__range", "1h".to_owned()),
    ]
    .into();
    let variable_picks = [("hub", hub_target.as_str()), ("instance", agent_target.as_str()), ("model", "digits")];

    let dash = dashboard();
    let mut table = Vec::new();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for q in queries(&dash) {
        // A variable's query is stored twice (`query` and `definition`).
        if !seen.insert((q.at.clone(), q.expr.clone())) {
            continue;
        }
        let refs = scan(&q.expr).unwrap();
        let names: Vec<&str> = refs.selectors.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = names.iter().all(|n| FED.contains(n));
        // A variable query is `label_values(selector, label)`: Prometheus
        // answers it as the label's values on that selector's series.
        let (expr, variable) = match q.at.strip_prefix("variable $") {
            Some(var) => {
                expected = true;
                (format!("group by ({}) ({})", q.needs[0], substitute(&q.expr, &values)), Some(var.to_owned()))
            }
            None => (substitute(&q.expr, &values), None),
        };
        match prom.query(&expr).await {
            Err(e) => problems.push(format!("{}: {e} (in {expr:?})", q.at)),
            Ok(result) => {
                if expected && result.is_empty() {
                    problems.push(format!("{}: no series, though the test fed its metrics (in {expr:?})", q.at));
                }
                if let Some(var) = &variable {
                    let seen: Vec<&str> =
                        result.iter().filter_map(|s| s["metric"][q.needs[0].as_str()].as_str()).collect();
                    let (_, pick) = variable_picks.iter().find(|(v, _)| v == var).unwrap();
                    if !seen.contains(pick) {
                        problems.push(format!("{}: offers {seen:?}, not {pick:?}", q.at));
                    }
                }
                table.push((result.len(), expected, q.at.clone(), expr));
            }
        }
    }
    println!("\nresults  expected  where  expression");
    for (n, expected, at, expr) in &table {
        println!("{n:>7}  {:<8}  {at}  {expr}", if *expected { "yes" } else { "-" });
    }
    assert!(problems.is_empty(), "on a real Prometheus:\n{}", problems.join("\n"));
    assert!(table.len() >= 20, "only {} queries evaluated", table.len());

    // The alert rules load, are evaluated without error, and every metric
    // they name is really exported by the hub or the agent.
    let alerts = alert_names();
    prom.wait_for("every alert rule loaded and evaluated", async |p| {
        let data = p.api("rules", &[]).await?;
        let rules: Vec<&Value> =
            data["groups"].as_array()?.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
        (rules.len() == alerts.len() && rules.iter().all(|r| r["health"] == "ok" && r["type"] == "alerting"))
            .then_some(())
    })
    .await;
    let data = prom.api("rules", &[]).await.unwrap();
    let mut missing = Vec::new();
    for rule in data["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()) {
        let (name, query) = (rule["name"].as_str().unwrap(), rule["query"].as_str().unwrap());
        let metrics: std::collections::BTreeSet<String> =
            scan(query).unwrap().selectors.into_iter().map(|(m, _)| m).collect();
        for metric in metrics {
            let n = prom.query(&format!("group({metric})")).await.unwrap().len();
            println!("alert {name}: {metric}: {n} series");
            if n == 0 {
                missing.push(format!("{name}: {metric} has no series"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    agent.shutdown().await;
}
