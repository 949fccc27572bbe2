//! Tensors as both sides hold them: element types ([`DType`], [`Element`]),
//! [`Tensor`] itself, and the checks that make a decoded tensor's bytes
//! agree with its dtype and shape.

use super::ProtocolError;

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
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, ZerosError> {
        let bytes = shape
            .iter()
            .try_fold(dtype.zero_width(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| ZerosError::TooLarge { shape: shape.to_vec() })?;
        let mut data = Vec::new();
        data.try_reserve_exact(bytes).map_err(|source| ZerosError::Allocation { bytes, source })?;
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

    /// Samples `start..start + len` of the tensor's first dim, as a tensor
    /// of `len` samples. The tensor must be checked ([`Tensor::check`]) and
    /// the range within its first dim; strings are cut at element
    /// boundaries.
    pub fn samples(&self, start: usize, len: usize) -> Tensor {
        let n = self.shape.first().copied().unwrap_or(1).max(1);
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = len;
        }
        let data = match self.dtype.width() {
            Some(_) => {
                let per = self.data.len() / n;
                self.data[start * per..(start + len) * per].to_vec()
            }
            // Length-prefixed: find the byte offsets of the first and the
            // last element wanted, and copy the bytes between them as they are.
            None => {
                let per = self.element_count().unwrap_or(0) / n;
                let (from, to) = (start * per, (start + len) * per);
                let (mut pos, mut element, mut begin) = (0usize, 0usize, None);
                while element < to && pos + STRING_PREFIX <= self.data.len() {
                    if element == from {
                        begin = Some(pos);
                    }
                    let prefix = &self.data[pos..pos + STRING_PREFIX];
                    pos += STRING_PREFIX + u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                    element += 1;
                }
                let begin = begin.unwrap_or(pos);
                self.data.get(begin..pos).map(<[u8]>::to_vec).unwrap_or_default()
            }
        };
        Tensor { dtype: self.dtype, shape, data }
    }

    /// Joins tensors along the first dim: each must have the same dtype and
    /// the same dims after the first. `None` when they do not, or there are none.
    pub fn concat(parts: Vec<Tensor>) -> Option<Tensor> {
        let first = parts.first()?;
        let (dtype, mut shape) = (first.dtype, first.shape.clone());
        if shape.is_empty() || parts.iter().any(|p| p.dtype != dtype || p.shape.get(1..) != shape.get(1..)) {
            return None;
        }
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Tensor { dtype, shape, data })
    }

    /// Joins several runs' tensor lists position by position along the
    /// first dim (see [`Tensor::concat`]): the inputs of requests joined
    /// into one batch, or the outputs of a batch's chunks or samples. `Err(i)`
    /// names the first position whose tensors do not join, a run lacking
    /// one included.
    pub fn concat_each(runs: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, usize> {
        let width = runs.first().map_or(0, Vec::len);
        let mut columns: Vec<Vec<Tensor>> = (0..width).map(|_| Vec::with_capacity(runs.len())).collect();
        for run in runs {
            if run.len() != width {
                return Err(run.len().min(width));
            }
            for (column, t) in columns.iter_mut().zip(run) {
                column.push(t);
            }
        }
        columns.into_iter().enumerate().map(|(i, parts)| Tensor::concat(parts).ok_or(i)).collect()
    }

    fn expect(&self, dtype: DType) -> Result<(), ProtocolError> {
        if self.dtype != dtype {
            return Err(ProtocolError::WrongDType { expected: dtype, found: self.dtype });
        }
        Ok(())
    }
}

/// See [`Tensor::check`].
pub(super) fn check_bytes(dtype: DType, shape: &[usize], data: &[u8], index: usize) -> Result<(), ProtocolError> {
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

/// Why [`Tensor::zeros`] made no tensor.
#[derive(Debug, thiserror::Error)]
pub enum ZerosError {
    #[error("shape {shape:?} is too large")]
    TooLarge { shape: Vec<usize> },
    #[error("failed to allocate {bytes} bytes of zeros")]
    Allocation {
        bytes: usize,
        #[source]
        source: std::collections::TryReserveError,
    },
}
