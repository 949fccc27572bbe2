//! The agent's side of the worker pipe (`agent/src/worker/protocol.rs`): a
//! confined worker is not trusted, so every frame it writes is untrusted.
//!
//! Input: a first byte choosing how many bytes each `read` returns (pipes
//! deliver frames in pieces), then a stream of frames. Each frame is decoded
//! as the ready line, a request and a response; whatever decodes must encode
//! back to the same value.
#![no_main]

use std::io::Read;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sentinel_worker_protocol::frame::{
    Tensor, decode_ready, decode_request, decode_response_timed, encode_ok_response, encode_ok_timed, encode_ready,
    read_frame, request_parts,
};

/// A reader that hands out at most `step` bytes per call, like a pipe.
struct Trickle<'a> {
    rest: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let mut pipe = Trickle { rest: stream, step: usize::from(step % 64) + 1 };
    while let Ok(Some(payload)) = read_frame(&mut pipe) {
        if let Ok(ready) = decode_ready(&payload) {
            assert_eq!(decode_ready(&encode_ready(&ready)), Ok(ready), "the ready line round-trips");
        }
        if let Ok(request) = decode_request(&payload) {
            assert_eq!(decode_request(&request.encode()), Ok(request.clone()), "a request round-trips");
            let parts = request_parts(&request.inputs, request.rows).concat();
            assert_eq!(parts, request.encode(), "the pieces join to the payload");
            for (i, t) in request.inputs.iter().enumerate() {
                // What decodes is well formed: bytes fit the shape, booleans
                // are 0 or 1, strings are length-prefixed and fill the bytes.
                assert_eq!(t.check(i), Ok(()), "a decoded tensor checks");
                // What the worker and the v2 API do with a request's tensors.
                let _ = (t.to_f32(), t.to_i64(), t.element_count(), t.strings(), t.first_non_finite());
                // Cut into samples along the first dim (rows, batch chunks)
                // and joined back, a tensor is what it was.
                if let Some(&n) = t.shape.first().filter(|&&n| (1..=64).contains(&n)) {
                    let samples: Vec<Tensor> = (0..n).map(|k| t.samples(k, 1)).collect();
                    assert!(samples.iter().enumerate().all(|(k, s)| s.check(k).is_ok()), "each sample checks");
                    assert_eq!(Tensor::concat(samples), Some(t.clone()), "samples join back");
                }
            }
        }
        match decode_response_timed(&payload) {
            Ok((tensors, Some(compute))) => {
                let again = decode_response_timed(&encode_ok_timed(&tensors, compute));
                assert_eq!(again, Ok((tensors, Some(compute))), "a timed response round-trips");
            }
            Ok((tensors, None)) => {
                let again = decode_response_timed(&encode_ok_response(&tensors));
                assert_eq!(again, Ok((tensors, None::<Duration>)), "a response round-trips");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
