//! `sentinel device enroll NAME --agent-config FILE`: an enrolment that
//! leaves the device ready to run, with an agent config `sentinel-agent`
//! takes as it is and the device's token in a file beside it.
//!
//! Whatever can be checked is checked before the hub is asked to enrol, so
//! that a refusal leaves nothing behind: the files do not exist yet (or
//! `--force`), their directory takes new files (both are created there as
//! empty temporary files), and the hub's keys and device URL are read and
//! fit an agent. After the enrolment only the writes are left; if one
//! fails, the message says the device is enrolled and where its token is,
//! since the hub never shows a token twice.
//!
//! The config's `hub_url` is the hub's `--public-url` when it has one (`GET
//! /api/v1/keys` says), else the URL this CLI reached it at. No `grpc_url`
//! is written unless asked for: the hub serves gRPC on its REST port, and
//! the agent streams from `hub_url` by default.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tempfile::NamedTempFile;

use super::CliError;
use super::args::EnrollArgs;

/// What `--agent-config` writes: the two paths and, held open until the
/// enrolment succeeds, a temporary file beside each.
#[derive(Debug)]
pub(super) struct AgentFiles {
    config: PathBuf,
    token: PathBuf,
    config_tmp: NamedTempFile,
    token_tmp: NamedTempFile,
    force: bool,
}

/// The token file beside `config`: `<stem>.token`.
fn token_path(config: &Path) -> Result<PathBuf, CliError> {
    let stem = config.file_stem().filter(|s| !s.is_empty()).ok_or_else(|| {
        CliError::Usage(format!("--agent-config {} names no file (e.g. edge-1/agent.toml)", config.display()))
    })?;
    let mut name = stem.to_owned();
    name.push(".token");
    let token = config.with_file_name(name);
    if token == config {
        return Err(CliError::Usage(format!(
            "--agent-config {} would also be its own token file: give the config another name (e.g. agent.toml)",
            config.display()
        )));
    }
    Ok(token)
}

/// The directory `path` is in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

impl AgentFiles {
    /// Checks that both files may be written, before anything is enrolled:
    /// neither exists (unless `force`, and even then neither is a
    /// directory), and their directory exists and takes a new file.
    pub(super) fn prepare(config: &Path, force: bool) -> Result<Self, CliError> {
        let token = token_path(config)?;
        let dir = dir_of(config);
        if !dir.is_dir() {
            return Err(CliError::Usage(format!(
                "the directory of --agent-config, {}, does not exist: create it first; nothing was enrolled",
                dir.display()
            )));
        }
        for path in [config, token.as_path()] {
            if path.is_dir() {
                return Err(CliError::Usage(format!("{} is a directory; nothing was enrolled", path.display())));
            }
            if !force && std::fs::symlink_metadata(path).is_ok() {
                return Err(CliError::Usage(format!(
                    "{} exists: pass --force to replace it, or choose another --agent-config; nothing was enrolled",
                    path.display()
                )));
            }
        }
        let tmp = |what: &str| {
            tempfile::Builder::new().prefix(&format!(".{what}-")).tempfile_in(dir).map_err(|source| {
                CliError::WriteFile {
                    message: format!("cannot write a file into {}; nothing was enrolled", dir.display()),
                    source,
                }
            })
        };
        let config_tmp = tmp("agent-config")?;
        let token_tmp = tmp("token")?;
        Ok(Self { config: config.to_owned(), token, config_tmp, token_tmp, force })
    }

    /// Writes the token (mode 0600), then the config, each to its temporary
    /// file first, synced, then renamed into place. Called once the device
    /// is enrolled: a failure says so, and `token_lost` is true when the
    /// token reached no file (the caller then prints it).
    pub(super) fn write(self, device: &str, token: &str, config: &str) -> Result<(), (CliError, bool)> {
        let Self { config: config_path, token: token_path, config_tmp, token_tmp, force } = self;
        let enrolled = |what: String| {
            move |source| CliError::WriteFile { message: format!("device {device} is enrolled, but {what}"), source }
        };
        let token_failed = enrolled(format!(
            "writing its token to {} failed; the token is printed on stdout and is not shown again: store it \
             yourself, or `sentinel device remove {device}` and enrol it again",
            token_path.display()
        ));
        // Created 0600 by tempfile; said again, as it is the point.
        commit(token_tmp, &token_path, format!("{token}\n").as_bytes(), 0o600, force)
            .map_err(|e| (token_failed(e), true))?;
        let config_failed = enrolled(format!(
            "its token is in {} and writing {} failed: write the config by hand (README, \"Running the \
             agent\"), or `sentinel device remove {device}` and enrol it again with --force",
            token_path.display(),
            config_path.display()
        ));
        commit(config_tmp, &config_path, config.as_bytes(), 0o644, force).map_err(|e| (config_failed(e), false))?;
        let dir = std::fs::File::open(dir_of(&config_path)).and_then(|d| d.sync_all());
        if let Err(e) = dir {
            // Both files are in place; only their durability across a crash is in doubt.
            eprintln!("warning: syncing {}: {e}", dir_of(&config_path).display());
        }
        Ok(())
    }

    pub(super) fn config(&self) -> &Path {
        &self.config
    }

    pub(super) fn token(&self) -> &Path {
        &self.token
    }
}

/// Writes `bytes` into `tmp`, syncs it, sets `mode` and renames it to
/// `path`: over an existing file only when `force`.
fn commit(mut tmp: NamedTempFile, path: &Path, bytes: &[u8], mode: u32, force: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    let persisted = if force { tmp.persist(path) } else { tmp.persist_noclobber(path) };
    persisted.map(drop).map_err(|e| e.error)
}

/// Whether an `http://` URL stays on this machine, where the agent allows
/// plain text (as its own config check decides).
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks a URL the agent will be given, as the agent's config check does:
/// `https://`, or `http://` on loopback only.
fn check_agent_url(what: &str, url: &str) -> Result<(), CliError> {
    let refuse = |why: String| CliError::Usage(format!("{what} {url:?} {why}; nothing was enrolled"));
    let parsed = reqwest::Url::parse(url).map_err(|e| refuse(format!("is not a URL ({e})")))?;
    match parsed.scheme() {
        "https" if parsed.host().is_some() => Ok(()),
        "http" if is_loopback(&parsed) => Ok(()),
        "http" => Err(refuse(
            "is plain text off loopback, which sentinel-agent refuses: give the hub TLS and an https:// URL, \
             or write the config by hand with transport = \"insecure-plaintext\""
                .into(),
        )),
        _ => Err(refuse("must be an https:// URL (http:// only on loopback)".into())),
    }
}

/// The hub's facts a device needs, from `GET /api/v1/keys`: its URL for
/// devices (`public_url`, else `reached_at`) and its public keys, the active
/// one first.
pub(super) fn hub_facts(keys: &Value, reached_at: &str) -> Result<(String, Vec<String>), CliError> {
    let url = keys["public_url"].as_str().filter(|u| !u.is_empty()).unwrap_or(reached_at).to_owned();
    check_agent_url("the hub's URL for devices", &url)?;
    let mut list: Vec<&Value> = keys["keys"].as_array().map(|ks| ks.iter().collect()).unwrap_or_default();
    list.sort_by_key(|k| k["active"] != json!(true));
    let pins: Vec<String> = list.iter().filter_map(|k| k["public_key"].as_str()).map(str::to_owned).collect();
    if pins.is_empty() {
        return Err(CliError::Usage("the hub lists no public keys to pin; nothing was enrolled".into()));
    }
    Ok((url, pins))
}

/// Checks `--grpc-url` before anything is enrolled.
pub(super) fn check_grpc_url(url: Option<&str>) -> Result<(), CliError> {
    url.map_or(Ok(()), |u| check_agent_url("--grpc-url", u))
}

/// A TOML string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The agent config: what `sentinel-agent run --config FILE` needs and
/// nothing it would default anyway.
pub(super) fn agent_toml(a: &EnrollArgs, hub_url: &str, pins: &[String], token_file: &Path, labels: &Value) -> String {
    let token_name = token_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = format!(
        "# sentinel-agent config for device {name}, written by `sentinel device enroll`.\n\
         # Every field: README, \"Running the agent\". Check it: sentinel-agent check-config --config FILE\n\
         device_id = {id}\n\
         hub_url = {hub}\n",
        name = a.name,
        id = quoted(&a.name),
        hub = quoted(hub_url),
    );
    match &a.grpc_url {
        Some(g) => out.push_str(&format!("grpc_url = {}\n", quoted(g.trim_end_matches('/')))),
        None => out.push_str("# grpc_url: hub_url (the hub serves gRPC on its REST port)\n"),
    }
    let pins: Vec<String> = pins.iter().map(|p| quoted(p)).collect();
    out.push_str(&format!(
        "token_file = {}   # beside this file, mode 0600\n\
         pinned_keys = [{}]   # the hub's public keys, the active one first; keep old ones across a rotation\n\
         state_dir = {}\n",
        quoted(&token_name),
        pins.join(", "),
        quoted(&a.state_dir.to_string_lossy()),
    ));
    let labels: BTreeMap<String, String> =
        labels.as_object().into_iter().flatten().map(|(k, v)| (k.clone(), super::commands::s(v))).collect();
    if !labels.is_empty() {
        out.push_str("\n# The labels the device was enrolled with; the hub's copy is the one deployments target.\n");
        out.push_str("[labels]\n");
        for (k, v) in &labels {
            out.push_str(&format!("{} = {}\n", quoted(k), quoted(v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_is_the_configs_stem_beside_it() {
        assert_eq!(token_path(Path::new("edge-1/agent.toml")).expect("path"), Path::new("edge-1/agent.token"));
        assert_eq!(token_path(Path::new("edge.conf")).expect("path"), Path::new("edge.token"));
        assert_eq!(token_path(Path::new("agent")).expect("path"), Path::new("agent.token"));
        let e = token_path(Path::new("x/agent.token")).expect_err("its own token file").to_string();
        assert!(e.contains("would also be its own token file"), "{e}");
    }

    #[test]
    fn urls_the_agent_would_refuse_are_refused_first() {
        for ok in ["https://hub.example:8443", "http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:8080"] {
            check_agent_url("url", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("http://10.0.0.5:8080", "plain text off loopback"),
            ("ftp://hub.example", "must be an https:// URL"),
            ("hub.example:8080", "must be an https:// URL"),
            ("not a url", "is not a URL"),
        ] {
            let e = check_agent_url("url", bad).expect_err(bad).to_string();
            assert!(e.contains(why) && e.ends_with("nothing was enrolled"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_hub_public_url_wins_and_the_active_key_comes_first() {
        let keys = json!({"keys": [{"public_key": "old", "active": false}, {"public_key": "new", "active": true}],
                          "public_url": "https://hub.example"});
        let (url, pins) = hub_facts(&keys, "http://127.0.0.1:8080").expect("facts");
        assert_eq!((url.as_str(), pins), ("https://hub.example", vec!["new".to_owned(), "old".to_owned()]));
        let keys = json!({"keys": [{"public_key": "k", "active": true}], "public_url": null});
        assert_eq!(hub_facts(&keys, "http://127.0.0.1:8080").expect("facts").0, "http://127.0.0.1:8080");
    }
}
