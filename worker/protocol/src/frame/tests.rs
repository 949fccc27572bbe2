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
    assert_eq!(decode_request(&encode_request(&tensors)).unwrap().inputs, tensors);
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
fn a_rows_request_round_trips_and_says_so() {
    let rows = Request { inputs: sample(), rows: true };
    assert_eq!(decode_request(&rows.encode()), Ok(rows.clone()));
    let whole = Request { inputs: sample(), rows: false };
    assert_eq!(decode_request(&whole.encode()), Ok(whole));
    // Its prefixes are refused like a plain request's.
    let payload = rows.encode();
    for len in 0..payload.len() {
        assert!(decode_request(&payload[..len]).is_err(), "prefix of {len} bytes accepted");
    }
}

#[test]
fn hostile_headers_are_refused_before_allocating() {
    // A count of 4 billion tensors in a 4-byte payload, with and without
    // the rows marker before it.
    assert!(matches!(decode_request(&(ROWS - 1).to_le_bytes()), Err(ProtocolError::Truncated { .. })));
    assert!(matches!(
        decode_request(&[ROWS, ROWS - 1].map(u32::to_le_bytes).concat()),
        Err(ProtocolError::Truncated { .. })
    ));
    // The marker alone is a truncated request, not an empty one.
    assert!(matches!(decode_request(&ROWS.to_le_bytes()), Err(ProtocolError::Truncated { .. })));
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
    assert_eq!(decode_response(&[STATUS_ERROR, 0xff]), Err(ResponseError::Malformed(ProtocolError::MessageNotUtf8)));
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
    assert_eq!(decode_request(&encode_request(&tensors)).unwrap().inputs, tensors);
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
        assert_eq!(decode_request(&encode_request(std::slice::from_ref(&z))).unwrap().inputs, vec![z.clone()]);
        if d == DType::String {
            assert_eq!(z.strings().unwrap(), vec![&b""[..]; 6]);
        }
        assert_eq!(z.first_non_finite(), None);
    }
    assert!(Tensor::zeros(DType::F64, &[usize::MAX, 2]).unwrap_err().to_string().contains("too large"));
}

#[test]
fn booleans_other_than_0_and_1_are_refused() {
    let bad = Tensor { dtype: DType::Bool, shape: vec![3], data: vec![1, 0, 2] };
    assert_eq!(decode_request(&encode_request(&[bad])), Err(ProtocolError::NotABool { index: 0, element: 2, byte: 2 }));
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
    let ready =
        Ready { ready: true, confined: false, reason: Some("sandbox unavailable: ENOSYS".into()), max_batch: 64 };
    assert_eq!(decode_ready(&encode_ready(&ready)).unwrap(), ready);
    let line = encode_ready(&Ready { ready: true, confined: true, reason: None, max_batch: 1 });
    assert_eq!(line, b"{\"ready\":true,\"confined\":true,\"max_batch\":1}\n");
    // A worker that predates batching says nothing of it: it runs fixed shapes only.
    assert_eq!(decode_ready(b"{\"ready\":true,\"confined\":true}\n").unwrap().max_batch, 1);
    assert!(decode_ready(b"not json").is_err());
}

#[test]
fn samples_split_and_join_back() {
    let t = Tensor::from_f32(vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let parts: Vec<Tensor> = (0..3).map(|i| t.samples(i, 1)).collect();
    assert_eq!(parts[1].to_f32().unwrap(), vec![3.0, 4.0]);
    assert_eq!(parts[1].shape, vec![1, 2]);
    assert_eq!(Tensor::concat(parts), Some(t));
}

#[test]
fn chunks_of_a_batch_split_and_join_back_in_order() {
    let t = Tensor::from_f32(vec![5, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    let parts: Vec<Tensor> = [(0, 2), (2, 2), (4, 1)].iter().map(|&(s, l)| t.samples(s, l)).collect();
    assert_eq!(parts.iter().map(|p| p.shape[0]).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(parts[1].to_f32().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
    assert_eq!(Tensor::concat(parts), Some(t.clone()));
    let strings = Tensor::from_strings(vec![3, 1], &["a", "bc", ""]);
    let parts = vec![strings.samples(0, 2), strings.samples(2, 1)];
    assert_eq!(parts[0].strings().unwrap(), vec![&b"a"[..], b"bc"]);
    assert_eq!(Tensor::concat(parts), Some(strings));
    // Parts that do not share their trailing dims or dtype do not join.
    let other = Tensor::from_f32(vec![1, 3], &[0.0, 0.0, 0.0]);
    assert_eq!(Tensor::concat(vec![t.clone(), other]), None);
    assert_eq!(Tensor::concat(vec![t, Tensor::from_i64(vec![1, 2], &[0, 0])]), None);
}

#[test]
fn string_and_narrow_samples_split_and_join_back() {
    // Strings vary in length: a sample is cut at element boundaries.
    let t = Tensor::from_strings(vec![3, 2], &["a", "", "longer one", "b", "é", "xyz"]);
    let parts: Vec<Tensor> = (0..3).map(|i| t.samples(i, 1)).collect();
    assert_eq!(parts[1].strings().unwrap(), vec![&b"longer one"[..], b"b"]);
    assert!(parts.iter().all(|p| p.shape == [1, 2] && p.check(0).is_ok()));
    assert_eq!(Tensor::concat(parts), Some(t));
    let t = Tensor::from_values::<u8>(vec![2, 3], &[1, 2, 3, 4, 5, 6]);
    let parts: Vec<Tensor> = (0..2).map(|i| t.samples(i, 1)).collect();
    assert_eq!(parts[1].values::<u8>().unwrap(), vec![4, 5, 6]);
    assert_eq!(Tensor::concat(parts), Some(t));
}

#[test]
fn request_parts_join_to_the_payload_and_borrow_the_tensor_data() {
    let inputs = sample();
    for rows in [false, true] {
        let parts = request_parts(&inputs, rows);
        let joined = parts.concat();
        assert_eq!(decode_request(&joined), Ok(Request { inputs: inputs.clone(), rows }));
        assert_eq!(joined, Request { inputs: inputs.clone(), rows }.encode());
        let borrowed: Vec<&[u8]> = parts
            .iter()
            .filter_map(|p| match p {
                Cow::Borrowed(b) => Some(*b),
                Cow::Owned(_) => None,
            })
            .collect();
        assert_eq!(borrowed.len(), inputs.len(), "each tensor's data is borrowed, not copied");
        for (b, t) in borrowed.iter().zip(&inputs) {
            assert!(std::ptr::eq(b.as_ptr(), t.data.as_ptr()));
        }
    }
    assert_eq!(request_parts(&[], false).concat(), 0u32.to_le_bytes(), "no tensors: the count alone");
}

#[test]
fn runs_join_position_by_position_or_name_the_position_that_does_not() {
    let run = |k: f32| vec![Tensor::from_f32(vec![1, 2], &[k, k]), Tensor::from_i64(vec![1], &[k as i64])];
    let joined = Tensor::concat_each(vec![run(1.0), run(2.0), run(3.0)]).expect("joins");
    assert_eq!(joined[0], Tensor::from_f32(vec![3, 2], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]));
    assert_eq!(joined[1], Tensor::from_i64(vec![3], &[1, 2, 3]));
    assert_eq!(Tensor::concat_each(Vec::new()), Ok(Vec::new()));
    let mut odd = run(2.0);
    odd[1] = Tensor::from_f32(vec![1], &[2.0]);
    assert_eq!(Tensor::concat_each(vec![run(1.0), odd]), Err(1), "another dtype at position 1");
    assert_eq!(Tensor::concat_each(vec![run(1.0), vec![run(2.0).remove(0)]]), Err(1), "a run lacking position 1");
}
