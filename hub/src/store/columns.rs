//! How both metadata stores encode a few values in text columns, and order
//! versions: one definition, so the two back ends cannot drift apart.

use crate::records::VersionRecord;

/// Hardware tags are stored as `,a,b,` so a tag filter is one substring test.
pub(crate) fn hardware_column(tags: &[String]) -> String {
    if tags.is_empty() { String::new() } else { format!(",{},", tags.join(",")) }
}

pub(crate) fn hardware_from_column(col: &str) -> Vec<String> {
    col.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

pub(crate) fn tags_to_json(tags: &[String]) -> String {
    serde_json::Value::from(tags.to_vec()).to_string()
}

/// Newest semver first; unparsable versions cannot be stored, but sort last anyway.
pub(crate) fn sort_versions(versions: &mut [VersionRecord]) {
    versions.sort_by(|a, b| {
        let pa = semver::Version::parse(&a.version).ok();
        let pb = semver::Version::parse(&b.version).ok();
        pb.cmp(&pa)
    });
}
