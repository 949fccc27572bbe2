//! `sentinel model import mlflow`: registered model versions from an MLflow
//! tracking server, each pushed through the same client path as `sentinel
//! model push`, so the hub inspects, signs and audits it like any push.
//!
//! The CLI does the reading, not the hub: the hub then needs no network path
//! to MLflow nor its credentials, and an import is just a publisher's pushes.
//!
//! For each selected version: its artifacts are found through the server
//! (`get-download-uri`, then `runs:`/`models:` URIs resolved to the artifact
//! proxy), the ONNX file is chosen ([`artifacts::choose_onnx`]), streamed to a
//! temporary file under a size cap while hashed, and compared with what the
//! hub holds ([`mapping::decide`]): a version tagged `mlflow.version=N` with
//! the same sha256 is already present, with another sha256 it is refused.
//!
//! # Layout
//! - [`rest`]: MLflow's REST API and artifact proxy, every answer bounded.
//! - [`artifacts`]: artifact URIs, the `MLmodel` onnx flavor, the ONNX file choice.
//! - [`mapping`]: semver, stage, tags and accuracy of an imported version, and
//!   whether the hub already has it.

pub mod artifacts;
pub mod mapping;
pub mod rest;

use std::io::IsTerminal as _;

use serde_json::{Value, json};

pub use rest::MlflowError;

use self::artifacts::{ArtifactUri, Listed, choose_onnx, join, onnx_data_path, parse_artifact_uri, signature_beside};
use self::mapping::{Decision, Existing, decide, sentinel_stage, sentinel_tags, sentinel_version};
use self::rest::{MlflowClient, ModelVersion};
use super::CliError;
use super::args::{MlflowImportArgs, PushArgs};
use super::client::HubClient;
use super::commands::{Out, push_version, q, s};
use sentinel_proto::publisher::MAX_BUNDLE_BYTES;

/// The largest artifact downloaded: the hub's default upload limit (a hub
/// configured lower refuses the push itself, naming its limit).
const MAX_ARTIFACT_BYTES: u64 = crate::config::DEFAULT_MAX_UPLOAD_BYTES;
/// The largest `MLmodel` file read.
const MAX_MLMODEL_BYTES: usize = 256 * 1024;
/// Bounds on walking a version's artifact directory.
const MAX_DEPTH: usize = 4;
const MAX_FILES: usize = 1_000;
/// How many `models:/NAME/VERSION` sources are followed, one to the next.
const MAX_HOPS: usize = 4;

/// What became of one MLflow version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Imported,
    Present,
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Imported => "imported",
            Outcome::Present => "already_present",
            Outcome::Refused => "refused",
        }
    }
}

/// One line of the report.
#[derive(Debug)]
struct Report {
    mlflow_version: String,
    outcome: Outcome,
    version: Option<String>,
    sha256: Option<String>,
    accuracy: Option<f64>,
    /// The publisher whose signature (logged beside the model) the hub verified.
    publisher: Option<String>,
    reason: Option<String>,
    warnings: Vec<String>,
}

impl Report {
    /// `mv`'s report with `outcome` and nothing else known yet.
    fn of(mv: &ModelVersion, outcome: Outcome) -> Self {
        Report {
            mlflow_version: mv.version.clone(),
            outcome,
            version: None,
            sha256: None,
            accuracy: None,
            publisher: None,
            reason: None,
            warnings: Vec::new(),
        }
    }

    fn refused(mv: &ModelVersion, reason: String) -> Self {
        Report { reason: Some(reason), ..Report::of(mv, Outcome::Refused) }
    }

    fn to_json(&self) -> Value {
        json!({
            "mlflow_version": self.mlflow_version,
            "outcome": self.outcome.as_str(),
            "version": self.version,
            "sha256": self.sha256,
            "accuracy": self.accuracy,
            "publisher": self.publisher,
            "reason": self.reason,
            "warnings": self.warnings,
        })
    }
}

/// Runs `sentinel model import mlflow`.
pub(super) async fn import(hub: &HubClient, out: &Out, a: MlflowImportArgs) -> Result<(), CliError> {
    let name = a.name.clone().unwrap_or_else(|| a.model.clone());
    sentinel_proto::manifest::validate_model_name(&name).map_err(|why| {
        CliError::Usage(format!("{name:?} cannot be a Sentinel model name: a model name {why}; choose one with --name"))
    })?;
    let ml = MlflowClient::new(&a.tracking_uri)?;
    let registered = ml.registered_model(&a.model).await?;
    let mut versions = if let Some(v) = &a.version {
        vec![ml.version(&a.model, v).await?]
    } else if let Some(alias) = &a.alias {
        vec![ml.version_by_alias(&a.model, alias).await?]
    } else if let Some(stage) = &a.stage {
        vec![ml.latest_in_stage(&a.model, stage).await?]
    } else {
        let mut all = ml.versions(&a.model).await?;
        all.sort_by_key(|v| v.version.parse::<u64>().unwrap_or(u64::MAX));
        if !a.all {
            all = all.pop().into_iter().collect();
        }
        all
    };
    if versions.is_empty() {
        return Err(MlflowError::NoSuchVersion { model: a.model.clone(), what: "at all".into() }.into());
    }
    versions.dedup_by(|x, y| x.version == y.version);

    let mut existing = hub_versions(hub, &name).await?;
    let progress = !out.json && std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    for mv in &versions {
        let report = match import_one(hub, &ml, &a, &name, &registered.description, mv, &existing, progress).await {
            Ok(r) => r,
            Err(Step::Refused(why)) => Report::refused(mv, why),
            Err(Step::Fatal(e)) => return Err(e),
        };
        if let (Outcome::Imported, Some(version), Some(sha256)) = (report.outcome, &report.version, &report.sha256) {
            // So that two MLflow versions mapped to one Sentinel version in
            // the same run conflict like they would across runs.
            let (tags, _) = sentinel_tags(&a.model, &mv.version, &mv.run_id, &mv.tags);
            existing.push(Existing { version: version.clone(), sha256: sha256.clone(), tags });
        }
        reports.push(report);
    }

    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    let (imported, present, refused) = (count(Outcome::Imported), count(Outcome::Present), count(Outcome::Refused));
    let summary = json!({
        "model": name,
        "mlflow_model": a.model,
        "tracking_uri": a.tracking_uri,
        "imported": imported,
        "already_present": present,
        "refused": refused,
        "versions": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
    });
    out.print(&summary, |_| human(&name, &a.model, &reports, (imported, present, refused)));
    if refused > 0 {
        return Err(CliError::ImportRefused { refused, total: reports.len() });
    }
    Ok(())
}

fn human(name: &str, model: &str, reports: &[Report], (imported, present, refused): (usize, usize, usize)) -> String {
    let mut text = String::new();
    for r in reports {
        let from = format!("MLflow {model} version {}", r.mlflow_version);
        let version = r.version.as_deref().unwrap_or("-");
        match r.outcome {
            Outcome::Imported => {
                let sha = r.sha256.as_deref().unwrap_or("-");
                let acc = r.accuracy.map(|a| format!(", accuracy {a}")).unwrap_or_default();
                let signer = r.publisher.as_ref().map(|p| format!(", signed by publisher {p}")).unwrap_or_default();
                text.push_str(&format!("imported         {name} {version} from {from} (sha256 {sha}{acc}{signer})\n"));
            }
            Outcome::Present => text.push_str(&format!("already present  {name} {version} from {from}\n")),
            Outcome::Refused => {
                let why = r.reason.as_deref().unwrap_or("-");
                text.push_str(&format!("refused          {from}: {why}\n"));
            }
        }
        for w in &r.warnings {
            text.push_str(&format!("warning: {from}: {w}\n"));
        }
    }
    text + &format!("{imported} imported, {present} already present, {refused} refused")
}

/// Why one version stopped: refused (the import goes on with the next) or a
/// failure that stops the whole import (an unreachable server, a bad token).
enum Step {
    Refused(String),
    Fatal(CliError),
}

impl From<MlflowError> for Step {
    fn from(e: MlflowError) -> Self {
        match e {
            MlflowError::Unreachable { .. } | MlflowError::LocalFile { .. } => Step::Fatal(e.into()),
            other => Step::Refused(crate::error_chain(&other)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn import_one(
    hub: &HubClient,
    ml: &MlflowClient,
    a: &MlflowImportArgs,
    name: &str,
    description: &str,
    mv: &ModelVersion,
    existing: &[Existing],
    progress: bool,
) -> Result<Report, Step> {
    if mv.status != "READY" {
        return Err(Step::Refused(format!("its status is {}, not READY", mv.status)));
    }
    let version = sentinel_version(&mv.version, &mv.tags).map_err(Step::Refused)?;
    let root = artifact_root(ml, &a.model, &mv.version).await?;
    let files = walk(ml, &root).await?;
    let data = match files.iter().any(|f| f.path == "MLmodel") {
        true => onnx_data_path(&String::from_utf8_lossy(&ml.read(&join(&root, "MLmodel"), MAX_MLMODEL_BYTES).await?)),
        false => None,
    };
    let onnx = choose_onnx(&files, data.as_deref()).map_err(Step::Refused)?;
    if onnx.size.is_some_and(|n| n > MAX_ARTIFACT_BYTES) {
        return Err(MlflowError::TooLarge { path: onnx.path.clone(), cap: MAX_ARTIFACT_BYTES }.into());
    }
    let tmp = temp_file(".onnx")?;
    let (sha256, _) = ml.download(&join(&root, &onnx.path), tmp.path(), MAX_ARTIFACT_BYTES).await?;

    let (tags, warnings) = sentinel_tags(&a.model, &mv.version, &mv.run_id, &mv.tags);
    match decide(existing, &mv.version, &version, &sha256) {
        Decision::Present(v) => {
            return Ok(Report { version: Some(v), sha256: Some(sha256), ..Report::of(mv, Outcome::Present) });
        }
        Decision::Conflict(why) => return Err(Step::Refused(why)),
        Decision::Push => {}
    }
    // Only what will be pushed needs its run's metric.
    let accuracy = match &a.metric {
        None => None,
        Some(_) if mv.run_id.is_empty() => {
            return Err(Step::Refused("it has no run to read --metric from".into()));
        }
        Some(key) => Some(mapping::accuracy(&ml.run(&mv.run_id).await?.data.metrics, key).map_err(Step::Refused)?),
    };
    // A model-signing bundle logged beside the file goes with it, so a model
    // or hub that requires a publisher signature can be fed from MLflow.
    let signature = match signature_beside(&files, onnx) {
        None => None,
        Some(sig) => {
            let bundle = ml.read(&join(&root, &sig.path), MAX_BUNDLE_BYTES).await?;
            let mut file = temp_file(".sig")?;
            std::io::Write::write_all(&mut file, &bundle).map_err(temp_file_error)?;
            Some(file)
        }
    };
    let push = PushArgs {
        path: tmp.path().to_owned(),
        name: name.to_owned(),
        version: Some(version.clone()),
        stage: sentinel_stage(&mv.current_stage).to_owned(),
        accuracy,
        metric: a.metric.clone().filter(|_| accuracy.is_some()),
        tags: Some(tags.join(",")),
        description: description.to_owned(),
        signature: signature.as_ref().map(|f| f.path().to_owned()),
        ..PushArgs::default()
    };
    match push_version(hub, push, progress).await {
        Ok(v) if s(&v["sha256"]) == sha256 => Ok(Report {
            version: Some(version),
            sha256: Some(sha256),
            accuracy,
            publisher: v["manifest"]["publisher"]["name"].as_str().map(str::to_owned),
            warnings,
            ..Report::of(mv, Outcome::Imported)
        }),
        Ok(v) => Err(Step::Fatal(CliError::Hub {
            status: 200,
            message: format!("the hub stored sha256 {} for a file of sha256 {sha256}", s(&v["sha256"])),
        })),
        // The hub refused this file or version (inspection, a taken version,
        // the upload limit): this version is refused, the next may pass.
        // (MLflow's default onnx flavor, weights in a separate `.data` file,
        // is one: the hub refuses external data itself and says how to log
        // the model instead.)
        Err(CliError::Hub { status: status @ (400 | 409 | 413 | 415 | 422), message }) => {
            Err(Step::Refused(format!("the hub refused it ({status}): {message}")))
        }
        Err(e) => Err(Step::Fatal(e)),
    }
}

/// A temporary file for a downloaded artifact, removed when dropped.
fn temp_file(suffix: &str) -> Result<tempfile::NamedTempFile, Step> {
    tempfile::Builder::new().prefix("sentinel-mlflow-").suffix(suffix).tempfile().map_err(temp_file_error)
}

fn temp_file_error(source: std::io::Error) -> Step {
    Step::Fatal(CliError::LocalFile { path: "a temporary file".into(), source })
}

/// The version's artifact directory as a path under the artifact proxy.
async fn artifact_root(ml: &MlflowClient, model: &str, version: &str) -> Result<String, Step> {
    let mut uri = ml.download_uri(model, version).await?;
    for _ in 0..MAX_HOPS {
        let (base, sub) = match parse_artifact_uri(&uri).map_err(Step::Refused)? {
            ArtifactUri::Proxy { authority: Some(host), .. } if host != ml.authority() => {
                return Err(Step::Refused(format!(
                    "its artifacts are at {uri}, a proxy on another host than the tracking server ({})",
                    ml.authority()
                )));
            }
            ArtifactUri::Proxy { path, .. } => return Ok(path),
            ArtifactUri::Run { run_id, path } => (ml.run(&run_id).await?.info.artifact_uri, path),
            ArtifactUri::LoggedModel { id } => (ml.logged_model_uri(&id).await?, String::new()),
            ArtifactUri::Registered { name, version } => (ml.download_uri(&name, &version).await?, String::new()),
        };
        uri = if sub.is_empty() { base } else { format!("{}/{sub}", base.trim_end_matches('/')) };
    }
    Err(Step::Refused(format!("its artifact URI is still {uri} after following {MAX_HOPS} sources")))
}

/// Every file under `root`, paths relative to it, bounded in depth and count.
async fn walk(ml: &MlflowClient, root: &str) -> Result<Vec<Listed>, Step> {
    let (mut files, mut dirs) = (Vec::new(), vec![(String::new(), 0usize)]);
    while let Some((dir, depth)) = dirs.pop() {
        for f in ml.list(&join(root, &dir)).await? {
            // The proxy lists names relative to the directory asked for.
            let name = f.path.rsplit('/').next().unwrap_or_default();
            if name.is_empty() || name == "." || name == ".." {
                continue;
            }
            let path = join(&dir, name);
            if f.is_dir {
                if depth < MAX_DEPTH {
                    dirs.push((path, depth + 1));
                }
            } else {
                files.push(Listed { path, size: f.size() });
            }
            if files.len() + dirs.len() > MAX_FILES {
                return Err(Step::Refused(format!("its artifacts hold more than {MAX_FILES} files")));
            }
        }
    }
    files.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(files)
}

/// The hub's versions of `name` (none when the model is not registered yet).
async fn hub_versions(hub: &HubClient, name: &str) -> Result<Vec<Existing>, CliError> {
    const LIMIT: u64 = 500;
    let mut out = Vec::new();
    loop {
        let path = format!("/api/v1/models/{}/versions?limit={LIMIT}&offset={}", q(name), out.len());
        let page = match hub.get(&path).await {
            Ok(v) => v,
            Err(CliError::Hub { status: 404, .. }) if out.is_empty() => return Ok(out),
            Err(e) => return Err(e),
        };
        let versions = page["versions"].as_array().cloned().unwrap_or_default();
        let n = versions.len();
        out.extend(versions.iter().map(|v| {
            Existing {
                version: s(&v["version"]),
                sha256: s(&v["sha256"]),
                tags: v["manifest"]["tags"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
            }
        }));
        if n == 0 || out.len() as u64 >= page["total"].as_u64().unwrap_or(0) {
            return Ok(out);
        }
    }
}
