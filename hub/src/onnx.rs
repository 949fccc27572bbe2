//! Reading an uploaded ONNX file's signature in the hub's own process:
//! inputs, outputs, their dtypes and dims, and how many nodes the graph has.
//!
//! This is the only part of an upload the hub decodes itself, and it is cheap
//! and bounded by construction: it walks the protobuf wire format from disk,
//! seeking over everything it does not need (weights, attributes, node
//! bodies), so memory stays at a few buffers whatever the file holds, and
//! time is one pass over the field headers. Loading the graph with an engine
//! (analysis, optimisation, constant folding, a probe inference) is another
//! matter: a 193-byte file can ask for gigabytes there. That happens in a
//! confined child process; see [`crate::inspect`].
//!
//! The signature is read from the file's own declarations, with symbolic
//! dimensions kept as written (`N`, `batch`, or `?` when unnamed). Graph
//! inputs that are also initializers (weights listed as inputs, as files of
//! IR version < 4 do) are not part of the signature.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use prost::Message as _;
use sentinel_proto::pb::{Dimension, TensorSpec, dimension::Kind};
use tract_onnx::pb::{ValueInfoProto, tensor_shape_proto::dimension::Value as DimValue, type_proto};

/// Default for [`SignatureLimits::max_nodes`]: generous for real exports
/// (MobileNet and ResNet-50 have 100-200 nodes, BERT-base 1-2.5 thousand,
/// GPT-2 about 3 thousand, BERT-large about 5 thousand), and below the sizes
/// where tract's optimiser grows out of proportion (a 20,000-node chain took
/// 8 s, 40,000 took 37 s).
pub const DEFAULT_MAX_NODES: u64 = 20_000;

/// Largest single input or output declaration read (a `ValueInfoProto`).
const MAX_VALUE_INFO_BYTES: u64 = 64 * 1024;
/// Largest total of input and output declarations kept.
const MAX_SIGNATURE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting of subgraphs (`If`/`Loop`/`Scan` bodies) followed.
const MAX_GRAPH_DEPTH: u32 = 32;
/// Longest initializer name compared against input names.
const MAX_NAME_BYTES: u64 = 64 * 1024;

/// Why a file is not a usable ONNX model. Shown to the uploader.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("the file is not an ONNX model (protobuf decoding failed: {0})")]
    Decode(String),
    #[error("reading the upload: {0}")]
    Read(#[source] io::Error),
    #[error("the ONNX model has no graph")]
    NoGraph,
    #[error("the ONNX graph declares no {0}")]
    NoTensors(&'static str),
    #[error("{what} `{name}` is not a tensor with a known element type")]
    NotATensor { what: &'static str, name: String },
    #[error("{what} `{name}` has unsupported element type {elem_type}")]
    UnsupportedType { what: &'static str, name: String, elem_type: i32 },
    #[error(
        "the graph has {nodes} nodes (subgraphs and functions included), more than this hub's inspection \
         limit of {limit} nodes; ask the hub's operator to raise --inspect-max-nodes"
    )]
    TooManyNodes { nodes: u64, limit: u64 },
    #[error("the graph's input and output declarations are larger than this hub reads ({0})")]
    SignatureTooLarge(String),
    /// Weights kept in files beside the model: a version is one file, and a
    /// hub must not open paths an upload names.
    #[error(
        "initializer `{name}` keeps its data in an external file; a version must be one self-contained \
         file: save it with the weights inside (onnx.save_model(model, path, save_as_external_data=False), \
         or mlflow.onnx.log_model(..., save_as_external_data=False))"
    )]
    ExternalData { name: String },
}

/// Bounds on the in-process read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureLimits {
    /// Refuse a graph with more nodes than this, subgraphs and functions included.
    pub max_nodes: u64,
}

impl Default for SignatureLimits {
    fn default() -> Self {
        Self { max_nodes: DEFAULT_MAX_NODES }
    }
}

/// What the hub learns from an ONNX file without loading it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Nodes in the graph, its subgraphs and its local functions.
    pub nodes: u64,
    /// The distinct operators used, as `(domain, op_type)` with the default
    /// domain as `""`; at most [`MAX_OPERATORS`] are kept.
    pub operators: BTreeSet<(String, String)>,
}

/// Most distinct operators a signature keeps (ONNX defines under 200).
pub const MAX_OPERATORS: usize = 1024;
/// Longest operator or domain name kept; a longer one is skipped.
const MAX_OPERATOR_NAME_BYTES: u64 = 256;

impl OnnxSignature {
    /// The domain of the operator named `op_type`, when the graph uses it
    /// (`ai.onnx` for the default domain).
    pub fn operator_domain(&self, op_type: &str) -> Option<&str> {
        self.operators
            .iter()
            .find(|(_, op)| op == op_type)
            .map(|(domain, _)| if domain.is_empty() { "ai.onnx" } else { domain.as_str() })
    }
}

impl OnnxSignature {
    /// The shapes a device serves with when nothing else is configured:
    /// each input's declared dims with symbolic ones fixed to 1.
    pub fn default_input_shapes(&self) -> Vec<Vec<u64>> {
        self.inputs
            .iter()
            .map(|t| {
                t.shape
                    .iter()
                    .map(|d| match d.kind {
                        Some(Kind::Fixed(n)) => n,
                        _ => 1,
                    })
                    .collect()
            })
            .collect()
    }
}

/// `[N, 3, 640, 640]` style rendering of declared dims (`?` for an unnamed symbol).
pub fn show_shape(dims: &[sentinel_proto::pb::Dimension]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match &d.kind {
            Some(Kind::Fixed(n)) => n.to_string(),
            Some(Kind::Symbolic(s)) if !s.is_empty() => s.clone(),
            _ => "?".to_owned(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// ONNX element type code to our dtype name.
fn elem_type(code: i32) -> Option<&'static str> {
    Some(match code {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        _ => return None,
    })
}

/// Size in bytes of one element of a dtype we can carry in raw tensors.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "float32" | "int32" | "uint32" => 4,
        "uint8" | "int8" | "bool" => 1,
        "uint16" | "int16" | "float16" | "bfloat16" => 2,
        "int64" | "float64" | "uint64" => 8,
        _ => return None,
    })
}

fn tensor_spec(what: &'static str, vi: &ValueInfoProto) -> Result<TensorSpec, OnnxError> {
    let not_tensor = || OnnxError::NotATensor { what, name: vi.name.clone() };
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(not_tensor());
    };
    let dtype = elem_type(t.elem_type).ok_or(OnnxError::UnsupportedType {
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
    Ok(TensorSpec { name: vi.name.clone(), dtype: dtype.to_owned(), shape })
}

/// Reads the signature of the ONNX file at `path`. Does blocking file I/O:
/// call it from a blocking thread.
pub fn read_signature(path: &Path, limits: SignatureLimits) -> Result<OnnxSignature, OnnxError> {
    let file = File::open(path).map_err(OnnxError::Read)?;
    let len = file.metadata().map_err(OnnxError::Read)?.len();
    read_signature_from(BufReader::new(file), len, limits)
}

/// [`read_signature`] over any seekable reader holding `len` bytes of ONNX.
pub fn read_signature_from<R: Read + Seek>(
    reader: R,
    len: u64,
    limits: SignatureLimits,
) -> Result<OnnxSignature, OnnxError> {
    let mut w = Walker { r: reader, pos: 0, nodes: 0, operators: BTreeSet::new() };
    // ModelProto: graph = 7, functions = 25. Several `graph` fields merge in
    // protobuf, so every one is read.
    let mut graphs = Vec::new();
    let mut functions = Vec::new();
    w.fields(len, |w, field, wire| match (field, wire) {
        (7, Wire::Len(n)) => {
            graphs.push((w.pos, n));
            w.skip(n)
        }
        (25, Wire::Len(n)) => {
            functions.push((w.pos, n));
            w.skip(n)
        }
        (_, wire) => w.skip_wire(wire),
    })?;
    if graphs.is_empty() {
        return Err(OnnxError::NoGraph);
    }
    let mut sig = Collected::default();
    for &(start, n) in &graphs {
        w.seek_to(start)?;
        w.graph(start + n, 0, Some(&mut sig))?;
    }
    for &(start, n) in &functions {
        w.seek_to(start)?;
        w.function(start + n)?;
    }
    if w.nodes > limits.max_nodes {
        return Err(OnnxError::TooManyNodes { nodes: w.nodes, limit: limits.max_nodes });
    }
    // Second pass: initializer names, to drop weights declared as inputs.
    let mut input_names: HashSet<String> = sig.inputs.iter().map(|vi| vi.name.clone()).collect();
    let mut weights = HashSet::new();
    for &(start, n) in &graphs {
        w.seek_to(start)?;
        w.initializer_names(start + n, &mut input_names, &mut weights)?;
    }
    let inputs = sig
        .inputs
        .iter()
        .filter(|vi| !weights.contains(&vi.name))
        .map(|vi| tensor_spec("input", vi))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = sig.outputs.iter().map(|vi| tensor_spec("output", vi)).collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() {
        return Err(OnnxError::NoTensors("inputs"));
    }
    if outputs.is_empty() {
        return Err(OnnxError::NoTensors("outputs"));
    }
    Ok(OnnxSignature { inputs, outputs, nodes: w.nodes, operators: w.operators })
}

#[derive(Debug, Default)]
struct Collected {
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    kept_bytes: u64,
}

/// A protobuf field's wire type, with the length of a length-delimited one.
#[derive(Debug, Clone, Copy)]
enum Wire {
    Varint,
    Fixed64,
    Len(u64),
    Fixed32,
}

struct Walker<R> {
    r: R,
    /// Bytes consumed from the start of the file.
    pos: u64,
    /// Nodes seen so far, subgraphs and functions included.
    nodes: u64,
    /// Distinct `(domain, op_type)` seen so far.
    operators: BTreeSet<(String, String)>,
}

fn decode_err(what: impl Into<String>) -> OnnxError {
    OnnxError::Decode(what.into())
}

impl<R: Read + Seek> Walker<R> {
    fn byte(&mut self) -> Result<u8, OnnxError> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => decode_err("the file ends inside a field"),
            _ => OnnxError::Read(e),
        })?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, OnnxError> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(decode_err("a varint is longer than 10 bytes"))
    }

    fn skip(&mut self, n: u64) -> Result<(), OnnxError> {
        let n = i64::try_from(n).map_err(|_| decode_err("a field is longer than the file"))?;
        self.r.seek_relative(n).map_err(OnnxError::Read)?;
        self.pos += n as u64;
        Ok(())
    }

    fn seek_to(&mut self, pos: u64) -> Result<(), OnnxError> {
        self.r.seek(io::SeekFrom::Start(pos)).map_err(OnnxError::Read)?;
        self.pos = pos;
        Ok(())
    }

    fn skip_wire(&mut self, wire: Wire) -> Result<(), OnnxError> {
        match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.skip(8),
            Wire::Len(n) => self.skip(n),
            Wire::Fixed32 => self.skip(4),
        }
    }

    fn read_bytes(&mut self, n: u64) -> Result<Vec<u8>, OnnxError> {
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| decode_err("a field is too long"))?];
        self.r.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => decode_err("the file ends inside a field"),
            _ => OnnxError::Read(e),
        })?;
        self.pos += n;
        Ok(buf)
    }

    /// Calls `on_field` for each field up to `end`, which must consume
    /// exactly the field's payload. A field that runs past `end` is an error.
    /// Counting is cheap (a header walk), so the whole graph is counted and
    /// a refusal can name the real count.
    fn count_node(&mut self) {
        self.nodes = self.nodes.saturating_add(1);
    }

    fn fields(
        &mut self,
        end: u64,
        mut on_field: impl FnMut(&mut Self, u64, Wire) -> Result<(), OnnxError>,
    ) -> Result<(), OnnxError> {
        while self.pos < end {
            let key = self.varint()?;
            let field = key >> 3;
            let wire = match key & 7 {
                0 => Wire::Varint,
                1 => Wire::Fixed64,
                2 => {
                    let n = self.varint()?;
                    if n > end.saturating_sub(self.pos) {
                        return Err(decode_err(format!("field {field} is longer than the message holding it")));
                    }
                    Wire::Len(n)
                }
                5 => Wire::Fixed32,
                other => return Err(decode_err(format!("field {field} has wire type {other}, which ONNX never uses"))),
            };
            if field == 0 {
                return Err(decode_err("a field number is 0"));
            }
            on_field(self, field, wire)?;
            if self.pos > end {
                return Err(decode_err(format!("field {field} runs past the end of the message holding it")));
            }
        }
        Ok(())
    }

    /// GraphProto: node = 1, input = 11, output = 12. The signature is
    /// collected from the top-level graph only (`sig` is `Some`); subgraphs
    /// only add to the node count.
    fn graph(&mut self, end: u64, depth: u32, mut sig: Option<&mut Collected>) -> Result<(), OnnxError> {
        if depth > MAX_GRAPH_DEPTH {
            return Err(decode_err(format!("subgraphs are nested more than {MAX_GRAPH_DEPTH} deep")));
        }
        self.fields(end, |w, field, wire| match (field, wire, sig.as_deref_mut()) {
            (1, Wire::Len(n), _) => w.node(w.pos + n, depth),
            (11 | 12, Wire::Len(n), Some(sig)) => {
                if n > MAX_VALUE_INFO_BYTES || sig.kept_bytes + n > MAX_SIGNATURE_BYTES {
                    return Err(OnnxError::SignatureTooLarge(format!(
                        "at most {MAX_VALUE_INFO_BYTES} bytes each and {MAX_SIGNATURE_BYTES} in all"
                    )));
                }
                sig.kept_bytes += n;
                let vi = ValueInfoProto::decode(w.read_bytes(n)?.as_slice())
                    .map_err(|e| decode_err(format!("graph {}: {e}", if field == 11 { "input" } else { "output" })))?;
                if field == 11 {
                    sig.inputs.push(vi)
                } else {
                    sig.outputs.push(vi)
                }
                Ok(())
            }
            (_, wire, _) => w.skip_wire(wire),
        })
    }

    /// FunctionProto: node = 7.
    fn function(&mut self, end: u64) -> Result<(), OnnxError> {
        self.fields(end, |w, field, wire| match (field, wire) {
            (7, Wire::Len(n)) => w.node(w.pos + n, 1),
            (_, wire) => w.skip_wire(wire),
        })
    }

    /// NodeProto: op_type = 4, attribute = 5, domain = 7; AttributeProto:
    /// g = 6, graphs = 11.
    fn node(&mut self, end: u64, depth: u32) -> Result<(), OnnxError> {
        self.count_node();
        let (mut op_type, mut domain) = (None, String::new());
        self.fields(end, |w, field, wire| match (field, wire) {
            (4 | 7, Wire::Len(n)) if n <= MAX_OPERATOR_NAME_BYTES => {
                let name = String::from_utf8_lossy(&w.read_bytes(n)?).into_owned();
                if field == 4 {
                    op_type = Some(name);
                } else {
                    domain = name;
                }
                Ok(())
            }
            (5, Wire::Len(n)) => {
                let attr_end = w.pos + n;
                w.fields(attr_end, |w, field, wire| match (field, wire) {
                    (6 | 11, Wire::Len(n)) => w.graph(w.pos + n, depth + 1, None),
                    (_, wire) => w.skip_wire(wire),
                })
            }
            (_, wire) => w.skip_wire(wire),
        })?;
        if let Some(op_type) = op_type
            && self.operators.len() < MAX_OPERATORS
        {
            self.operators.insert((domain, op_type));
        }
        Ok(())
    }

    /// GraphProto: initializer = 5; TensorProto: name = 8.
    fn initializer_names(
        &mut self,
        end: u64,
        inputs: &mut HashSet<String>,
        weights: &mut HashSet<String>,
    ) -> Result<(), OnnxError> {
        self.fields(end, |w, field, wire| match (field, wire) {
            (5, Wire::Len(n)) => {
                let tensor_end = w.pos + n;
                // TensorProto: name = 8, external_data = 13, data_location = 14 (1: EXTERNAL).
                let (mut name, mut external) = (String::new(), false);
                w.fields(tensor_end, |w, field, wire| match (field, wire) {
                    (8, Wire::Len(n)) if n <= MAX_NAME_BYTES => {
                        name = String::from_utf8_lossy(&w.read_bytes(n)?).into_owned();
                        if let Some(input) = inputs.take(&name) {
                            weights.insert(input);
                        }
                        Ok(())
                    }
                    (13, Wire::Len(n)) => {
                        external = true;
                        w.skip(n)
                    }
                    (14, Wire::Varint) => {
                        external |= w.varint()? == 1;
                        Ok(())
                    }
                    (_, wire) => w.skip_wire(wire),
                })?;
                if external {
                    return Err(OnnxError::ExternalData { name: name.chars().take(200).collect() });
                }
                Ok(())
            }
            (_, wire) => w.skip_wire(wire),
        })
    }
}

#[cfg(test)]
mod tests;
