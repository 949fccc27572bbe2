//! The hub's multipart upload body (`hub/src/api/upload.rs`,
//! `read_multipart`): axum's multipart parser and the hub's routing of parts
//! (model, validation inputs and labels, signature; unknown, repeated or
//! missing parts),
//! with each part streamed to an in-memory sink under a cap, as the hub
//! streams it to a staging file.
//!
//! Input: a first byte choosing the body's chunk size, the `Content-Type`
//! header value up to the first newline, then the body.
#![no_main]

use std::fmt::Display;
use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use futures_util::{Stream, StreamExt as _};
use libfuzzer_sys::fuzz_target;
use sentinel_hub::api::ApiError;
use sentinel_hub::api::upload::{PartSink, read_multipart};

/// Cap per part, as the hub's `--max-upload-bytes`, small so the refusal is reached.
const CAP: u64 = 4096;

/// Counts each part's bytes and refuses more than [`CAP`].
struct Counting;

impl PartSink for Counting {
    type Part = u64;

    fn receive<S, E>(&mut self, mut part: S, what: &str) -> impl Future<Output = Result<u64, ApiError>> + Send
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: Display + Send,
    {
        let what = what.to_owned();
        async move {
            let mut size = 0u64;
            while let Some(chunk) = part.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::bad_request(format!("the upload of {what} broke off ({e})")))?;
                size += chunk.len() as u64;
                if size > CAP {
                    return Err(ApiError::bad_request(format!("{what} is over the cap")));
                }
            }
            Ok(size)
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else { return };
    let (content_type, body) = (&rest[..newline], &rest[newline + 1..]);
    let step = usize::from(step % 128) + 1;
    let chunks: Vec<Result<Bytes, std::io::Error>> = body.chunks(step).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let Ok(req) = Request::builder()
        .method("POST")
        .uri("/api/v1/models/digits/versions?version=1.0.0")
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
    else {
        return;
    };
    match runtime().block_on(read_multipart(req, &mut Counting)) {
        Ok(parts) => {
            assert!(parts.model <= CAP);
            if let Some((inputs, labels)) = parts.validation {
                assert!(inputs <= CAP && labels <= CAP);
            }
            // Read whole, so bounded by the hub, not the sink.
            assert!(parts.signature.is_none_or(|s| s.len() <= sentinel_proto::publisher::MAX_BUNDLE_BYTES));
        }
        Err(e) => assert!(e.status.is_client_error(), "a bad body is the client's error: {}", e.message),
    }
});
