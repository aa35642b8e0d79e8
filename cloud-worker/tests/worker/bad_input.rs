//! Every kind of bad input gets an error frame naming the problem, and the worker keeps
//! serving: frames are crafted byte by byte and sent on real streams.

use splitee_protocol::{
    ErrorCode, HEADER_LEN, MAGIC, PROTOCOL_VERSION, PayloadEncoding, Response, encode_request,
};
use splitee_service::transport;

use super::*;

fn header(version: u16, kind: u8, body_len: u32) -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&version.to_le_bytes());
    header.push(kind);
    header.extend_from_slice(&body_len.to_le_bytes());
    header
}

async fn error_of(connection: &Connection, frame: &[u8]) -> (ErrorCode, String, u64) {
    match transport::exchange(connection, frame, TIMEOUT)
        .await
        .unwrap()
    {
        Response::Error(error) => (error.code, error.message, error.request_id),
        other => panic!("bad input was answered: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_error_code_and_the_worker_keeps_serving() {
    let harness = Harness::start(|config, _| config.limits.read_timeout_ms = 2_000).await;
    let connection = harness.connect().await;
    let good = harness.request("the worker keeps serving", 3, PayloadEncoding::F32, 77);
    let good_frame = encode_request(&good);

    let mut cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = Vec::new();
    let mut wrong = good.clone();
    wrong.fingerprint[0] ^= 1;
    cases.push((
        "wrong fingerprint",
        encode_request(&wrong),
        ErrorCode::WrongFingerprint,
        "fingerprint",
    ));
    for split in [6, 7, u16::MAX] {
        let mut wrong = good.clone();
        wrong.split_layer = split;
        cases.push((
            "split out of range",
            encode_request(&wrong),
            ErrorCode::SplitOutOfRange,
            "split layer",
        ));
    }
    let mut wrong = good.clone();
    wrong.seq_len = 513;
    cases.push((
        "sequence too long",
        encode_request(&wrong),
        ErrorCode::SequenceTooLong,
        "sequence length",
    ));
    let mut wrong = good.clone();
    wrong.seq_len += 1;
    cases.push((
        "payload of the wrong shape",
        encode_request(&wrong),
        ErrorCode::WrongShape,
        "payload",
    ));
    let mut wrong = good.clone();
    wrong.payload.truncate(wrong.payload.len() - 4);
    cases.push((
        "short payload",
        encode_request(&wrong),
        ErrorCode::WrongShape,
        "payload",
    ));
    let mut wrong = good.clone();
    wrong.payload[4 * 385..4 * 386].copy_from_slice(&f32::NAN.to_le_bytes());
    cases.push((
        "NaN hidden state",
        encode_request(&wrong),
        ErrorCode::NonFinite,
        "token 1 dimension 1",
    ));
    let mut wrong = good.clone();
    wrong.payload[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    cases.push((
        "infinite hidden state",
        encode_request(&wrong),
        ErrorCode::NonFinite,
        "inf",
    ));
    let mut wrong = good.clone();
    wrong.deadline_ms = 0;
    cases.push((
        "no time to answer",
        encode_request(&wrong),
        ErrorCode::Malformed,
        "deadline of 0 ms",
    ));
    let mut wrong = good.clone();
    wrong.options.cloud_exit_threshold = Some(2.0);
    cases.push((
        "threshold out of range",
        encode_request(&wrong),
        ErrorCode::Malformed,
        "threshold",
    ));
    // Header problems, answered before the body is read.
    cases.push((
        "oversized length",
        header(PROTOCOL_VERSION, 1, 100 << 20),
        ErrorCode::FrameTooLarge,
        "exceeds the limit",
    ));
    cases.push((
        "newer protocol",
        header(PROTOCOL_VERSION + 1, 1, 10),
        ErrorCode::UnsupportedVersion,
        "version",
    ));
    cases.push((
        "response kind",
        header(PROTOCOL_VERSION, 2, 10),
        ErrorCode::Malformed,
        "frame kind",
    ));
    let mut bad_magic = good_frame.clone();
    bad_magic[..4].copy_from_slice(b"HTTP");
    cases.push(("bad magic", bad_magic, ErrorCode::Malformed, "magic"));
    // Truncation: of the header, of the body.
    cases.push((
        "truncated header",
        good_frame[..7].to_vec(),
        ErrorCode::Malformed,
        "truncated",
    ));
    cases.push((
        "truncated body",
        good_frame[..good_frame.len() - 100].to_vec(),
        ErrorCode::Malformed,
        "truncated",
    ));
    cases.push((
        "empty stream",
        Vec::new(),
        ErrorCode::Malformed,
        "truncated",
    ));
    let mut trailing = good_frame.clone();
    trailing.extend_from_slice(b"extra");
    cases.push((
        "bytes after the frame",
        trailing,
        ErrorCode::Malformed,
        "after the request frame",
    ));
    let mut garbage = header(PROTOCOL_VERSION, 1, 40);
    garbage.extend_from_slice(&[0xff; 40]);
    cases.push(("undecodable metadata", garbage, ErrorCode::Malformed, ""));

    let mut expected_errors = std::collections::HashMap::new();
    for (what, frame, code, needle) in &cases {
        let (got, message, _) = error_of(&connection, frame).await;
        assert_eq!(got, *code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: message {message:?} lacks {needle:?}"
        );
        *expected_errors.entry(*code).or_insert(0u64) += 1;
        // The same connection still answers a good request after each bad one.
        let answer = expect_answer(
            transport::exchange(&connection, &good_frame, TIMEOUT)
                .await
                .unwrap(),
        );
        assert_eq!(answer.request_id, 77);
    }
    // Errors found after the metadata decoded name the request they answer.
    let (_, _, id) = error_of(&connection, &cases[0].1).await;
    assert_eq!(id, 77);
    *expected_errors
        .get_mut(&ErrorCode::WrongFingerprint)
        .unwrap() += 1;

    // A client that resets its stream mid-frame gets no answer and harms nobody.
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&good_frame[..HEADER_LEN + 10])
        .await
        .unwrap();
    send.reset(0u32.into()).unwrap();
    // A client that stalls mid-frame is cut off by the read timeout.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&good_frame[..HEADER_LEN + 10])
        .await
        .unwrap();
    let stalled = recv.read_to_end(1 << 16).await.unwrap();
    let Response::Error(error) = splitee_protocol::decode_response(&stalled).unwrap() else {
        panic!("a stalled request was answered")
    };
    assert_eq!(error.code, ErrorCode::Malformed);
    assert!(
        error
            .message
            .contains("did not arrive whole within 2000 ms"),
        "{}",
        error.message
    );
    *expected_errors.get_mut(&ErrorCode::Malformed).unwrap() += 1;

    // A client of protocol version 1 is refused in version 1's framing, so that it can read
    // why (its own header check wants version 1).
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&header(1, 1, 10)).await.unwrap();
    // The worker answers after the header and stops reading: the body may find the stream
    // already stopped, which is fine.
    let _ = send.write_all(&[0; 10]).await;
    let _ = send.finish();
    let mut old = recv.read_to_end(1 << 16).await.unwrap();
    assert_eq!(
        old[4..6],
        1u16.to_le_bytes(),
        "answered in another version's framing"
    );
    old[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let Response::Error(error) = splitee_protocol::decode_response(&old).unwrap() else {
        panic!("an old client was answered")
    };
    assert_eq!(error.code, ErrorCode::UnsupportedVersion);
    assert!(
        error.message.contains("version 1, this side speaks 2"),
        "{}",
        error.message
    );
    *expected_errors
        .entry(ErrorCode::UnsupportedVersion)
        .or_insert(0) += 1;

    // The hello: the worker's limits for the right model, `wrong_fingerprint` for another.
    let welcome = transport::hello(&connection, &harness.fingerprint, TIMEOUT)
        .await
        .unwrap();
    assert_eq!((welcome.max_streams, welcome.max_seq_len), (32, 512));
    match transport::hello(&connection, &[9; 32], TIMEOUT).await {
        Err(transport::TransportError::Refused(error)) => {
            assert_eq!(error.code, ErrorCode::WrongFingerprint);
            assert!(
                error.message.contains("0909090909090909"),
                "{}",
                error.message
            );
        }
        other => panic!("a hello for another model was welcomed: {other:?}"),
    }
    *expected_errors
        .get_mut(&ErrorCode::WrongFingerprint)
        .unwrap() += 1;

    // Another client is served as if nothing happened.
    let other = harness.connect().await;
    expect_answer(transport::offload(&other, &good, TIMEOUT).await.unwrap());

    let metrics = harness.worker.metrics();
    for (code, count) in expected_errors {
        assert_eq!(
            metrics.errors(code),
            count,
            "errors counted for {}",
            code.name()
        );
    }
    harness.worker.shutdown().await.unwrap();
}
