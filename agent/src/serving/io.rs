//! Tensors in and out of a model: the declared inputs and outputs from the
//! signed manifest, the checks a request and a result must pass, batch
//! splitting and joining, and the label a model predicted. Pure: no worker.

use sentinel_proto::pb::ModelManifest;
use sentinel_proto::pb::dimension::Kind;

use crate::slots::Color;
use sentinel_worker_protocol::frame::{DType, Tensor};

/// One input or output of a model, from its signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Declared dims; `None` where the model declares a symbolic dim.
    pub declared: Vec<Option<u64>>,
    /// The shape the worker runs with (inputs only; symbolic dims fixed).
    pub fixed: Vec<usize>,
}

impl TensorInfo {
    /// Whether the first dim is a symbolic batch dim the worker runs at 1,
    /// so requests may carry several samples.
    pub fn batched(&self) -> bool {
        self.declared.first() == Some(&None) && self.fixed.first() == Some(&1)
    }
}

/// The wire dtype of a manifest dtype name.
pub fn wire_dtype(name: &str) -> Option<DType> {
    DType::from_name(name)
}

/// A model's inputs and outputs, with input shapes fixed from the manifest
/// (its signed serving shapes, else a symbolic batch dim becomes 1) or from
/// the device's configured `overrides`; refuses other symbolic dims left open.
pub fn model_io(
    m: &ModelManifest,
    overrides: Option<&Vec<Vec<usize>>>,
) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), TensorsError> {
    let convert = |what: &'static str,
                   index: usize,
                   spec: &sentinel_proto::pb::TensorSpec,
                   fixed: Option<&Vec<usize>>| {
        let dtype = wire_dtype(&spec.dtype).ok_or_else(|| {
            let carried: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            TensorsError::Dtype {
                what,
                index,
                name: spec.name.clone(),
                dtype: spec.dtype.clone(),
                carried: carried.join(", "),
            }
        })?;
        let declared: Vec<Option<u64>> = spec
            .shape
            .iter()
            .map(|d| match d.kind {
                Some(Kind::Fixed(n)) => Some(n),
                _ => None,
            })
            .collect();
        let fixed = match fixed {
            Some(f) => {
                let fits = f.len() == declared.len()
                    && f.iter().zip(&declared).all(|(g, d)| d.is_none_or(|d| u64::try_from(*g).is_ok_and(|g| g == d)));
                if !fits {
                    return Err(TensorsError::ConfiguredShape {
                        shape: f.clone(),
                        what,
                        name: spec.name.clone(),
                        declared: show_dims(&declared),
                    });
                }
                f.clone()
            }
            // Outputs are only described; their fixed shape is not used.
            None if what == "output" => {
                declared.iter().map(|d| d.map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))).collect()
            }
            None => {
                let signed = m.serving_shapes.iter().find(|s| s.input == spec.name);
                match signed {
                    Some(s) => s.dims.iter().map(|&n| usize::try_from(n).unwrap_or(usize::MAX)).collect(),
                    // A symbolic batch dim (the first) serves one sample; any
                    // other symbolic dim has no safe guess (1 would look ready
                    // and refuse every real request).
                    None if declared.iter().skip(1).any(Option::is_none) => {
                        return Err(TensorsError::Symbolic {
                            what,
                            name: spec.name.clone(),
                            declared: show_dims(&declared),
                        });
                    }
                    None => {
                        declared.iter().map(|d| d.map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))).collect()
                    }
                }
            }
        };
        Ok(TensorInfo { name: spec.name.clone(), dtype, declared, fixed })
    };
    if let Some(o) = overrides
        && o.len() != m.inputs.len()
    {
        return Err(TensorsError::ShapeCount { configured: o.len(), inputs: m.inputs.len() });
    }
    let inputs = m
        .inputs
        .iter()
        .enumerate()
        .map(|(i, s)| convert("input", i, s, overrides.and_then(|o| o.get(i))))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs =
        m.outputs.iter().enumerate().map(|(i, s)| convert("output", i, s, None)).collect::<Result<Vec<_>, _>>()?;
    Ok((inputs, outputs))
}

/// A manifest's tensors that this device cannot serve as declared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorsError {
    #[error("{what} {index} `{name}` has dtype {dtype}; workers carry {carried}")]
    Dtype { what: &'static str, index: usize, name: String, dtype: String, carried: String },
    #[error("configured shape {shape:?} for {what} `{name}` does not fit the declared {declared}")]
    ConfiguredShape { shape: Vec<usize>, what: &'static str, name: String, declared: String },
    #[error(
        "{what} `{name}` has symbolic dims {declared} besides the batch; fix them at push with \
         `sentinel model push --input-shape {name}=...` or on this device with `serving.input_shapes`"
    )]
    Symbolic { what: &'static str, name: String, declared: String },
    #[error("configured {configured} input shapes, but the model has {inputs} inputs")]
    ShapeCount { configured: usize, inputs: usize },
}

/// `[N, 64]` style rendering of declared dims.
pub fn show_dims(dims: &[Option<u64>]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.map_or_else(|| "?".to_owned(), |n| n.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// Why an inference request got no outputs. Each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("model `{model}` has no version `{version}` in service")]
    UnknownVersion { model: String, version: String },
    #[error("model `{0}` has no version in service yet")]
    NotReady(String),
    #[error("{0}")]
    BadInput(String),
    #[error("model `{model}` {version}: {reason}")]
    Unavailable { model: String, version: String, reason: String },
}

/// Outputs of one request and who served them.
#[derive(Debug, Clone)]
pub struct Served {
    /// The request id to quote in feedback.
    pub id: String,
    pub version: String,
    pub color: Color,
    pub outputs: Vec<Tensor>,
    pub output_names: Vec<String>,
}

/// Puts named inputs in model order; a missing or unknown name is bad input.
pub fn order_inputs(specs: &[TensorInfo], mut named: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, ServeError> {
    let expected = || specs.iter().map(|s| format!("`{}`", s.name)).collect::<Vec<_>>().join(", ");
    let mut ordered = Vec::with_capacity(specs.len());
    for spec in specs {
        let at = named.iter().position(|(n, _)| *n == spec.name).ok_or_else(|| {
            ServeError::BadInput(format!("missing input `{}`; the model takes {}", spec.name, expected()))
        })?;
        ordered.push(named.swap_remove(at).1);
    }
    if let Some((extra, _)) = named.first() {
        return Err(ServeError::BadInput(format!("unknown input `{extra}`; the model takes {}", expected())));
    }
    Ok(ordered)
}

/// Checks count, dtypes and shapes. Returns `Some(n)` when the request is a
/// batch of `n` samples to be run one by one, `None` when it has the fixed shape.
pub fn check_inputs(specs: &[TensorInfo], inputs: &[Tensor]) -> Result<Option<usize>, ServeError> {
    if inputs.len() != specs.len() {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(ServeError::BadInput(format!(
            "expected {} input(s) [{}], got {}",
            specs.len(),
            names.join(", "),
            inputs.len()
        )));
    }
    let mut batch: Option<usize> = None;
    let mut split = false;
    for (spec, t) in specs.iter().zip(inputs) {
        if t.dtype != spec.dtype {
            return Err(ServeError::BadInput(format!("input `{}` must be {}, got {}", spec.name, spec.dtype, t.dtype)));
        }
        let n = if t.shape == spec.fixed {
            if !spec.batched() {
                continue;
            }
            1
        } else {
            let fits = spec.batched()
                && t.shape.len() == spec.fixed.len()
                && t.shape.get(1..) == spec.fixed.get(1..)
                && t.shape.first().is_some_and(|n| *n > 0);
            if !fits {
                return Err(ServeError::BadInput(format!(
                    "input `{}` has shape {:?}; the model takes {:?}{}",
                    spec.name,
                    t.shape,
                    spec.fixed,
                    if spec.batched() { " (any batch size in the first dim)" } else { "" }
                )));
            }
            split = true;
            t.shape[0]
        };
        if batch.is_some_and(|b| b != n) {
            return Err(ServeError::BadInput("inputs disagree on the batch size".to_owned()));
        }
        batch = Some(n);
    }
    Ok(if split { batch } else { None })
}

/// The class a model predicted for one sample: an integer output holding
/// one value (an int64 one first), else the argmax of the first float output
/// (f32, f16, bf16 or f64).
pub fn predicted_label(outputs: &[Tensor]) -> Option<i64> {
    let single = |t: &Tensor| -> Option<i64> {
        if t.element_count() != Some(1) {
            return None;
        }
        match t.dtype {
            DType::I64 => t.to_i64().ok()?.first().copied(),
            DType::I32 => t.values::<i32>().ok()?.first().map(|v| i64::from(*v)),
            DType::I16 => t.values::<i16>().ok()?.first().map(|v| i64::from(*v)),
            DType::I8 => t.values::<i8>().ok()?.first().map(|v| i64::from(*v)),
            DType::U8 => t.values::<u8>().ok()?.first().map(|v| i64::from(*v)),
            DType::U16 => t.values::<u16>().ok()?.first().map(|v| i64::from(*v)),
            DType::U32 => t.values::<u32>().ok()?.first().map(|v| i64::from(*v)),
            DType::U64 => t.values::<u64>().ok()?.first().and_then(|v| i64::try_from(*v).ok()),
            _ => None,
        }
    };
    if let Some(v) = outputs.iter().filter(|t| t.dtype == DType::I64).find_map(single) {
        return Some(v);
    }
    if let Some(v) = outputs.iter().find_map(single) {
        return Some(v);
    }
    let probs = outputs.iter().find_map(Tensor::floats)?;
    let (best, _) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    i64::try_from(best).ok()
}

/// Outputs that do not match what the manifest declares.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputError {
    #[error("the model produced {produced} outputs; its manifest declares {declared}")]
    Count { produced: usize, declared: usize },
    #[error("output `{name}` is {got}; its manifest declares {declared}")]
    Dtype { name: String, got: DType, declared: DType },
    #[error("output `{name}` has shape {shape:?}; its manifest declares {declared}")]
    Shape { name: String, shape: Vec<usize>, declared: String },
    #[error("output {index} element {at} is {value}, not finite")]
    NotFinite { index: usize, at: usize, value: f64 },
}

/// Outputs must match the declared count, dtypes and fixed dims, and be finite.
pub fn check_outputs(specs: &[TensorInfo], outputs: &[Tensor]) -> Result<(), OutputError> {
    if !specs.is_empty() && outputs.len() != specs.len() {
        return Err(OutputError::Count { produced: outputs.len(), declared: specs.len() });
    }
    for (spec, t) in specs.iter().zip(outputs) {
        if t.dtype != spec.dtype {
            return Err(OutputError::Dtype { name: spec.name.clone(), got: t.dtype, declared: spec.dtype });
        }
        let fits = t.shape.len() == spec.declared.len()
            && t.shape
                .iter()
                .zip(&spec.declared)
                .all(|(g, d)| d.is_none_or(|d| u64::try_from(*g).is_ok_and(|g| g == d)));
        if !fits {
            return Err(OutputError::Shape {
                name: spec.name.clone(),
                shape: t.shape.clone(),
                declared: show_dims(&spec.declared),
            });
        }
    }
    for (i, t) in outputs.iter().enumerate() {
        if let Some((at, v)) = t.first_non_finite() {
            return Err(OutputError::NotFinite { index: i, at, value: v });
        }
    }
    Ok(())
}
