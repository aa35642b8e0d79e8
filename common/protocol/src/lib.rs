//! The edge ↔ cloud wire protocol, sans I/O: frames in, frames out, no sockets.
//!
//! One QUIC bidirectional stream carries one frame each way: a request and its response, or,
//! once per connection, a hello and its welcome. A frame is
//!
//! ```text
//! magic "SPEE" | version u16 LE | kind u8 | body length u32 LE | body (bincode 2, standard config)
//! ```
//!
//! The fixed 11-byte header is checked (magic, version, kind, length against the receiver's
//! limit) before a single byte of the body is buffered. bincode only ever decodes small
//! metadata under a 64 KiB limit; the hidden-state payload is the raw remainder of the body,
//! so no length field inside a frame can make the receiver allocate more than arrived. Semantic
//! checks (fingerprint, split layer, sequence length, payload size, finite values, deadline)
//! follow in [`OffloadRequest::validate`] and each failure maps to an [`ErrorCode`] for the
//! error frame.
//!
//! # Versions
//!
//! Version 2 added the request's deadline and the hello exchange. Error frames kept their
//! encoding from version 1 (the `Error` variant, [`ErrorFrame`] and the codes up to
//! `Internal`), so a client that speaks version 1 still reads why it is refused:
//! [`encode_error_for_version`].

use bincode::{Decode, Encode};

pub const MAGIC: [u8; 4] = *b"SPEE";
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version whose error frames this side can still write (see "Versions").
pub const OLDEST_ERROR_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 11;

/// Limits applied before and while decoding. The cloud worker fills them from its model and
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame body.
    pub max_body_bytes: usize,
    pub max_seq_len: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
}

impl Limits {
    /// Limits for a model: the largest body is a full-length f32 payload plus slack for the
    /// other fields.
    pub fn for_model(hidden_size: usize, num_layers: usize, max_seq_len: usize) -> Self {
        Self {
            max_body_bytes: max_seq_len * hidden_size * 4 + 4096,
            max_seq_len,
            hidden_size,
            num_layers,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
    /// The first exchange of a connection: the client's model, answered by the worker's
    /// limits ([`Welcome`]) or an error frame.
    Hello = 3,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Hello),
            _ => None,
        }
    }
}

/// Longest hello body a worker reads: a fingerprint and bincode's framing of it.
pub const MAX_HELLO_BODY_BYTES: usize = 256;

/// What the cloud should do beyond the final exit.
#[derive(Debug, Clone, Copy, PartialEq, Encode, Decode, Default)]
pub struct ReplyOptions {
    /// Stop at the first cloud-side exit whose top probability reaches this threshold (saves
    /// cloud compute); `None` runs to the last layer.
    pub cloud_exit_threshold: Option<f32>,
}

impl ReplyOptions {
    /// Whether the cloud answers at an exit (before the last layer) with these class
    /// probabilities: the worker's test, and the simulator's replay of it.
    pub fn exits_at(&self, probs: &[f32]) -> bool {
        self.cloud_exit_threshold
            .is_some_and(|t| probs.iter().copied().fold(f32::NEG_INFINITY, f32::max) >= t)
    }
}

/// Hidden states after layer `split_layer` of one sample, for the cloud to finish.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct OffloadRequest {
    pub request_id: u64,
    pub fingerprint: [u8; 32],
    /// Milliseconds the client waits for the answer, counted by the worker from when the
    /// request began to arrive. A request the worker cannot answer in time is dropped with a
    /// `deadline_exceeded` error instead of being computed for a client that has given up.
    pub deadline_ms: u32,
    /// The last layer run on the edge, 0 for embeddings only.
    pub split_layer: u16,
    /// Real tokens only: padding never crosses the wire.
    pub seq_len: u32,
    pub encoding: PayloadEncoding,
    pub options: ReplyOptions,
    pub payload: Vec<u8>,
}

/// The variants' order is part of the wire format: `Error` keeps index 1 (see "Versions").
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum Response {
    Answer(Answer),
    Error(ErrorFrame),
    Welcome(Welcome),
}

/// A client's hello: the model it will send hidden states of.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    pub fingerprint: [u8; 32],
}

impl Hello {
    /// Whether the client's model is the worker's (`fingerprint`).
    pub fn validate(&self, fingerprint: &[u8; 32]) -> Result<(), ProtocolError> {
        check_fingerprint(&self.fingerprint, fingerprint)
    }
}

/// The worker's answer to a hello whose model matched: what it will accept on this
/// connection, so the client can stay within it instead of learning it request by request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    /// Requests this connection may have open at once (its share of the worker).
    pub max_streams: u32,
    /// Longest sequence a request may carry.
    pub max_seq_len: u32,
    pub num_layers: u16,
    /// Milliseconds within which a whole request frame must arrive once its stream opened.
    pub receive_timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Answer {
    pub request_id: u64,
    pub probs: Vec<f32>,
    pub predicted: u32,
    /// The layer whose exit answered (the last layer unless a cloud exit fired).
    pub exit_layer: u16,
    /// Time the worker spent computing this request's batch, microseconds.
    pub compute_us: u64,
    /// Time the request waited for a batch to start, microseconds.
    pub queue_us: u64,
    pub batch_size: u16,
}

#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct ErrorFrame {
    pub request_id: u64,
    pub code: ErrorCode,
    pub message: String,
}

/// Codes are encoded by index: new ones go at the end (see "Versions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum ErrorCode {
    Malformed,
    UnsupportedVersion,
    FrameTooLarge,
    WrongFingerprint,
    SplitOutOfRange,
    SequenceTooLong,
    WrongShape,
    NonFinite,
    /// The worker is at its in-flight bound; retry later or answer locally.
    Busy,
    ShuttingDown,
    Internal,
    /// The worker could not answer within the request's deadline (it was dropped before
    /// being computed).
    DeadlineExceeded,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedVersion => "unsupported_version",
            Self::FrameTooLarge => "frame_too_large",
            Self::WrongFingerprint => "wrong_fingerprint",
            Self::SplitOutOfRange => "split_out_of_range",
            Self::SequenceTooLong => "sequence_too_long",
            Self::WrongShape => "wrong_shape",
            Self::NonFinite => "non_finite",
            Self::Busy => "busy",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

/// A protocol violation, with the code the error frame will carry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn into_frame(self, request_id: u64) -> Response {
        Response::Error(self.into_error_frame(request_id))
    }

    pub fn into_error_frame(self, request_id: u64) -> ErrorFrame {
        ErrorFrame {
            request_id,
            code: self.code,
            message: self.message,
        }
    }
}

/// `theirs` (a client's model) against `ours` (the worker's).
fn check_fingerprint(theirs: &[u8; 32], ours: &[u8; 32]) -> Result<(), ProtocolError> {
    if theirs == ours {
        return Ok(());
    }
    Err(ProtocolError::new(
        ErrorCode::WrongFingerprint,
        format!(
            "model fingerprint {} does not match the worker's {}",
            hex(&theirs[..8]),
            hex(&ours[..8])
        ),
    ))
}

impl OffloadRequest {
    /// Checks the request against the worker's model. `fingerprint` is the worker's own.
    pub fn validate(&self, fingerprint: &[u8; 32], limits: &Limits) -> Result<(), ProtocolError> {
        check_fingerprint(&self.fingerprint, fingerprint)?;
        if self.deadline_ms == 0 {
            return Err(ProtocolError::new(
                ErrorCode::Malformed,
                "deadline of 0 ms: the request was over before it was sent",
            ));
        }
        let split = usize::from(self.split_layer);
        if split >= limits.num_layers {
            return Err(ProtocolError::new(
                ErrorCode::SplitOutOfRange,
                format!(
                    "split layer {split} is outside 0..{} (the cloud must run at least one layer)",
                    limits.num_layers
                ),
            ));
        }
        let seq_len = self.seq_len as usize;
        if seq_len == 0 {
            return Err(ProtocolError::new(
                ErrorCode::WrongShape,
                "sequence length 0: every tokenized input has at least [CLS] and [SEP]",
            ));
        }
        if seq_len > limits.max_seq_len {
            return Err(ProtocolError::new(
                ErrorCode::SequenceTooLong,
                format!(
                    "sequence length {seq_len} is outside 1..={}",
                    limits.max_seq_len
                ),
            ));
        }
        let expected = self.encoding.payload_len(seq_len, limits.hidden_size);
        if self.payload.len() != expected {
            return Err(ProtocolError::new(
                ErrorCode::WrongShape,
                format!(
                    "payload of {} bytes; {} tokens × hidden {} in {} need {expected}",
                    self.payload.len(),
                    seq_len,
                    limits.hidden_size,
                    self.encoding.name()
                ),
            ));
        }
        if let Some(threshold) = self.options.cloud_exit_threshold
            && !(0.0..=1.0).contains(&threshold)
        {
            return Err(ProtocolError::new(
                ErrorCode::Malformed,
                format!("cloud exit threshold {threshold} is outside [0, 1]"),
            ));
        }
        Ok(())
    }

    /// The hidden states as f32 `[seq, hidden]`, row-major. Call after [`Self::validate`].
    pub fn hidden_states(&self, hidden_size: usize) -> Result<Vec<f32>, ProtocolError> {
        decode_hidden(
            &self.payload,
            self.encoding,
            self.seq_len as usize,
            hidden_size,
        )
    }
}

/// Everything the worker does with bytes off the wire before they reach the model, for the
/// cargo-fuzz target (`common/protocol/fuzz`) and the stable million-input test below: any panic (or an
/// allocation from a length that was not checked) is a bug, and a request that decodes must
/// survive re-encoding byte for byte.
#[cfg(any(test, fuzzing))]
pub fn check_untrusted_input(data: &[u8], limits: &Limits) {
    if let Some(header) = data.first_chunk::<HEADER_LEN>() {
        let _ = decode_header(
            header,
            &[FrameKind::Request, FrameKind::Hello],
            |kind| match kind {
                FrameKind::Hello => MAX_HELLO_BODY_BYTES,
                _ => limits.max_body_bytes,
            },
        );
        let body = &data[HEADER_LEN..];
        let _ = decode_request_body(body);
        if let Ok(hello) = decode_hello_body(body) {
            let _ = hello.validate(&[0; 32]);
        }
    }
    if let Ok(request) = decode_request(data, limits.max_body_bytes) {
        // Any fingerprint is accepted so that validation and payload decoding are reached.
        if request.validate(&request.fingerprint, limits).is_ok() {
            let _ = request.hidden_states(limits.hidden_size);
        }
        // Bytes, not values, are compared: a NaN threshold is never equal to itself.
        let reencoded = encode_request(&request);
        let again = decode_request(&reencoded, usize::MAX).expect("a re-encoded request decodes");
        assert_eq!(
            encode_request(&again),
            reencoded,
            "a decoded request must survive re-encoding"
        );
    }
    if let Ok(response) = decode_response(data) {
        let _ = encode_response(&response);
        if let Response::Error(error) = &response {
            let _ = encode_error_for_version(error, OLDEST_ERROR_VERSION);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

mod codec;
mod payload;
pub use codec::{
    MAX_ERROR_MESSAGE_BYTES, MAX_RESPONSE_FRAME, decode_header, decode_hello_body, decode_request,
    decode_request_body, decode_response, encode_error_for_version, encode_hello, encode_request,
    encode_response, header_version,
};
#[cfg(test)]
use codec::{decode_metadata, frame};
pub use payload::{PayloadEncoding, decode_hidden, encode_hidden};

#[cfg(test)]
mod tests;
