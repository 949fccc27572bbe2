//! Reading an uploaded ONNX file: its input/output signature, and whether it
//! loads at all.
//!
//! The signature is read from the file's own declarations, with symbolic
//! dimensions kept as written (`N`, `batch`, or `?` when unnamed). "Loads"
//! means tract can build and optimise the graph once symbolic dimensions are
//! fixed to 1: that catches truncated files, garbage that happens to decode
//! as protobuf, and operators tract does not know, before anything is stored.

use std::collections::HashSet;
use std::path::Path;

use sentinel_proto::pb::{Dimension, TensorSpec, dimension::Kind};
use tract_onnx::pb::{ValueInfoProto, tensor_shape_proto::dimension::Value as DimValue, type_proto};
use tract_onnx::prelude::*;

/// Why a file is not a loadable ONNX model. Shown to the uploader.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("the file is not an ONNX model (protobuf decoding failed: {0})")]
    Decode(String),
    #[error("the ONNX model has no graph")]
    NoGraph,
    #[error("the ONNX graph declares no {0}")]
    NoTensors(&'static str),
    #[error("{what} `{name}` is not a tensor with a known element type")]
    NotATensor { what: &'static str, name: String },
    #[error("{what} `{name}` has unsupported element type {elem_type}")]
    UnsupportedType { what: &'static str, name: String, elem_type: i32 },
    #[error("the model does not load: {0}")]
    Load(String),
}

/// What the hub learns from an ONNX file.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// ONNX element type code to our dtype name and tract's datum type.
fn elem_type(code: i32) -> Option<(&'static str, DatumType)> {
    Some(match code {
        1 => ("float32", DatumType::F32),
        2 => ("uint8", DatumType::U8),
        3 => ("int8", DatumType::I8),
        4 => ("uint16", DatumType::U16),
        5 => ("int16", DatumType::I16),
        6 => ("int32", DatumType::I32),
        7 => ("int64", DatumType::I64),
        8 => ("string", DatumType::String),
        9 => ("bool", DatumType::Bool),
        10 => ("float16", DatumType::F16),
        11 => ("float64", DatumType::F64),
        12 => ("uint32", DatumType::U32),
        13 => ("uint64", DatumType::U64),
        _ => return None,
    })
}

/// Size in bytes of one element of a dtype we can carry in raw tensors.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "float32" | "int32" | "uint32" => 4,
        "uint8" | "int8" | "bool" => 1,
        "uint16" | "int16" | "float16" => 2,
        "int64" | "float64" | "uint64" => 8,
        _ => return None,
    })
}

fn tensor_spec(what: &'static str, vi: &ValueInfoProto) -> Result<(TensorSpec, DatumType), OnnxError> {
    let not_tensor = || OnnxError::NotATensor { what, name: vi.name.clone() };
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(not_tensor());
    };
    let (dtype, datum) = elem_type(t.elem_type).ok_or(OnnxError::UnsupportedType {
        what,
        name: vi.name.clone(),
        elem_type: t.elem_type,
    })?;
    let shape = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| Dimension {
                    kind: Some(match &d.value {
                        Some(DimValue::DimValue(n)) if *n >= 0 => Kind::Fixed(u64::try_from(*n).unwrap_or(0)),
                        Some(DimValue::DimParam(p)) if !p.is_empty() => Kind::Symbolic(p.clone()),
                        _ => Kind::Symbolic("?".into()),
                    }),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((TensorSpec { name: vi.name.clone(), dtype: dtype.to_owned(), shape }, datum))
}

/// Reads the signature of the ONNX file at `path` and checks that it loads.
/// CPU-heavy for large models: call it from a blocking thread.
pub fn inspect(path: &Path) -> Result<OnnxSignature, OnnxError> {
    let onnx = onnx().with_ignore_output_shapes(true);
    let proto = onnx.proto_model_for_path(path).map_err(|e| OnnxError::Decode(format!("{e:#}")))?;
    let graph = proto.graph.as_ref().ok_or(OnnxError::NoGraph)?;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut inputs = Vec::new();
    let mut facts = Vec::new();
    for vi in graph.input.iter().filter(|vi| !initializers.contains(vi.name.as_str())) {
        let (spec, datum) = tensor_spec("input", vi)?;
        let dims: TVec<usize> = spec
            .shape
            .iter()
            .map(|d| match d.kind {
                Some(Kind::Fixed(n)) => usize::try_from(n).unwrap_or(1),
                _ => 1,
            })
            .collect();
        facts.push(InferenceFact::dt_shape(datum, dims));
        inputs.push(spec);
    }
    let outputs =
        graph.output.iter().map(|vi| tensor_spec("output", vi).map(|(s, _)| s)).collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() {
        return Err(OnnxError::NoTensors("inputs"));
    }
    if outputs.is_empty() {
        return Err(OnnxError::NoTensors("outputs"));
    }
    let load = || -> TractResult<()> {
        let mut model = onnx.model_for_proto_model(&proto)?;
        for (i, fact) in facts.into_iter().enumerate() {
            model.set_input_fact(i, fact)?;
        }
        model.into_optimized()?;
        Ok(())
    };
    let loaded = load();
    drop(proto);
    release_freed_memory();
    loaded.map_err(|e| OnnxError::Load(format!("{e:#}")))?;
    Ok(OnnxSignature { inputs, outputs })
}

/// Optimising a large graph allocates hundreds of MB that glibc keeps in its
/// arenas after they are freed; hand them back so an idle hub stays small.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions and touches no memory the program still owns.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}
