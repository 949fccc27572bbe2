//! How the supervisor starts a `sentinel-worker` and how to read its end:
//! the engine and confinement flags, the environment an engine needs, and
//! the exit codes.

use std::fmt;
use std::str::FromStr;

/// Exit code when the arguments are unusable (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when the model cannot be loaded or warmed up (`EX_DATAERR`).
pub const EXIT_MODEL: u8 = 65;
/// Exit code when the sandbox cannot be installed on a system that has seccomp (`EX_OSERR`).
pub const EXIT_SANDBOX: u8 = 71;
/// Exit code when stdin or stdout fails (`EX_IOERR`).
pub const EXIT_IO: u8 = 74;

/// The inference engine that runs a model (`--engine`). Tract is the default
/// and is always built in; ONNX Runtime needs a worker built with the `ort`
/// feature and a library named by [`ORT_DYLIB_ENV`] at run time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// tract-onnx, pure Rust, single threaded.
    #[default]
    Tract,
    /// ONNX Runtime, loaded dynamically (feature `ort`).
    Ort,
}

impl Engine {
    /// The name used on the command line (`--engine`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::Ort => "ort",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An engine name that is neither `tract` nor `ort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown engine {0:?}: expected \"tract\" or \"ort\"")]
pub struct UnknownEngine(pub String);

impl FromStr for Engine {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tract" => Ok(Engine::Tract),
            "ort" => Ok(Engine::Ort),
            other => Err(UnknownEngine(other.to_owned())),
        }
    }
}

/// The variable that names the ONNX Runtime library file for [`Engine::Ort`].
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// The variable that must be `1` for [`Engine::Ort`]: with telemetry on,
/// ONNX Runtime starts a timer thread, keeps a SQLite store under
/// `$HOME/.cache` and uploads over HTTPS, which the sandbox forbids.
pub const ORT_TELEMETRY_ENV: &str = "ORT_DISABLE_TELEMETRY";

/// Whether the worker confines itself (`--confinement on|off`). Enforcing is
/// the default; turning it off must be asked for by name (debugging, or
/// platforms without seccomp).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Confinement {
    /// Install the seccomp allow-list after warm-up.
    #[default]
    Enforce,
    /// Serve without a filter.
    Off,
}

impl Confinement {
    /// The value of the worker's `--confinement` flag.
    pub fn flag(self) -> &'static str {
        match self {
            Confinement::Enforce => "on",
            Confinement::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_round_trip_and_unknown_names_are_refused() {
        for e in [Engine::Tract, Engine::Ort] {
            assert_eq!(e.name().parse::<Engine>(), Ok(e));
        }
        assert_eq!(
            "onnxruntime".parse::<Engine>().unwrap_err().to_string(),
            r#"unknown engine "onnxruntime": expected "tract" or "ort""#
        );
    }
}
