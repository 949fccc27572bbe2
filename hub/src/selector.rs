//! Deployment target selectors.
//!
//! A selector is a comma-separated list of `key=value` requirements on a
//! device's labels, e.g. `ring=production,site=a`. A bare word is short for
//! `ring=WORD` (deployment rings), so `--target production` reads as users
//! expect. The key `hardware` is special: it matches the device's hardware
//! tags rather than a label, and a deploy checks it against the version's
//! declared hardware.
//!
//! The ring label was called `stage` until this release, the word a model
//! version's stage (development, staging, production) keeps. The old key is
//! still read for one release, as `ring` and with a warning: in selectors
//! ([`Selector::parse_noting`]), enrolment labels and the labels agents
//! report ([`rename_deprecated_label`]). Stored labels and selectors were
//! rewritten by a store migration.

use std::collections::BTreeMap;
use std::fmt;

/// The device-label key of deployment rings, which a bare word names.
pub const RING: &str = "ring";

/// What [`RING`] was called before; read as `ring` for one release.
pub const DEPRECATED_RING: &str = "stage";

/// What a caller is told when it used the old key: `what` names where.
pub fn deprecated_ring_warning(what: &str) -> String {
    format!(
        "{what} uses the label key `{DEPRECATED_RING}`, which is now `{RING}` (a model version's stage keeps \
         its name): it was read as `{RING}`; write `{RING}`, as `{DEPRECATED_RING}` is accepted only until \
         the next release"
    )
}

/// What [`rename_deprecated_label`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLabel {
    /// No `stage` key: nothing to do.
    Unchanged,
    /// `stage` was renamed to `ring`.
    Renamed,
    /// Both `stage` and `ring` are there; the labels are left as they are.
    Both,
}

/// Renames a `stage` label to `ring`, unless `ring` is there too.
pub fn rename_deprecated_label(labels: &mut BTreeMap<String, String>) -> RingLabel {
    if !labels.contains_key(DEPRECATED_RING) {
        return RingLabel::Unchanged;
    }
    if labels.contains_key(RING) {
        return RingLabel::Both;
    }
    if let Some(v) = labels.remove(DEPRECATED_RING) {
        labels.insert(RING.to_owned(), v);
    }
    RingLabel::Renamed
}

/// A parsed selector; keys are kept sorted so equal selectors print equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub labels: BTreeMap<String, String>,
    pub hardware: Vec<String>,
}

/// Why a selector does not parse: its syntax (400), or a key named twice
/// (well formed, so 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("{0}")]
    Syntax(String),
    #[error("selector names {0} twice")]
    Duplicate(String),
}

/// A selector key or value: letters, digits, '-', '_', '.' or '/', 1 to 63.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl Selector {
    /// Parses `k=v,k=v` (or a bare ring name). The empty string selects every
    /// device. The deprecated key `stage` reads as `ring`, silently: see
    /// [`Selector::parse_noting`] for a caller to be told.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        Self::parse_noting(text).map(|(sel, _)| sel)
    }

    /// [`Selector::parse`], and whether the text used the deprecated key
    /// `stage` for `ring` (true: say [`deprecated_ring_warning`]).
    ///
    /// Spaces around parts, keys and values are ignored; only ASCII spaces, so
    /// the pattern the OpenAPI description declares says exactly what parses.
    pub fn parse_noting(text: &str) -> Result<(Self, bool), SelectorError> {
        let trim = |s: &'_ str| -> String { s.trim_matches(' ').to_owned() };
        let mut sel = Selector::default();
        let mut deprecated = false;
        for part in text.split(',').map(trim).filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (trim(k), trim(v)),
                None => (RING.to_owned(), part.clone()),
            };
            let (k, v) = (k.as_str(), v.as_str());
            if !valid_token(k) || !valid_token(v) {
                return Err(SelectorError::Syntax(format!(
                    "selector part {} is not key=value with letters, digits, '-', '_', '.' or '/'",
                    sentinel_proto::quote(&part)
                )));
            }
            let k = if k == DEPRECATED_RING {
                deprecated = true;
                RING
            } else {
                k
            };
            if k == "hardware" {
                sel.hardware.push(v.to_owned());
            } else if sel.labels.insert(k.to_owned(), v.to_owned()).is_some() {
                let also = if deprecated && k == RING {
                    format!(" (\"{DEPRECATED_RING}\" is its old name)")
                } else {
                    String::new()
                };
                return Err(SelectorError::Duplicate(format!("{}{also}", sentinel_proto::quote(k))));
            }
        }
        sel.hardware.sort();
        sel.hardware.dedup();
        Ok((sel, deprecated))
    }

    /// Whether a device with these labels and hardware tags is targeted.
    pub fn matches(&self, labels: &BTreeMap<String, String>, hardware: &[String]) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v)) && self.hardware.iter().all(|h| hardware.contains(h))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(self.hardware.iter().map(|h| format!("hardware={h}")))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let s = Selector::parse("site=a, production,hardware=aarch64").expect("parse");
        assert_eq!(s.to_string(), "ring=production,site=a,hardware=aarch64");
        assert_eq!(Selector::parse("").expect("empty"), Selector::default());
    }

    #[test]
    fn refuses_malformed_parts() {
        for bad in ["a=", "=b", "a=b=c", "a b=c", "ring=x,ring=y", "ring=x,y"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_old_ring_key_reads_as_ring_and_is_noted() {
        let (s, deprecated) = Selector::parse_noting("site=a,stage=production").expect("parse");
        assert_eq!((s.to_string().as_str(), deprecated), ("ring=production,site=a", true));
        assert_eq!(s, Selector::parse("production,site=a").expect("parse"));
        let (_, deprecated) = Selector::parse_noting("site=a,ring=production,hardware=cuda").expect("parse");
        assert!(!deprecated);
        let e = Selector::parse("stage=x,ring=y").expect_err("twice").to_string();
        assert_eq!(e, r#"selector names "ring" ("stage" is its old name) twice"#);
    }

    #[test]
    fn an_old_ring_label_is_renamed_unless_ring_is_there_too() {
        let mut labels: BTreeMap<String, String> =
            [("site".to_owned(), "a".to_owned()), ("stage".to_owned(), "production".to_owned())].into();
        assert_eq!(rename_deprecated_label(&mut labels), RingLabel::Renamed);
        assert_eq!(labels, [("ring".to_owned(), "production".to_owned()), ("site".to_owned(), "a".to_owned())].into());
        assert_eq!(rename_deprecated_label(&mut labels), RingLabel::Unchanged);
        labels.insert("stage".into(), "canary".into());
        assert_eq!(rename_deprecated_label(&mut labels), RingLabel::Both);
        assert_eq!(labels.len(), 3, "left as it was");
    }

    #[test]
    fn matches_labels_and_hardware() {
        let s = Selector::parse("ring=production,hardware=cuda").expect("parse");
        let labels: BTreeMap<_, _> = [("ring".to_owned(), "production".to_owned())].into();
        assert!(s.matches(&labels, &["cuda".into(), "aarch64".into()]));
        assert!(!s.matches(&labels, &["aarch64".into()]));
        assert!(!s.matches(&BTreeMap::new(), &["cuda".into()]));
    }
}
