//! The ONNX Runtime engine (cargo feature `ort`): one session per worker, with
//! one intra-op thread, for the input shapes fixed at load time.
//!
//! The runtime is a shared library that the worker loads itself from the path
//! in `ORT_DYLIB_PATH` (the `onnxruntime` PyPI wheel ships one; see
//! `.ci/install-onnxruntime`). Nothing is linked or downloaded at build time,
//! and the library is never searched for by name: without the variable the
//! engine refuses to load. It also refuses unless `ORT_DISABLE_TELEMETRY=1`:
//! ONNX Runtime 1.32 on Linux otherwise starts a telemetry thread, writes a
//! SQLite store under `$HOME/.cache/Microsoft` and may upload over HTTPS, and
//! the confined worker would die with SIGSYS when that thread next wakes up or
//! when the store is flushed at exit. The supervisor sets both variables.
//!
//! [`crate::model::LoadedModel`] checks every request before it gets here, so
//! this module only converts between wire tensors and ONNX Runtime values:
//! every ONNX element type but complex, 4-bit and 8-bit floats, strings
//! included (UTF-8 without NUL bytes, as ONNX Runtime copies C strings).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;
use ort::ep::{CUDA, ExecutionProvider, ExecutionProviderDispatch, TensorRT};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor as OrtTensor, TensorElementType, ValueType};

use sentinel_worker_protocol::frame::{DType, Element, Tensor};
use sentinel_worker_protocol::launch::{ORT_DYLIB_ENV, ORT_TELEMETRY_ENV, Provider, Providers};

use crate::model::{InferenceError, InputSpec, ModelError};

/// What to tell someone whose worker has no ONNX Runtime library.
const HOW_TO_GET_IT: &str = "install it with `.ci/install-onnxruntime` (pip's onnxruntime==1.32.0) \
                             and export ORT_DYLIB_PATH=<the path it prints>";

/// ONNX Runtime allows one environment per process and it cannot be rebuilt
/// once dropped, so the first load keeps it for every later one.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// A loaded ONNX Runtime session.
#[derive(Debug)]
pub struct OrtModel {
    /// `Session::run` takes `&mut self`; the worker serves one request at a
    /// time, so the lock is never contended and never sleeps on a futex.
    session: Mutex<Session>,
}

/// Loads the ONNX file at `path` with one shape per model input, in order.
/// Named symbolic dimensions are fixed to the given sizes, but for the first
/// dim of each input when `dynamic_batch` (so one session runs any batch);
/// every declared fixed dimension must match the given shape.
pub fn load(
    path: &Path,
    input_shapes: &[Vec<usize>],
    dynamic_batch: bool,
    providers: &Providers,
) -> Result<(OrtModel, Vec<InputSpec>), ModelError> {
    let load_err = |message: String| ModelError::Load { path: path.to_owned(), message };
    let environment = environment()?;
    let dispatch = execution_providers(providers)?;
    let build = |overrides: &[(String, usize)]| -> Result<Session, ModelError> {
        // One intra-op thread and sequential execution: ONNX Runtime then
        // runs every node on the calling thread and starts no pool, like tract.
        let mut builder = Session::builder(&environment)
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| b.with_parallel_execution(false).map_err(Into::into))
            .map_err(|e| load_err(e.to_string()))?;
        if !dispatch.is_empty() {
            builder = builder.with_execution_providers(&dispatch).map_err(|e| load_err(e.to_string()))?;
        }
        for (name, size) in overrides {
            let size = i64::try_from(*size).map_err(|e| load_err(format!("dimension {name}: {e}")))?;
            builder = builder.with_dimension_override(name, size).map_err(|e| load_err(e.to_string()))?;
        }
        builder.commit_from_file(path).map_err(|e| load_err(e.to_string()))
    };

    let session = build(&[])?;
    let declared = session.inputs();
    if declared.len() != input_shapes.len() {
        return Err(ModelError::InputCount { path: path.to_owned(), model: declared.len(), given: input_shapes.len() });
    }
    let mut inputs = Vec::with_capacity(declared.len());
    // Symbol -> the size every use of it was given; `None` once two uses
    // disagree.
    let mut symbols: Vec<(String, Option<usize>)> = Vec::new();
    // Symbols of the batch dim, left dynamic wherever they appear.
    let mut batch_symbols: Vec<String> = Vec::new();
    for (index, (outlet, shape)) in declared.iter().zip(input_shapes).enumerate() {
        let unsupported =
            |datum: String| ModelError::UnsupportedDType { path: path.to_owned(), what: "input", index, datum };
        let ValueType::Tensor { ty, shape: dims, dimension_symbols } = outlet.dtype() else {
            return Err(unsupported(format!("{:?}", outlet.dtype())));
        };
        let dtype = wire_dtype(*ty).ok_or_else(|| unsupported(format!("{ty:?}")))?;
        let fits = dims.len() == shape.len()
            && dims.iter().zip(shape).all(|(&d, &s)| d < 0 || usize::try_from(d).is_ok_and(|d| d == s));
        if !fits {
            return Err(ModelError::IncompatibleShape {
                path: path.to_owned(),
                index,
                declared: dims.to_vec(),
                given: shape.clone(),
            });
        }
        for (axis, ((&d, &s), symbol)) in dims.iter().zip(shape).zip(dimension_symbols.iter()).enumerate() {
            if d >= 0 || symbol.is_empty() {
                continue;
            }
            if dynamic_batch && axis == 0 {
                batch_symbols.push(symbol.clone());
                continue;
            }
            match symbols.iter_mut().find(|(name, _)| name == symbol) {
                Some((_, fixed)) if *fixed != Some(s) => *fixed = None,
                Some(_) => {}
                None => symbols.push((symbol.clone(), Some(s))),
            }
        }
        inputs.push(InputSpec { dtype, shape: shape.clone() });
    }
    // Only a symbol with one size can be fixed by name. Exporters also write
    // placeholders such as `?` for unrelated dimensions, so a symbol given two
    // sizes stays dynamic, as do unnamed ones; the warm-up then shows whether
    // the model accepts the given shapes, and the request checks hold every
    // input to them.
    let overrides: Vec<(String, usize)> = symbols
        .into_iter()
        .filter(|(name, _)| !batch_symbols.contains(name))
        .filter_map(|(name, size)| size.map(|size| (name, size)))
        .collect();
    let session = if overrides.is_empty() {
        session
    } else {
        drop(session);
        build(&overrides)?
    };
    for (index, outlet) in session.outputs().iter().enumerate() {
        if outlet.dtype().tensor_type().and_then(wire_dtype).is_none() {
            return Err(ModelError::UnsupportedDType {
                path: path.to_owned(),
                what: "output",
                index,
                datum: format!("{:?}", outlet.dtype()),
            });
        }
    }
    Ok((OrtModel { session: Mutex::new(session) }, inputs))
}

/// The providers to register, in order: each checked against the library
/// first, so a missing one is a clear error (or, with `fallback`, skipped and
/// logged); registration itself must then succeed. CPU is not registered:
/// ONNX Runtime runs whatever the others leave on its CPU kernels anyway, and
/// registering it explicitly would also turn its memory arena off.
fn execution_providers(p: &Providers) -> Result<Vec<ExecutionProviderDispatch>, ModelError> {
    let library = || std::env::var_os(ORT_DYLIB_ENV).map(PathBuf::from).unwrap_or_default();
    let mut out = Vec::new();
    for &provider in &p.order {
        let available = match provider {
            Provider::TensorRt => <TensorRT as ExecutionProvider>::is_available(),
            Provider::Cuda => <CUDA as ExecutionProvider>::is_available(),
            Provider::Cpu => break,
        }
        .map_err(|e| ModelError::Runtime { message: format!("asking for the {provider} execution provider: {e}") })?;
        if !available {
            if p.fallback {
                eprintln!(
                    "sentinel-worker: the ONNX Runtime library {} has no {provider} execution provider; trying the next",
                    library().display()
                );
                continue;
            }
            return Err(ModelError::Provider { provider, library: library() });
        }
        let device = p.device_id.map_or(0, |d| i32::try_from(d).unwrap_or(i32::MAX));
        // CPU ended the loop above: what is left is TensorRT or CUDA.
        out.push(if provider == Provider::TensorRt {
            if p.builds_engine() {
                eprintln!(
                    "sentinel-worker: TensorRT builds its engine for this model on this first load (minutes on a \
                     Jetson); later loads reuse {}",
                    p.tensorrt_cache
                        .as_deref()
                        .map_or_else(|| "nothing (no cache set)".into(), |d| d.display().to_string())
                );
            }
            let mut ep = TensorRT::default().with_device_id(device).with_fp16(p.tensorrt_fp16);
            if let Some(dir) = &p.tensorrt_cache {
                ep = ep.with_engine_cache(true).with_engine_cache_path(dir.display());
            }
            ep.build().error_on_failure()
        } else {
            CUDA::default().with_device_id(device).build().error_on_failure()
        });
    }
    Ok(out)
}

impl OrtModel {
    /// Runs checked inputs (see [`crate::model::LoadedModel::run`]).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        // The wire bytes are little-endian and may be unaligned: each input
        // is decoded into a value ONNX Runtime owns.
        let values: Vec<SessionInputValue<'_>> = inputs
            .iter()
            .enumerate()
            .map(|(index, t)| {
                to_ort(t).map(SessionInputValue::from).map_err(|e| InferenceError::Run(format!("input {index}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs =
            session.run(values.as_slice()).map_err(|e| InferenceError::Run(format!("inference failed: {e}")))?;
        outputs.values().enumerate().map(|(index, v)| from_ort(index, &v)).collect()
    }
}

fn to_ort(t: &Tensor) -> Result<DynValue, String> {
    fn typed<T: Element + PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        t: &Tensor,
    ) -> Result<DynValue, String> {
        let values = t.values::<T>().map_err(|e| e.to_string())?;
        OrtTensor::from_array((t.shape.clone(), values)).map(OrtTensor::into_dyn).map_err(|e| e.to_string())
    }
    match t.dtype {
        DType::F32 => typed::<f32>(t),
        DType::F16 => typed::<half::f16>(t),
        DType::BF16 => typed::<half::bf16>(t),
        DType::F64 => typed::<f64>(t),
        DType::U8 => typed::<u8>(t),
        DType::I8 => typed::<i8>(t),
        DType::U16 => typed::<u16>(t),
        DType::I16 => typed::<i16>(t),
        DType::U32 => typed::<u32>(t),
        DType::I32 => typed::<i32>(t),
        DType::U64 => typed::<u64>(t),
        DType::I64 => typed::<i64>(t),
        DType::Bool => typed::<bool>(t),
        DType::String => {
            // ONNX Runtime copies strings as C strings: they must be UTF-8
            // for the `ort` API and free of NUL bytes.
            let values = t
                .strings()
                .map_err(|e| e.to_string())?
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    std::str::from_utf8(e).map_err(|_| format!("string element {i} is not UTF-8")).and_then(|s| {
                        if s.contains('\0') {
                            Err(format!("string element {i} holds a NUL byte, which ONNX Runtime cannot take"))
                        } else {
                            Ok(s.to_owned())
                        }
                    })
                })
                .collect::<Result<Vec<String>, String>>()?;
            OrtTensor::<String>::from_string_array((t.shape.clone(), values.as_slice()))
                .map(OrtTensor::into_dyn)
                .map_err(|e| e.to_string())
        }
    }
}

fn from_ort(index: usize, value: &DynValue) -> Result<Tensor, InferenceError> {
    fn typed<T: Element + PrimitiveTensorElementType>(value: &DynValue) -> Result<Tensor, String> {
        let (dims, data) = value.try_extract_tensor::<T>().map_err(|e| e.to_string())?;
        Ok(Tensor::from_values(shape(dims)?, data))
    }
    fn shape(dims: &[i64]) -> Result<Vec<usize>, String> {
        dims.iter().map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d}"))).collect()
    }
    let unsupported = || InferenceError::OutputDType { index, datum: format!("{:?}", value.dtype()) };
    let dtype = value.dtype().tensor_type().and_then(wire_dtype).ok_or_else(unsupported)?;
    let converted = match dtype {
        DType::F32 => typed::<f32>(value),
        DType::F16 => typed::<half::f16>(value),
        DType::BF16 => typed::<half::bf16>(value),
        DType::F64 => typed::<f64>(value),
        DType::U8 => typed::<u8>(value),
        DType::I8 => typed::<i8>(value),
        DType::U16 => typed::<u16>(value),
        DType::I16 => typed::<i16>(value),
        DType::U32 => typed::<u32>(value),
        DType::I32 => typed::<i32>(value),
        DType::U64 => typed::<u64>(value),
        DType::I64 => typed::<i64>(value),
        DType::Bool => typed::<bool>(value),
        DType::String => value
            .try_extract_strings()
            .map_err(|e| e.to_string())
            .and_then(|(dims, data)| Ok(Tensor::from_strings(shape(dims)?, &data))),
    };
    converted.map_err(|e| InferenceError::Run(format!("output {index}: {e}")))
}

/// The wire dtype of an ONNX Runtime element type: every one but complex,
/// 4-bit and 8-bit float types.
fn wire_dtype(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint16 => DType::U16,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Uint32 => DType::U32,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Uint64 => DType::U64,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Bool => DType::Bool,
        TensorElementType::String => DType::String,
        _ => return None,
    })
}

/// The process's ONNX Runtime environment, loading the library on first use.
fn environment() -> Result<Environment, ModelError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(environment) = slot.as_ref() {
        return Ok(environment.clone());
    }
    let library = dylib_path()?;
    if std::env::var_os(ORT_TELEMETRY_ENV).is_none_or(|v| v != "1") {
        return Err(ModelError::Runtime {
            message: format!(
                "{ORT_TELEMETRY_ENV}=1 is required: with telemetry on, ONNX Runtime starts a thread, writes under \
                 $HOME/.cache and uploads over HTTPS, which the sandbox forbids"
            ),
        });
    }
    let runtime_err = |message: String| ModelError::Runtime { message };
    let environment = ort::init_from(&library)
        .map_err(|e| runtime_err(format!("{e}; {HOW_TO_GET_IT}")))?
        .with_name("sentinel-worker")
        // Belt and braces with ORT_DISABLE_TELEMETRY: this only turns off the
        // events, not the telemetry machinery, hence the variable.
        .with_telemetry(false)
        .build()
        .map_err(|e| runtime_err(e.to_string()))?;
    *slot = Some(environment.clone());
    Ok(environment)
}

/// The library named by `ORT_DYLIB_PATH`, which must be an existing file.
pub fn dylib_path() -> Result<PathBuf, ModelError> {
    let Some(value) = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()) else {
        return Err(ModelError::Runtime { message: format!("{ORT_DYLIB_ENV} is not set; {HOW_TO_GET_IT}") });
    };
    let path = PathBuf::from(value);
    if !path.is_file() {
        return Err(ModelError::Runtime {
            message: format!("{ORT_DYLIB_ENV}={} is not a file; {HOW_TO_GET_IT}", path.display()),
        });
    }
    Ok(path)
}
