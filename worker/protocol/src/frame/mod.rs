//! The wire format between the agent and a `sentinel-worker` process.
//!
//! Both directions carry frames: a `u32` little-endian payload length, then the
//! payload. The first frame the worker writes is a [`Ready`] line (JSON) once the
//! model is loaded, warmed up and the sandbox is in place; after that it answers
//! every request frame with exactly one response frame, in order.
//!
//! Payloads, all integers little-endian:
//! - request: a tensor list, run as one; or [`ROWS`] (a `u32`) then a tensor
//!   list whose inputs share a first dim of samples, each sample run by
//!   itself and the outputs joined along the first dim (see [`Request`]);
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

use std::borrow::Cow;
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

mod tensor;

use tensor::check_bytes;
pub use tensor::{DType, Element, STRING_PREFIX, Tensor, ZerosError, split_strings};

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
    /// The largest batch one request may carry in every input's first dim,
    /// run as one (`--max-batch`; 1, the default, when batches are not run
    /// as one).
    #[serde(default = "one")]
    pub max_batch: usize,
}

fn one() -> usize {
    1
}

/// The `u32` that starts a request to be run sample by sample: a tensor
/// count no frame can hold, so it cannot be mistaken for one.
pub const ROWS: u32 = u32::MAX;

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The inputs, in model input order.
    pub inputs: Vec<Tensor>,
    /// Run each sample of the inputs' first dim by itself, and join the
    /// outputs along the first dim, rather than run the inputs as one. Each
    /// sample's outputs are then exactly those of a request carrying that
    /// sample alone, which one batched run does not promise (engines pick
    /// other kernels for several rows than for one). The agent's dynamic
    /// batcher sends joined requests this way.
    pub rows: bool,
}

impl Request {
    /// The request's payload.
    pub fn encode(&self) -> Vec<u8> {
        if self.rows { encode_rows_request(&self.inputs) } else { encode_request(&self.inputs) }
    }
}

/// Encodes a request carrying `inputs`, in model input order, run as one.
pub fn encode_request(inputs: &[Tensor]) -> Vec<u8> {
    request_parts(inputs, false).concat()
}

/// Encodes a request whose inputs carry samples in their first dim, each
/// run by itself (see [`Request::rows`]).
pub fn encode_rows_request(inputs: &[Tensor]) -> Vec<u8> {
    request_parts(inputs, true).concat()
}

/// Decodes a request payload.
pub fn decode_request(payload: &[u8]) -> Result<Request, ProtocolError> {
    let (rows, rest) = match payload.split_first_chunk::<4>() {
        Some((head, rest)) if u32::from_le_bytes(*head) == ROWS => (true, rest),
        _ => (false, payload),
    };
    let mut cur = Cursor { buf: rest, pos: 0 };
    let inputs = decode_tensors(&mut cur)?;
    cur.finish()?;
    Ok(Request { inputs, rows })
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
    // Read into spare capacity: zeroing a large buffer first costs as much
    // as a copy.
    let mut payload = Vec::with_capacity(len);
    if r.take(len as u64).read_to_end(&mut payload)? < len {
        return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Some(payload))
}

/// The length prefix of a frame whose payload is `len` bytes; refuses one
/// over [`MAX_FRAME_LEN`].
pub fn frame_len(len: usize) -> io::Result<[u8; 4]> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME_LEN)
        .map(u32::to_le_bytes)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame exceeds MAX_FRAME_LEN"))
}

/// Writes one frame and flushes it.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    w.write_all(&frame_len(payload.len())?)?;
    w.write_all(payload)?;
    w.flush()
}

fn encode_tensors(tensors: &[Tensor], out: &mut Vec<u8>) {
    for part in tensor_parts(tensors, Vec::new()) {
        out.extend_from_slice(&part);
    }
}

/// A payload in pieces, in order: headers owned, tensor data borrowed from
/// the tensors, so that a large tensor can go to the pipe without first
/// being copied into one buffer. Joined, the pieces are the payload.
pub type Parts<'a> = Vec<Cow<'a, [u8]>>;

/// A request's payload in pieces (see [`Parts`]); `rows` as in [`Request::rows`].
pub fn request_parts(inputs: &[Tensor], rows: bool) -> Parts<'_> {
    tensor_parts(inputs, if rows { ROWS.to_le_bytes().to_vec() } else { Vec::new() })
}

/// `head`, then the tensor list: each tensor's header joined to what came
/// before it, then its data, borrowed.
fn tensor_parts(tensors: &[Tensor], mut head: Vec<u8>) -> Parts<'_> {
    let mut parts = Vec::with_capacity(2 * tensors.len() + 1);
    // Counts and ranks beyond the wire widths are caller bugs; saturating
    // makes the peer's decoder refuse the frame instead of misreading it.
    head.extend_from_slice(&u32::try_from(tensors.len()).unwrap_or(u32::MAX).to_le_bytes());
    for t in tensors {
        head.push(t.dtype.code());
        head.push(u8::try_from(t.shape.len()).unwrap_or(u8::MAX));
        for &d in &t.shape {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
        parts.push(Cow::Owned(std::mem::take(&mut head)));
        parts.push(Cow::Borrowed(t.data.as_slice()));
    }
    if !head.is_empty() {
        parts.push(Cow::Owned(head));
    }
    parts
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
mod tests;
