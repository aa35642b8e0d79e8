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

/// Upper bound on the bincode-encoded part of any frame. The only large field, the hidden-state
/// payload, travels outside bincode; everything bincode decodes is small, so a length prefix
/// inside it can never claim more than this.
const MAX_METADATA_BYTES: usize = 64 * 1024;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_METADATA_BYTES>,
> {
    bincode::config::standard().with_limit::<MAX_METADATA_BYTES>()
}

/// The request without its payload: what bincode encodes.
#[derive(Encode, Decode)]
struct RequestMetadata {
    request_id: u64,
    fingerprint: [u8; 32],
    deadline_ms: u32,
    split_layer: u16,
    seq_len: u32,
    encoding: PayloadEncoding,
    options: ReplyOptions,
}

fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    versioned_frame(PROTOCOL_VERSION, kind, body)
}

fn versioned_frame(version: u16, kind: FrameKind, body: &[u8]) -> Vec<u8> {
    // Bodies are bounded by the model (a full-length f32 payload is < 2 MiB for BERT-base
    // sizes); a body past 4 GiB would be a caller bug, not input, and would otherwise be
    // announced with a silently wrapped length.
    let len = u32::try_from(body.len()).expect("frame bodies are smaller than 4 GiB");
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&version.to_le_bytes());
    frame.push(kind as u8);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Request body: `metadata length u32 LE | metadata (bincode) | payload (raw bytes)`.
pub fn encode_request(request: &OffloadRequest) -> Vec<u8> {
    let metadata = RequestMetadata {
        request_id: request.request_id,
        fingerprint: request.fingerprint,
        deadline_ms: request.deadline_ms,
        split_layer: request.split_layer,
        seq_len: request.seq_len,
        encoding: request.encoding,
        options: request.options,
    };
    let metadata = bincode::encode_to_vec(&metadata, config()).expect("small metadata encodes");
    let mut body = Vec::with_capacity(4 + metadata.len() + request.payload.len());
    body.extend_from_slice(&(metadata.len() as u32).to_le_bytes());
    body.extend_from_slice(&metadata);
    body.extend_from_slice(&request.payload);
    frame(FrameKind::Request, &body)
}

/// Longest error message put on the wire; longer ones are cut (on a character boundary) so
/// that an error frame always fits the response limit whatever produced the message.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Encodes a response frame. Never fails: an over-long error message is truncated, and a
/// response that still exceeds the metadata limit (a model with tens of thousands of labels)
/// becomes an `internal` error frame rather than a frame the client would refuse.
pub fn encode_response(response: &Response) -> Vec<u8> {
    let truncated;
    let response = match response {
        Response::Error(error) if error.message.len() > MAX_ERROR_MESSAGE_BYTES => {
            let mut cut = MAX_ERROR_MESSAGE_BYTES;
            while !error.message.is_char_boundary(cut) {
                cut -= 1;
            }
            truncated = Response::Error(ErrorFrame {
                message: error.message[..cut].to_owned(),
                ..error.clone()
            });
            &truncated
        }
        other => other,
    };
    // bincode's limit only guards decoding; the encoder must check the size itself.
    let body = match bincode::encode_to_vec(response, config()) {
        Ok(body) if body.len() <= MAX_METADATA_BYTES => body,
        result => {
            let request_id = match response {
                Response::Answer(answer) => answer.request_id,
                Response::Error(error) => error.request_id,
                Response::Welcome(_) => 0,
            };
            let problem = match result {
                Ok(body) => format!(
                    "{} bytes exceed the limit of {MAX_METADATA_BYTES}",
                    body.len()
                ),
                Err(e) => e.to_string(),
            };
            let fallback = Response::Error(ErrorFrame {
                request_id,
                code: ErrorCode::Internal,
                message: format!("the response could not be encoded: {problem}"),
            });
            bincode::encode_to_vec(&fallback, config()).expect("a short error frame encodes")
        }
    };
    frame(FrameKind::Response, &body)
}

/// Encodes an error frame in the framing of `version`, for a client that speaks an older
/// protocol (as old as [`OLDEST_ERROR_VERSION`]): error frames kept their encoding, so it can
/// read why it is refused. Codes added after its version are sent as `internal`.
pub fn encode_error_for_version(error: &ErrorFrame, version: u16) -> Vec<u8> {
    if version >= PROTOCOL_VERSION || version < OLDEST_ERROR_VERSION {
        return encode_response(&Response::Error(error.clone()));
    }
    let code = match error.code {
        ErrorCode::DeadlineExceeded => ErrorCode::Internal,
        code => code,
    };
    let current = encode_response(&Response::Error(ErrorFrame {
        code,
        ..error.clone()
    }));
    versioned_frame(version, FrameKind::Response, &current[HEADER_LEN..])
}

/// The version a frame header claims, if it is a splitee header at all.
pub fn header_version(header: &[u8; HEADER_LEN]) -> Option<u16> {
    (header[..4] == MAGIC).then(|| u16::from_le_bytes([header[4], header[5]]))
}

/// Checks a frame header and returns its kind, one of `accepted`, and the body length it
/// announces, at most `max_body_bytes(kind)`.
pub fn decode_header(
    header: &[u8; HEADER_LEN],
    accepted: &[FrameKind],
    max_body_bytes: impl Fn(FrameKind) -> usize,
) -> Result<(FrameKind, usize), ProtocolError> {
    let Some(version) = header_version(header) else {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            "not a splitee frame (bad magic)",
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {version}, this side speaks {PROTOCOL_VERSION}: upgrade the \
                 {} side",
                if version < PROTOCOL_VERSION {
                    "sending"
                } else {
                    "receiving"
                }
            ),
        ));
    }
    let kind = FrameKind::from_byte(header[6])
        .filter(|kind| accepted.contains(kind))
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::Malformed,
                format!("frame kind {} where {accepted:?} was expected", header[6]),
            )
        })?;
    let len = u32::from_le_bytes([header[7], header[8], header[9], header[10]]) as usize;
    let max = max_body_bytes(kind);
    if len > max {
        return Err(ProtocolError::new(
            ErrorCode::FrameTooLarge,
            format!("{kind:?} frame body of {len} bytes exceeds the limit of {max}"),
        ));
    }
    Ok((kind, len))
}

/// Splits a complete in-memory frame into its checked body.
fn frame_body(
    frame: &[u8],
    expected: FrameKind,
    max_body_bytes: usize,
) -> Result<&[u8], ProtocolError> {
    let header: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::Malformed,
                format!(
                    "truncated frame: {} bytes, the header alone needs {HEADER_LEN}",
                    frame.len()
                ),
            )
        })?;
    let (_, len) = decode_header(header, &[expected], |_| max_body_bytes)?;
    let body = &frame[HEADER_LEN..];
    if body.len() != len {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            format!(
                "truncated frame: header announces {len} body bytes, {} arrived",
                body.len()
            ),
        ));
    }
    Ok(body)
}

fn decode_metadata<T: Decode<()>>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (value, used) = bincode::decode_from_slice(bytes, config())
        .map_err(|e| ProtocolError::new(ErrorCode::Malformed, format!("undecodable frame: {e}")))?;
    if used != bytes.len() {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            format!("{} unexpected bytes after the message", bytes.len() - used),
        ));
    }
    Ok(value)
}

/// Decodes a request frame. Only structure is checked here; see [`OffloadRequest::validate`].
pub fn decode_request(
    frame: &[u8],
    max_body_bytes: usize,
) -> Result<OffloadRequest, ProtocolError> {
    decode_request_body(frame_body(frame, FrameKind::Request, max_body_bytes)?)
}

/// Decodes the body of a request frame whose header was checked with [`decode_header`]: what a
/// streaming receiver calls after reading exactly the announced number of body bytes.
pub fn decode_request_body(body: &[u8]) -> Result<OffloadRequest, ProtocolError> {
    let (len, rest) = body.split_at_checked(4).ok_or_else(|| {
        ProtocolError::new(ErrorCode::Malformed, "truncated frame: no metadata length")
    })?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > rest.len().min(MAX_METADATA_BYTES) {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            format!(
                "metadata length {len} exceeds the {} bytes available",
                rest.len().min(MAX_METADATA_BYTES)
            ),
        ));
    }
    let (metadata, payload) = rest.split_at(len);
    let metadata: RequestMetadata = decode_metadata(metadata)?;
    Ok(OffloadRequest {
        request_id: metadata.request_id,
        fingerprint: metadata.fingerprint,
        deadline_ms: metadata.deadline_ms,
        split_layer: metadata.split_layer,
        seq_len: metadata.seq_len,
        encoding: metadata.encoding,
        options: metadata.options,
        payload: payload.to_vec(),
    })
}

pub fn decode_response(frame: &[u8]) -> Result<Response, ProtocolError> {
    decode_metadata(frame_body(frame, FrameKind::Response, MAX_METADATA_BYTES)?)
}

pub fn encode_hello(hello: &Hello) -> Vec<u8> {
    let body = bincode::encode_to_vec(hello, config()).expect("a hello encodes");
    frame(FrameKind::Hello, &body)
}

/// Decodes the body of a hello frame whose header was checked with [`decode_header`].
pub fn decode_hello_body(body: &[u8]) -> Result<Hello, ProtocolError> {
    decode_metadata(body)
}

/// The largest response frame a client needs to accept.
pub const MAX_RESPONSE_FRAME: usize = HEADER_LEN + MAX_METADATA_BYTES;

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

mod payload;
pub use payload::{PayloadEncoding, decode_hidden, encode_hidden};

#[cfg(test)]
mod tests;
