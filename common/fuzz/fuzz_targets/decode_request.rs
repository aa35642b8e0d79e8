//! Arbitrary bytes through everything the cloud worker does with a request frame before it
//! reaches the model: header, body, validation against a MiniLM-sized model, payload decoding.
//! Any panic (or out-of-memory from a trusted length) is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/protocol.rs"]
#[allow(dead_code)]
mod protocol;

use protocol::{FrameKind, HEADER_LEN, Limits};

const LIMITS: Limits = Limits {
    max_body_bytes: 512 * 384 * 4 + 4096,
    max_seq_len: 512,
    hidden_size: 384,
    num_layers: 6,
};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<HEADER_LEN>() {
        let _ = protocol::decode_header(header, FrameKind::Request, LIMITS.max_body_bytes);
        let _ = protocol::decode_request_body(&data[HEADER_LEN..]);
    }
    if let Ok(request) = protocol::decode_request(data, LIMITS.max_body_bytes) {
        // Accept any fingerprint so that validation and payload decoding are reached.
        if request.validate(&request.fingerprint, &LIMITS).is_ok() {
            let _ = request.hidden_states(LIMITS.hidden_size);
        }
        // Bytes, not values, are compared: a NaN threshold is never equal to itself.
        let reencoded = protocol::encode_request(&request);
        let again =
            protocol::decode_request(&reencoded, usize::MAX).expect("a re-encoded request decodes");
        assert_eq!(
            protocol::encode_request(&again),
            reencoded,
            "a decoded request must survive re-encoding"
        );
    }
    let _ = protocol::decode_response(data);
});
