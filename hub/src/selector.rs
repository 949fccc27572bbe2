//! Deployment target selectors.
//!
//! A selector is a comma-separated list of `key=value` requirements on a
//! device's labels, e.g. `stage=production,site=a`. A bare word is short for
//! `stage=WORD`, so `--target production` reads as users expect. The key
//! `hardware` is special: it matches the device's hardware tags rather than
//! a label, and a deploy checks it against the version's declared hardware.

use std::collections::BTreeMap;
use std::fmt;

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
    /// Parses `k=v,k=v` (or a bare stage name). The empty string selects every device.
    ///
    /// Spaces around parts, keys and values are ignored; only ASCII spaces, so
    /// the pattern the OpenAPI description declares says exactly what parses.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let trim = |s: &'_ str| -> String { s.trim_matches(' ').to_owned() };
        let mut sel = Selector::default();
        for part in text.split(',').map(trim).filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (trim(k), trim(v)),
                None => ("stage".to_owned(), part.clone()),
            };
            let (k, v) = (k.as_str(), v.as_str());
            if !valid_token(k) || !valid_token(v) {
                return Err(SelectorError::Syntax(format!(
                    "selector part {} is not key=value with letters, digits, '-', '_', '.' or '/'",
                    sentinel_proto::quote(&part)
                )));
            }
            if k == "hardware" {
                sel.hardware.push(v.to_owned());
            } else if sel.labels.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(SelectorError::Duplicate(sentinel_proto::quote(k)));
            }
        }
        sel.hardware.sort();
        sel.hardware.dedup();
        Ok(sel)
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
        assert_eq!(s.to_string(), "site=a,stage=production,hardware=aarch64");
        assert_eq!(Selector::parse("").expect("empty"), Selector::default());
    }

    #[test]
    fn refuses_malformed_parts() {
        for bad in ["a=", "=b", "a=b=c", "a b=c", "stage=x,stage=y"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matches_labels_and_hardware() {
        let s = Selector::parse("stage=production,hardware=cuda").expect("parse");
        let labels: BTreeMap<_, _> = [("stage".to_owned(), "production".to_owned())].into();
        assert!(s.matches(&labels, &["cuda".into(), "aarch64".into()]));
        assert!(!s.matches(&labels, &["aarch64".into()]));
        assert!(!s.matches(&BTreeMap::new(), &["cuda".into()]));
    }
}
