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

/// An ONNX Runtime execution provider (`--provider`, in order of preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// NVIDIA TensorRT (Jetson, CUDA machines).
    TensorRt,
    /// NVIDIA CUDA.
    Cuda,
    /// ONNX Runtime's own CPU kernels, always present.
    Cpu,
}

impl Provider {
    /// Every provider, by name.
    pub const ALL: [Provider; 3] = [Provider::TensorRt, Provider::Cuda, Provider::Cpu];

    /// The name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Provider::TensorRt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider name that is none of [`Provider::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown execution provider {0:?}: expected \"tensorrt\", \"cuda\" or \"cpu\"")]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| UnknownProvider(s.to_owned()))
    }
}

/// The execution providers an [`Engine::Ort`] worker asks ONNX Runtime for,
/// and their options: `--provider NAME` per provider in order of preference,
/// `--provider-fallback`, `--device-id N`, `--tensorrt-fp16`,
/// `--tensorrt-cache DIR`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Providers {
    /// In order of preference. CPU kernels always run whatever the others
    /// do not take; empty means CPU only.
    pub order: Vec<Provider>,
    /// A provider missing from the library is skipped (and logged) instead
    /// of failing the load.
    pub fallback: bool,
    /// The GPU, for CUDA and TensorRT (default 0).
    pub device_id: Option<u32>,
    /// TensorRT may build FP16 kernels.
    pub tensorrt_fp16: bool,
    /// Where TensorRT keeps the engines it builds, so a restart or a
    /// rollback reuses them instead of building again.
    pub tensorrt_cache: Option<std::path::PathBuf>,
}

impl Providers {
    /// The worker's command-line flags for these providers.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        for p in &self.order {
            args.extend(["--provider".into(), p.name().into()]);
        }
        if self.fallback {
            args.push("--provider-fallback".into());
        }
        if let Some(id) = self.device_id {
            args.extend(["--device-id".into(), id.to_string().into()]);
        }
        if self.tensorrt_fp16 {
            args.push("--tensorrt-fp16".into());
        }
        if let Some(dir) = &self.tensorrt_cache {
            args.extend(["--tensorrt-cache".into(), dir.clone().into_os_string()]);
        }
        args
    }

    /// Whether TensorRT will build its engine when a worker loads with these
    /// providers: it is asked for, and its engine cache holds nothing yet
    /// (none is set, or the directory is empty or missing). A build takes
    /// minutes on a Jetson; a cached engine loads in seconds.
    pub fn builds_engine(&self) -> bool {
        self.order.contains(&Provider::TensorRt)
            && self.tensorrt_cache.as_deref().is_none_or(|dir| {
                std::fs::read_dir(dir).map_or_else(|_| !dir.exists(), |mut entries| entries.next().is_none())
            })
    }

    /// Whether any provider but CPU is asked for.
    pub fn gpu(&self) -> bool {
        self.order.iter().any(|p| *p != Provider::Cpu)
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
    fn provider_names_round_trip_and_unknown_names_are_refused() {
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>(), Ok(p));
        }
        assert_eq!(
            "rocm".parse::<Provider>().unwrap_err().to_string(),
            r#"unknown execution provider "rocm": expected "tensorrt", "cuda" or "cpu""#
        );
    }

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
