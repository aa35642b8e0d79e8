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
use half::f16;

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

/// How hidden states are laid out in [`OffloadRequest::payload`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadEncoding {
    /// `seq × hidden` little-endian f32.
    F32,
    /// `seq × hidden` little-endian IEEE half floats.
    F16,
    /// `seq` little-endian f32 scales, then `seq × hidden` i8; value = i8 × scale of its token.
    /// Per-token scales because activation magnitudes vary a lot between tokens.
    Int8PerToken,
}

impl PayloadEncoding {
    pub const ALL: [PayloadEncoding; 3] = [Self::F32, Self::F16, Self::Int8PerToken];

    /// Payload bytes for `seq_len` tokens. Saturates instead of overflowing: the arguments
    /// may come off the wire, and a saturated length simply never matches a real payload.
    pub fn payload_len(self, seq_len: usize, hidden_size: usize) -> usize {
        let values = seq_len.saturating_mul(hidden_size);
        match self {
            Self::F32 => values.saturating_mul(4),
            Self::F16 => values.saturating_mul(2),
            Self::Int8PerToken => seq_len.saturating_mul(4).saturating_add(values),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8PerToken => "int8",
        }
    }
}

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
/// cargo-fuzz target (`common/fuzz`) and the stable million-input test below: any panic (or an
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

/// Encodes `[seq, hidden]` f32 hidden states.
///
/// Non-finite values are carried, never hidden: f32 and f16 keep them (f16 also turns values
/// beyond ±65504 into infinities), and int8 gives the token a NaN scale, so the receiver's
/// [`decode_hidden`] rejects the payload with [`ErrorCode::NonFinite`] instead of computing
/// on silently zeroed states.
///
/// # Panics
///
/// When `hidden_size` is 0 or `values` is not a whole number of tokens: both are caller bugs.
pub fn encode_hidden(values: &[f32], hidden_size: usize, encoding: PayloadEncoding) -> Vec<u8> {
    assert!(
        hidden_size > 0 && values.len().is_multiple_of(hidden_size),
        "values must be whole tokens of a non-zero hidden size"
    );
    match encoding {
        PayloadEncoding::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        PayloadEncoding::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        PayloadEncoding::Int8PerToken => {
            let tokens = values.chunks_exact(hidden_size);
            let scales: Vec<f32> = tokens
                .clone()
                .map(|token| {
                    // `f32::max` ignores NaN, so a NaN would otherwise quantise to 0 unseen.
                    if token.iter().any(|v| !v.is_finite()) {
                        f32::NAN
                    } else {
                        token.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0
                    }
                })
                .collect();
            let mut out = Vec::with_capacity(encoding.payload_len(scales.len(), hidden_size));
            out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            for (token, scale) in tokens.zip(&scales) {
                // Division rather than multiplication by `1 / scale`: for a subnormal scale
                // the reciprocal overflows to infinity and would saturate every value.
                out.extend(token.iter().map(|v| {
                    if *scale > 0.0 {
                        (v / scale).round().clamp(-127.0, 127.0) as i8 as u8
                    } else {
                        0
                    }
                }));
            }
            out
        }
    }
}

/// Decodes a payload back to f32, rejecting NaN and infinities.
pub fn decode_hidden(
    payload: &[u8],
    encoding: PayloadEncoding,
    seq_len: usize,
    hidden_size: usize,
) -> Result<Vec<f32>, ProtocolError> {
    if hidden_size == 0 {
        return Err(ProtocolError::new(
            ErrorCode::WrongShape,
            "hidden size 0 cannot hold hidden states",
        ));
    }
    let expected = encoding.payload_len(seq_len, hidden_size);
    if payload.len() != expected {
        return Err(ProtocolError::new(
            ErrorCode::WrongShape,
            format!("payload of {} bytes, expected {expected}", payload.len()),
        ));
    }
    let values: Vec<f32> = match encoding {
        PayloadEncoding::F32 => payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        PayloadEncoding::F16 => payload
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        PayloadEncoding::Int8PerToken => {
            let (scales, quantised) = payload.split_at(seq_len * 4);
            let scales: Vec<f32> = scales
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(bad) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
                return Err(ProtocolError::new(
                    ErrorCode::NonFinite,
                    format!(
                        "int8 scale of token {bad} is {} (must be finite and ≥ 0)",
                        scales[bad]
                    ),
                ));
            }
            quantised
                .chunks_exact(hidden_size)
                .zip(&scales)
                .flat_map(|(token, scale)| token.iter().map(move |q| f32::from(*q as i8) * scale))
                .collect()
        }
    };
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(ProtocolError::new(
            ErrorCode::NonFinite,
            format!(
                "hidden state of token {} dimension {} is {}",
                bad / hidden_size,
                bad % hidden_size,
                values[bad]
            ),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
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
        let error =
            (any::<u64>(), 0usize..12, ".{0,40}").prop_map(|(request_id, code, message)| {
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
}
