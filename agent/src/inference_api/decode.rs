//! Decoding a v2 inference request (JSON, or JSON followed by the binary
//! tensor data extension) into tensors, without I/O.
//!
//! Every size the client chooses is checked before it is allocated:
//! - the JSON is parsed with each input's `data` kept as a borrowed slice of
//!   the body, so no `serde_json::Value` tree (32 bytes per number) is built;
//! - an input's element count (the product of its shape, with checked
//!   arithmetic) must fit in the data actually sent: at most one element per
//!   two bytes of JSON text, or exactly `binary_data_size` bytes; only then is
//!   the tensor allocated, once, at its final size;
//! - the request id, the number of inputs and each rank have fixed caps;
//! - unknown `parameters` are skipped without being stored.
//!
//! Every datatype of [`DType`] is accepted under its v2 name
//! ([`datatype_name`]: `FP32`, `FP16`, `BF16`, `FP64`, `INT8` ... `UINT64`,
//! `BOOL`, `BYTES`). JSON integers are range-checked for their type, FP16 and
//! BF16 numbers are rounded to it, BOOL takes `true`/`false` and BYTES takes
//! strings; binary BOOL bytes must be 0 or 1 and binary BYTES must hold
//! exactly the shape's count of length-prefixed strings.
//!
//! Messages quote the client's values clipped to [`ECHO_LIMIT`] bytes.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use sentinel_worker_protocol::frame::{DType, Element, MAX_RANK, ProtocolError, Tensor};

/// Bytes of a client's value quoted back in an error message.
pub const ECHO_LIMIT: usize = sentinel_proto::quote::QUOTE_LIMIT;

/// Limits a request is decoded under.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    /// Largest body (JSON and binary together).
    pub max_body_bytes: usize,
    /// Longest request `id`, in bytes (it is remembered for feedback).
    pub max_id_bytes: usize,
    /// Most inputs in one request.
    pub max_inputs: usize,
}

/// Longest request id by default: room for a UUID, a trace id and a prefix.
pub const MAX_ID_BYTES: usize = 256;
/// Most inputs of one request by default; models take a handful.
pub const MAX_INPUTS: usize = 64;

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_body_bytes: 16 << 20, max_id_bytes: MAX_ID_BYTES, max_inputs: MAX_INPUTS }
    }
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedOutput {
    pub name: String,
    /// Its `binary_data` parameter, when given.
    pub binary: Option<bool>,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRequest {
    /// The client's request id, if any (at most `max_id_bytes`).
    pub id: Option<String>,
    /// Inputs by name, in request order.
    pub inputs: Vec<(String, Tensor)>,
    /// The outputs asked for; `None` means all.
    pub outputs: Option<Vec<WantedOutput>>,
    /// The request-level `binary_data_output` parameter.
    pub binary_output: bool,
}

/// `s` clipped to [`ECHO_LIMIT`] bytes on a character boundary, with an
/// ellipsis and the full length when clipped.
pub fn clip(s: &str) -> String {
    match sentinel_proto::quote::clip(s, ECHO_LIMIT) {
        (shown, true) => format!("{shown}… ({} bytes)", s.len()),
        (shown, false) => shown.to_owned(),
    }
}

#[derive(Debug, Deserialize)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow)]
    inputs: Vec<RawInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
    #[serde(default)]
    parameters: Option<RequestParameters>,
}

#[derive(Debug, Deserialize)]
struct RawInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    parameters: Option<InputParameters>,
}

#[derive(Debug, Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<OutputParameters>,
}

/// The request parameters the agent reads; others are skipped unstored.
#[derive(Debug, Deserialize)]
struct RequestParameters {
    #[serde(default)]
    binary_data_output: Option<bool>,
    #[serde(flatten)]
    _rest: IgnoreRest,
}

#[derive(Debug, Deserialize)]
struct InputParameters {
    #[serde(default)]
    binary_data_size: Option<u64>,
    #[serde(flatten)]
    _rest: IgnoreRest,
}

#[derive(Debug, Deserialize)]
struct OutputParameters {
    #[serde(default)]
    binary_data: Option<bool>,
    #[serde(flatten)]
    _rest: IgnoreRest,
}

/// Swallows a map's other entries without keeping them.
#[derive(Debug, Default)]
struct IgnoreRest;

impl<'de> Deserialize<'de> for IgnoreRest {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IgnoreRest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("parameters")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<IgnoreRest, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IgnoreRest)
            }
        }
        d.deserialize_map(V)
    }
}

/// Why a request body was refused (a 400). The text is what the client
/// reads, so every message names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("request body of {size} bytes is over the limit of {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    /// The header as sent, clipped.
    #[error("inference-header-content-length must be a byte count, not {0:?}")]
    HeaderLengthNotACount(String),
    #[error("inference-header-content-length is {header}, but the body has only {body} bytes")]
    HeaderLengthPastBody { header: usize, body: usize },
    /// The parser's message, clipped.
    #[error("request JSON: {0}")]
    Json(String),
    #[error("request id is {len} bytes; at most {limit} are allowed")]
    IdTooLong { len: usize, limit: usize },
    #[error("{count} inputs in one request; at most {limit} are allowed")]
    TooManyInputs { count: usize, limit: usize },
    #[error("{0} bytes of binary tensor data are not claimed by any input")]
    UnclaimedBinary(usize),
    /// One input is wrong; `name` is clipped.
    #[error("{}", input_message(name, problem))]
    Input { name: String, problem: InputError },
}

fn input_message(name: &str, problem: &InputError) -> String {
    match problem {
        InputError::NoData => format!("input `{name}` has no data"),
        p => format!("input `{name}`: {p}"),
    }
}

/// What is wrong with one input of a request.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The datatype as sent, clipped.
    #[error("datatype {0} is not supported ({list})", list = datatype_list())]
    Datatype(String),
    #[error("rank {0} is over the limit of {MAX_RANK}")]
    Rank(usize),
    #[error("negative dim {0} in shape")]
    NegativeDim(i64),
    #[error("shape {0:?} is larger than a request can carry")]
    TooLarge(Vec<usize>),
    #[error("binary_data_size {size} exceeds the {left} bytes left")]
    BinaryPastEnd { size: usize, left: usize },
    #[error("shape {shape:?} needs {count} elements ({bytes} bytes), binary_data_size is {size}")]
    BinarySize { shape: Vec<usize>, count: usize, bytes: usize, size: usize },
    #[error("shape {shape:?} needs {count} strings (at least {bytes} bytes), binary_data_size is {size}")]
    BinaryStrings { shape: Vec<usize>, count: usize, bytes: usize, size: usize },
    #[error("give either data or a binary_data_size, not both")]
    DataAndBinary,
    /// The element parser's message, clipped.
    #[error("{0}")]
    Elements(String),
    #[error("shape {shape:?} needs {count} elements, got {seen}")]
    ElementCount { shape: Vec<usize>, count: usize, seen: usize },
    #[error("has no data")]
    NoData,
    #[error("BOOL element {element} is byte {byte}; booleans are 0 or 1")]
    NotABool { element: usize, byte: u8 },
    #[error("BYTES data: {0}")]
    Strings(String),
    #[error(transparent)]
    Tensor(ProtocolError),
}

/// Decodes a request body. `header_length` is the
/// `Inference-Header-Content-Length` header, when present: the JSON is that
/// many leading bytes and binary tensor data follows.
pub fn decode_request(
    body: Bytes,
    header_length: Option<&str>,
    limits: &DecodeLimits,
) -> Result<DecodedRequest, DecodeError> {
    if body.len() > limits.max_body_bytes {
        return Err(DecodeError::BodyTooLarge { size: body.len(), limit: limits.max_body_bytes });
    }
    let (head, mut binary) = match header_length {
        Some(v) => {
            let n = v.trim().parse::<usize>().map_err(|_| DecodeError::HeaderLengthNotACount(clip(v)))?;
            if n > body.len() {
                return Err(DecodeError::HeaderLengthPastBody { header: n, body: body.len() });
            }
            (body.slice(..n), body.slice(n..))
        }
        None => (body.clone(), Bytes::new()),
    };
    let raw: RawRequest<'_> = serde_json::from_slice(&head)
        .map_err(|e| DecodeError::Json(sentinel_proto::quote::clip_message(&e.to_string())))?;
    if let Some(id) = &raw.id
        && id.len() > limits.max_id_bytes
    {
        return Err(DecodeError::IdTooLong { len: id.len(), limit: limits.max_id_bytes });
    }
    if raw.inputs.len() > limits.max_inputs {
        return Err(DecodeError::TooManyInputs { count: raw.inputs.len(), limit: limits.max_inputs });
    }
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in &raw.inputs {
        let tensor = decode_input(input, &mut binary, limits)
            .map_err(|problem| DecodeError::Input { name: clip(&input.name), problem })?;
        inputs.push((input.name.clone(), tensor));
    }
    if !binary.is_empty() {
        return Err(DecodeError::UnclaimedBinary(binary.len()));
    }
    let binary_output = raw.parameters.as_ref().and_then(|p| p.binary_data_output).unwrap_or(false);
    let outputs = raw.outputs.map(|list| {
        list.into_iter()
            .map(|o| WantedOutput { binary: o.parameters.and_then(|p| p.binary_data), name: o.name })
            .collect()
    });
    Ok(DecodedRequest { id: raw.id, inputs, outputs, binary_output })
}

/// The v2 `datatype` name of a dtype.
pub fn datatype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::F64 => "FP64",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::I16 => "INT16",
        DType::U16 => "UINT16",
        DType::I32 => "INT32",
        DType::U32 => "UINT32",
        DType::I64 => "INT64",
        DType::U64 => "UINT64",
        DType::Bool => "BOOL",
        DType::String => "BYTES",
    }
}

/// The dtype of a v2 `datatype` name, if the agent carries it.
pub fn parse_datatype(name: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|d| datatype_name(*d) == name)
}

/// Every v2 datatype accepted, for error messages.
fn datatype_list() -> String {
    DType::ALL.map(datatype_name).join(", ")
}

/// Builds one input tensor from its JSON data or the next binary chunk.
fn decode_input(input: &RawInput<'_>, binary: &mut Bytes, limits: &DecodeLimits) -> Result<Tensor, InputError> {
    let dtype = parse_datatype(&input.datatype).ok_or_else(|| InputError::Datatype(clip(&input.datatype)))?;
    if input.shape.len() > MAX_RANK {
        return Err(InputError::Rank(input.shape.len()));
    }
    let shape = input
        .shape
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| InputError::NegativeDim(*d)))
        .collect::<Result<Vec<usize>, _>>()?;
    let too_large = || InputError::TooLarge(shape.clone());
    let count = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).ok_or_else(too_large)?;
    // The exact byte count of a fixed-width tensor; for BYTES the least one
    // can take (every string has a 4-byte length prefix).
    let bytes = count.checked_mul(dtype.zero_width()).ok_or_else(too_large)?;
    let binary_size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
    let data = match (binary_size, input.data) {
        (Some(n), None) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > binary.len() {
                return Err(InputError::BinaryPastEnd { size: n, left: binary.len() });
            }
            if dtype.width().is_some() && n != bytes {
                return Err(InputError::BinarySize { shape, count, bytes, size: n });
            }
            if dtype.width().is_none() && n < bytes {
                return Err(InputError::BinaryStrings { shape, count, bytes, size: n });
            }
            binary.split_to(n).to_vec()
        }
        (Some(_), Some(_)) => {
            return Err(InputError::DataAndBinary);
        }
        (None, Some(raw)) => {
            // Each JSON element takes at least one digit and one separator,
            // so a shape claiming more than that is refused before the
            // tensor is allocated.
            let text = raw.get();
            let most = text.len().div_ceil(2);
            let fits = count <= most && bytes <= limits.max_body_bytes.saturating_mul(4);
            // A shape claiming more than the data can hold is only counted
            // against it, never allocated.
            if fits && let Some(data) = fast_numbers(text, dtype, count, bytes) {
                return Ok(Tensor { dtype, shape, data });
            }
            let mut out = if fits { Some(Vec::with_capacity(bytes)) } else { None };
            let mut seen = 0usize;
            let limit = if fits { count } else { most };
            Elements { dtype, limit, seen: &mut seen, out: out.as_mut() }
                .deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| InputError::Elements(sentinel_proto::quote::clip_message(&e.to_string())))?;
            match out {
                Some(out) if seen == count => out,
                _ => return Err(InputError::ElementCount { shape, count, seen }),
            }
        }
        (None, None) => return Err(InputError::NoData),
    };
    let tensor = Tensor { dtype, shape, data };
    // Binary data is only sized so far: booleans must be 0 or 1 and BYTES
    // must hold exactly `count` length-prefixed strings.
    tensor.check(0).map_err(|e| match e {
        ProtocolError::NotABool { element, byte, .. } => InputError::NotABool { element, byte },
        ProtocolError::Strings { reason, .. } => InputError::Strings(reason),
        other => InputError::Tensor(other),
    })?;
    Ok(tensor)
}

/// Deepest nesting the fast path takes; deeper data goes the general way.
const FAST_DEPTH: usize = 32;

/// The fast path of JSON `data` for numeric dtypes: a scan of the text for
/// (nested) arrays of plain JSON numbers, each parsed by the standard
/// library straight into the tensor's bytes, without serde's per-element
/// dispatch. A 110,592-number text-direction request took 3.6-4.9 ms the
/// general way, more than building a `serde_json::Value` of it. It gives
/// up (`None`) on anything it does not expect: another element count, a
/// value that is not a plain number, an integer out of the dtype's range,
/// a float that is not finite, an empty array, odd syntax. The general path
/// then decodes the same text and says what is wrong. FP32 is parsed as
/// f32 directly (correctly rounded); the general path rounds through f64.
fn fast_numbers(text: &str, dtype: DType, count: usize, bytes: usize) -> Option<Vec<u8>> {
    if matches!(dtype, DType::Bool | DType::String) {
        return None;
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(bytes);
    let (mut i, mut depth, mut seen) = (0usize, 0usize, 0usize);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    // The data is one array (a scalar input is a one-element array too).
    if b.get(i) != Some(&b'[') {
        return None;
    }
    loop {
        // Expecting a value: an array or a number.
        skip_ws(&mut i);
        match b.get(i)? {
            b'[' => {
                depth += 1;
                if depth > FAST_DEPTH {
                    return None;
                }
                i += 1;
                continue;
            }
            b'-' | b'0'..=b'9' => {
                let (number, end) = scan_number(b, i)?;
                if seen == count {
                    return None;
                }
                push_number(&number, &text[i..end], dtype, &mut out)?;
                i = end;
                seen += 1;
            }
            _ => return None,
        }
        // After a value: a comma and the next value, or closing brackets.
        loop {
            skip_ws(&mut i);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    break;
                }
                Some(b']') => {
                    i += 1;
                    depth -= 1;
                    if depth == 0 {
                        skip_ws(&mut i);
                        return (i == b.len() && seen == count).then_some(out);
                    }
                }
                _ => return None,
            }
        }
    }
}

/// A JSON number as scanned: its sign, up to 19 significant digits and a
/// power of ten.
struct Scanned {
    negative: bool,
    mantissa: u64,
    exponent: i32,
    /// More significant digits than `mantissa` holds (they were dropped).
    truncated: bool,
    /// No fraction and no exponent: written as an integer.
    integer: bool,
}

/// Scans a number as JSON spells it (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`)
/// from `b[start..]`; returns it and where it ends, or `None` if the text
/// there is not such a number.
fn scan_number(b: &[u8], start: usize) -> Option<(Scanned, usize)> {
    let mut i = start;
    let negative = b.get(i) == Some(&b'-');
    i += usize::from(negative);
    let (mut mantissa, mut digits, mut exponent, mut truncated) = (0u64, 0u32, 0i32, false);
    let mut digit = |d: u8, fraction: bool| {
        if mantissa == 0 && d == b'0' {
            // Leading zeros are not significant.
            exponent -= i32::from(fraction);
        } else if digits < 19 {
            mantissa = mantissa * 10 + u64::from(d - b'0');
            digits += 1;
            exponent -= i32::from(fraction);
        } else {
            truncated = true;
            exponent += i32::from(!fraction);
        }
    };
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            while let Some(&d @ b'0'..=b'9') = b.get(i) {
                digit(d, false);
                i += 1;
            }
        }
        _ => return None,
    }
    let mut integer = true;
    if b.get(i) == Some(&b'.') {
        integer = false;
        i += 1;
        let first = i;
        while let Some(&d @ b'0'..=b'9') = b.get(i) {
            digit(d, true);
            i += 1;
        }
        if i == first {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        integer = false;
        i += 1;
        let minus = b.get(i) == Some(&b'-');
        i += usize::from(matches!(b.get(i), Some(b'+' | b'-')));
        let first = i;
        let mut e = 0i32;
        while let Some(&d @ b'0'..=b'9') = b.get(i) {
            e = e.saturating_mul(10).saturating_add(i32::from(d - b'0'));
            i += 1;
        }
        if i == first {
            return None;
        }
        exponent = exponent.saturating_add(if minus { -e } else { e });
    }
    // A number runs into a separator, never into more number characters.
    if matches!(b.get(i), Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')) {
        return None;
    }
    Some((Scanned { negative, mantissa, exponent, truncated, integer }, i))
}

/// Powers of ten exact in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

impl Scanned {
    /// The number as the nearest f64: exactly (one correctly rounded
    /// operation on exact operands, Clinger's fast path) when its digits
    /// and exponent allow, else through the standard library's parser.
    fn to_f64(&self, text: &str) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)] // below 2^53: exact
        let x = if !self.truncated && self.mantissa < (1 << 53) && self.exponent.unsigned_abs() <= 22 {
            let m = self.mantissa as f64;
            let p = POW10[self.exponent.unsigned_abs() as usize];
            let x = if self.exponent < 0 { m / p } else { m * p };
            if self.negative { -x } else { x }
        } else {
            text.parse::<f64>().ok()?
        };
        x.is_finite().then_some(x)
    }

    /// The number as an integer, if it is written as one and fits in 19 digits.
    fn to_i128(&self) -> Option<i128> {
        (self.integer && !self.truncated && self.exponent == 0).then(|| {
            let m = i128::from(self.mantissa);
            if self.negative { -m } else { m }
        })
    }
}

/// Appends one scanned JSON number (`text` is how it was written) as
/// `dtype`, converted as the general path converts it; `None` where the
/// general path must decide (not finite, not an integer, out of range).
fn push_number(n: &Scanned, text: &str, dtype: DType, out: &mut Vec<u8>) -> Option<()> {
    fn int<T: TryFrom<i128> + Element>(n: &Scanned, out: &mut Vec<u8>) -> Option<()> {
        T::try_from(n.to_i128()?).ok()?.write_le(out);
        Some(())
    }
    #[allow(clippy::cast_possible_truncation)] // FP32 is what the client declared
    match dtype {
        // Through f64, as the general path (serde's f64) does.
        DType::F32 => Some(n.to_f64(text)? as f32).filter(|x| x.is_finite())?.write_le(out),
        DType::F64 => n.to_f64(text)?.write_le(out),
        DType::F16 => half::f16::from_f64(n.to_f64(text)?).write_le(out),
        DType::BF16 => half::bf16::from_f64(n.to_f64(text)?).write_le(out),
        DType::I8 => int::<i8>(n, out)?,
        DType::U8 => int::<u8>(n, out)?,
        DType::I16 => int::<i16>(n, out)?,
        DType::U16 => int::<u16>(n, out)?,
        DType::I32 => int::<i32>(n, out)?,
        DType::U32 => int::<u32>(n, out)?,
        DType::I64 => int::<i64>(n, out)?,
        DType::U64 => int::<u64>(n, out)?,
        DType::Bool | DType::String => return None,
    }
    Some(())
}

/// Writes a (possibly nested) JSON array of numbers straight into a
/// tensor's little-endian bytes (or only counts them, without `out`),
/// refusing the element after `limit`.
struct Elements<'v> {
    dtype: DType,
    limit: usize,
    seen: &'v mut usize,
    out: Option<&'v mut Vec<u8>>,
}

impl Elements<'_> {
    fn reborrow(&mut self) -> Elements<'_> {
        Elements { dtype: self.dtype, limit: self.limit, seen: self.seen, out: self.out.as_deref_mut() }
    }

    /// Appends one JSON value, converted to the tensor's dtype.
    fn push<E: de::Error>(self, v: Value<'_>) -> Result<(), E> {
        let i = *self.seen;
        if i >= self.limit {
            return Err(E::custom(format!("more than the {} elements its shape has", self.limit)));
        }
        let dtype = self.dtype;
        let not = |what: &str| E::custom(format!("element {i} is not {what}"));
        let wrong = || not(expected(dtype));
        let Some(out) = self.out else {
            // Counting only: the kind must still be right.
            if matches!((dtype, v), (DType::Bool, Value::Bool(_)) | (DType::String, Value::Str(_)))
                || (v.is_number() && !matches!(dtype, DType::Bool | DType::String))
            {
                *self.seen += 1;
                return Ok(());
            }
            return Err(wrong());
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // the client declared the type
        let float = || match v {
            Value::F(x) => Some(x),
            Value::I(x) => Some(x as f64),
            Value::U(x) => Some(x as f64),
            _ => None,
        };
        let int = || -> Result<i128, E> {
            match v {
                Value::I(x) => Ok(i128::from(x)),
                Value::U(x) => Ok(i128::from(x)),
                Value::F(_) => Err(not("an integer")),
                _ => Err(wrong()),
            }
        };
        fn fit<T: TryFrom<i128> + Element, E: de::Error>(x: i128, i: usize, out: &mut Vec<u8>) -> Result<(), E> {
            let v = T::try_from(x)
                .map_err(|_| E::custom(format!("element {i} ({x}) does not fit in {}", datatype_name(T::DTYPE))))?;
            v.write_le(out);
            Ok(())
        }
        #[allow(clippy::cast_possible_truncation)] // FP32 is what the client declared
        match dtype {
            DType::F32 => (float().ok_or_else(wrong)? as f32).write_le(out),
            DType::F64 => float().ok_or_else(wrong)?.write_le(out),
            DType::F16 => half::f16::from_f64(float().ok_or_else(wrong)?).write_le(out),
            DType::BF16 => half::bf16::from_f64(float().ok_or_else(wrong)?).write_le(out),
            DType::I8 => fit::<i8, E>(int()?, i, out)?,
            DType::U8 => fit::<u8, E>(int()?, i, out)?,
            DType::I16 => fit::<i16, E>(int()?, i, out)?,
            DType::U16 => fit::<u16, E>(int()?, i, out)?,
            DType::I32 => fit::<i32, E>(int()?, i, out)?,
            DType::U32 => fit::<u32, E>(int()?, i, out)?,
            DType::I64 => fit::<i64, E>(int()?, i, out)?,
            DType::U64 => fit::<u64, E>(int()?, i, out)?,
            DType::Bool => match v {
                Value::Bool(b) => b.write_le(out),
                _ => return Err(wrong()),
            },
            DType::String => match v {
                Value::Str(text) => {
                    let len = u32::try_from(text.len()).map_err(|_| not("a string under 4 GiB"))?;
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
                _ => return Err(wrong()),
            },
        }
        *self.seen += 1;
        Ok(())
    }

    fn not_a_number<E: de::Error>(&self) -> E {
        E::custom(format!("element {} is not {}", *self.seen, expected(self.dtype)))
    }
}

/// What a JSON element of `dtype` must be, for messages.
fn expected(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => "a number",
        DType::Bool => "a boolean (true or false)",
        DType::String => "a string",
        _ => "an integer",
    }
}

/// One JSON element as the parser saw it.
#[derive(Debug, Clone, Copy)]
enum Value<'s> {
    F(f64),
    I(i64),
    U(u64),
    Bool(bool),
    Str(&'s str),
}

impl Value<'_> {
    fn is_number(self) -> bool {
        matches!(self, Value::F(_) | Value::I(_) | Value::U(_))
    }
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers, booleans or strings, or nested arrays of them")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Value::F(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Value::I(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Value::U(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.reborrow())?.is_some() {}
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Value::Str(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Value::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.not_a_number())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.not_a_number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<DecodedRequest, String> {
        decode_request(Bytes::from(json.to_owned()), None, &DecodeLimits::default()).map_err(|e| e.to_string())
    }

    fn one_input(input: &str) -> Result<Tensor, String> {
        decode(&format!(r#"{{"inputs":[{input}]}}"#)).map(|mut r| r.inputs.remove(0).1)
    }

    #[test]
    fn json_and_binary_inputs_decode_to_the_same_tensor() {
        let t = one_input(r#"{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}"#).unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
        let head = r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend([1.0f32, 2.0, 3.0, 4.5].iter().flat_map(|v| v.to_le_bytes()));
        let r = decode_request(Bytes::from(body), Some(&head.len().to_string()), &DecodeLimits::default()).unwrap();
        assert_eq!(r.inputs, vec![("x".to_owned(), t)]);
        let i = one_input(r#"{"name":"y","shape":[3],"datatype":"INT64","data":[1,-2,9007199254740993]}"#).unwrap();
        assert_eq!(i.to_i64().unwrap(), vec![1, -2, 9_007_199_254_740_993]);
    }

    /// Decodes `data` as JSON and `binary` as the binary extension for one
    /// input of `datatype`, and checks both give `want`.
    fn both_ways(datatype: &str, shape: &str, data: &str, binary: &[u8], want: &Tensor) {
        let json = one_input(&format!(r#"{{"name":"x","shape":{shape},"datatype":"{datatype}","data":{data}}}"#))
            .unwrap_or_else(|e| panic!("{datatype} JSON: {e}"));
        assert_eq!(&json, want, "{datatype} JSON");
        let head = format!(
            r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{datatype}","parameters":{{"binary_data_size":{}}}}}]}}"#,
            binary.len()
        );
        let body = [head.as_bytes(), binary].concat();
        let r = decode_request(Bytes::from(body), Some(&head.len().to_string()), &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{datatype} binary: {e}"));
        assert_eq!(&r.inputs[0].1, want, "{datatype} binary");
    }

    #[test]
    fn every_v2_datatype_decodes_from_json_and_binary() {
        use half::{bf16, f16};
        let t = Tensor::from_values::<f32>(vec![2], &[1.5, -2.0]);
        both_ways("FP32", "[2]", "[1.5,-2]", &t.data.clone(), &t);
        let t = Tensor::from_values::<f64>(vec![2], &[0.1, -1e300]);
        both_ways("FP64", "[2]", "[0.1,-1e300]", &t.data.clone(), &t);
        let t = Tensor::from_values(vec![3], &[f16::from_f64(0.1), f16::from_f32(-2.0), f16::from_f32(65504.0)]);
        both_ways("FP16", "[3]", "[0.1,-2,65504]", &t.data.clone(), &t);
        let t = Tensor::from_values(vec![2], &[bf16::from_f64(0.1), bf16::from_f32(3.0e38)]);
        both_ways("BF16", "[2]", "[0.1,3.0e38]", &t.data.clone(), &t);
        let t = Tensor::from_values::<i8>(vec![2], &[-128, 127]);
        both_ways("INT8", "[2]", "[-128,127]", &t.data.clone(), &t);
        let t = Tensor::from_values::<u8>(vec![1, 3], &[0, 128, 255]);
        both_ways("UINT8", "[1,3]", "[[0,128,255]]", &t.data.clone(), &t);
        let t = Tensor::from_values::<i16>(vec![2], &[-32768, 32767]);
        both_ways("INT16", "[2]", "[-32768,32767]", &t.data.clone(), &t);
        let t = Tensor::from_values::<u16>(vec![2], &[0, 65535]);
        both_ways("UINT16", "[2]", "[0,65535]", &t.data.clone(), &t);
        let t = Tensor::from_values::<i32>(vec![2], &[i32::MIN, i32::MAX]);
        both_ways("INT32", "[2]", "[-2147483648,2147483647]", &t.data.clone(), &t);
        let t = Tensor::from_values::<u32>(vec![1], &[u32::MAX]);
        both_ways("UINT32", "[1]", "[4294967295]", &t.data.clone(), &t);
        let t = Tensor::from_values::<i64>(vec![2], &[i64::MIN, i64::MAX]);
        both_ways("INT64", "[2]", "[-9223372036854775808,9223372036854775807]", &t.data.clone(), &t);
        let t = Tensor::from_values::<u64>(vec![1], &[u64::MAX]);
        both_ways("UINT64", "[1]", "[18446744073709551615]", &t.data.clone(), &t);
        let t = Tensor::from_values(vec![3], &[true, false, true]);
        both_ways("BOOL", "[3]", "[true,false,true]", &t.data.clone(), &t);
        let t = Tensor::from_strings(vec![3], &["", "héllo \"quoted\"", "a"]);
        both_ways("BYTES", "[3]", r#"["","h\u00e9llo \"quoted\"","a"]"#, &t.data.clone(), &t);
    }

    #[test]
    fn bad_values_of_each_datatype_say_what_is_wrong() {
        let cases = [
            (r#""INT8","shape":[1],"data":[128]"#, "element 0 (128) does not fit in INT8"),
            (r#""UINT8","shape":[1],"data":[-1]"#, "element 0 (-1) does not fit in UINT8"),
            (r#""UINT8","shape":[1],"data":[256]"#, "(256) does not fit in UINT8"),
            (r#""INT16","shape":[1],"data":[40000]"#, "does not fit in INT16"),
            (r#""UINT16","shape":[1],"data":[70000]"#, "does not fit in UINT16"),
            (r#""INT32","shape":[1],"data":[2147483648]"#, "does not fit in INT32"),
            (r#""UINT32","shape":[1],"data":[-5]"#, "does not fit in UINT32"),
            (r#""UINT64","shape":[1],"data":[-1]"#, "does not fit in UINT64"),
            (r#""INT32","shape":[1],"data":[1.5]"#, "element 0 is not an integer"),
            (r#""INT32","shape":[1],"data":[true]"#, "element 0 is not an integer"),
            (r#""BOOL","shape":[2],"data":[true,1]"#, "element 1 is not a boolean"),
            (r#""BOOL","shape":[1],"data":["true"]"#, "element 0 is not a boolean"),
            (r#""BYTES","shape":[2],"data":["a",1]"#, "element 1 is not a string"),
            (r#""BYTES","shape":[1],"data":[null]"#, "element 0 is not a string"),
            (r#""FP16","shape":[1],"data":["1"]"#, "element 0 is not a number"),
            (r#""BF16","shape":[1],"data":[false]"#, "element 0 is not a number"),
            (r#""FP64","shape":[2],"data":[1]"#, "needs 2 elements, got 1"),
            (r#""BYTES","shape":[1],"data":["a","b"]"#, "more than the 1 elements"),
            (r#""COMPLEX64","shape":[1],"data":[1]"#, "COMPLEX64 is not supported (FP32, UINT8"),
            (r#""fp32","shape":[1],"data":[1]"#, "fp32 is not supported"),
        ];
        for (text, want) in cases {
            let err = one_input(&format!(r#"{{"name":"x","datatype":{text}}}"#)).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn bad_binary_bool_and_bytes_are_refused() {
        let limits = DecodeLimits::default();
        let binary = |datatype: &str, shape: &str, data: &[u8]| {
            let head = format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{datatype}","parameters":{{"binary_data_size":{}}}}}]}}"#,
                data.len()
            );
            decode_request(Bytes::from([head.as_bytes(), data].concat()), Some(&head.len().to_string()), &limits)
                .map_err(|e| e.to_string())
        };
        let err = binary("BOOL", "[3]", &[1, 0, 7]).unwrap_err();
        assert_eq!(err, "input `x`: BOOL element 2 is byte 7; booleans are 0 or 1");
        let err = binary("BYTES", "[1]", &[9, 0, 0, 0, b'a']).unwrap_err();
        assert!(err.contains("BYTES data: string 0 claims 9 bytes, 1 are left"), "{err}");
        let err = binary("BYTES", "[1]", &[0, 0, 0, 0, b'a']).unwrap_err();
        assert!(err.contains("BYTES data: 1 bytes after the last of 1 strings"), "{err}");
        // A shape of a billion strings against 8 bytes: refused by arithmetic.
        let err = binary("BYTES", "[1000000000]", &[0; 8]).unwrap_err();
        assert!(err.contains("needs 1000000000 strings (at least 4000000000 bytes), binary_data_size is 8"), "{err}");
        let err = binary("UINT16", "[3]", &[0; 5]).unwrap_err();
        assert!(err.contains("needs 3 elements (6 bytes), binary_data_size is 5"), "{err}");
        // Strings in JSON count against the text like numbers do.
        let err = one_input(r#"{"name":"x","shape":[100000000],"datatype":"BYTES","data":["a"]}"#).unwrap_err();
        assert!(err.ends_with("needs 100000000 elements, got 1"), "{err}");
    }

    #[test]
    fn outputs_ids_and_parameters_are_read_and_unknown_parameters_skipped() {
        let r = decode(
            r#"{"id":"req-1","inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],
                "parameters":{"other":{"deep":[1,2,3]}}}],
                "outputs":[{"name":"probabilities","parameters":{"binary_data":true,"classification":3}}],
                "parameters":{"binary_data_output":true,"sequence_id":7}}"#,
        )
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("req-1"));
        assert!(r.binary_output);
        assert_eq!(r.outputs, Some(vec![WantedOutput { name: "probabilities".into(), binary: Some(true) }]));
    }

    /// Finding 1 of issue 11: a ~100-byte body claiming [1e9, 64] elements
    /// made the agent allocate 512 GB and abort. Refused before allocation.
    #[test]
    fn a_huge_shape_is_refused_before_anything_is_allocated() {
        for (shape, count) in [("[1000000000,64]", "64000000000"), ("[10000000,64]", "640000000"), ("[2,2,2]", "8")] {
            let err =
                one_input(&format!(r#"{{"name":"input","shape":{shape},"datatype":"FP32","data":[1]}}"#)).unwrap_err();
            assert!(err.ends_with(&format!("needs {count} elements, got 1")), "{shape}: {err}");
        }
        let err =
            one_input(r#"{"name":"x","shape":[4611686018427387904,4],"datatype":"INT64","data":[1]}"#).unwrap_err();
        assert!(err.contains("larger than a request can carry"), "{err}");
        let err = one_input(r#"{"name":"x","shape":[1,1,1,1,1,1,1,1,1],"datatype":"FP32","data":[1]}"#).unwrap_err();
        assert!(err.contains("rank 9 is over the limit"), "{err}");
    }

    /// Finding 2 of issue 11: ids were remembered without bound.
    #[test]
    fn a_long_request_id_is_refused_without_being_echoed() {
        let id = "i".repeat(MAX_ID_BYTES + 1);
        let err = decode(&format!(r#"{{"id":"{id}","inputs":[]}}"#)).unwrap_err();
        assert_eq!(err, format!("request id is {} bytes; at most {MAX_ID_BYTES} are allowed", MAX_ID_BYTES + 1));
        let ok = "i".repeat(MAX_ID_BYTES);
        assert_eq!(decode(&format!(r#"{{"id":"{ok}","inputs":[]}}"#)).unwrap().id, Some(ok));
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let cases = [
            (r#"{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}"#, "needs 3 elements, got 2"),
            (r#"{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2,3]}"#, "more than the 2 elements"),
            (r#"{"name":"x","shape":[1],"datatype":"FP8","data":[1]}"#, "FP8 is not supported"),
            (r#"{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}"#, "negative dim"),
            (r#"{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}"#, "element 0 is not an integer"),
            (r#"{"name":"x","shape":[1],"datatype":"INT64","data":[18446744073709551615]}"#, "does not fit in INT64"),
            (r#"{"name":"x","shape":[2],"datatype":"FP32","data":[1,"a"]}"#, "element 1 is not a number"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","data":[null]}"#, "not a number"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","data":[{"a":1}]}"#, "not a number"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32"}"#, "no data"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}"#, "exceeds"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}"#, "either"),
            (r#"{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":"4"}}"#, "request JSON"),
        ];
        for (text, want) in cases {
            let err = one_input(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(decode("{").unwrap_err().starts_with("request JSON"));
        let err = decode(&format!(r#"{{"inputs":"{}"}}"#, "a".repeat(1 << 20))).unwrap_err();
        assert!(err.len() < 500, "a {}-byte message echoes the value", err.len());
        assert!(decode(r#"{"inputs":{}}"#).unwrap_err().starts_with("request JSON"));
    }

    #[test]
    fn binary_sizes_must_match_the_shape_and_the_body() {
        let limits = DecodeLimits::default();
        let head = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend([0u8; 4]);
        let err =
            decode_request(Bytes::from(body.clone()), Some(&head.len().to_string()), &limits).unwrap_err().to_string();
        assert!(err.contains("needs 2 elements (8 bytes), binary_data_size is 4"), "{err}");
        let err = decode_request(Bytes::from(body.clone()), Some("999999"), &limits).unwrap_err().to_string();
        assert!(err.contains("but the body has only"), "{err}");
        let err = decode_request(Bytes::from(body), Some("-1"), &limits).unwrap_err().to_string();
        assert!(err.contains("must be a byte count"), "{err}");
        let head = r#"{"inputs":[]}"#;
        let err = decode_request(Bytes::from(format!("{head}xx")), Some(&head.len().to_string()), &limits)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "2 bytes of binary tensor data are not claimed by any input");
    }

    #[test]
    fn request_wide_caps_hold() {
        let limits = DecodeLimits { max_body_bytes: 64, ..DecodeLimits::default() };
        let err = decode_request(Bytes::from(vec![b' '; 65]), None, &limits).unwrap_err().to_string();
        assert_eq!(err, "request body of 65 bytes is over the limit of 64 bytes");
        let inputs = vec![r#"{"name":"x","shape":[1],"datatype":"FP32","data":[1]}"#; MAX_INPUTS + 1].join(",");
        let err = decode(&format!(r#"{{"inputs":[{inputs}]}}"#)).unwrap_err();
        assert!(err.contains("65 inputs in one request; at most 64"), "{err}");
    }

    #[test]
    fn echoed_values_are_clipped() {
        let name = "n".repeat(1 << 20);
        let err = one_input(&format!(r#"{{"name":"{name}","shape":[1],"datatype":"FP32"}}"#)).unwrap_err();
        assert!(err.len() < 400, "{} bytes", err.len());
        assert!(err.contains("(1048576 bytes)"), "{err}");
        assert_eq!(clip("é".repeat(150).as_str()).chars().filter(|c| *c == 'é').count(), 100);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = one_input(&format!(r#"{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}"#)).unwrap_err();
        assert!(err.contains("recursion limit"), "{err}");
    }

    /// The general path (serde, element by element) on `text`.
    fn general(text: &str, dtype: DType, count: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut seen = 0;
        Elements { dtype, limit: count, seen: &mut seen, out: Some(&mut out) }
            .deserialize(&mut serde_json::Deserializer::from_str(text))
            .ok()?;
        (seen == count).then_some(out)
    }

    /// The fast path decodes what the general path decodes, to the bit, or
    /// leaves the text to it: numbers written every way JSON allows, each
    /// dtype, and texts it must give up on.
    #[test]
    fn the_fast_path_agrees_with_the_general_one_or_gives_way() {
        let mut numbers: Vec<String> = [
            "0",
            "-0",
            "1",
            "-1",
            "0.5",
            "1e3",
            "1E-3",
            "-2.5e+2",
            "123456789012345678",
            "0.8470588326454163",
            "0.9372549057006836",
            "3.4028234663852886e38",
            "1.401298464324817e-45",
            "9007199254740993",
            "0.000000000000000000000000001",
            "12345678901234567890123",
            "1e22",
            "1e23",
            "2.2250738585072014e-308",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // A spread of f32 values as clients write them (shortest f64 forms).
        let mut x = 0x2545_f491_u32;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            if f.is_finite() {
                numbers.push(serde_json::to_string(&f64::from(f)).unwrap());
                numbers.push(serde_json::to_string(&f).unwrap());
            }
        }
        for n in &numbers {
            for d in [DType::F64, DType::F32, DType::F16, DType::BF16] {
                assert!(fast_numbers(&format!("[{n}]"), d, 1, 0).is_some(), "{d} {n}");
            }
        }
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let text = format!("[{}]", numbers.join(","));
            let fast = fast_numbers(&text, dtype, numbers.len(), 0).expect("plain numbers take the fast path");
            assert_eq!(Some(fast), general(&text, dtype, numbers.len()), "{dtype}");
        }
        let ints = [
            "0",
            "-1",
            "127",
            "-128",
            "255",
            "32767",
            "65535",
            "2147483647",
            "-9223372036854775808",
            "18446744073709551615",
        ];
        for dtype in [DType::I8, DType::U8, DType::I16, DType::U16, DType::I32, DType::U32, DType::I64, DType::U64] {
            for n in ints {
                let text = format!("[[{n}]]");
                let fast = fast_numbers(&text, dtype, 1, 0);
                let slow = general(&text, dtype, 1);
                // Where the fast path answers, it answers as the general one
                // (out of range, or past 19 digits, it gives way).
                assert!(fast.is_none() || fast == slow, "{dtype} {n}");
            }
        }
        for (text, count) in [
            ("[1,2,3]", 2),
            ("[1,2]", 3),
            ("[1,,2]", 2),
            ("[1 2]", 2),
            ("[01]", 1),
            ("[1.]", 1),
            ("[.5]", 1),
            ("[+1]", 1),
            ("[1e]", 1),
            ("[-]", 1),
            ("[1e400]", 1),
            ("[true]", 1),
            ("[\"1\"]", 1),
            ("[null]", 1),
            ("[[1],[2]", 2),
            ("[1]]", 1),
            ("[]", 0),
            ("1", 1),
            ("[1.5]", 1),
        ] {
            let dtype = if text == "[1.5]" { DType::I32 } else { DType::F32 };
            assert_eq!(fast_numbers(text, dtype, count, 0), None, "{text} must go the general way");
        }
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(fast_numbers(&deep, DType::F32, 1, 0), None, "deep nesting goes the general way");
    }
}
