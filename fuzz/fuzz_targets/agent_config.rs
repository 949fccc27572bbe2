//! The agent's TOML configuration (`agent/src/config.rs`), with its
//! `SENTINEL_AGENT_*` environment overrides: whatever the file says, parsing
//! ends in a config or an error naming a field, never a panic.
//!
//! Input: the TOML text, then optionally a NUL byte and environment lines
//! (`KEY=VALUE`). Files the config names are not read from disk: every path
//! reads as a token, except paths containing `missing`, which do not exist.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sentinel_agent::AgentConfig;

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    if path.to_string_lossy().contains("missing") {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    Ok(b"snt_fuzz_token\n".to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let (text, env_lines) = input.split_once('\0').unwrap_or((input, ""));
    let env: BTreeMap<String, String> =
        env_lines.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    match AgentConfig::parse_with(text, &env, Path::new("/etc/sentinel"), &read_file) {
        Ok(config) => {
            assert!(!config.token.is_empty(), "a config always has a token");
            assert!(!config.trusted.is_empty(), "a config always pins a key");
            assert!(config.state_dir.is_absolute(), "paths resolve against the config's directory");
            let _ = config.control_socket();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
