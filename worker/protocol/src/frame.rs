//! The wire format between the agent and a `sentinel-worker` process.
//!
//! Both directions carry frames: a `u32` little-endian payload length, then the
//! payload. The first frame the worker writes is a [`Ready`] line (JSON) once the
//! model is loaded, warmed up and the sandbox is in place; after that it answers
//! every request frame with exactly one response frame, in order.
//!
//! Payloads, all integers little-endian:
//! - request: a tensor list;
//! - response: a status byte, then a tensor list ([`STATUS_OK`]), a `u64`
//!   compute time in nanoseconds and a tensor list ([`STATUS_OK_TIMED`]), or a
//!   UTF-8 error message ([`STATUS_ERROR`]);
//! - tensor list: `u32` count, then per tensor `u8` dtype code ([`DType::code`],
//!   ONNX's `TensorProto.DataType`), `u8` rank, `rank` x `u64` dims, `u64` byte
//!   length, the bytes (C order): elements of fixed width, booleans one byte 0
//!   or 1, strings each a `u32` byte length and the bytes (see [`Tensor`]).
//!
//! Decoders take untrusted bytes: every length is checked against what is left
//! and against the shape before anything is allocated (a string tensor's
//! elements are walked in place, and a count its bytes cannot hold is refused
//! by arithmetic first), and they never panic.

use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Response status: the payload continues with the output tensors.
pub const STATUS_OK: u8 = 0;
/// Response status: the payload continues with a UTF-8 error message.
pub const STATUS_ERROR: u8 = 1;
/// Response status: a `u64` compute time in nanoseconds, then the output tensors.
pub const STATUS_OK_TIMED: u8 = 2;
/// Largest frame either side accepts (64 MiB): a corrupt length prefix must not
/// make the reader allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 64 << 20;
/// Largest tensor rank the decoder accepts.
pub const MAX_RANK: usize = 8;

/// Element type of a [`Tensor`]. Codes are ONNX's `TensorProto.DataType` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit IEEE float (ONNX code 1).
    F32,
    /// 8-bit unsigned integer (2).
    U8,
    /// 8-bit signed integer (3).
    I8,
    /// 16-bit unsigned integer (4).
    U16,
    /// 16-bit signed integer (5).
    I16,
    /// 32-bit signed integer (6).
    I32,
    /// 64-bit signed integer (7).
    I64,
    /// Byte strings (8): see [`Tensor`] for their encoding.
    String,
    /// Booleans (9), one byte each, 0 or 1.
    Bool,
    /// 16-bit IEEE float (10).
    F16,
    /// 64-bit IEEE float (11).
    F64,
    /// 32-bit unsigned integer (12).
    U32,
    /// 64-bit unsigned integer (13).
    U64,
    /// bfloat16 (16).
    BF16,
}

impl DType {
    /// Every dtype carried, in code order.
    pub const ALL: [DType; 14] = [
        DType::F32,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::String,
        DType::Bool,
        DType::F16,
        DType::F64,
        DType::U32,
        DType::U64,
        DType::BF16,
    ];

    /// The byte on the wire: ONNX's `TensorProto.DataType` value.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::String => 8,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
        }
    }

    /// The dtype for a wire byte, if it is one we carry.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// The name the signed manifest uses (the hub's reading of the ONNX
    /// element type): `float32`, `uint8`, `string`, `bfloat16`, ...
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::String => "string",
            DType::Bool => "bool",
            DType::F16 => "float16",
            DType::F64 => "float64",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::BF16 => "bfloat16",
        }
    }

    /// The dtype of a manifest name (see [`DType::name`]).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element; `None` for strings, whose elements vary in length.
    pub fn width(self) -> Option<usize> {
        match self {
            DType::U8 | DType::I8 | DType::Bool => Some(1),
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => Some(2),
            DType::F32 | DType::I32 | DType::U32 => Some(4),
            DType::I64 | DType::F64 | DType::U64 => Some(8),
            DType::String => None,
        }
    }

    /// Bytes of the zero element: the value itself, or for a string the
    /// length prefix of an empty one.
    pub fn zero_width(self) -> usize {
        self.width().unwrap_or(STRING_PREFIX)
    }

    /// Whether the elements are floating point (checked for NaN and infinity).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of a string element's length prefix.
pub const STRING_PREFIX: usize = 4;

/// A Rust type that is one fixed-width [`DType`] on the wire.
pub trait Element: Copy {
    /// The dtype this type is.
    const DTYPE: DType;
    /// Reads one element from exactly `DTYPE.width()` little-endian bytes.
    fn read_le(bytes: &[u8]) -> Self;
    /// Appends the element's little-endian bytes.
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn read_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(u8, DType::U8);
element!(i8, DType::I8);
element!(u16, DType::U16);
element!(i16, DType::I16);
element!(i32, DType::I32);
element!(i64, DType::I64);
element!(u32, DType::U32);
element!(u64, DType::U64);
element!(half::f16, DType::F16);
element!(half::bf16, DType::BF16);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    /// Any byte but 0 is true; [`Tensor::check`] refuses bytes other than 0
    /// and 1 on untrusted input before it gets here.
    fn read_le(bytes: &[u8]) -> Self {
        bytes.first().is_some_and(|b| *b != 0)
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

/// A dense tensor as raw little-endian bytes in C order.
///
/// A string tensor's bytes are its elements in order, each a `u32`
/// little-endian byte length and then that many bytes (the layout of the
/// KServe v2 binary `BYTES` extension), so an empty string is four zero
/// bytes and an all-zero buffer of 4 bytes per element is all empty strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor of fixed-width elements; `values.len()` should equal the
    /// product of `shape` (the decoder on the other side refuses it otherwise).
    pub fn from_values<T: Element>(shape: Vec<usize>, values: &[T]) -> Tensor {
        let mut data = Vec::with_capacity(values.len().saturating_mul(T::DTYPE.zero_width()));
        for v in values {
            v.write_le(&mut data);
        }
        Tensor { dtype: T::DTYPE, shape, data }
    }

    /// An f32 tensor; see [`Tensor::from_values`].
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor::from_values(shape, values)
    }

    /// An i64 tensor; see [`Tensor::from_values`].
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Tensor {
        Tensor::from_values(shape, values)
    }

    /// A string tensor of `values` (any bytes), encoded as described above.
    pub fn from_strings<S: AsRef<[u8]>>(shape: Vec<usize>, values: &[S]) -> Tensor {
        let mut data = Vec::new();
        for v in values {
            let v = v.as_ref();
            // A string over 4 GiB cannot be framed anyway (frames are at most
            // MAX_FRAME_LEN); saturating makes the peer refuse it.
            data.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
            data.extend_from_slice(v);
        }
        Tensor { dtype: DType::String, shape, data }
    }

    /// A tensor of zeros (empty strings for [`DType::String`]), allocated
    /// fallibly: under a memory limit a huge shape is an error, not an abort.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
        let bytes = shape
            .iter()
            .try_fold(dtype.zero_width(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} is too large"))?;
        let mut data = Vec::new();
        data.try_reserve_exact(bytes).map_err(|_| format!("failed to allocate {bytes} bytes of zeros"))?;
        data.resize(bytes, 0);
        Ok(Tensor { dtype, shape: shape.to_vec(), data })
    }

    /// Number of elements the shape describes, `None` on overflow.
    pub fn element_count(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// The values of a fixed-width tensor of element type `T`.
    pub fn values<T: Element>(&self) -> Result<Vec<T>, ProtocolError> {
        self.expect(T::DTYPE)?;
        let width = T::DTYPE.zero_width();
        Ok(self.data.chunks_exact(width).map(T::read_le).collect())
    }

    /// The values of an f32 tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>, ProtocolError> {
        self.values()
    }

    /// The values of an i64 tensor.
    pub fn to_i64(&self) -> Result<Vec<i64>, ProtocolError> {
        self.values()
    }

    /// The elements of a string tensor, borrowed. The bytes must follow the
    /// encoding (every decoder checks it with [`Tensor::check`]).
    pub fn strings(&self) -> Result<Vec<&[u8]>, ProtocolError> {
        self.expect(DType::String)?;
        let count =
            self.element_count().ok_or_else(|| ProtocolError::ShapeOverflow { index: 0, shape: self.shape.clone() })?;
        split_strings(&self.data, count, 0)
    }

    /// Float elements as f64, for finiteness checks; `None` for other dtypes.
    pub fn floats(&self) -> Option<Vec<f64>> {
        Some(match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|c| f64::from(f32::read_le(c))).collect(),
            DType::F64 => self.data.chunks_exact(8).map(f64::read_le).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|c| half::f16::read_le(c).to_f64()).collect(),
            DType::BF16 => self.data.chunks_exact(2).map(|c| half::bf16::read_le(c).to_f64()).collect(),
            _ => return None,
        })
    }

    /// The first non-finite float element, if any: `(index, value)`.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        self.floats()?.into_iter().enumerate().find(|(_, v)| !v.is_finite())
    }

    /// Checks that the bytes are what the dtype and shape say: exactly
    /// `count x width` bytes, booleans 0 or 1, strings `count` well-formed
    /// elements filling the bytes exactly. Allocates nothing. `index` names
    /// the tensor in errors.
    pub fn check(&self, index: usize) -> Result<(), ProtocolError> {
        check_bytes(self.dtype, &self.shape, &self.data, index)
    }

    fn expect(&self, dtype: DType) -> Result<(), ProtocolError> {
        if self.dtype != dtype {
            return Err(ProtocolError::WrongDType { expected: dtype, found: self.dtype });
        }
        Ok(())
    }
}

/// See [`Tensor::check`].
fn check_bytes(dtype: DType, shape: &[usize], data: &[u8], index: usize) -> Result<(), ProtocolError> {
    let overflow = || ProtocolError::ShapeOverflow { index, shape: shape.to_vec() };
    let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(overflow)?;
    match dtype.width() {
        Some(width) => {
            let expected = count.checked_mul(width).ok_or_else(overflow)?;
            if expected != data.len() {
                return Err(ProtocolError::ByteLength {
                    index,
                    dtype,
                    shape: shape.to_vec(),
                    expected: expected as u128,
                    found: data.len() as u64,
                });
            }
            if dtype == DType::Bool
                && let Some(element) = data.iter().position(|b| *b > 1)
            {
                return Err(ProtocolError::NotABool { index, element, byte: data[element] });
            }
            Ok(())
        }
        None => walk_strings(data, count, index, |_| ()),
    }
}

/// Walks `count` string elements that must fill `data` exactly, calling
/// `each` on every element. Refuses a count that the bytes cannot hold
/// (every element takes at least its prefix) before walking.
fn walk_strings<'a>(
    data: &'a [u8],
    count: usize,
    index: usize,
    mut each: impl FnMut(&'a [u8]),
) -> Result<(), ProtocolError> {
    if count > data.len() / STRING_PREFIX {
        return Err(ProtocolError::Strings {
            index,
            reason: format!("{count} strings need at least {} bytes, got {}", count as u128 * 4, data.len()),
        });
    }
    let mut pos = 0usize;
    for element in 0..count {
        let prefix = data.get(pos..pos + STRING_PREFIX).ok_or_else(|| ProtocolError::Strings {
            index,
            reason: format!("string {element}: length cut off at byte {pos}"),
        })?;
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        pos += STRING_PREFIX;
        let bytes = data.get(pos..).and_then(|rest| rest.get(..len)).ok_or_else(|| ProtocolError::Strings {
            index,
            reason: format!("string {element} claims {len} bytes, {} are left", data.len() - pos),
        })?;
        pos += len;
        each(bytes);
    }
    if pos != data.len() {
        return Err(ProtocolError::Strings {
            index,
            reason: format!("{} bytes after the last of {count} strings", data.len() - pos),
        });
    }
    Ok(())
}

/// The `count` string elements of checked string bytes, borrowed.
pub fn split_strings(data: &[u8], count: usize, index: usize) -> Result<Vec<&[u8]>, ProtocolError> {
    // walk_strings refuses a count the bytes cannot hold before this grows.
    let mut out = Vec::new();
    walk_strings(data, count, index, |s| out.push(s))?;
    Ok(out)
}

/// A payload that does not follow the format above.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("payload truncated: needed {needed} more bytes for {what} at offset {offset}")]
    Truncated { what: &'static str, offset: usize, needed: usize },
    #[error("{0} trailing bytes after the last tensor")]
    TrailingBytes(usize),
    #[error("tensor {index}: unknown dtype code {code}")]
    UnknownDType { index: usize, code: u8 },
    #[error("tensor {index}: rank {rank} exceeds {MAX_RANK}")]
    RankTooLarge { index: usize, rank: usize },
    #[error("tensor {index}: shape {shape:?} of {dtype} needs {expected} bytes, frame says {found}")]
    ByteLength { index: usize, dtype: DType, shape: Vec<usize>, expected: u128, found: u64 },
    #[error("tensor {index}: shape {shape:?} is too large")]
    ShapeOverflow { index: usize, shape: Vec<usize> },
    #[error("tensor {index}: bool element {element} is byte {byte}; booleans are 0 or 1")]
    NotABool { index: usize, element: usize, byte: u8 },
    #[error("tensor {index}: malformed strings: {reason}")]
    Strings { index: usize, reason: String },
    #[error("expected a {expected} tensor, found {found}")]
    WrongDType { expected: DType, found: DType },
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    #[error("empty response")]
    EmptyResponse,
    #[error("error message is not UTF-8")]
    MessageNotUtf8,
    #[error("ready frame is not the expected JSON: {0}")]
    Ready(String),
}

/// Why [`decode_response`] produced no tensors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    /// The worker refused the request or inference failed; the worker is still serving.
    #[error("worker: {0}")]
    Worker(String),
    /// The response itself is garbled: treat the worker as broken.
    #[error("malformed response")]
    Malformed(#[source] ProtocolError),
}

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading frame")]
    Io(#[from] io::Error),
    /// The length prefix exceeds the cap. The payload was not read: skip that
    /// many bytes to stay in step with the frames, or drop the stream.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(u64),
}

/// The worker's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Always true; present so the frame reads as what it is.
    pub ready: bool,
    /// Whether the seccomp filter is installed.
    pub confined: bool,
    /// Why the worker is not confined, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Encodes a request carrying `inputs`, in model input order.
pub fn encode_request(inputs: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_tensors(inputs, &mut out);
    out
}

/// Decodes a request payload into input tensors.
pub fn decode_request(payload: &[u8]) -> Result<Vec<Tensor>, ProtocolError> {
    let mut cur = Cursor { buf: payload, pos: 0 };
    let tensors = decode_tensors(&mut cur)?;
    cur.finish()?;
    Ok(tensors)
}

/// Encodes a successful response carrying `outputs`, in model output order.
pub fn encode_ok_response(outputs: &[Tensor]) -> Vec<u8> {
    let mut out = vec![STATUS_OK];
    encode_tensors(outputs, &mut out);
    out
}

/// Encodes an error response.
pub fn encode_error_response(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.len());
    out.push(STATUS_ERROR);
    out.extend_from_slice(message.as_bytes());
    out
}

/// Encodes a successful response with the time the model took to compute
/// it, measured in the worker: transport and scheduling on the host are not
/// in it, so two slots' models can be compared fairly.
pub fn encode_ok_timed(outputs: &[Tensor], compute: Duration) -> Vec<u8> {
    let mut out = vec![STATUS_OK_TIMED];
    out.extend_from_slice(&u64::try_from(compute.as_nanos()).unwrap_or(u64::MAX).to_le_bytes());
    encode_tensors(outputs, &mut out);
    out
}

/// Decodes a response payload: the outputs, or why there are none.
pub fn decode_response(payload: &[u8]) -> Result<Vec<Tensor>, ResponseError> {
    decode_response_timed(payload).map(|(tensors, _)| tensors)
}

/// Like [`decode_response`], with the compute time when the worker sent one.
pub fn decode_response_timed(payload: &[u8]) -> Result<(Vec<Tensor>, Option<Duration>), ResponseError> {
    let (&status, rest) = payload.split_first().ok_or(ResponseError::Malformed(ProtocolError::EmptyResponse))?;
    match status {
        STATUS_OK | STATUS_OK_TIMED => {
            let (compute, rest) = if status == STATUS_OK_TIMED {
                let (ns, rest) = rest.split_first_chunk::<8>().ok_or_else(|| {
                    ResponseError::Malformed(ProtocolError::Truncated {
                        what: "compute time",
                        offset: 1,
                        needed: 8 - rest.len(),
                    })
                })?;
                (Some(Duration::from_nanos(u64::from_le_bytes(*ns))), rest)
            } else {
                (None, rest)
            };
            let mut cur = Cursor { buf: rest, pos: 0 };
            let tensors = decode_tensors(&mut cur).map_err(ResponseError::Malformed)?;
            cur.finish().map_err(ResponseError::Malformed)?;
            Ok((tensors, compute))
        }
        STATUS_ERROR => match std::str::from_utf8(rest) {
            Ok(msg) => Err(ResponseError::Worker(msg.to_owned())),
            Err(_) => Err(ResponseError::Malformed(ProtocolError::MessageNotUtf8)),
        },
        other => Err(ResponseError::Malformed(ProtocolError::UnknownStatus(other))),
    }
}

/// Encodes the ready frame's payload: one JSON line.
pub fn encode_ready(ready: &Ready) -> Vec<u8> {
    // Serialising a struct of bools and an optional string cannot fail; the
    // fallback keeps this function total without an unwrap.
    let mut line = serde_json::to_vec(ready).unwrap_or_else(|_| br#"{"ready":true,"confined":false}"#.to_vec());
    line.push(b'\n');
    line
}

/// Decodes the ready frame's payload.
pub fn decode_ready(payload: &[u8]) -> Result<Ready, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Ready(e.to_string()))
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames;
/// an end of stream inside a frame is an error.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len);
    let len = usize::try_from(len).map_err(|_| FrameError::TooLarge(u64::from(len)))?;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len as u64));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(payload))
}

/// Writes one frame and flushes it.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame exceeds MAX_FRAME_LEN"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

fn encode_tensors(tensors: &[Tensor], out: &mut Vec<u8>) {
    // Counts and ranks beyond the wire widths are caller bugs; saturating
    // makes the peer's decoder refuse the frame instead of misreading it.
    out.extend_from_slice(&u32::try_from(tensors.len()).unwrap_or(u32::MAX).to_le_bytes());
    for t in tensors {
        out.push(t.dtype.code());
        out.push(u8::try_from(t.shape.len()).unwrap_or(u8::MAX));
        for &d in &t.shape {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&t.data);
    }
}

fn decode_tensors(cur: &mut Cursor<'_>) -> Result<Vec<Tensor>, ProtocolError> {
    let count = u32::from_le_bytes(cur.array("tensor count")?);
    // Each tensor takes at least 10 bytes, so a count larger than that allows
    // is refused before reserving memory for it.
    let mut tensors = Vec::with_capacity((count as usize).min(cur.remaining() / 10));
    for index in 0..count as usize {
        let [code] = cur.array::<1>("dtype")?;
        let dtype = DType::from_code(code).ok_or(ProtocolError::UnknownDType { index, code })?;
        let [rank] = cur.array::<1>("rank")?;
        let rank = usize::from(rank);
        if rank > MAX_RANK {
            return Err(ProtocolError::RankTooLarge { index, rank });
        }
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            let d = u64::from_le_bytes(cur.array("dimension")?);
            shape.push(usize::try_from(d).unwrap_or(usize::MAX));
        }
        let byte_len = u64::from_le_bytes(cur.array("byte length")?);
        let data = match dtype.width() {
            Some(width) => {
                let expected = shape
                    .iter()
                    .try_fold(width, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| ProtocolError::ShapeOverflow { index, shape: shape.clone() })?;
                if expected as u128 != u128::from(byte_len) {
                    return Err(ProtocolError::ByteLength {
                        index,
                        dtype,
                        shape,
                        expected: expected as u128,
                        found: byte_len,
                    });
                }
                cur.take(expected, "tensor data")?
            }
            // Strings vary in length: the bytes must be in the payload, and
            // [`Tensor::check`] then walks them against the shape.
            None => cur.take(usize::try_from(byte_len).unwrap_or(usize::MAX), "tensor data")?,
        };
        check_bytes(dtype, &shape, data, index)?;
        tensors.push(Tensor { dtype, shape, data: data.to_vec() });
    }
    Ok(tensors)
}

/// A read position in an untrusted buffer.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if n > self.remaining() {
            return Err(ProtocolError::Truncated { what, offset: self.pos, needed: n - self.remaining() });
        }
        let slice = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ProtocolError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Tensor> {
        vec![
            Tensor::from_f32(vec![2, 3], &[0.0, 1.5, -2.0, 16.0, f32::MIN_POSITIVE, 3.25]),
            Tensor::from_i64(vec![2], &[7, -1]),
            Tensor::from_f32(vec![0, 4], &[]),
            Tensor::from_i64(vec![], &[42]),
        ]
    }

    #[test]
    fn request_round_trips() {
        let tensors = sample();
        assert_eq!(decode_request(&encode_request(&tensors)).unwrap(), tensors);
        assert_eq!(tensors[0].to_f32().unwrap()[3], 16.0);
        assert_eq!(tensors[1].to_i64().unwrap(), vec![7, -1]);
        assert_eq!(tensors[3].element_count(), Some(1));
    }

    #[test]
    fn responses_round_trip() {
        let tensors = sample();
        assert_eq!(decode_response(&encode_ok_response(&tensors)).unwrap(), tensors);
        assert_eq!(decode_response(&encode_ok_response(&[])).unwrap(), vec![]);
        let timed = encode_ok_timed(&tensors, Duration::from_micros(1234));
        assert_eq!(decode_response_timed(&timed).unwrap(), (tensors.clone(), Some(Duration::from_micros(1234))));
        for len in 0..9 {
            assert!(decode_response_timed(&timed[..len]).is_err(), "cut at {len}");
        }
        assert_eq!(
            decode_response(&encode_error_response("wrong shape")),
            Err(ResponseError::Worker("wrong shape".into()))
        );
    }

    #[test]
    fn every_truncation_is_refused_without_panicking() {
        let request = encode_request(&sample());
        for len in 0..request.len() {
            assert!(decode_request(&request[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        let response = encode_ok_response(&sample());
        for len in 0..response.len() {
            assert!(matches!(decode_response(&response[..len]), Err(ResponseError::Malformed(_))), "{len}");
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut request = encode_request(&sample());
        request.push(0);
        assert_eq!(decode_request(&request), Err(ProtocolError::TrailingBytes(1)));
    }

    #[test]
    fn byte_length_must_match_the_shape() {
        let bad = Tensor { dtype: DType::F32, shape: vec![1, 64], data: vec![0; 255] };
        let err = decode_request(&encode_request(&[bad])).unwrap_err();
        assert!(matches!(err, ProtocolError::ByteLength { expected: 256, found: 255, .. }), "{err}");
    }

    #[test]
    fn hostile_headers_are_refused_before_allocating() {
        // A count of 4 billion tensors in a 4-byte payload.
        assert!(matches!(decode_request(&u32::MAX.to_le_bytes()), Err(ProtocolError::Truncated { .. })));
        // Dimensions whose product overflows.
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[DType::F32.code(), 2]);
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(decode_request(&p), Err(ProtocolError::ShapeOverflow { .. })));
        // A consistent but huge byte length with no data behind it.
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[DType::I64.code(), 1]);
        p.extend_from_slice(&(1u64 << 40).to_le_bytes());
        p.extend_from_slice(&(8u64 << 40).to_le_bytes());
        assert!(matches!(decode_request(&p), Err(ProtocolError::Truncated { .. })));
        // Unknown dtype and oversized rank.
        assert!(matches!(decode_request(&[1, 0, 0, 0, 99, 0]), Err(ProtocolError::UnknownDType { code: 99, .. })));
        assert!(matches!(decode_request(&[1, 0, 0, 0, 1, 200]), Err(ProtocolError::RankTooLarge { .. })));
    }

    #[test]
    fn garbled_responses_are_malformed_not_worker_errors() {
        assert_eq!(decode_response(&[]), Err(ResponseError::Malformed(ProtocolError::EmptyResponse)));
        assert_eq!(decode_response(&[9]), Err(ResponseError::Malformed(ProtocolError::UnknownStatus(9))));
        assert_eq!(
            decode_response(&[STATUS_ERROR, 0xff]),
            Err(ResponseError::Malformed(ProtocolError::MessageNotUtf8))
        );
    }

    #[test]
    fn frames_round_trip_and_stop_cleanly() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"one").unwrap();
        write_frame(&mut wire, b"").unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_frame(&mut r).unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(read_frame(&mut r).unwrap().as_deref(), Some(&b""[..]));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn cut_and_oversized_frames_are_errors() {
        let mut r: &[u8] = &[5, 0];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        let mut r: &[u8] = &[5, 0, 0, 0, b'a'];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        let mut r: &[u8] = &u32::MAX.to_le_bytes();
        assert!(matches!(read_frame(&mut r), Err(FrameError::TooLarge(_))));
    }

    /// One tensor of every dtype carried, with edge values.
    fn every_dtype() -> Vec<Tensor> {
        use half::{bf16, f16};
        vec![
            Tensor::from_values(vec![3], &[f32::MIN_POSITIVE, -0.5, f32::MAX]),
            Tensor::from_values(vec![1, 3], &[0u8, 127, 255]),
            Tensor::from_values(vec![3], &[i8::MIN, -1, i8::MAX]),
            Tensor::from_values(vec![2], &[0u16, u16::MAX]),
            Tensor::from_values(vec![2], &[i16::MIN, i16::MAX]),
            Tensor::from_values(vec![2, 1], &[i32::MIN, i32::MAX]),
            Tensor::from_values(vec![2], &[i64::MIN, i64::MAX]),
            Tensor::from_strings(vec![2, 2], &["", "héllo", "a\0b", "x".repeat(300).as_str()]),
            Tensor::from_values(vec![3], &[true, false, true]),
            Tensor::from_values(vec![3], &[f16::from_f32(0.1), f16::MAX, f16::MIN_POSITIVE_SUBNORMAL]),
            Tensor::from_values(vec![2], &[std::f64::consts::PI, f64::MIN_POSITIVE]),
            Tensor::from_values(vec![2], &[0u32, u32::MAX]),
            Tensor::from_values(vec![2], &[0u64, u64::MAX]),
            Tensor::from_values(vec![3], &[bf16::from_f32(0.1), bf16::MAX, bf16::from_f32(-3.0)]),
            Tensor::from_strings::<&str>(vec![0], &[]),
        ]
    }

    #[test]
    fn every_dtype_round_trips_with_its_onnx_code_and_name() {
        let tensors = every_dtype();
        let carried: Vec<DType> = tensors.iter().map(|t| t.dtype).take(DType::ALL.len()).collect();
        assert_eq!(carried, DType::ALL, "the sample holds every dtype once, in code order");
        assert_eq!(decode_request(&encode_request(&tensors)).unwrap(), tensors);
        assert_eq!(decode_response(&encode_ok_response(&tensors)).unwrap(), tensors);
        let codes: Vec<u8> = DType::ALL.iter().map(|d| d.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16], "TensorProto.DataType values");
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_code(14), None, "complex64 is not carried");
        assert_eq!(tensors[1].values::<u8>().unwrap(), vec![0, 127, 255]);
        assert_eq!(tensors[8].values::<bool>().unwrap(), vec![true, false, true]);
        assert_eq!(tensors[9].values::<half::f16>().unwrap()[1], half::f16::MAX);
        assert_eq!(tensors[13].values::<half::bf16>().unwrap()[2], half::bf16::from_f32(-3.0));
        let strings = tensors[7].strings().unwrap();
        assert_eq!(strings[..3], [&b""[..], "héllo".as_bytes(), b"a\0b"]);
        assert_eq!(strings[3].len(), 300);
        assert!(tensors[0].values::<f64>().is_err(), "a typed read of another dtype is refused");
    }

    #[test]
    fn every_truncation_of_every_dtype_is_refused() {
        for t in every_dtype() {
            let request = encode_request(std::slice::from_ref(&t));
            for len in 0..request.len() {
                assert!(decode_request(&request[..len]).is_err(), "{}: prefix of {len} bytes accepted", t.dtype);
            }
            let mut longer = request.clone();
            longer.push(0);
            assert!(decode_request(&longer).is_err(), "{}: a trailing byte accepted", t.dtype);
        }
    }

    #[test]
    fn zeros_are_zero_of_each_dtype_and_empty_strings() {
        for d in DType::ALL {
            let z = Tensor::zeros(d, &[2, 3]).unwrap();
            assert_eq!(z.check(0), Ok(()), "{d}");
            assert_eq!(decode_request(&encode_request(std::slice::from_ref(&z))).unwrap(), vec![z.clone()]);
            if d == DType::String {
                assert_eq!(z.strings().unwrap(), vec![&b""[..]; 6]);
            }
            assert_eq!(z.first_non_finite(), None);
        }
        assert!(Tensor::zeros(DType::F64, &[usize::MAX, 2]).unwrap_err().contains("too large"));
    }

    #[test]
    fn booleans_other_than_0_and_1_are_refused() {
        let bad = Tensor { dtype: DType::Bool, shape: vec![3], data: vec![1, 0, 2] };
        assert_eq!(
            decode_request(&encode_request(&[bad])),
            Err(ProtocolError::NotABool { index: 0, element: 2, byte: 2 })
        );
    }

    #[test]
    fn malformed_strings_are_refused_before_allocating() {
        let string = |shape: Vec<usize>, data: Vec<u8>| Tensor { dtype: DType::String, shape, data };
        let cases = [
            // A length running past the tensor's bytes.
            (string(vec![1], [5u32.to_le_bytes().as_slice(), b"abc"].concat()), "claims 5 bytes, 3 are left"),
            // A prefix cut short.
            (string(vec![2], [1u32.to_le_bytes().as_slice(), b"a", &[0, 0, 0]].concat()), "length cut off"),
            // Bytes left over after the last element.
            (string(vec![1], [1u32.to_le_bytes().as_slice(), b"ab"].concat()), "1 bytes after the last"),
            // A billion strings claimed in 8 bytes: refused by arithmetic.
            (string(vec![1_000_000_000], vec![0; 8]), "1000000000 strings need at least 4000000000 bytes"),
            // A length of 4 GiB.
            (string(vec![1], u32::MAX.to_le_bytes().to_vec()), "claims 4294967295 bytes"),
        ];
        for (t, want) in cases {
            let err = decode_request(&encode_request(&[t])).unwrap_err();
            assert!(matches!(&err, ProtocolError::Strings { reason, .. } if reason.contains(want)), "{want}: {err}");
        }
        // A byte length claiming more than the payload holds.
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[DType::String.code(), 1]);
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_request(&p), Err(ProtocolError::Truncated { .. })));
    }

    #[test]
    fn non_finite_floats_are_found_in_every_float_dtype() {
        use half::{bf16, f16};
        let cases = [
            Tensor::from_values(vec![2], &[1.0f32, f32::NAN]),
            Tensor::from_values(vec![2], &[1.0f64, f64::INFINITY]),
            Tensor::from_values(vec![2], &[f16::ONE, f16::NEG_INFINITY]),
            Tensor::from_values(vec![2], &[bf16::ONE, bf16::NAN]),
        ];
        for t in cases {
            assert_eq!(t.first_non_finite().map(|(i, _)| i), Some(1), "{}", t.dtype);
        }
        assert_eq!(Tensor::from_values(vec![1], &[7i32]).first_non_finite(), None);
    }

    #[test]
    fn ready_round_trips() {
        let ready = Ready { ready: true, confined: false, reason: Some("sandbox unavailable: ENOSYS".into()) };
        assert_eq!(decode_ready(&encode_ready(&ready)).unwrap(), ready);
        let line = encode_ready(&Ready { ready: true, confined: true, reason: None });
        assert_eq!(line, b"{\"ready\":true,\"confined\":true}\n");
        assert!(decode_ready(b"not json").is_err());
    }
}
