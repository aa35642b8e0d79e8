//! The edge ↔ cloud wire protocol, sans I/O: frames in, frames out, no sockets.
//!
//! One QUIC bidirectional stream carries one request frame and one response frame. A frame is
//!
//! ```text
//! magic "SPEE" | version u16 LE | kind u8 | body length u32 LE | body (bincode 2, standard config)
//! ```
//!
//! The fixed 11-byte header is checked (magic, version, kind, length against the receiver's
//! limit) before a single byte of the body is buffered. bincode only ever decodes small
//! metadata under a 64 KiB limit; the hidden-state payload is the raw remainder of the body,
//! so no length field inside a frame can make the receiver allocate more than arrived. Semantic
//! checks (fingerprint, split layer, sequence length, payload size, finite values) follow in
//! [`OffloadRequest::validate`] and each failure maps to an [`ErrorCode`] for the error frame.

use bincode::{Decode, Encode};
use half::f16;

pub const MAGIC: [u8; 4] = *b"SPEE";
pub const PROTOCOL_VERSION: u16 = 1;
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
}

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

    pub fn payload_len(self, seq_len: usize, hidden_size: usize) -> usize {
        let values = seq_len * hidden_size;
        match self {
            Self::F32 => values * 4,
            Self::F16 => values * 2,
            Self::Int8PerToken => seq_len * 4 + values,
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

/// Hidden states after layer `split_layer` of one sample, for the cloud to finish.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct OffloadRequest {
    pub request_id: u64,
    pub fingerprint: [u8; 32],
    /// The last layer run on the edge, 0 for embeddings only.
    pub split_layer: u16,
    /// Real tokens only: padding never crosses the wire.
    pub seq_len: u32,
    pub encoding: PayloadEncoding,
    pub options: ReplyOptions,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum Response {
    Answer(Answer),
    Error(ErrorFrame),
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
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn into_frame(self, request_id: u64) -> Response {
        Response::Error(ErrorFrame {
            request_id,
            code: self.code,
            message: self.message,
        })
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
    split_layer: u16,
    seq_len: u32,
    encoding: PayloadEncoding,
    options: ReplyOptions,
}

fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.push(kind as u8);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Request body: `metadata length u32 LE | metadata (bincode) | payload (raw bytes)`.
pub fn encode_request(request: &OffloadRequest) -> Vec<u8> {
    let metadata = RequestMetadata {
        request_id: request.request_id,
        fingerprint: request.fingerprint,
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

pub fn encode_response(response: &Response) -> Vec<u8> {
    let body = bincode::encode_to_vec(response, config()).expect("responses are small");
    frame(FrameKind::Response, &body)
}

/// Checks a frame header and returns the body length it announces.
pub fn decode_header(
    header: &[u8; HEADER_LEN],
    expected: FrameKind,
    max_body_bytes: usize,
) -> Result<usize, ProtocolError> {
    if header[..4] != MAGIC {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            "not a splitee frame (bad magic)",
        ));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {version}, this side speaks {PROTOCOL_VERSION}"),
        ));
    }
    if header[6] != expected as u8 {
        return Err(ProtocolError::new(
            ErrorCode::Malformed,
            format!("frame kind {} where {expected:?} was expected", header[6]),
        ));
    }
    let len = u32::from_le_bytes([header[7], header[8], header[9], header[10]]) as usize;
    if len > max_body_bytes {
        return Err(ProtocolError::new(
            ErrorCode::FrameTooLarge,
            format!("frame body of {len} bytes exceeds the limit of {max_body_bytes}"),
        ));
    }
    Ok(len)
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
    let len = decode_header(header, expected, max_body_bytes)?;
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
    let body = frame_body(frame, FrameKind::Request, max_body_bytes)?;
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

/// The largest response frame a client needs to accept.
pub const MAX_RESPONSE_FRAME: usize = HEADER_LEN + MAX_METADATA_BYTES;

impl OffloadRequest {
    /// Checks the request against the worker's model. `fingerprint` is the worker's own.
    pub fn validate(&self, fingerprint: &[u8; 32], limits: &Limits) -> Result<(), ProtocolError> {
        if &self.fingerprint != fingerprint {
            return Err(ProtocolError::new(
                ErrorCode::WrongFingerprint,
                format!(
                    "model fingerprint {} does not match the worker's {}",
                    hex(&self.fingerprint[..8]),
                    hex(&fingerprint[..8])
                ),
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
        if seq_len == 0 || seq_len > limits.max_seq_len {
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes `[seq, hidden]` f32 hidden states.
pub fn encode_hidden(values: &[f32], hidden_size: usize, encoding: PayloadEncoding) -> Vec<u8> {
    assert_eq!(values.len() % hidden_size, 0, "values must be whole tokens");
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
                .map(|token| token.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
                .collect();
            let mut out = Vec::with_capacity(encoding.payload_len(scales.len(), hidden_size));
            out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            for (token, scale) in tokens.zip(&scales) {
                let inverse = if *scale > 0.0 { 1.0 / scale } else { 0.0 };
                out.extend(
                    token
                        .iter()
                        .map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8 as u8),
                );
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
