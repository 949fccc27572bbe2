//! Dispatch, and one function per `model` and `deployments` command. Each
//! prints a table (or JSON with `--json`); `admin` has the rest.

use std::io::IsTerminal as _;

use comfy_table::{ColumnConstraint, ContentArrangement, Row, Table, Width, presets::UTF8_BORDERS_ONLY};
use reqwest::Method;
use serde_json::{Value, json};

use super::CliError;
use super::admin::{device, hub, publisher, token};
use super::args::{Cli, Command, DeploymentsCommand, ImportCommand, ListArgs, ModelCommand, PushArgs};
use super::client::HubClient;
use super::deploy::{deploy_body, deployment_text, effective_policy_text};

/// Percent-encodes a query value.
pub(super) fn q(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b',') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response's `warnings`, one `warning: ...` line each.
pub(super) fn warnings(v: &Value) -> String {
    v["warnings"].as_array().into_iter().flatten().map(|w| format!("\nwarning: {}", s(w))).collect()
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", q(v)))).collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub(super) fn time(v: &Value) -> String {
    let Some(ms) = v.as_i64() else { return "-".into() };
    format!("{}Z", sentinel_proto::time::utc_datetime(ms))
}

fn size(v: &Value) -> String {
    let Some(n) = v.as_u64() else { return "-".into() };
    match n {
        0..1_024 => format!("{n} B"),
        1_024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// The width tables fit: `COLUMNS` when set (as `ls` reads it), else the
/// terminal's when stdout is one. `None` (piped output without `COLUMNS`):
/// rows are left whole.
fn table_width() -> Option<u16> {
    std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse::<u16>().ok()).filter(|w| *w > 0)
}

fn fitted(header: &[&str], rows: Vec<Vec<String>>, one_line: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_truncation_indicator("…")
        .set_header(header.to_vec());
    if let Some(width) = table_width() {
        t.set_width(width);
    }
    if one_line {
        // The first column is what the matching `show` takes (an id, a
        // name): it is never cut. The others keep room for their header on
        // one line; what is left goes to the longest cells, which are cut.
        // Too narrow for that, the table is wider than asked.
        // A lower boundary counts the cell's padding, one space each side.
        let width = |h: &str| Width::Fixed(u16::try_from(h.chars().count() + 2).unwrap_or(u16::MAX));
        t.set_constraints(header.iter().enumerate().map(|(i, h)| match i {
            0 => ColumnConstraint::ContentWidth,
            _ => ColumnConstraint::LowerBoundary(width(h)),
        }));
    }
    for r in rows {
        let mut row = Row::from(r);
        if one_line {
            row.max_height(1);
        }
        t.add_row(row);
    }
    t
}

/// A list: one line per row, fitted to the width (see [`table_width`]) by
/// cutting long cells short with `…`, all but the first (the id). The
/// matching `show` command has them whole.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) -> Table {
    fitted(header, rows, true)
}

/// One thing shown in full (`show` and what a change answers): long cells
/// wrap to fit the width, and nothing is cut.
pub(super) fn wrapped_table(header: &[&str], rows: Vec<Vec<String>>) -> Table {
    fitted(header, rows, false)
}

/// Prints a command's answer. A reader that went away (`sentinel ... |
/// head`) ends the command quietly, as for any Unix tool, rather than a
/// panic from `println!`.
pub(super) fn emit(text: &str) {
    use std::io::Write as _;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{text}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Where a command's answer goes: JSON with `--json`, else the human text.
pub(super) struct Out {
    pub(super) json: bool,
}

impl Out {
    pub(super) fn print(&self, value: &Value, human: impl FnOnce(&Value) -> String) {
        if self.json {
            emit(&serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            emit(&human(value));
        }
    }
}

pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "sentinel", &mut out);
        emit(String::from_utf8_lossy(&out).trim_end());
        return Ok(());
    }
    let client = HubClient::new(&cli.hub, cli.token.clone())?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Model(cmd) => model(&client, &out, cmd).await,
        Command::Deployments(cmd) => deployments(&client, &out, cmd).await,
        Command::Token(cmd) => token(&client, &out, cmd).await,
        Command::Publisher(cmd) => publisher(&client, &out, cmd).await,
        Command::Device(cmd) => device(&client, &out, cmd).await,
        Command::Hub(cmd) => hub(&client, &out, cmd).await,
        Command::Demo(args) => super::demo::run(args).await.map_err(|e| CliError::Demo(Box::new(e))),
        Command::Completions { .. } => Ok(()),
    }
}

/// Whether a push of a new version of model `v` needs a publisher
/// signature, and who requires it: the hub (of every model) or the model.
fn publisher_requirement(v: &Value) -> String {
    let own = v["require_publisher"] == json!(true);
    match v["require_publisher_source"].as_str() {
        Some("hub") if own => "required by the hub (--require-publisher), and by this model".into(),
        Some("hub") => "required by the hub (--require-publisher), for every model".into(),
        Some(_) => "required by this model".into(),
        // A hub from before the effective requirement was shown says only the model's.
        None if own && v.get("require_publisher_source").is_none() => "required by this model".into(),
        None => "not required".into(),
    }
}

/// `publisher: NAME (key KEY_ID)` for a version pushed with a publisher signature.
fn publisher_line(v: &Value) -> String {
    let p = &v["manifest"]["publisher"];
    if p.is_null() { String::new() } else { format!("\npublisher: {} (key {})", s(&p["name"]), s(&p["key_id"])) }
}

fn version_rows(versions: &Value) -> Vec<Vec<String>> {
    versions
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    let acc = &v["manifest"]["accuracy"];
                    let accuracy =
                        if acc.is_null() { "-".into() } else { format!("{} {}", s(&acc["metric"]), s(&acc["value"])) };
                    vec![
                        s(&v["version"]),
                        s(&v["stage"]),
                        size(&v["size"]),
                        accuracy,
                        s(&v["hardware"]),
                        s(&v["sha256"]).chars().take(12).collect(),
                        s(&v["key_id"]),
                        time(&v["created_at_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

const VERSION_HEADER: [&str; 8] = ["VERSION", "STAGE", "SIZE", "ACCURACY", "HARDWARE", "SHA256", "KEY", "CREATED"];

fn deployment_rows(list: &[Value]) -> Vec<Vec<String>> {
    list.iter()
        .map(|d| {
            vec![
                s(&d["id"]),
                s(&d["model"]),
                s(&d["version"]),
                if s(&d["target"]) == "-" { "(all devices)".into() } else { s(&d["target"]) },
                s(&d["kind"]),
                s(&d["state"]),
                s(&d["created_by"]),
                time(&d["created_at_ms"]),
            ]
        })
        .collect()
}

const DEPLOYMENT_HEADER: [&str; 8] = ["ID", "MODEL", "VERSION", "TARGET", "KIND", "STATE", "BY", "CREATED"];

async fn push(client: &HubClient, out: &Out, a: PushArgs) -> Result<(), CliError> {
    let progress = !out.json && std::io::stderr().is_terminal();
    let v = push_version(client, a, progress).await?;
    out.print(&v, |v| {
        format!(
            "pushed {} {}: sha256 {} ({}), signed by {}\n{}",
            s(&v["model"]),
            s(&v["version"]),
            s(&v["sha256"]),
            size(&v["size"]),
            s(&v["key_id"]),
            wrapped_table(&VERSION_HEADER, version_rows(&json!([v])))
        ) + &publisher_line(v)
            + &warnings(v)
    });
    Ok(())
}

/// Registers the model name if needed and uploads one version, returning
/// the hub's record of it: `model push`, and each version `model import` pushes.
pub(super) async fn push_version(client: &HubClient, a: PushArgs, progress: bool) -> Result<Value, CliError> {
    let version = a.version.ok_or_else(|| {
        CliError::Usage("--version is required: a push never picks a version for you (e.g. --version 1.0.0)".into())
    })?;
    if !a.path.is_file() {
        return Err(CliError::LocalFile {
            path: a.path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    // A new name is registered with the version, in one transaction: a
    // refused push registers nothing.
    let path = format!(
        "/api/v1/models/{}/versions{}",
        a.name,
        query(&[
            ("version", Some(version)),
            ("stage", Some(a.stage)),
            ("accuracy", a.accuracy.map(|v| v.to_string())),
            ("metric", a.metric),
            ("dataset", a.dataset),
            ("hardware", a.hardware),
            ("tags", a.tags),
            ("input_shapes", (!a.input_shapes.is_empty()).then(|| serving_shapes_param(&a.input_shapes))),
            ("engine", a.engine),
            ("register", Some("true".to_owned())),
            ("description", (!a.description.is_empty()).then_some(a.description)),
        ])
    );
    let validation = match &a.validation_set {
        None => None,
        Some(dir) => {
            let (inputs, labels) = (dir.join("inputs.bin"), dir.join("labels.bin"));
            for p in [&inputs, &labels] {
                if !p.is_file() {
                    return Err(CliError::Usage(format!(
                        "--validation-set {} must hold inputs.bin and labels.bin; {} is missing",
                        dir.display(),
                        p.display()
                    )));
                }
            }
            Some((inputs, labels))
        }
    };
    if let Some(sig) = &a.signature
        && !sig.is_file()
    {
        return Err(CliError::LocalFile {
            path: sig.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let v = if validation.is_none() && a.signature.is_none() {
        client.upload_file(&path, &a.path, progress).await?
    } else {
        let validation = validation.as_ref().map(|(i, l)| (i.as_path(), l.as_path()));
        client.upload_multipart(&path, &a.path, validation, a.signature.as_deref(), progress).await?
    };
    Ok(v)
}

async fn list(client: &HubClient, out: &Out, a: ListArgs) -> Result<(), CliError> {
    let v = client
        .get(&format!(
            "/api/v1/models{}",
            query(&[
                ("name", a.name),
                ("stage", a.stage),
                ("hardware", a.hardware),
                ("limit", a.limit.map(|n| n.to_string())),
                ("offset", a.offset.map(|n| n.to_string())),
            ])
        ))
        .await?;
    out.print(&v, |v| {
        let models = v["models"].as_array().cloned().unwrap_or_default();
        let rows = models
            .iter()
            .map(|m| {
                vec![
                    s(&m["name"]),
                    s(&m["latest_version"]),
                    s(&m["version_count"]),
                    s(&m["tags"]),
                    s(&m["description"]),
                    time(&m["updated_at_ms"]),
                ]
            })
            .collect();
        format!(
            "{}\n{} of {} models",
            table(&["NAME", "LATEST", "VERSIONS", "TAGS", "DESCRIPTION", "UPDATED"], rows),
            models.len(),
            s(&v["total"])
        )
    });
    Ok(())
}

async fn model(client: &HubClient, out: &Out, cmd: ModelCommand) -> Result<(), CliError> {
    match cmd {
        ModelCommand::Push(a) => push(client, out, *a).await,
        ModelCommand::Import(ImportCommand::Mlflow(a)) => super::mlflow::import(client, out, *a).await,
        ModelCommand::List(a) => list(client, out, a).await,
        ModelCommand::Show { name } => {
            let v = client.get(&format!("/api/v1/models/{name}")).await?;
            out.print(&v, |v| {
                format!(
                    "{}: {}\ntags: {}\npublisher signature: {}\n{}",
                    s(&v["name"]),
                    s(&v["description"]),
                    s(&v["tags"]),
                    publisher_requirement(v),
                    wrapped_table(&VERSION_HEADER, version_rows(&v["versions"]))
                )
            });
            Ok(())
        }
        ModelCommand::Deploy(a) => {
            let body = deploy_body(&a)?;
            // What devices will apply, defaults filled in, before it is sent;
            // the hub's answer names any field it refuses.
            let version = s(&body["version"]);
            let declared = match client.get(&format!("/api/v1/models/{}/versions/{version}", a.name)).await {
                Ok(v) => v["manifest"]["accuracy"]["value"].as_f64(),
                Err(_) => None,
            };
            if let Some(text) = effective_policy_text(&body, declared) {
                eprintln!("effective policy: {text}");
            }
            let v = client.send_json(Method::POST, &format!("/api/v1/models/{}/deploy", a.name), &body).await?;
            // The hub's warnings (e.g. a version with open dims) under the table.
            out.print(&v, |v| {
                wrapped_table(&DEPLOYMENT_HEADER, deployment_rows(std::slice::from_ref(v))).to_string() + &warnings(v)
            });
            Ok(())
        }
        ModelCommand::Rollback { name, version, target } => {
            let v = client
                .send_json(
                    Method::POST,
                    &format!("/api/v1/models/{name}/rollback"),
                    &json!({"version": version, "target": target}),
                )
                .await?;
            out.print(&v, |v| {
                wrapped_table(&DEPLOYMENT_HEADER, deployment_rows(std::slice::from_ref(v))).to_string() + &warnings(v)
            });
            Ok(())
        }
        ModelCommand::Update { name, description, require_publisher } => {
            let body = json!({"description": description, "require_publisher": require_publisher});
            let v = client.send_json(Method::PUT, &format!("/api/v1/models/{name}"), &body).await?;
            out.print(&v, |v| {
                format!(
                    "{}: {}\npublisher signature: {}",
                    s(&v["name"]),
                    s(&v["description"]),
                    publisher_requirement(v)
                )
            });
            Ok(())
        }
        ModelCommand::Delete { name, force } => {
            let suffix = if force { "?force=true" } else { "" };
            client.delete(&format!("/api/v1/models/{name}{suffix}")).await?;
            out.print(&json!({"deleted": name}), |_| format!("deleted model {name}"));
            Ok(())
        }
    }
}

async fn deployments(client: &HubClient, out: &Out, cmd: DeploymentsCommand) -> Result<(), CliError> {
    match cmd {
        DeploymentsCommand::List { model, state, limit } => {
            let v = client
                .get(&format!(
                    "/api/v1/deployments{}",
                    query(&[("model", model), ("state", state), ("limit", limit.map(|n| n.to_string()))])
                ))
                .await?;
            out.print(&v, |v| {
                let list = v["deployments"].as_array().cloned().unwrap_or_default();
                format!(
                    "{}\n{} of {} deployments",
                    table(&DEPLOYMENT_HEADER, deployment_rows(&list)),
                    list.len(),
                    s(&v["total"])
                )
            });
        }
        DeploymentsCommand::Show { id } => {
            let v = client.get(&format!("/api/v1/deployments/{id}")).await?;
            // The telemetry is for people; `--json` keeps the one answer.
            let telemetry =
                if out.json { None } else { Some(client.get(&format!("/api/v1/deployments/{id}/telemetry")).await?) };
            out.print(&v, |v| {
                format!(
                    "{}\n{}{}",
                    wrapped_table(&DEPLOYMENT_HEADER, deployment_rows(std::slice::from_ref(v))),
                    deployment_text(v),
                    telemetry.as_ref().map(super::deploy::telemetry_text).unwrap_or_default()
                )
            });
        }
    }
    Ok(())
}

/// `--input-shape` values as the hub's `input_shapes` parameter: `;`-joined,
/// with the spaces a shell user may type around the name and dims dropped.
fn serving_shapes_param(shapes: &[String]) -> String {
    let one = |s: &String| match s.split_once('=') {
        Some((name, dims)) => {
            let dims: Vec<&str> = dims.split(',').map(str::trim).collect();
            format!("{}={}", name.trim(), dims.join(","))
        }
        None => s.trim().to_owned(),
    };
    shapes.iter().map(one).collect::<Vec<_>>().join(";")
}
