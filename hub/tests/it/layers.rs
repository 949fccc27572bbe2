//! The hub's layers, kept: every module of `hub/src` may import only from
//! layers below its own (see the "# Layout" section of `hub/src/lib.rs`).
//!
//! The test reads the sources, finds each module's `crate::…` references
//! (and `super::…` ones that climb to the crate root), and fails on any that
//! point to the same or a higher layer. Comments and string literals are
//! skipped, so doc links do not count. A module missing from [`LAYERS`]
//! fails too: a new module is placed on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom to top: a module may import from a strictly lower
/// layer only. Several rows are leaves over leaves; each says why.
const LAYERS: &[(&str, &[&str])] = &[
    // Pure leaves: values, rules and crypto with no I/O beyond their own files.
    ("leaves", &["selector", "rollout", "keys", "auth", "onnx", "tls", "telemetry"]),
    // Settings name the ONNX limits; records carry a rollout policy.
    ("leaf data", &["config", "records"]),
    // Inspection reads its settings; targeting reads records.
    ("leaf logic", &["inspect", "targeting"]),
    // A rollup counts devices by the targeting rule.
    ("leaf rollups", &["rollup"]),
    ("storage", &["store"]),
    ("state and services", &["service"]),
    ("adapters", &["api", "grpc", "metrics"]),
    // The web interface's routes reuse the REST API's error and extractors.
    ("web adapter", &["web"]),
    // The CLI is a client: it speaks HTTP to a hub and starts hubs as processes.
    ("client", &["cli"]),
    // The one composition root: nothing imports it.
    ("composition root", &["server"]),
];

/// Items of the crate root that are not modules, and where they point.
/// `None`: a root helper (`now_ms`, `error_chain`, a macro) any layer may use.
fn root_item(name: &str) -> Option<Option<&'static str>> {
    match name {
        "Hub" => Some(Some("server")),
        "HubConfig" => Some(Some("config")),
        "now_ms" | "error_chain" | "install_crypto_provider" | "string_schema" => Some(None),
        _ => None,
    }
}

fn layer_of(group: &str) -> Option<(usize, &'static str)> {
    LAYERS.iter().enumerate().find(|(_, (_, groups))| groups.contains(&group)).map(|(i, (name, _))| (i, *name))
}

/// Source text with comments and the contents of string and char literals
/// blanked out (newlines kept, so line numbers stay right).
fn code_only(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_is_ident(&chars, i) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let rest: String = chars[j + 1..].iter().collect();
            let len = rest.find(&close).map_or(rest.chars().count(), |at| rest[..at].chars().count());
            let end = (j + 1 + len + close.len()).min(chars.len());
            out.extend(chars[i..end].iter().map(|&ch| blank(ch)));
            i = j + 1 + len + close.len();
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            out.push(' ');
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push_str("  ");
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The first path segment after each `crate::` (each item of a
/// `crate::{a, b::c}` group), with the line it is on.
fn crate_refs(code: &str, depth: usize) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut prefixes = vec!["crate::".to_owned()];
    if depth > 0 {
        prefixes.push("super::".repeat(depth));
    }
    for prefix in &prefixes {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix.as_str()) {
            let start = from + at;
            from = start + prefix.len();
            // `super::super::x` seen from deeper: only whole chains count.
            if prefix.starts_with("super") && code[..start].ends_with("super::") {
                continue;
            }
            if start > 0 && matches!(code.as_bytes()[start - 1], b'$' | b'_' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
            {
                continue; // `$crate::`, or an identifier ending in `crate` or `super`
            }
            let line = code[..start].matches('\n').count() + 1;
            let rest = &code[from..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut level = 1;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => level += 1,
                        '}' => level -= 1,
                        _ => {}
                    }
                    if level == 0 || (level == 1 && c == ',') {
                        if let Some(name) = first_ident(&item) {
                            out.push((line, name));
                        }
                        item.clear();
                        if level == 0 {
                            break;
                        }
                    } else {
                        item.push(c);
                    }
                }
            } else if let Some(name) = first_ident(rest) {
                out.push((line, name));
            }
        }
    }
    out
}

fn first_ident(s: &str) -> Option<String> {
    let name: String = s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name != "self").then_some(name)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read hub/src") {
        let path = entry.expect("a dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every reference from one module group to another: (from, to, file, line).
fn references(src: &Path) -> Vec<(String, String, String, usize)> {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut refs = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let parts: Vec<&str> = rel.iter().map(|p| p.to_str().expect("utf-8 path")).collect();
        // The binaries are thin entry points over the library's public interface.
        if parts[0] == "bin" || parts == ["lib.rs"] {
            continue;
        }
        let group = parts[0].trim_end_matches(".rs").to_owned();
        // How many `super::` climb from this file to the crate root.
        let depth = if parts.last() == Some(&"mod.rs") { parts.len() - 1 } else { parts.len() };
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (line, name) in crate_refs(&code_only(&text), depth) {
            let to = match root_item(&name) {
                Some(Some(module)) => module.to_owned(),
                Some(None) => continue,
                None => name,
            };
            if to != group {
                refs.push((group.clone(), to, format!("hub/src/{}", rel.display()), line));
            }
        }
    }
    refs
}

/// The import table, group by group: what `hub-imports-*.txt` records.
fn table(refs: &[(String, String, String, usize)]) -> String {
    let mut by: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to, _, _) in refs {
        by.entry(from).or_default().insert(to);
    }
    by.iter()
        .map(|(from, to)| format!("{from:10} -> {}\n", to.iter().copied().collect::<Vec<_>>().join(", ")))
        .collect()
}

#[test]
fn each_layer_imports_only_from_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let refs = references(&src);
    println!("{}", table(&refs));
    let mut wrong = Vec::new();
    let mut groups: BTreeSet<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    groups.extend(refs.iter().map(|r| r.1.as_str()));
    for g in &groups {
        if layer_of(g).is_none() {
            wrong.push(format!("module `{g}` is in no layer; add it to LAYERS in hub/tests/it/layers.rs"));
        }
    }
    for (from, to, file, line) in &refs {
        let (Some((lf, lname)), Some((lt, tname))) = (layer_of(from), layer_of(to)) else { continue };
        if lt >= lf {
            wrong.push(format!(
                "{file}:{line}: `{from}` ({lname}) imports `crate::{to}` ({tname}); a module may import only \
                 from a lower layer"
            ));
        }
    }
    assert!(wrong.is_empty(), "the hub's layers are broken:\n{}", wrong.join("\n"));
}

/// Below the adapters nothing speaks a transport: services return their own
/// errors and the adapters turn them into HTTP or gRPC statuses. (Before,
/// the fleet service handed tonic `Status`es to the gRPC stream.)
#[test]
fn no_layer_below_the_adapters_names_a_transport_crate() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let adapters = layer_of("api").expect("api has a layer").0;
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let group = rel.iter().next().and_then(|p| p.to_str()).expect("utf-8").trim_end_matches(".rs");
        if layer_of(group).is_none_or(|(layer, _)| layer >= adapters) {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&file).expect("read a source file"));
        for (n, line) in code.lines().enumerate() {
            for krate in ["tonic::", "axum::", "hyper::", "tower_http::"] {
                if line.contains(krate) && !line.contains(&format!("_{krate}")) {
                    wrong.push(format!("hub/src/{}:{}: `{group}` names `{krate}`", rel.display(), n + 1));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "transport types below the adapters:\n{}", wrong.join("\n"));
}

#[test]
fn the_reader_finds_grouped_imports_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::{a::X, b::{c, d}};\n// crate::e\nlet s = \"crate::f\"; let r = r#\"crate::g\"#;\n\
         let c = '\"'; super::h::y(); crate::i();",
    );
    let names: Vec<String> = crate_refs(&code, 1).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["a", "b", "i", "h"]);
}
