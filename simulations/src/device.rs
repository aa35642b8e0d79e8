//! Device profiles: how long each encoder layer takes on the edge device and in the cloud,
//! and how many bytes the hidden state of one sample weighs on the wire.
//!
//! # Edge compute time
//!
//! * `edge = "recorded"`: each sample's own `layer{j}_ms` from the matrix, times `edge_scale`
//!   (e.g. `4.0` for a device four times slower than the recording machine).
//! * `edge = "<path>.toml"`: a preset (format below). When the matrix has timings, each
//!   sample's recorded `layer{j}_ms` is rescaled so that the layer's mean over the matrix
//!   equals the preset's `layer_ms[j]` (per-sample variation, e.g. from token count, is kept).
//!   Without timings, layer `j` takes `layer_ms[j] · tokens / ref_tokens` (linear in length: a
//!   documented approximation; attention is quadratic but small at sentence lengths).
//!
//! Preset TOML:
//!
//! ```toml
//! name = "raspberry-pi-4-minilm"
//! description = "ESTIMATE, not a measurement: …"
//! layer_ms = [8.0, 8.0, 8.0, 8.0, 8.0, 8.0]   # per encoder layer, at ref_tokens tokens
//! ref_tokens = 32
//! ```
//!
//! # Cloud compute time
//!
//! Layer `j` in the cloud takes the sample's edge time of layer `j` divided by
//! `cloud_speedup`.
//!
//! # Payload
//!
//! The hidden states of the real tokens after the split layer: `tokens × hidden × b` bytes
//! with `b` = 4 (`f32`), 2 (`f16`), or `hidden × 1 + 4` per token for `int8` (one f32 scale
//! per token), plus `overhead_bytes` (framing). BERT's hidden state has the same shape after
//! every layer, so the payload does not depend on the split.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::InputError;
use crate::matrix::ConfidenceMatrix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    F32,
    F16,
    Int8,
}

impl Encoding {
    pub fn bytes_per_token(self, hidden: u64) -> u64 {
        match self {
            Encoding::F32 => 4 * hidden,
            Encoding::F16 => 2 * hidden,
            // One byte per value plus one f32 scale per token.
            Encoding::Int8 => hidden + 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePreset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub layer_ms: Vec<f64>,
    pub ref_tokens: f64,
}

impl DevicePreset {
    pub fn load(path: &Path) -> Result<Self, InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
        let preset: DevicePreset =
            toml::from_str(&text).map_err(|e| InputError::new(path, e.to_string()))?;
        if preset.layer_ms.is_empty()
            || preset
                .layer_ms
                .iter()
                .any(|m| !(m.is_finite() && *m >= 0.0))
        {
            return Err(InputError::new(
                path,
                "layer_ms must be a non-empty list of times ≥ 0",
            ));
        }
        if !(preset.ref_tokens.is_finite() && preset.ref_tokens > 0.0) {
            return Err(InputError::new(path, "ref_tokens must be > 0"));
        }
        Ok(preset)
    }
}

/// The `[device]` table of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// `"recorded"` or a preset TOML path.
    pub edge: String,
    #[serde(default = "one")]
    pub edge_scale: f64,
    pub cloud_speedup: f64,
    /// Hidden size; defaults to the matrix's `hidden` metadata.
    pub hidden: Option<u64>,
    pub encoding: Encoding,
    /// Token count for formats that do not record one.
    #[serde(default = "default_tokens")]
    pub default_tokens: u32,
    #[serde(default)]
    pub overhead_bytes: u64,
}

fn one() -> f64 {
    1.0
}

fn default_tokens() -> u32 {
    32
}

/// Per-sample times and payloads, resolved once per experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTimes {
    pub num_layers: usize,
    /// `n × L`: edge time of each layer of each sample (ms).
    pub edge_ms: Vec<f64>,
    /// `n × L`: cloud time of each layer of each sample (ms).
    pub cloud_ms: Vec<f64>,
    /// Payload bytes of each sample.
    pub bytes: Vec<u64>,
    /// Description for reports.
    pub description: String,
}

impl DeviceConfig {
    pub fn resolve(&self, matrix: &ConfidenceMatrix) -> anyhow::Result<DeviceTimes> {
        anyhow::ensure!(
            self.edge_scale.is_finite() && self.edge_scale > 0.0,
            "device.edge_scale must be > 0"
        );
        anyhow::ensure!(
            self.cloud_speedup.is_finite() && self.cloud_speedup > 0.0,
            "device.cloud_speedup must be > 0"
        );
        let l = matrix.num_layers();
        let n = matrix.len();
        let tokens = |i: usize| matrix.tokens(i).unwrap_or(self.default_tokens) as f64;
        let mut edge_ms = Vec::with_capacity(n * l);
        let description = if self.edge == "recorded" {
            anyhow::ensure!(
                matrix.has_layer_ms(),
                "device.edge = \"recorded\" needs layer{{j}}_ms columns in the matrix"
            );
            for i in 0..n {
                let row = matrix.layer_ms(i).expect("has timings");
                edge_ms.extend(row.iter().map(|m| m * self.edge_scale));
            }
            format!("recorded layer times × {}", self.edge_scale)
        } else {
            let path = PathBuf::from(&self.edge);
            let preset = DevicePreset::load(&path)?;
            anyhow::ensure!(
                preset.layer_ms.len() == l,
                "{}: {} layer times, the matrix has {l} layers",
                path.display(),
                preset.layer_ms.len()
            );
            match matrix.mean_layer_ms() {
                Some(mean) => {
                    for i in 0..n {
                        let row = matrix.layer_ms(i).expect("has timings");
                        for j in 0..l {
                            // A layer that took no time on average keeps the preset's time.
                            let v = if mean[j] > 0.0 {
                                row[j] * preset.layer_ms[j] / mean[j]
                            } else {
                                preset.layer_ms[j]
                            };
                            edge_ms.push(v * self.edge_scale);
                        }
                    }
                }
                None => {
                    for i in 0..n {
                        let f = tokens(i) / preset.ref_tokens;
                        edge_ms.extend(preset.layer_ms.iter().map(|m| m * f * self.edge_scale));
                    }
                }
            }
            format!("preset {} × {}", preset.name, self.edge_scale)
        };
        let cloud_ms = edge_ms.iter().map(|m| m / self.cloud_speedup).collect();
        let hidden = match self.hidden {
            Some(h) => h,
            None => matrix
                .metadata()
                .get("hidden")
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "device.hidden is not set and the matrix has no `hidden` metadata"
                    )
                })?,
        };
        let per_token = self.encoding.bytes_per_token(hidden);
        let bytes = (0..n)
            .map(|i| tokens(i) as u64 * per_token + self.overhead_bytes)
            .collect();
        Ok(DeviceTimes {
            num_layers: l,
            edge_ms,
            cloud_ms,
            bytes,
            description,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_bytes_follow_the_encoding() {
        assert_eq!(Encoding::F32.bytes_per_token(384), 1536);
        assert_eq!(Encoding::F16.bytes_per_token(384), 768);
        assert_eq!(Encoding::Int8.bytes_per_token(384), 388);
    }
}
