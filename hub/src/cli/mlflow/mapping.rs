//! What an MLflow model version becomes in Sentinel: its semver, stage, tags
//! and declared accuracy, and whether the hub already holds it. Pure.

use super::rest::{Metric, Tag};

/// A version tag that gives the Sentinel version (semver) outright.
pub const SEMVER_TAG: &str = "sentinel.version";
/// The tags every imported version carries; what a re-run looks for.
pub const VERSION_TAG: &str = "mlflow.version";
pub const RUN_TAG: &str = "mlflow.run_id";
pub const MODEL_TAG: &str = "mlflow.model";

/// The hub's limit on one tag (see `api::models::check_tags`).
const MAX_TAG_CHARS: usize = 64;

/// The Sentinel version of MLflow version `version`: the `sentinel.version`
/// tag when the version has one (it must be semver), else `N.0.0` for MLflow's
/// integer version N.
pub fn sentinel_version(version: &str, tags: &[Tag]) -> Result<String, String> {
    if let Some(t) = tags.iter().find(|t| t.key == SEMVER_TAG) {
        let v = t.value.trim();
        return match semver::Version::parse(v) {
            Ok(_) => Ok(v.to_owned()),
            Err(e) => Err(format!("its {SEMVER_TAG} tag {v:?} is not semver (e.g. 1.2.0): {e}")),
        };
    }
    match version.parse::<u64>() {
        Ok(n) => Ok(format!("{n}.0.0")),
        Err(_) => Err(format!("its version {version:?} is not an integer; give it a {SEMVER_TAG} tag")),
    }
}

/// The Sentinel stage of a legacy MLflow stage (`None`, `Staging`,
/// `Production`, `Archived`); unknown or absent stages are `development`.
pub fn sentinel_stage(mlflow_stage: &str) -> &'static str {
    match mlflow_stage.to_ascii_lowercase().as_str() {
        "staging" => "staging",
        "production" => "production",
        "archived" => "archived",
        _ => "development",
    }
}

/// The Sentinel tags of a version: its MLflow tags as `key=value` (`key`
/// alone when the value is empty), then `mlflow.version`, `mlflow.run_id` and
/// `mlflow.model`. A tag the hub would refuse (over 64 characters, a comma, a
/// control character) or that would shadow one of those three is left out,
/// with a warning saying so.
pub fn sentinel_tags(model: &str, version: &str, run_id: &str, tags: &[Tag]) -> (Vec<String>, Vec<String>) {
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    for t in tags {
        let tag = if t.value.is_empty() { t.key.clone() } else { format!("{}={}", t.key, t.value) };
        if [VERSION_TAG, RUN_TAG, MODEL_TAG].contains(&t.key.as_str()) {
            warnings.push(format!("MLflow tag {} left out: the import sets it itself", t.key));
        } else if let Err(why) = fits(&tag) {
            warnings.push(format!("MLflow tag {} left out: {why}", t.key));
        } else {
            out.push(tag);
        }
    }
    out.push(format!("{VERSION_TAG}={version}"));
    if !run_id.is_empty() {
        out.push(format!("{RUN_TAG}={run_id}"));
    }
    let model_tag = format!("{MODEL_TAG}={model}");
    match fits(&model_tag) {
        Ok(()) => out.push(model_tag),
        Err(why) => warnings.push(format!("tag {MODEL_TAG} left out: {why}")),
    }
    // Each tag once, first one kept: the hub stores a list.
    let mut seen = std::collections::HashSet::new();
    out.retain(|t| seen.insert(t.clone()));
    (out, warnings)
}

fn fits(tag: &str) -> Result<(), &'static str> {
    if tag.chars().count() > MAX_TAG_CHARS {
        Err("Sentinel tags are at most 64 characters")
    } else if tag.contains(',') || tag.chars().any(char::is_control) {
        Err("Sentinel tags have no commas or control characters")
    } else {
        Ok(())
    }
}

/// The run metric `key` as a declared accuracy: the latest value (highest
/// step, then timestamp), which must be a fraction between 0 and 1.
pub fn accuracy(metrics: &[Metric], key: &str) -> Result<f64, String> {
    let latest = metrics.iter().filter(|m| m.key == key).max_by_key(|m| (m.step, m.timestamp));
    let Some(m) = latest else {
        let mut have: Vec<&str> = metrics.iter().map(|m| m.key.as_str()).collect();
        have.sort_unstable();
        have.dedup();
        let have = if have.is_empty() { "none".into() } else { have.join(", ") };
        return Err(format!("its run has no metric {key} (it has: {have})"));
    };
    if !m.value.is_finite() || !(0.0..=1.0).contains(&m.value) {
        return Err(format!("its run's metric {key} is {}, not a fraction between 0 and 1", m.value));
    }
    Ok(m.value)
}

/// A version the hub already has, as far as the import cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub version: String,
    pub sha256: String,
    pub tags: Vec<String>,
}

/// What to do with one MLflow version, given the hub's versions of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Push it as the new version.
    Push,
    /// The hub has it already: this Sentinel version, same source, same bytes.
    Present(String),
    /// It cannot be imported; the reason names the versions involved.
    Conflict(String),
}

/// Decides by source version and content: a hub version tagged
/// `mlflow.version=N` with the same sha256 is this one; tagged so with other
/// bytes is a conflict; and the Sentinel version `target` already taken by
/// something else is a conflict too (the hub would refuse the push).
pub fn decide(existing: &[Existing], mlflow_version: &str, target: &str, sha256: &str) -> Decision {
    let tag = format!("{VERSION_TAG}={mlflow_version}");
    let same_source: Vec<&Existing> = existing.iter().filter(|e| e.tags.contains(&tag)).collect();
    if let Some(e) = same_source.iter().find(|e| e.sha256 == sha256) {
        return Decision::Present(e.version.clone());
    }
    if let Some(e) = same_source.first() {
        return Decision::Conflict(format!(
            "Sentinel version {} was imported from MLflow version {mlflow_version} with sha256 {}, but its artifact \
             now has sha256 {sha256}",
            e.version, e.sha256
        ));
    }
    if let Some(e) = existing.iter().find(|e| e.version == target) {
        return Decision::Conflict(format!(
            "Sentinel version {target} already exists (sha256 {}) and was not imported from MLflow version \
             {mlflow_version}",
            e.sha256
        ));
    }
    Decision::Push
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> Tag {
        Tag { key: k.into(), value: v.into() }
    }

    #[test]
    fn integer_versions_become_major_versions_unless_a_tag_says() {
        assert_eq!(sentinel_version("7", &[]), Ok("7.0.0".into()));
        assert_eq!(
            sentinel_version("7", &[tag("team", "x"), tag(SEMVER_TAG, " 2.1.0-rc.1 ")]),
            Ok("2.1.0-rc.1".into())
        );
        let e = sentinel_version("7", &[tag(SEMVER_TAG, "v2")]).unwrap_err();
        assert!(e.contains("not semver"), "{e}");
        assert!(sentinel_version("seven", &[]).unwrap_err().contains("not an integer"));
    }

    #[test]
    fn legacy_stages_map_to_sentinel_stages() {
        assert_eq!(sentinel_stage("Production"), "production");
        assert_eq!(sentinel_stage("Staging"), "staging");
        assert_eq!(sentinel_stage("Archived"), "archived");
        assert_eq!(sentinel_stage("None"), "development");
        assert_eq!(sentinel_stage(""), "development");
    }

    #[test]
    fn tags_carry_the_source_and_leave_out_what_the_hub_refuses() {
        let long = "x".repeat(70);
        let (tags, warnings) = sentinel_tags(
            "digits",
            "3",
            "abc123",
            &[tag("team", "vision"), tag("reviewed", ""), tag("note", "a,b"), tag("big", &long), tag(VERSION_TAG, "9")],
        );
        assert_eq!(
            tags,
            ["team=vision", "reviewed", "mlflow.version=3", "mlflow.run_id=abc123", "mlflow.model=digits"]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("note") && warnings[0].contains("commas"));
        assert!(warnings[1].contains("big") && warnings[1].contains("64"));
        assert!(warnings[2].contains("sets it itself"));
        // No run: no run tag; a model name too long for a tag: said.
        let (tags, warnings) = sentinel_tags(&"m".repeat(60), "1", "", &[]);
        assert_eq!(tags, ["mlflow.version=1"]);
        assert!(warnings[0].contains(MODEL_TAG));
    }

    fn metric(key: &str, value: f64, step: i64, timestamp: i64) -> Metric {
        Metric { key: key.into(), value, step, timestamp }
    }

    #[test]
    fn the_latest_metric_value_is_the_accuracy() {
        let ms = [metric("accuracy", 0.5, 0, 1), metric("accuracy", 0.9, 2, 0), metric("loss", 3.0, 9, 9)];
        assert_eq!(accuracy(&ms, "accuracy"), Ok(0.9));
        assert_eq!(accuracy(&ms, "f1").unwrap_err(), "its run has no metric f1 (it has: accuracy, loss)");
        assert!(accuracy(&ms, "loss").unwrap_err().contains("not a fraction"));
        assert!(accuracy(&[], "f1").unwrap_err().contains("(it has: none)"));
    }

    #[test]
    fn a_version_is_present_new_or_in_conflict() {
        let existing = [
            Existing { version: "1.0.0".into(), sha256: "aa".into(), tags: vec!["mlflow.version=1".into()] },
            Existing { version: "5.0.0".into(), sha256: "cc".into(), tags: vec![] },
        ];
        assert_eq!(decide(&existing, "1", "1.0.0", "aa"), Decision::Present("1.0.0".into()));
        assert_eq!(decide(&existing, "2", "2.0.0", "bb"), Decision::Push);
        let Decision::Conflict(why) = decide(&existing, "1", "1.0.0", "bb") else { panic!() };
        assert!(why.contains("sha256 aa") && why.contains("sha256 bb"), "{why}");
        let Decision::Conflict(why) = decide(&existing, "5", "5.0.0", "cc") else { panic!() };
        assert!(why.contains("5.0.0 already exists"), "{why}");
        // `mlflow.version=1` is not `mlflow.version=10`.
        assert_eq!(decide(&existing, "10", "10.0.0", "aa"), Decision::Push);
    }
}
