//! The simulated clocks: how long each encoder layer takes on the edge device and in the
//! cloud, and how many bytes one sample's hidden states weigh on the wire. This is the time
//! the simulation advances by; what the bandit is *charged* is the `[reward]` table's business
//! (the device clock with `edge_costs = "measured"`, a `[device]` profile with `"profile"`).
//!
//! # Edge clock (`[clock]`)
//!
//! * `edge = "none"`: every layer takes no time (abstract-cost experiments, where time is not
//!   priced; latencies then count only the network).
//! * `edge = "recorded"`: each sample's own `layer{j}_ms` from the matrix, times `edge_scale`
//!   (e.g. `4.0` for a device four times slower than the recording machine).
//! * `edge = "profile"` (the config's `[device]` table) or `edge = "<path>.toml"` (a
//!   [`DeviceProfile`] file, `configs/devices/`): when the matrix has timings, each sample's
//!   recorded `layer{j}_ms` is rescaled so that the layer's mean over the matrix equals the
//!   profile's `layer_ms[j]` (per-sample variation, e.g. from token count, is kept). Without
//!   timings, layer `j` takes `layer_ms[j] · tokens / ref_tokens` (linear in length: a
//!   documented approximation; attention is quadratic but small at sentence lengths).
//!
//! # Cloud clock
//!
//! Layer `j` in the cloud takes the sample's edge time of layer `j` divided by
//! `cloud_speedup` (1 for a worker on the recording machine itself).
//!
//! # Payload
//!
//! The hidden states of the real tokens after the split layer, in the `[cloud]` table's
//! `encoding` ([`PayloadEncoding::payload_len`], the size the agent sends), plus
//! `overhead_bytes` (framing). BERT's hidden state has the same shape after every layer, so
//! the payload does not depend on the split.

use std::path::Path;

use serde::{Deserialize, Serialize};
use splitee_bandits::DeviceProfile;
use splitee_protocol::PayloadEncoding;

use crate::matrix::ConfidenceMatrix;
use splitee_link::InputError;

/// Reads a [`DeviceProfile`] file (`configs/devices/*.toml`).
pub fn load_profile(path: &Path) -> Result<DeviceProfile, InputError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| InputError::new(path, e.to_string()))
}

/// The `[clock]` table of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// `"recorded"`, `"profile"` (the agent's `[device]` table), a profile TOML path, or
    /// `"none"` (every layer instantaneous: for abstract costs, where time is not priced).
    pub edge: String,
    #[serde(default = "one")]
    pub edge_scale: f64,
    #[serde(default = "one")]
    pub cloud_speedup: f64,
    /// Hidden size; defaults to the matrix's `hidden` metadata.
    pub hidden: Option<u64>,
    /// Token count for formats that do not record one.
    #[serde(default = "default_tokens")]
    pub default_tokens: u32,
    #[serde(default)]
    pub overhead_bytes: u64,
}

fn one() -> f64 {
    1.0
}

impl Default for ClockConfig {
    /// The matrix's recorded layer times, a cloud as fast as the recording machine.
    fn default() -> Self {
        Self {
            edge: "recorded".into(),
            edge_scale: 1.0,
            cloud_speedup: 1.0,
            hidden: None,
            default_tokens: default_tokens(),
            overhead_bytes: 0,
        }
    }
}

fn default_tokens() -> u32 {
    32
}

/// Per-sample times and payloads, resolved once per experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Clocks {
    pub num_layers: usize,
    /// `n × L`: edge time of each layer of each sample (ms).
    pub edge_ms: Vec<f64>,
    /// `n × L`: cloud time of each layer of each sample (ms).
    pub cloud_ms: Vec<f64>,
    /// Tokens of each sample.
    pub tokens: Vec<usize>,
    /// Payload bytes of each sample.
    pub bytes: Vec<u64>,
    /// Description for reports.
    pub description: String,
}

impl ClockConfig {
    /// `device` is the experiment's `[device]` profile, for `edge = "profile"`.
    pub fn resolve(
        &self,
        matrix: &ConfidenceMatrix,
        device: Option<&DeviceProfile>,
        encoding: PayloadEncoding,
    ) -> anyhow::Result<Clocks> {
        anyhow::ensure!(
            self.edge_scale.is_finite() && self.edge_scale > 0.0,
            "clock.edge_scale must be > 0"
        );
        anyhow::ensure!(
            self.cloud_speedup.is_finite() && self.cloud_speedup > 0.0,
            "clock.cloud_speedup must be > 0"
        );
        let l = matrix.num_layers();
        let n = matrix.len();
        let tokens: Vec<usize> = (0..n)
            .map(|i| matrix.tokens(i).unwrap_or(self.default_tokens) as usize)
            .collect();
        let mut edge_ms = Vec::with_capacity(n * l);
        let description = if self.edge == "none" {
            edge_ms.resize(n * l, 0.0);
            "no device clock (layers take no time)".to_owned()
        } else if self.edge == "recorded" {
            anyhow::ensure!(
                matrix.has_layer_ms(),
                "clock.edge = \"recorded\" needs layer{{j}}_ms columns in the matrix"
            );
            for i in 0..n {
                let row = matrix.layer_ms(i).expect("has timings");
                edge_ms.extend(row.iter().map(|m| m * self.edge_scale));
            }
            format!("recorded layer times × {}", self.edge_scale)
        } else {
            let (profile, source) = if self.edge == "profile" {
                let profile = device.ok_or_else(|| {
                    anyhow::anyhow!("clock.edge = \"profile\" needs a [device] table")
                })?;
                (profile.clone(), "[device]".to_owned())
            } else {
                let path = Path::new(&self.edge);
                (load_profile(path)?, path.display().to_string())
            };
            profile
                .validate(l)
                .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            match matrix.mean_layer_ms() {
                Some(mean) => {
                    for i in 0..n {
                        let row = matrix.layer_ms(i).expect("has timings");
                        for j in 0..l {
                            // A layer that took no time on average keeps the profile's time.
                            let v = if mean[j] > 0.0 {
                                row[j] * profile.layer_ms[j] / mean[j]
                            } else {
                                profile.layer_ms[j]
                            };
                            edge_ms.push(v * self.edge_scale);
                        }
                    }
                }
                None => {
                    for &t in &tokens {
                        let f = t as f64 / profile.ref_tokens;
                        edge_ms.extend(profile.layer_ms.iter().map(|m| m * f * self.edge_scale));
                    }
                }
            }
            let name = if profile.name.is_empty() {
                source
            } else {
                profile.name.clone()
            };
            format!("profile {name} × {}", self.edge_scale)
        };
        let cloud_ms = edge_ms.iter().map(|m| m / self.cloud_speedup).collect();
        let hidden = match self.hidden {
            Some(h) => h,
            // Without a clock, payload sizes only feed the network's latency; unknown: 0.
            None if self.edge == "none" => matrix
                .metadata()
                .get("hidden")
                .and_then(|h| h.parse().ok())
                .unwrap_or(0),
            None => matrix
                .metadata()
                .get("hidden")
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "clock.hidden is not set and the matrix has no `hidden` metadata"
                    )
                })?,
        };
        let bytes = tokens
            .iter()
            .map(|&t| encoding.payload_len(t, hidden as usize) as u64 + self.overhead_bytes)
            .collect();
        Ok(Clocks {
            num_layers: l,
            edge_ms,
            cloud_ms,
            tokens,
            bytes,
            description,
        })
    }
}
