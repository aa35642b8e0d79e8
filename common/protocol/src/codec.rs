//! Frames on the wire: the 11-byte header, checked against the receiver's limits before a
//! body is buffered, and every message's encoding (bincode 2 for small metadata; the
//! hidden-state payload travels raw after it).

use bincode::{Decode, Encode};

use crate::{
    ErrorCode, ErrorFrame, FrameKind, HEADER_LEN, Hello, MAGIC, OLDEST_ERROR_VERSION,
    OffloadRequest, PROTOCOL_VERSION, PayloadEncoding, ProtocolError, ReplyOptions, Response,
};

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

pub(crate) fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
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

pub(crate) fn decode_metadata<T: Decode<()>>(bytes: &[u8]) -> Result<T, ProtocolError> {
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
