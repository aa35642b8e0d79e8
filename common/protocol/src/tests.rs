use proptest::prelude::*;

use super::*;

const HIDDEN: usize = 8;
const LIMITS: Limits = Limits {
    max_body_bytes: 64 * HIDDEN * 4 + 4096,
    max_seq_len: 64,
    hidden_size: HIDDEN,
    num_layers: 6,
};
const FINGERPRINT: [u8; 32] = [7; 32];

fn request(seq_len: usize, encoding: PayloadEncoding) -> OffloadRequest {
    let values: Vec<f32> = (0..seq_len * HIDDEN)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    OffloadRequest {
        request_id: 42,
        fingerprint: FINGERPRINT,
        deadline_ms: 2_000,
        split_layer: 3,
        seq_len: seq_len as u32,
        encoding,
        options: ReplyOptions::default(),
        payload: encode_hidden(&values, HIDDEN, encoding),
    }
}

fn code(result: Result<impl std::fmt::Debug, ProtocolError>) -> ErrorCode {
    result.expect_err("an error was expected").code
}

#[test]
fn a_valid_request_round_trips_and_validates() {
    for encoding in PayloadEncoding::ALL {
        let request = request(5, encoding);
        let decoded = decode_request(&encode_request(&request), LIMITS.max_body_bytes);
        assert_eq!(decoded.as_ref(), Ok(&request));
        decoded.unwrap().validate(&FINGERPRINT, &LIMITS).unwrap();
    }
}

#[test]
fn header_checks_name_the_problem() {
    let frame = encode_request(&request(4, PayloadEncoding::F32));
    let mut bad_magic = frame.clone();
    bad_magic[0] = b'X';
    assert_eq!(
        code(decode_request(&bad_magic, 1 << 20)),
        ErrorCode::Malformed
    );
    let mut bad_version = frame.clone();
    bad_version[4] = 9;
    assert_eq!(
        code(decode_request(&bad_version, 1 << 20)),
        ErrorCode::UnsupportedVersion
    );
    let mut bad_kind = frame.clone();
    bad_kind[6] = FrameKind::Response as u8;
    assert_eq!(
        code(decode_request(&bad_kind, 1 << 20)),
        ErrorCode::Malformed
    );
    assert_eq!(code(decode_request(&frame, 16)), ErrorCode::FrameTooLarge);
    assert_eq!(
        code(decode_request(&frame[..frame.len() - 1], 1 << 20)),
        ErrorCode::Malformed
    );
    assert_eq!(
        code(decode_request(&frame[..5], 1 << 20)),
        ErrorCode::Malformed
    );
}

#[test]
fn validation_names_each_problem() {
    let good = request(4, PayloadEncoding::F32);
    let check = |r: &OffloadRequest| code(r.validate(&FINGERPRINT, &LIMITS));
    assert_eq!(
        code(good.validate(&[0; 32], &LIMITS)),
        ErrorCode::WrongFingerprint
    );
    let mut r = good.clone();
    r.split_layer = 6;
    assert_eq!(check(&r), ErrorCode::SplitOutOfRange);
    let mut r = good.clone();
    r.seq_len = 65;
    assert_eq!(check(&r), ErrorCode::SequenceTooLong);
    let mut r = good.clone();
    r.seq_len = 0;
    assert_eq!(check(&r), ErrorCode::WrongShape);
    let mut r = good.clone();
    r.seq_len = 5;
    assert_eq!(check(&r), ErrorCode::WrongShape);
    let mut r = good.clone();
    r.deadline_ms = 0;
    assert_eq!(check(&r), ErrorCode::Malformed);
    let mut r = good.clone();
    r.options.cloud_exit_threshold = Some(f32::NAN);
    assert_eq!(check(&r), ErrorCode::Malformed);
    let mut r = good.clone();
    r.options.cloud_exit_threshold = Some(1.5);
    assert_eq!(check(&r), ErrorCode::Malformed);
}

#[test]
fn non_finite_values_are_rejected_in_every_encoding() {
    for encoding in PayloadEncoding::ALL {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = vec![0.5f32; 3 * HIDDEN];
            values[HIDDEN + 2] = bad;
            let payload = encode_hidden(&values, HIDDEN, encoding);
            assert_eq!(
                code(decode_hidden(&payload, encoding, 3, HIDDEN)),
                ErrorCode::NonFinite,
                "{bad} in {}",
                encoding.name()
            );
        }
    }
    // f16 cannot hold 1e6: it becomes infinity, which must be refused, not computed on.
    let payload = encode_hidden(&[1e6; HIDDEN], HIDDEN, PayloadEncoding::F16);
    assert_eq!(
        code(decode_hidden(&payload, PayloadEncoding::F16, 1, HIDDEN)),
        ErrorCode::NonFinite
    );
    // A negative int8 scale is not something our encoder writes.
    let mut payload = encode_hidden(&[1.0; HIDDEN], HIDDEN, PayloadEncoding::Int8PerToken);
    payload[..4].copy_from_slice(&(-1.0f32).to_le_bytes());
    assert_eq!(
        code(decode_hidden(
            &payload,
            PayloadEncoding::Int8PerToken,
            1,
            HIDDEN
        )),
        ErrorCode::NonFinite
    );
}

#[test]
fn degenerate_shapes_are_errors_not_panics() {
    assert_eq!(
        code(decode_hidden(&[], PayloadEncoding::Int8PerToken, 0, 0)),
        ErrorCode::WrongShape
    );
    assert_eq!(
        code(decode_hidden(
            &[0; 8],
            PayloadEncoding::F32,
            usize::MAX,
            usize::MAX
        )),
        ErrorCode::WrongShape
    );
    let zeros = encode_hidden(&[0.0; HIDDEN], HIDDEN, PayloadEncoding::Int8PerToken);
    assert_eq!(
        decode_hidden(&zeros, PayloadEncoding::Int8PerToken, 1, HIDDEN),
        Ok(vec![0.0; HIDDEN])
    );
}

#[test]
fn long_error_messages_are_cut_to_fit() {
    let response = Response::Error(ErrorFrame {
        request_id: 9,
        code: ErrorCode::Internal,
        message: "é".repeat(100_000),
    });
    let frame = encode_response(&response);
    assert!(frame.len() <= MAX_RESPONSE_FRAME);
    let Response::Error(error) = decode_response(&frame).unwrap() else {
        panic!("an error frame was sent")
    };
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(error.message.len() <= MAX_ERROR_MESSAGE_BYTES && error.message.starts_with('é'));

    let huge = Response::Answer(Answer {
        request_id: 3,
        probs: vec![0.0; 100_000],
        predicted: 0,
        exit_layer: 6,
        compute_us: 0,
        queue_us: 0,
        batch_size: 1,
    });
    let Response::Error(error) = decode_response(&encode_response(&huge)).unwrap() else {
        panic!("an oversized answer must become an error frame")
    };
    assert_eq!((error.request_id, error.code), (3, ErrorCode::Internal));
}

#[test]
fn a_hello_round_trips_and_names_a_mismatched_model() {
    let hello = Hello {
        fingerprint: FINGERPRINT,
    };
    let frame = encode_hello(&hello);
    let header = frame.first_chunk::<HEADER_LEN>().unwrap();
    let (kind, len) = decode_header(header, &[FrameKind::Request, FrameKind::Hello], |kind| {
        if kind == FrameKind::Hello {
            MAX_HELLO_BODY_BYTES
        } else {
            0
        }
    })
    .unwrap();
    assert_eq!((kind, len), (FrameKind::Hello, frame.len() - HEADER_LEN));
    let decoded = decode_hello_body(&frame[HEADER_LEN..]).unwrap();
    assert_eq!(decoded, hello);
    decoded.validate(&FINGERPRINT).unwrap();
    let error = decoded.validate(&[1; 32]).unwrap_err();
    assert_eq!(error.code, ErrorCode::WrongFingerprint);
    assert!(
        error.message.contains("0707070707070707"),
        "{}",
        error.message
    );
    // A hello where only requests are accepted, and one over the hello limit.
    assert_eq!(
        code(decode_header(header, &[FrameKind::Request], |_| 1 << 20)),
        ErrorCode::Malformed
    );
    assert_eq!(
        code(decode_header(header, &[FrameKind::Hello], |_| 4)),
        ErrorCode::FrameTooLarge
    );
}

/// What a version-1 client does with a response: its header check wanted version 1, and
/// its `Response` had two variants (`Answer`, `Error`) and codes up to `Internal`.
fn decode_as_version_one(frame: &[u8]) -> Result<ErrorFrame, String> {
    let header = frame.first_chunk::<HEADER_LEN>().ok_or("short frame")?;
    if header_version(header) != Some(1) || header[6] != FrameKind::Response as u8 {
        return Err(format!("header {header:?} is not a version-1 response"));
    }
    match decode_metadata::<Response>(&frame[HEADER_LEN..]).map_err(|e| e.to_string())? {
        Response::Error(error) if (error.code as u8) <= ErrorCode::Internal as u8 => Ok(error),
        other => Err(format!("{other:?} is not a version-1 error frame")),
    }
}

#[test]
fn an_older_client_reads_why_it_is_refused() {
    let mut old_header = encode_request(&request(1, PayloadEncoding::F32));
    old_header[4..6].copy_from_slice(&1u16.to_le_bytes());
    let header = old_header.first_chunk::<HEADER_LEN>().unwrap();
    let error = decode_header(header, &[FrameKind::Request], |_| 1 << 20).unwrap_err();
    assert_eq!(error.code, ErrorCode::UnsupportedVersion);
    assert!(
        error.message.contains("version 1, this side speaks 2"),
        "{}",
        error.message
    );
    let version = header_version(header).unwrap();
    let frame = encode_error_for_version(&error.clone().into_error_frame(0), version);
    let read = decode_as_version_one(&frame).unwrap();
    assert_eq!((read.code, read.message), (error.code, error.message));
    // A code version 1 did not have goes out as `internal`, still readable.
    let late = ErrorFrame {
        request_id: 3,
        code: ErrorCode::DeadlineExceeded,
        message: "late".into(),
    };
    let read = decode_as_version_one(&encode_error_for_version(&late, 1)).unwrap();
    assert_eq!((read.code, read.request_id), (ErrorCode::Internal, 3));
}

/// xorshift64*: a fast, seeded generator, so that a million inputs take about a second
/// and a failure is reproducible from its index.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn a_million_generated_frames_never_panic() {
    // Valid frames of every kind to mutate: the generator then reaches the checks past
    // the header, which random bytes alone almost never do.
    let mut seeds: Vec<Vec<u8>> = PayloadEncoding::ALL
        .into_iter()
        .flat_map(|encoding| [1, 3].map(|seq| encode_request(&request(seq, encoding))))
        .collect();
    let mut exiting = request(2, PayloadEncoding::Int8PerToken);
    exiting.options.cloud_exit_threshold = Some(0.5);
    seeds.push(encode_request(&exiting));
    seeds.push(encode_hello(&Hello {
        fingerprint: FINGERPRINT,
    }));
    seeds.push(encode_response(&Response::Welcome(Welcome {
        max_streams: 32,
        max_seq_len: 512,
        num_layers: 6,
        receive_timeout_ms: 2_000,
    })));
    seeds.push(encode_response(
        &ProtocolError::new(ErrorCode::Busy, "busy").into_frame(9),
    ));
    let mut generator = Generator(0x5eed_f00d_dead_beef);
    const INPUTS: usize = 1_000_000;
    for _ in 0..INPUTS {
        let seed = &seeds[generator.below(seeds.len())];
        let input = match generator.below(5) {
            0 => {
                let len = generator.below(80);
                generator.bytes(len)
            }
            1 => {
                let mut input = seed.clone();
                for _ in 0..1 + generator.below(4) {
                    let at = generator.below(input.len());
                    input[at] ^= 1 + generator.below(255) as u8;
                }
                input
            }
            2 => {
                let mut input = seed[..generator.below(seed.len() + 1)].to_vec();
                let extra = generator.below(3) * generator.below(40);
                input.extend(generator.bytes(extra));
                input
            }
            3 => {
                // A valid header of any kind, announcing the body that follows or not.
                let len = generator.below(200);
                let mut input = seed[..HEADER_LEN].to_vec();
                input[6] = generator.below(5) as u8;
                let announced = if generator.below(2) == 0 {
                    len as u32
                } else {
                    generator.next() as u32
                };
                input[7..HEADER_LEN].copy_from_slice(&announced.to_le_bytes());
                input.extend(generator.bytes(len));
                input
            }
            _ => {
                // Random bytes over part of the metadata, where lengths and tags live.
                let mut input = seed.clone();
                let start = HEADER_LEN + generator.below(60.min(input.len() - HEADER_LEN));
                let end = (start + 1 + generator.below(8)).min(input.len());
                let noise = generator.bytes(end - start);
                input[start..end].copy_from_slice(&noise);
                input
            }
        };
        check_untrusted_input(&input, &LIMITS);
    }
}

fn arb_encoding() -> impl Strategy<Value = PayloadEncoding> {
    prop_oneof![
        Just(PayloadEncoding::F32),
        Just(PayloadEncoding::F16),
        Just(PayloadEncoding::Int8PerToken)
    ]
}

fn arb_request() -> impl Strategy<Value = OffloadRequest> {
    (
        (any::<u64>(), any::<[u8; 32]>(), any::<u32>()),
        any::<u16>(),
        any::<u32>(),
        arb_encoding(),
        proptest::option::of(any::<f32>()),
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(
            |(
                (request_id, fingerprint, deadline_ms),
                split_layer,
                seq_len,
                encoding,
                threshold,
                payload,
            )| {
                OffloadRequest {
                    request_id,
                    fingerprint,
                    deadline_ms,
                    split_layer,
                    seq_len,
                    encoding,
                    options: ReplyOptions {
                        cloud_exit_threshold: threshold,
                    },
                    payload,
                }
            },
        )
}

fn arb_response() -> impl Strategy<Value = Response> {
    let answer = (
        any::<u64>(),
        proptest::collection::vec(any::<f32>(), 0..20),
        any::<(u32, u16, u64, u64, u16)>(),
    )
        .prop_map(
            |(request_id, probs, (predicted, exit_layer, compute_us, queue_us, batch_size))| {
                Response::Answer(Answer {
                    request_id,
                    probs,
                    predicted,
                    exit_layer,
                    compute_us,
                    queue_us,
                    batch_size,
                })
            },
        );
    let error = (any::<u64>(), 0usize..12, ".{0,40}").prop_map(|(request_id, code, message)| {
        let codes = [
            ErrorCode::Malformed,
            ErrorCode::UnsupportedVersion,
            ErrorCode::FrameTooLarge,
            ErrorCode::WrongFingerprint,
            ErrorCode::SplitOutOfRange,
            ErrorCode::SequenceTooLong,
            ErrorCode::WrongShape,
            ErrorCode::NonFinite,
            ErrorCode::Busy,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
            ErrorCode::DeadlineExceeded,
        ];
        Response::Error(ErrorFrame {
            request_id,
            code: codes[code],
            message,
        })
    });
    let welcome = any::<(u32, u32, u16, u32)>().prop_map(
        |(max_streams, max_seq_len, num_layers, receive_timeout_ms)| {
            Response::Welcome(Welcome {
                max_streams,
                max_seq_len,
                num_layers,
                receive_timeout_ms,
            })
        },
    );
    prop_oneof![answer, error, welcome]
}

/// Bit-level equality, so that NaN probabilities compare equal to themselves.
fn same_response(a: &Response, b: &Response) -> bool {
    match (a, b) {
        (Response::Answer(a), Response::Answer(b)) => {
            a.probs.len() == b.probs.len()
                && a.probs
                    .iter()
                    .zip(&b.probs)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
                && Answer {
                    probs: vec![],
                    ..a.clone()
                } == Answer {
                    probs: vec![],
                    ..b.clone()
                }
        }
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_request(&bytes, 1 << 20);
        let _ = decode_request_body(&bytes);
        let _ = decode_response(&bytes);
        if let Some(header) = bytes.first_chunk::<HEADER_LEN>() {
            let _ = decode_header(header, &[FrameKind::Request, FrameKind::Hello], |_| 1 << 20);
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        for kind in [FrameKind::Request, FrameKind::Response] {
            let frame = frame(kind, &body);
            if let Ok(request) = decode_request(&frame, 1 << 20)
                && request.validate(&FINGERPRINT, &LIMITS).is_ok()
            {
                let _ = request.hidden_states(HIDDEN);
            }
            let _ = decode_response(&frame);
        }
    }

    #[test]
    fn requests_round_trip(request in arb_request()) {
        let frame = encode_request(&request);
        let decoded = decode_request(&frame, frame.len()).unwrap();
        // Compare the threshold by bits: NaN is a legal (if invalid) value on the wire.
        prop_assert_eq!(
            decoded.options.cloud_exit_threshold.map(f32::to_bits),
            request.options.cloud_exit_threshold.map(f32::to_bits)
        );
        let without_options = |r: &OffloadRequest| OffloadRequest {
            options: ReplyOptions::default(),
            ..r.clone()
        };
        prop_assert_eq!(without_options(&decoded), without_options(&request));
    }

    #[test]
    fn responses_round_trip(response in arb_response()) {
        let decoded = decode_response(&encode_response(&response)).unwrap();
        prop_assert!(same_response(&decoded, &response));
    }

    #[test]
    fn mutated_frames_give_errors_not_panics(
        request in arb_request(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
    ) {
        let frame = encode_request(&request);
        let mut mutated = frame.clone();
        for (at, xor) in flips {
            let at = at % mutated.len();
            mutated[at] ^= xor;
        }
        if let Ok(decoded) = decode_request(&mutated, 1 << 20)
            && decoded.validate(&request.fingerprint, &LIMITS).is_ok()
        {
            let _ = decoded.hidden_states(HIDDEN);
        }
        // A frame cut anywhere short of its end is always an error.
        let cut = cut % frame.len();
        prop_assert!(decode_request(&frame[..cut], 1 << 20).is_err());
        let response = encode_response(&Response::Error(ErrorFrame {
            request_id: 1,
            code: ErrorCode::Busy,
            message: "busy".into(),
        }));
        prop_assert!(decode_response(&response[..cut % response.len()]).is_err());
    }

    #[test]
    fn hidden_states_round_trip_within_each_encoding_bound(
        tokens in proptest::collection::vec(
            proptest::collection::vec(-50.0f32..50.0, HIDDEN), 1..10),
        encoding in arb_encoding(),
    ) {
        let values: Vec<f32> = tokens.concat();
        let payload = encode_hidden(&values, HIDDEN, encoding);
        prop_assert_eq!(payload.len(), encoding.payload_len(tokens.len(), HIDDEN));
        let decoded = decode_hidden(&payload, encoding, tokens.len(), HIDDEN).unwrap();
        for (t, token) in tokens.iter().enumerate() {
            let max = token.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (d, &v) in token.iter().enumerate() {
                let got = decoded[t * HIDDEN + d];
                let bound = match encoding {
                    PayloadEncoding::F32 => 0.0,
                    // Half precision: 11 significant bits, or the subnormal spacing.
                    PayloadEncoding::F16 => (v.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
                    // Half a quantisation step of this token, plus float rounding.
                    PayloadEncoding::Int8PerToken => max / 127.0 * 0.5 + max * 1e-6,
                };
                prop_assert!((got - v).abs() <= bound, "{} → {} in {}", v, got, encoding.name());
            }
        }
    }
}
