//! `sentinel device`, `sentinel token`, `sentinel publisher` and `sentinel hub`:
//! enrolling and inspecting devices, managing API tokens and publisher keys,
//! and the hub's signing keys.

use reqwest::Method;
use serde_json::{Value, json};

use super::CliError;
use super::args::{DeviceCommand, EnrollArgs, HubCommand, PublisherCommand, TokenCommand};
use super::client::HubClient;
use super::commands::{Out, s, table, time, wrapped_table};

fn labels_text(v: &Value) -> String {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into())
}

fn running_text(models: &Value) -> String {
    models
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| format!("{} {} ({})", s(&m["name"]), s(&m["version"]), s(&m["state"])))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// A rollout decision's evidence in a line: the new slot against the old
/// on compute p95 and feedback accuracy, and how fast traffic moved back.
fn evidence_text(e: &Value) -> Option<String> {
    let e = e.as_object()?;
    let (new, old) = (&e.get("candidate")?, e.get("baseline"));
    let p95 = |w: &Value| w["p95_ms"].as_f64().map(|p| format!("{p:.2} ms"));
    #[allow(clippy::cast_precision_loss)] // display only
    let acc = |w: &Value| {
        let total = w["feedback_total"].as_u64().filter(|t| *t > 0)?;
        let correct = w["feedback_correct"].as_u64().unwrap_or(0);
        Some(format!("{:.1}% of {total}", 100.0 * correct as f64 / total as f64))
    };
    let versus = |what: &str, f: &dyn Fn(&Value) -> Option<String>| {
        let n = f(new)?;
        Some(match old.and_then(f) {
            Some(o) => format!("{what} {n} vs {o}"),
            None => format!("{what} {n}"),
        })
    };
    let mut parts: Vec<String> =
        [versus("compute p95", &p95), versus("accuracy", &acc)].into_iter().flatten().collect();
    if let Some(us) = e.get("switch_us").and_then(Value::as_u64).filter(|_| e.get("kind").is_some_and(|k| k != "")) {
        parts.push(format!("switched back in {us} µs"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn device_rows(list: &[Value]) -> Vec<Vec<String>> {
    list.iter()
        .map(|d| {
            vec![
                s(&d["id"]),
                labels_text(&d["labels"]),
                s(&d["hardware"]),
                if d["connected"] == json!(true) { "connected".into() } else { "offline".into() },
                time(&d["last_seen_ms"]),
                s(&d["applied_revision"]),
                running_text(&d["models"]),
            ]
        })
        .collect()
}

const DEVICE_HEADER: [&str; 7] = ["DEVICE", "LABELS", "HARDWARE", "STREAM", "LAST SEEN", "REVISION", "RUNNING"];

pub(super) async fn device(client: &HubClient, out: &Out, cmd: DeviceCommand) -> Result<(), CliError> {
    match cmd {
        DeviceCommand::Enroll(a) => enroll(client, out, a).await?,
        DeviceCommand::List => {
            // One page of the most a page holds; the total says if there are more.
            let v = client.get("/api/v1/devices?limit=500").await?;
            out.print(&v, |v| {
                let devices = v["devices"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                let mut text = table(&DEVICE_HEADER, device_rows(devices)).to_string();
                if v["total"].as_u64().is_some_and(|t| t > devices.len() as u64) {
                    text.push_str(&format!("(the first {} of {} devices)\n", devices.len(), v["total"]));
                }
                text
            });
        }
        DeviceCommand::Show { id } => {
            let v = client.get(&format!("/api/v1/devices/{id}")).await?;
            out.print(&v, |v| {
                let desired = v["desired"]
                    .as_array()
                    .map(|ds| {
                        ds.iter()
                            .map(|d| {
                                format!(
                                    "{} {} (deployment {})",
                                    s(&d["model"]),
                                    s(&d["version"]),
                                    s(&d["deployment_id"])
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "-".into());
                let events: Vec<Vec<String>> = v["events"]
                    .as_array()
                    .map(|es| {
                        es.iter()
                            .take(20)
                            .map(|e| {
                                vec![
                                    time(&e["at_ms"]),
                                    s(&e["kind"]),
                                    s(&e["model"]),
                                    s(&e["version"]),
                                    match evidence_text(&e["evidence"]) {
                                        Some(why) => format!("{} ({why})", s(&e["reason"])),
                                        None => s(&e["reason"]),
                                    },
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                // The list's columns as lines, each whole however long.
                let row = device_rows(std::slice::from_ref(v)).pop().unwrap_or_default();
                let mut text: String = DEVICE_HEADER
                    .iter()
                    .zip(&row)
                    .map(|(h, cell)| format!("{:<10} {cell}\n", h.to_lowercase()))
                    .collect();
                text.push_str(&format!("{:<10} {desired}\n", "desired"));
                text + &wrapped_table(&["AT", "EVENT", "MODEL", "VERSION", "REASON"], events).to_string()
            });
        }
        DeviceCommand::Remove { id } => {
            client.delete(&format!("/api/v1/devices/{id}")).await?;
            out.print(&json!({"removed": id}), |_| format!("removed device {id}"));
        }
    }
    Ok(())
}

/// `device enroll`: the token on stdout, or with `--agent-config` in a file
/// beside a ready agent config ([`super::enroll`]).
async fn enroll(client: &HubClient, out: &Out, a: EnrollArgs) -> Result<(), CliError> {
    let mut map = serde_json::Map::new();
    for part in a.labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) =
            part.split_once('=').ok_or_else(|| CliError::Usage(format!("--labels part {part:?} is not key=value")))?;
        map.insert(k.trim().to_owned(), Value::String(v.trim().to_owned()));
    }
    // Everything the files need is checked and fetched before the device
    // is enrolled, so a refusal leaves nothing half done.
    let files = match &a.agent_config {
        None => None,
        Some(config) => {
            let files = super::enroll::AgentFiles::prepare(config, a.force)?;
            super::enroll::check_grpc_url(a.grpc_url.as_deref())?;
            let keys = client.get("/api/v1/keys").await?;
            let (hub_url, pins) = super::enroll::hub_facts(&keys, client.base())?;
            Some((files, hub_url, pins))
        }
    };
    let v = client.send_json(Method::POST, "/api/v1/devices", &json!({"id": a.name, "labels": map})).await?;
    // On stderr, so stdout stays the token (or the summary) alone.
    let said = super::commands::warnings(&v);
    if !out.json && !said.is_empty() {
        eprintln!("{}", said.trim_start());
    }
    let Some((files, hub_url, pins)) = files else {
        out.print(&v, |v| s(&v["token"]));
        if !out.json {
            eprintln!(
                "device {} enrolled ({}): store its token now, it is not shown again",
                s(&v["id"]),
                labels_text(&v["labels"])
            );
        }
        return Ok(());
    };
    let (config, token) = (files.config().to_owned(), files.token().to_owned());
    let text = super::enroll::agent_toml(&a, &hub_url, &pins, &token, &v["labels"]);
    if let Err((e, token_lost)) = files.write(&s(&v["id"]), v["token"].as_str().unwrap_or_default(), &text) {
        if token_lost {
            out.print(&v, |v| s(&v["token"]));
        }
        return Err(e);
    }
    let done = json!({"id": v["id"], "labels": v["labels"], "agent_config": config, "token_file": token,
                      "hub_url": hub_url, "warnings": v.get("warnings").cloned().unwrap_or_else(|| json!([]))});
    out.print(&done, |d| {
        format!(
            "enrolled device {} ({})\nwrote {} and its token {} (mode 0600)\nstart the agent: sentinel-agent run --config {}",
            s(&d["id"]),
            labels_text(&d["labels"]),
            config.display(),
            token.display(),
            config.display()
        )
    });
    Ok(())
}

pub(super) async fn token(client: &HubClient, out: &Out, cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create { role, name } => {
            let v = client.send_json(Method::POST, "/api/v1/tokens", &json!({"role": role, "name": name})).await?;
            // The bare token on stdout, so `TOKEN=$(sentinel token create ...)` works.
            out.print(&v, |v| s(&v["token"]));
            if !out.json {
                eprintln!(
                    "token {} ({}, role {}): store it now, it is not shown again",
                    s(&v["id"]),
                    s(&v["name"]),
                    s(&v["role"])
                );
            }
        }
        TokenCommand::List => {
            let v = client.get("/api/v1/tokens?limit=500").await?;
            out.print(&v, |v| {
                let rows = v["tokens"]
                    .as_array()
                    .map(|ts| {
                        ts.iter()
                            .map(|t| {
                                vec![
                                    s(&t["id"]),
                                    s(&t["name"]),
                                    s(&t["role"]),
                                    s(&t["created_by"]),
                                    time(&t["created_at_ms"]),
                                    if t["revoked"] == json!(true) { "revoked".into() } else { "active".into() },
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["ID", "NAME", "ROLE", "BY", "CREATED", "STATUS"], rows).to_string()
            });
        }
        TokenCommand::Revoke { id } => {
            client.delete(&format!("/api/v1/tokens/{id}")).await?;
            out.print(&json!({"revoked": id}), |_| format!("revoked token {id}"));
        }
    }
    Ok(())
}

pub(super) async fn publisher(client: &HubClient, out: &Out, cmd: PublisherCommand) -> Result<(), CliError> {
    let v = match cmd {
        PublisherCommand::Add { name, key } => {
            let pem = read_small(&key, sentinel_proto::publisher::MAX_KEY_BYTES)?;
            let v =
                client.send_json(Method::POST, "/api/v1/publishers", &json!({"name": name, "public_key": pem})).await?;
            out.print(&v, |v| format!("registered publisher {} (key {})", s(&v["name"]), s(&v["key_id"])));
            return Ok(());
        }
        PublisherCommand::Remove { name } => {
            client.delete(&format!("/api/v1/publishers/{name}")).await?;
            out.print(&json!({"removed": name}), |_| format!("removed publisher {name}"));
            return Ok(());
        }
        PublisherCommand::List => client.get("/api/v1/publishers").await?,
    };
    out.print(&v, |v| {
        let rows = v["publishers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                vec![s(&p["name"]), s(&p["algorithm"]), s(&p["key_id"]), s(&p["created_by"]), time(&p["created_at_ms"])]
            })
            .collect();
        table(&["NAME", "ALGORITHM", "KEY ID", "BY", "ADDED"], rows).to_string()
    });
    Ok(())
}

/// Reads a small local file (a key), refusing one over `cap` bytes.
fn read_small(path: &std::path::Path, cap: usize) -> Result<String, CliError> {
    let local = |source| CliError::LocalFile { path: path.display().to_string(), source };
    let len = std::fs::metadata(path).map_err(local)?.len();
    if len > cap as u64 {
        return Err(CliError::Usage(format!("{} is {len} bytes; a public key PEM is at most {cap}", path.display())));
    }
    std::fs::read_to_string(path).map_err(local)
}

pub(super) async fn hub(client: &HubClient, out: &Out, cmd: HubCommand) -> Result<(), CliError> {
    let v = match cmd {
        HubCommand::Key { pin: true } => {
            let v = client.get("/api/v1/keys").await?;
            let mut keys: Vec<&Value> = v["keys"].as_array().map(|ks| ks.iter().collect()).unwrap_or_default();
            // Active first: `pinned_keys = ["$(sentinel hub key --pin | head -1)"]` pins the signing key.
            keys.sort_by_key(|k| k["active"] != json!(true));
            let pins: Vec<String> = keys.iter().map(|k| s(&k["public_key"])).collect();
            out.print(&json!({ "pinned_keys": pins }), |_| pins.join("\n"));
            return Ok(());
        }
        HubCommand::Key { pin: false } => client.get("/api/v1/keys").await?,
        HubCommand::RotateKey => client.send_json(Method::POST, "/api/v1/keys/rotate", &json!({})).await?,
    };
    out.print(&v, |v| {
        // One line per key: `KEY_ID PUBLIC_KEY [active]`, ready to paste into an agent config.
        v["keys"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .map(|k| {
                        let active = if k["active"] == json!(true) { " active" } else { "" };
                        format!("{} {}{active}", s(&k["key_id"]), s(&k["public_key"]))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_reads_as_one_line_new_against_old() {
        let e = json!({"kind": "accuracy", "switch_us": 4,
            "candidate": {"p95_ms": 0.26, "feedback_correct": 60, "feedback_total": 100},
            "baseline": {"p95_ms": 0.25, "feedback_correct": 97, "feedback_total": 100}});
        assert_eq!(
            evidence_text(&e).as_deref(),
            Some("compute p95 0.26 ms vs 0.25 ms; accuracy 60.0% of 100 vs 97.0% of 100; switched back in 4 µs")
        );
        let phase = json!({"kind": "", "candidate": {"p95_ms": 1.0}});
        assert_eq!(evidence_text(&phase).as_deref(), Some("compute p95 1.00 ms"));
        assert_eq!(evidence_text(&Value::Null), None);
    }
}
