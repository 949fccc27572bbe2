//! The worker's one model: loaded with tract for fixed input shapes, warmed up,
//! and run on requests that are checked against those shapes first.
//!
//! Every input shape is fixed at load time (models may declare symbolic
//! dimensions such as `N`), so the optimised plan is concrete and the warm-up
//! exercises exactly the code paths later requests take. That matters for the
//! sandbox: tract reads `/sys` and sizes its buffers on the first run, which
//! must happen before the filter forbids opening files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::protocol::{DType, Tensor};

/// The model could not be prepared for serving.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("loading {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: the model has {model} inputs but {given} input shapes were given")]
    InputCount { path: PathBuf, model: usize, given: usize },
    #[error("{path}: {what} {index} has type {datum:?}; the worker carries only f32 and i64")]
    UnsupportedDType { path: PathBuf, what: &'static str, index: usize, datum: DatumType },
    #[error("{path}: warm-up inference failed: {message}")]
    WarmUp { path: PathBuf, message: String },
}

/// A request the model cannot run; the worker answers it with an error and
/// keeps serving.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InferenceError {
    #[error("expected {expected} input tensors, got {found}")]
    InputCount { expected: usize, found: usize },
    #[error("input {index}: expected {expected}, got {found}")]
    DType { index: usize, expected: DType, found: DType },
    #[error("input {index}: expected shape {expected:?}, got {found:?}")]
    Shape { index: usize, expected: Vec<usize>, found: Vec<usize> },
    #[error("input {index}: element {element} is {value}; inputs must be finite")]
    NotFinite { index: usize, element: usize, value: f32 },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("output {index} has unsupported type {datum:?}")]
    OutputDType { index: usize, datum: DatumType },
}

/// The shape and type a request must have for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// An optimised, runnable model with fixed input shapes.
#[derive(Debug)]
pub struct LoadedModel {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
}

impl LoadedModel {
    /// Loads the ONNX file at `path` with one shape per model input, in order.
    /// An input's element type comes from the model (f32 when undeclared).
    pub fn load(path: &Path, input_shapes: &[Vec<usize>]) -> Result<LoadedModel, ModelError> {
        let load_err = |e: TractError| ModelError::Load { path: path.to_owned(), message: format!("{e:#}") };
        // Output shapes declared in the file are often wrong for other batch
        // sizes; tract infers them from the fixed inputs instead.
        let mut model = onnx().with_ignore_output_shapes(true).model_for_path(path).map_err(load_err)?;
        let count = model.inputs.len();
        if count != input_shapes.len() {
            return Err(ModelError::InputCount { path: path.to_owned(), model: count, given: input_shapes.len() });
        }
        let mut inputs = Vec::with_capacity(count);
        for (index, shape) in input_shapes.iter().enumerate() {
            let datum = model.input_fact(index).map_err(load_err)?.datum_type().unwrap_or(f32::datum_type());
            let dtype = wire_dtype(datum).ok_or(ModelError::UnsupportedDType {
                path: path.to_owned(),
                what: "input",
                index,
                datum,
            })?;
            model.set_input_fact(index, InferenceFact::dt_shape(datum, shape.clone())).map_err(load_err)?;
            inputs.push(InputSpec { dtype, shape: shape.clone() });
        }
        let typed = model.into_optimized().map_err(load_err)?;
        for index in 0..typed.outputs.len() {
            let datum = typed.output_fact(index).map_err(load_err)?.datum_type;
            if wire_dtype(datum).is_none() {
                return Err(ModelError::UnsupportedDType { path: path.to_owned(), what: "output", index, datum });
            }
        }
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(LoadedModel { plan, inputs })
    }

    /// What each request input must look like.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// Runs once on zeros so that everything tract initialises lazily (CPU
    /// feature and cache-size probes under `/sys`, scratch buffers) is done
    /// before the sandbox goes up.
    pub fn warm_up(&self, path: &Path) -> Result<(), ModelError> {
        let zeros: Vec<Tensor> = self
            .inputs
            .iter()
            .map(|spec| {
                let bytes = spec.shape.iter().product::<usize>() * spec.dtype.size();
                Tensor { dtype: spec.dtype, shape: spec.shape.clone(), data: vec![0; bytes] }
            })
            .collect();
        self.run(&zeros).map(drop).map_err(|e| ModelError::WarmUp { path: path.to_owned(), message: e.to_string() })
    }

    /// Checks `inputs` against the fixed specs, then runs the model.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        if inputs.len() != self.inputs.len() {
            return Err(InferenceError::InputCount { expected: self.inputs.len(), found: inputs.len() });
        }
        let mut values = TVec::with_capacity(inputs.len());
        for (index, (t, spec)) in inputs.iter().zip(&self.inputs).enumerate() {
            if t.dtype != spec.dtype {
                return Err(InferenceError::DType { index, expected: spec.dtype, found: t.dtype });
            }
            if t.shape != spec.shape {
                return Err(InferenceError::Shape { index, expected: spec.shape.clone(), found: t.shape.clone() });
            }
            values.push(to_tract(index, t)?.into_tvalue());
        }
        let outputs = self.plan.run(values).map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        outputs.iter().enumerate().map(|(index, v)| from_tract(index, v)).collect()
    }
}

fn wire_dtype(datum: DatumType) -> Option<DType> {
    match datum {
        DatumType::F32 => Some(DType::F32),
        DatumType::I64 => Some(DType::I64),
        _ => None,
    }
}

/// Builds a tract tensor from wire bytes. The protocol decoder has already
/// checked that the byte count matches the shape.
fn to_tract(index: usize, t: &Tensor) -> Result<tract_onnx::prelude::Tensor, InferenceError> {
    let shape_err = |e: TractError| InferenceError::Run(format!("input {index}: {e:#}"));
    match t.dtype {
        DType::F32 => {
            let values = t.to_f32().map_err(|e| InferenceError::Run(e.to_string()))?;
            if let Some((element, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(InferenceError::NotFinite { index, element, value });
            }
            tract_ndarray::ArrayD::from_shape_vec(t.shape.clone(), values)
                .map(Into::into)
                .map_err(|e| shape_err(e.into()))
        }
        DType::I64 => {
            let values = t.to_i64().map_err(|e| InferenceError::Run(e.to_string()))?;
            tract_ndarray::ArrayD::from_shape_vec(t.shape.clone(), values)
                .map(Into::into)
                .map_err(|e| shape_err(e.into()))
        }
    }
}

fn from_tract(index: usize, v: &TValue) -> Result<Tensor, InferenceError> {
    let shape = v.shape().to_vec();
    let datum = v.datum_type();
    let run_err = |e: TractError| InferenceError::Run(format!("output {index}: {e:#}"));
    let dtype = wire_dtype(datum).ok_or(InferenceError::OutputDType { index, datum })?;
    let view = v.try_as_plain_ram().map_err(run_err)?;
    match dtype {
        DType::F32 => Ok(Tensor::from_f32(shape, view.as_slice::<f32>().map_err(run_err)?)),
        DType::I64 => Ok(Tensor::from_i64(shape, view.as_slice::<i64>().map_err(run_err)?)),
    }
}
