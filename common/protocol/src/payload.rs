//! Hidden-state payloads: how `[seq, hidden]` f32 states travel (f32, f16, int8 with a
//! per-token scale), and the checks a receiver makes before computing on them.

use bincode::{Decode, Encode};
use half::f16;

use crate::{ErrorCode, ProtocolError};

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
