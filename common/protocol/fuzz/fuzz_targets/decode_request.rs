//! Arbitrary bytes through everything the cloud worker does with a frame before it reaches
//! the model (`splitee_protocol::check_untrusted_input`: headers, request and hello bodies, validation
//! against a MiniLM-sized model, payload decoding, responses). Any panic (or out-of-memory from
//! a trusted length) is a bug. The test suite runs the same check on a million generated
//! inputs on stable (`splitee_protocol` test `a_million_generated_frames_never_panic`).
#![no_main]

use libfuzzer_sys::fuzz_target;

use splitee_protocol::{Limits, check_untrusted_input};

const LIMITS: Limits = Limits {
    max_body_bytes: 512 * 384 * 4 + 4096,
    max_seq_len: 512,
    hidden_size: 384,
    num_layers: 6,
};

fuzz_target!(|data: &[u8]| check_untrusted_input(data, &LIMITS));
