//! A v2 inference request body, JSON or JSON followed by binary tensor data
//! (`agent/src/inference_api/decode.rs`, `decode_request`): every size the
//! client chooses must be checked before it is allocated.
//!
//! Input: a first byte of options, then the body. Bit 0 set: the body starts
//! with the `Inference-Header-Content-Length` value up to the first newline.
//! Bit 1 set: tight limits (a 512-byte body, 8-byte ids, 2 inputs), so each
//! limit's refusal is reached.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sentinel_agent::inference_api::{DecodeLimits, decode_request};
use sentinel_worker_protocol::frame::MAX_RANK;

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else { return };
    let (header, body) = if options & 1 == 1 {
        let Some(newline) = rest.iter().position(|&b| b == b'\n') else { return };
        let Ok(header) = std::str::from_utf8(&rest[..newline]) else { return };
        (Some(header), &rest[newline + 1..])
    } else {
        (None, rest)
    };
    let limits = if options & 2 == 2 {
        DecodeLimits { max_body_bytes: 512, max_id_bytes: 8, max_inputs: 2, ..DecodeLimits::default() }
    } else {
        DecodeLimits::default()
    };
    let Ok(request) = decode_request(Bytes::copy_from_slice(body), header, &limits) else { return };
    assert!(body.len() <= limits.max_body_bytes);
    assert!(request.id.as_ref().is_none_or(|id| id.len() <= limits.max_id_bytes));
    assert!(request.inputs.len() <= limits.max_inputs);
    let mut tensor_bytes = 0usize;
    for (_, t) in &request.inputs {
        assert!(t.shape.len() <= MAX_RANK);
        // Bytes match the shape (strings: length-prefixed, filling them).
        assert_eq!(t.check(0), Ok(()), "data matches the shape");
        tensor_bytes += t.data.len();
    }
    // No amplification: a JSON element takes at least two bytes of text and
    // at most eight of tensor (a string: its text, quotes included, and a
    // 4-byte prefix), and binary data is carried as is.
    assert!(tensor_bytes <= 4 * body.len(), "{tensor_bytes} tensor bytes from a {}-byte body", body.len());
});
