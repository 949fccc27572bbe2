//! The agent's layers hold: a module names (`crate::…`) only modules of a
//! lower layer, or of its own layer within its own top-level module (e.g.
//! `rollout::decision` → `rollout::policy`). The table below is the
//! architecture; `agent/src/lib.rs` "# Layout" says the same in words.
//! Comment lines are skipped: a doc link is not a dependency.

use std::path::{Path, PathBuf};

/// Layers from the bottom up: a label and the module paths in it. A module
/// belongs to the longest path that prefixes it. The worker is a crate of its
/// own (`sentinel-worker`), which `.ci/deps-check` keeps apart.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves: pure logic and helpers",
        &[
            "util",
            "slots",
            "verify",
            "download",
            "notify",
            "rollout",
            "rollout::window",
            "rollout::policy",
            "rollout::decision",
            "rollout::progress",
        ],
    ),
    ("the worker supervisor and the configuration", &["supervisor", "config"]),
    ("storage, the metrics registry and transport to the hub", &["store", "metrics", "transport"]),
    ("serving: slots and their workers at run time", &["serving"]),
    ("the shared state", &["state"]),
    ("services on the state", &["rollout::controller", "sync", "report"]),
    ("the apply loop", &["apply"]),
    ("adapters", &["control", "inference_api", "metrics::endpoint"]),
    ("clients of the adapters", &["cli"]),
    ("the composition root", &["agent"]),
];

/// The table entry (layer index, module path) a module path belongs to.
fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (layer, (_, modules)) in LAYERS.iter().enumerate() {
        for m in *modules {
            let fits = module == *m || module.starts_with(&format!("{m}::"));
            if fits && best.is_none_or(|(_, b)| m.len() > b.len()) {
                best = Some((layer, m));
            }
        }
    }
    best
}

/// `src/rollout/decision/tests.rs` → `rollout::decision::tests`.
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src").with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).filter(|p| p != "mod").collect();
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading agent/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every module path a line names through `crate::`, with `{…}` groups
/// expanded: `crate::rollout::{policy, controller::Rollouts}` names
/// `rollout::policy` and `rollout::controller::Rollouts`.
fn crate_paths(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue; // e.g. `sentinel_crate::`, not this crate.
        }
        expand("", rest, &mut out);
    }
    out
}

fn expand(prefix: &str, text: &str, out: &mut Vec<String>) {
    let end = text.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(text.len());
    let path = format!("{prefix}{}", &text[..end]);
    if text[end..].starts_with('{') {
        let inner = &text[end + 1..];
        let mut depth = 0usize;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&path, inner[start..i].trim(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&path, inner[start..i].trim(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        // A group spanning lines: what is on this line.
        expand(&path, inner[start..].trim(), out);
    } else if !path.is_empty() {
        out.push(path.trim_end_matches(':').to_owned());
    }
}

/// Every reference that breaks the layering, as a readable line.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let module = module_path(src, &file);
        // Entry points wire the library; they are not layers of it.
        if matches!(module.as_str(), "lib" | "main") || module.starts_with("bin::") {
            continue;
        }
        let Some((layer, entry)) = layer_of(&module) else {
            found.push(format!(
                "{}: module `{module}` is in no layer; add it to LAYERS in agent/tests/it/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("reading a source file");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for target in crate_paths(line) {
                let Some((to_layer, to_entry)) = layer_of(&target) else { continue };
                let same_group = entry.split("::").next() == to_entry.split("::").next();
                if to_layer < layer || (to_layer == layer && (same_group || to_entry == entry)) {
                    continue;
                }
                found.push(format!(
                    "{}:{}: `{module}` ({}) names `crate::{target}` ({}); a lower layer must not import an upper one",
                    file.display(),
                    n + 1,
                    LAYERS[layer].0,
                    LAYERS[to_layer].0,
                ));
            }
        }
    }
    found
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(found.is_empty(), "the agent's layers are broken:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_grouped_and_nested_imports() {
    let names =
        crate_paths("use crate::rollout::{policy::{self, Policy}, controller::Rollouts}; crate::util::now_ms()");
    assert_eq!(
        names,
        ["rollout::policy::self", "rollout::policy::Policy", "rollout::controller::Rollouts", "util::now_ms"]
    );
    assert_eq!(layer_of("rollout::controller::tests").map(|(_, m)| m), Some("rollout::controller"));
    assert_eq!(layer_of("rollout::policy::Policy").map(|(_, m)| m), Some("rollout::policy"));
    assert!(crate_paths("use sentinel_crate::x;").is_empty());
}
