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
//! - tensor list: `u32` count, then per tensor `u8` dtype code ([`DType::code`]),
//!   `u8` rank, `rank` x `u64` dims, `u64` byte length, the bytes (C order).
//!
//! Decoders take untrusted bytes: every length is checked against what is left
//! and against the shape before anything is allocated, and they never panic.

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
    /// 64-bit signed integer (ONNX code 7).
    I64,
}

impl DType {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::I64 => 7,
        }
    }

    /// The dtype for a wire byte, if it is one we carry.
    pub fn from_code(code: u8) -> Option<DType> {
        match code {
            1 => Some(DType::F32),
            7 => Some(DType::I64),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
        })
    }
}

/// A dense tensor as raw little-endian bytes in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// An f32 tensor; `values.len()` should equal the product of `shape`
    /// (the decoder on the other side refuses it otherwise).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor { dtype: DType::F32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// An i64 tensor; see [`Tensor::from_f32`].
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Tensor {
        Tensor { dtype: DType::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// Number of elements the shape describes, `None` on overflow.
    pub fn element_count(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// The values of an f32 tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>, ProtocolError> {
        self.expect(DType::F32)?;
        Ok(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// The values of an i64 tensor.
    pub fn to_i64(&self) -> Result<Vec<i64>, ProtocolError> {
        self.expect(DType::I64)?;
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    fn expect(&self, dtype: DType) -> Result<(), ProtocolError> {
        if self.dtype != dtype {
            return Err(ProtocolError::WrongDType { expected: dtype, found: self.dtype });
        }
        Ok(())
    }
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
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ProtocolError::ShapeOverflow { index, shape: shape.clone() })?;
        if expected as u128 != u128::from(byte_len) {
            return Err(ProtocolError::ByteLength { index, dtype, shape, expected: expected as u128, found: byte_len });
        }
        let data = cur.take(expected, "tensor data")?.to_vec();
        tensors.push(Tensor { dtype, shape, data });
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

    #[test]
    fn ready_round_trips() {
        let ready = Ready { ready: true, confined: false, reason: Some("sandbox unavailable: ENOSYS".into()) };
        assert_eq!(decode_ready(&encode_ready(&ready)).unwrap(), ready);
        let line = encode_ready(&Ready { ready: true, confined: true, reason: None });
        assert_eq!(line, b"{\"ready\":true,\"confined\":true}\n");
        assert!(decode_ready(b"not json").is_err());
    }
}
