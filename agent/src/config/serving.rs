//! The `[serving]` table: how the agent runs models and serves the local
//! inference API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sentinel_worker_protocol::launch::{Confinement, Engine, Provider, Providers, UnknownProvider};
use serde::Deserialize;

use super::{ConfigError, DEFAULT_METRICS_LISTEN, bad};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServing {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    unix_socket: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    max_inflight_bytes: Option<usize>,
    max_connections: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    pub(super) worker_bin: Option<PathBuf>,
    confinement: Option<String>,
    memory_limit_mib: Option<u64>,
    request_timeout_ms: Option<u64>,
    load_timeout_secs: Option<u64>,
    validation_tolerance: Option<f64>,
    #[serde(default)]
    input_shapes: BTreeMap<String, Vec<String>>,
    pub(super) workers: Option<usize>,
    pub(super) engine: Option<String>,
    ort_library: Option<PathBuf>,
    max_batch_size: Option<usize>,
    pub(super) max_queue_delay_us: Option<u64>,
    #[serde(default)]
    models: BTreeMap<String, RawModelServing>,
}

/// `[serving.models.<name>]`: one model's overrides of the `[serving]` defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelServing {
    workers: Option<usize>,
    engine: Option<String>,
    max_batch_size: Option<usize>,
    max_queue_delay_us: Option<u64>,
    execution_providers: Option<Vec<String>>,
    provider_fallback: Option<bool>,
    device_id: Option<u32>,
    tensorrt_fp16: Option<bool>,
    load_timeout_secs: Option<u64>,
    cuda_load_timeout_secs: Option<u64>,
    tensorrt_load_timeout_secs: Option<u64>,
}

/// Which engine a model's workers run (`serving.engine`, or per model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// tract, built into every worker.
    Tract,
    /// ONNX Runtime; a model fails to load when its library is missing.
    Ort,
    /// ONNX Runtime when its library is found (`serving.ort_library` or
    /// `ORT_DYLIB_PATH`), tract otherwise: the default, since the library is
    /// there only where someone installed it, and it runs most models faster.
    #[default]
    Auto,
}

impl EngineChoice {
    fn parse(field: &str, value: &str) -> Result<EngineChoice, ConfigError> {
        match value {
            "tract" => Ok(EngineChoice::Tract),
            "ort" => Ok(EngineChoice::Ort),
            "auto" => Ok(EngineChoice::Auto),
            other => Err(bad(field, format!("{other:?}: expected \"tract\", \"ort\" or \"auto\""))),
        }
    }

    /// The engine a worker is started with, given the ONNX Runtime library
    /// found on this device, if any.
    pub fn resolve(self, ort_library: Option<&std::path::Path>) -> Engine {
        match (self, ort_library) {
            (EngineChoice::Tract, _) | (EngineChoice::Auto, None) => Engine::Tract,
            (EngineChoice::Ort, _) | (EngineChoice::Auto, Some(_)) => Engine::Ort,
        }
    }
}

/// One model's overrides (`[serving.models.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelServingSettings {
    /// Workers in each of the model's slots.
    pub workers: Option<usize>,
    pub engine: Option<EngineChoice>,
    pub max_batch_size: Option<usize>,
    pub max_queue_delay: Option<Duration>,
    /// ONNX Runtime's execution providers, in order, and their options
    /// (`execution_providers`, `provider_fallback`, `device_id`,
    /// `tensorrt_fp16`); the TensorRT engine cache is set per model file.
    pub providers: Providers,
    /// Load timeouts, each used when its provider is asked for (see
    /// [`load_timeout_for`]): the CPU one overrides `serving.load_timeout_secs`.
    pub load_timeouts: LoadTimeouts,
}

/// How long a worker may take to load, per execution provider; `None`: the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadTimeouts {
    pub cpu: Option<Duration>,
    pub cuda: Option<Duration>,
    pub tensorrt: Option<Duration>,
}

/// Default load timeout of a model served with CUDA: cuDNN and the CUDA
/// context take tens of seconds to set up on a Jetson.
pub const DEFAULT_CUDA_LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Default load timeout of a model served with TensorRT, which builds its
/// engine during the first load: ~9.5 minutes were measured for one COCO
/// detector on an Orin 16 GB. The active version serves meanwhile.
pub const DEFAULT_TENSORRT_LOAD_TIMEOUT: Duration = Duration::from_secs(1800);

/// The load timeout of a worker with `providers`: the longest among the
/// providers it may end up on (CPU always, the ones listed), each its own
/// configured timeout or default; `cpu` is `serving.load_timeout_secs`.
pub fn load_timeout_for(providers: &Providers, cpu: Duration, own: &LoadTimeouts) -> Duration {
    providers
        .order
        .iter()
        .map(|p| match p {
            Provider::Cpu => own.cpu.unwrap_or(cpu),
            Provider::Cuda => own.cuda.unwrap_or(DEFAULT_CUDA_LOAD_TIMEOUT),
            Provider::TensorRt => own.tensorrt.unwrap_or(DEFAULT_TENSORRT_LOAD_TIMEOUT),
        })
        .fold(own.cpu.unwrap_or(cpu), Duration::max)
}

/// How the agent runs models and serves the local inference API.
#[derive(Debug, Clone)]
pub struct ServingSettings {
    /// TCP address of the KServe v2 API (default `127.0.0.1:8601`); `None` when disabled.
    pub listen: Option<String>,
    /// TCP address of the Prometheus `/metrics` listener (default
    /// [`DEFAULT_METRICS_LISTEN`]); `None` when disabled (`""`).
    pub metrics_listen: Option<String>,
    /// Unix socket for the v2 API, in addition to (or instead of) TCP.
    pub unix_socket: Option<PathBuf>,
    /// Largest inference request body (default 16 MiB).
    pub max_body_bytes: usize,
    /// Request bodies the inference API holds at once; past it, 503 with
    /// `Retry-After` (default 4 x `max_body_bytes`, at least `max_body_bytes`).
    pub max_inflight_bytes: usize,
    /// Connections open at once on the inference API and metrics listeners
    /// (default 1024, lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Time a new connection has to send its first request head (default 10 s).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed (default 120 s).
    pub idle_timeout: Duration,
    /// The `sentinel-worker` executable (default: next to `sentinel-agent`).
    pub worker_bin: PathBuf,
    pub confinement: Confinement,
    /// `RLIMIT_AS` of each worker (default 2048 MiB; 0 for none).
    pub memory_limit_bytes: Option<u64>,
    pub request_timeout: Duration,
    pub load_timeout: Duration,
    /// How far below the manifest's declared accuracy the on-device
    /// validation-set accuracy may be (default 0.02).
    pub validation_tolerance: f64,
    /// Fixed input shapes per model name, for models that declare symbolic
    /// non-batch dims (default: symbolic dims become 1).
    pub input_shapes: BTreeMap<String, Vec<Vec<usize>>>,
    /// Workers in each slot's pool (default: the CPUs divided among the
    /// models served, at least 1; see [`pool_size`]).
    pub workers: Option<usize>,
    /// The engine of every model without its own (default auto).
    pub engine: EngineChoice,
    /// The ONNX Runtime library (`serving.ort_library`, else the agent's
    /// `ORT_DYLIB_PATH`), when that file exists.
    pub ort_library: Option<PathBuf>,
    /// The largest batch of samples one worker run takes, for models with a
    /// symbolic batch dim; 1: sample by sample. Larger request batches run
    /// in chunks of this size. Unset, it is [`DEFAULT_MAX_BATCH`], kept by
    /// each worker only where a batch runs faster per sample (see
    /// [`ServingSettings::batch_of`]).
    pub max_batch_size: Option<usize>,
    /// Dynamic batching: concurrent requests join one worker exchange of up
    /// to `max_batch_size` samples, the first waiting at most this long for
    /// company (`max_queue_delay_us`); `None`, the default, runs each
    /// request as it comes. See [`crate::serving::batcher`].
    pub max_queue_delay: Option<Duration>,
    /// Per-model overrides.
    pub models: BTreeMap<String, ModelServingSettings>,
}

/// Default `serving.max_batch_size`.
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Largest `max_batch_size` accepted (the worker's `--max-batch` bound).
pub const MAX_BATCH_LIMIT: usize = 4096;
/// Largest `max_queue_delay_us` accepted (1 s): a request waiting longer
/// for company would be better off alone.
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;

impl ServingSettings {
    /// The engine `model`'s workers run.
    pub fn engine_of(&self, model: &str) -> Engine {
        let choice = self.models.get(model).and_then(|m| m.engine).unwrap_or(self.engine);
        choice.resolve(self.ort_library.as_deref())
    }

    /// ONNX Runtime's execution providers for `model` (none: CPU).
    pub fn providers_of(&self, model: &str) -> Providers {
        self.models.get(model).map(|m| m.providers.clone()).unwrap_or_default()
    }

    /// The largest batch one run of `model` takes, and whether the worker
    /// may fall back to single samples where a batch does not pay: only when
    /// nobody configured `max_batch_size` for it.
    pub fn batch_of(&self, model: &str) -> (usize, bool) {
        match self.models.get(model).and_then(|m| m.max_batch_size).or(self.max_batch_size) {
            Some(n) => (n, false),
            None => (DEFAULT_MAX_BATCH, true),
        }
    }

    /// `model`'s dynamic batching, when on: the most samples one joined
    /// batch carries (its `max_batch_size`, which 1 turns it off with) and
    /// how long the first request waits for company.
    pub fn dynamic_batching_of(&self, model: &str) -> Option<(usize, Duration)> {
        let delay = self.models.get(model).and_then(|m| m.max_queue_delay).or(self.max_queue_delay)?;
        let (max, _) = self.batch_of(model);
        (max > 1).then_some((max, delay))
    }

    /// How long `model`'s workers may take to load (see [`load_timeout_for`]).
    pub fn load_timeout_of(&self, model: &str) -> Duration {
        let own = self.models.get(model).map(|m| m.load_timeouts).unwrap_or_default();
        load_timeout_for(&self.providers_of(model), self.load_timeout, &own)
    }

    /// How many workers each of `model`'s slots gets: its own `workers`,
    /// else `serving.workers`, else [`pool_size`] of this machine's CPUs.
    pub fn workers_of(&self, model: &str, cpus: usize, models_served: usize) -> usize {
        pool_size(self.models.get(model).and_then(|m| m.workers).or(self.workers), cpus, models_served)
    }
}

/// Most workers one slot may have: `serving.workers` and the per-model
/// overrides are bounded by it, and so is the default on a large machine.
pub const MAX_POOL_SIZE: usize = 64;

/// How many workers a slot gets: `configured` when set, else the CPUs
/// divided among the models served (this one included), at least 1.
pub fn pool_size(configured: Option<usize>, cpus: usize, models: usize) -> usize {
    configured.unwrap_or_else(|| cpus / models.max(1)).clamp(1, MAX_POOL_SIZE)
}

/// Largest `serving.memory_limit_mib` accepted (1 TiB): larger values would
/// wrap when turned into bytes.
pub const MAX_MEMORY_LIMIT_MIB: u64 = 1 << 20;

/// Largest `serving.max_body_bytes` accepted (1 GiB).
pub const MAX_BODY_LIMIT: usize = 1 << 30;

impl ServingSettings {
    /// The bounds of every connection to the inference API and metrics.
    pub fn connection_limits(&self) -> sentinel_net::Limits {
        sentinel_net::Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            ..sentinel_net::Limits::default()
        }
    }
}

fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("sentinel-worker")))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/sentinel-worker"))
}

impl RawServing {
    /// `ort_env` is the agent's `ORT_DYLIB_PATH`, if set.
    pub(super) fn validate(
        self,
        resolve: impl Fn(PathBuf) -> PathBuf,
        ort_env: Option<&str>,
    ) -> Result<ServingSettings, ConfigError> {
        let address = |field: &str, value: Option<&str>, default: &str| match value {
            None => Ok(Some(default.to_owned())),
            Some("") => Ok(None),
            Some(a) => {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| bad(field, format!("{a:?} is not an address:port: {e}")))?;
                Ok(Some(a.to_owned()))
            }
        };
        let listen = address("serving.listen", self.listen.as_deref(), "127.0.0.1:8601")?;
        let metrics_listen = address("serving.metrics_listen", self.metrics_listen.as_deref(), DEFAULT_METRICS_LISTEN)?;
        let confinement = match self.confinement.as_deref().unwrap_or("enforce") {
            "enforce" => Confinement::Enforce,
            "off" => Confinement::Off,
            other => return Err(bad("serving.confinement", format!("{other:?}: expected \"enforce\" or \"off\""))),
        };
        let tolerance = self.validation_tolerance.unwrap_or(0.02);
        if !(0.0..=1.0).contains(&tolerance) {
            return Err(bad("serving.validation_tolerance", "must be between 0 and 1"));
        }
        let mut input_shapes = BTreeMap::new();
        for (model, shapes) in self.input_shapes {
            let field = format!("serving.input_shapes.{model}");
            let parsed = shapes
                .iter()
                .map(|s| {
                    s.split(',')
                        .map(|d| d.trim().parse::<usize>().ok().filter(|d| *d > 0))
                        .collect::<Option<Vec<usize>>>()
                        .ok_or_else(|| bad(&field, format!("{s:?}: expected positive dims like \"1,3,48,192\"")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            input_shapes.insert(model, parsed);
        }
        let pool = |field: &str, v: Option<usize>| match v {
            Some(n) if n == 0 || n > MAX_POOL_SIZE => Err(bad(field, format!("must be between 1 and {MAX_POOL_SIZE}"))),
            v => Ok(v),
        };
        let workers = pool("serving.workers", self.workers)?;
        let batch = |field: &str, v: Option<usize>| match v {
            Some(n) if n == 0 || n > MAX_BATCH_LIMIT => {
                Err(bad(field, format!("must be between 1 and {MAX_BATCH_LIMIT} (1: sample by sample)")))
            }
            v => Ok(v),
        };
        let max_batch_size = batch("serving.max_batch_size", self.max_batch_size)?;
        let delay = |field: &str, v: Option<u64>| match v {
            Some(us) if us > MAX_QUEUE_DELAY_US => Err(bad(
                field,
                format!("{us} is over {MAX_QUEUE_DELAY_US} (1 s); 0 joins only requests already queued"),
            )),
            v => Ok(v.map(Duration::from_micros)),
        };
        let max_queue_delay = delay("serving.max_queue_delay_us", self.max_queue_delay_us)?;
        let engine = match self.engine.as_deref() {
            None => EngineChoice::default(),
            Some(e) => EngineChoice::parse("serving.engine", e)?,
        };
        let positive = |field: &str, v: u64| if v == 0 { Err(bad(field, "must be positive")) } else { Ok(v) };
        let mut models = BTreeMap::new();
        for (name, m) in self.models {
            let engine = match m.engine.as_deref() {
                None => None,
                Some(e) => Some(EngineChoice::parse(&format!("serving.models.{name}.engine"), e)?),
            };
            let workers = pool(&format!("serving.models.{name}.workers"), m.workers)?;
            let max_batch_size = batch(&format!("serving.models.{name}.max_batch_size"), m.max_batch_size)?;
            let max_queue_delay = delay(&format!("serving.models.{name}.max_queue_delay_us"), m.max_queue_delay_us)?;
            let field = format!("serving.models.{name}.execution_providers");
            let mut order: Vec<Provider> = Vec::new();
            for p in m.execution_providers.unwrap_or_default() {
                let p: Provider = p.parse().map_err(|e: UnknownProvider| bad(&field, e.to_string()))?;
                if order.contains(&p) {
                    return Err(bad(&field, format!("{p} is listed twice")));
                }
                order.push(p);
            }
            let providers = Providers {
                order,
                fallback: m.provider_fallback.unwrap_or(false),
                device_id: m.device_id,
                tensorrt_fp16: m.tensorrt_fp16.unwrap_or(false),
                tensorrt_cache: None,
            };
            let secs = |key: &str, v: Option<u64>| {
                v.map(|v| positive(&format!("serving.models.{name}.{key}"), v).map(Duration::from_secs)).transpose()
            };
            let load_timeouts = LoadTimeouts {
                cpu: secs("load_timeout_secs", m.load_timeout_secs)?,
                cuda: secs("cuda_load_timeout_secs", m.cuda_load_timeout_secs)?,
                tensorrt: secs("tensorrt_load_timeout_secs", m.tensorrt_load_timeout_secs)?,
            };
            if providers.gpu() && engine == Some(EngineChoice::Tract) {
                return Err(bad(&field, "execution providers are ONNX Runtime's: set engine = \"ort\" or \"auto\""));
            }
            models.insert(
                name,
                ModelServingSettings { workers, engine, max_batch_size, max_queue_delay, providers, load_timeouts },
            );
        }
        let ort_library = match self.ort_library.map(&resolve) {
            Some(path) if !path.is_file() => {
                return Err(bad("serving.ort_library", format!("{} is not a file", path.display())));
            }
            Some(path) => Some(path),
            None => ort_env.map(PathBuf::from).filter(|p| p.is_file()),
        };
        let bounded = |field: &str, v: u64, most: u64| {
            if v == 0 || v > most { Err(bad(field, format!("must be between 1 and {most}"))) } else { Ok(v) }
        };
        let max_body_bytes = self.max_body_bytes.unwrap_or(16 << 20);
        if max_body_bytes == 0 || max_body_bytes > MAX_BODY_LIMIT {
            return Err(bad("serving.max_body_bytes", format!("must be between 1 and {MAX_BODY_LIMIT}")));
        }
        let max_inflight_bytes = self.max_inflight_bytes.unwrap_or(max_body_bytes.saturating_mul(4));
        if max_inflight_bytes < max_body_bytes {
            return Err(bad(
                "serving.max_inflight_bytes",
                format!(
                    "{max_inflight_bytes} is below serving.max_body_bytes ({max_body_bytes}): no large request could run"
                ),
            ));
        }
        Ok(ServingSettings {
            listen,
            metrics_listen,
            unix_socket: self.unix_socket.map(&resolve),
            max_body_bytes,
            max_inflight_bytes,
            max_connections: match self.max_connections.unwrap_or(1024) {
                0 => return Err(bad("serving.max_connections", "must be positive")),
                n => sentinel_net::Limits::connections_within_fd_limit(n),
            },
            header_read_timeout: Duration::from_secs(bounded(
                "serving.header_read_timeout_secs",
                self.header_read_timeout_secs.unwrap_or(10),
                3600,
            )?),
            idle_timeout: Duration::from_secs(bounded(
                "serving.idle_timeout_secs",
                self.idle_timeout_secs.unwrap_or(120),
                86_400,
            )?),
            worker_bin: self.worker_bin.map(&resolve).unwrap_or_else(default_worker_bin),
            confinement,
            memory_limit_bytes: match self.memory_limit_mib.unwrap_or(2048) {
                0 => None,
                mib if mib > MAX_MEMORY_LIMIT_MIB => {
                    return Err(bad(
                        "serving.memory_limit_mib",
                        format!("{mib} is over {MAX_MEMORY_LIMIT_MIB} (1 TiB); 0 means no limit"),
                    ));
                }
                mib => Some(mib << 20),
            },
            request_timeout: Duration::from_millis(positive(
                "serving.request_timeout_ms",
                self.request_timeout_ms.unwrap_or(5000),
            )?),
            load_timeout: Duration::from_secs(positive(
                "serving.load_timeout_secs",
                self.load_timeout_secs.unwrap_or(60),
            )?),
            validation_tolerance: tolerance,
            input_shapes,
            workers,
            engine,
            ort_library,
            max_batch_size,
            max_queue_delay,
            models,
        })
    }
}
