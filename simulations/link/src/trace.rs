//! The trace vocabulary both link models read: where a link's capacity comes from
//! ([`TraceSource`], as configs name it) and the capacity itself ([`BaseTrace`]) in *trace
//! time* (ms from the moment the trace became active).
//!
//! # Base traces
//!
//! * `constant`: `rate_mbps`.
//! * `mahimahi` (`*.up` files): each line an integer millisecond timestamp at which one
//!   1500-byte packet may be delivered; a repeated stamp is several opportunities; the trace
//!   loops with a period equal to its last stamp (as `mm-link` does). A payload of `B` bytes
//!   takes `ceil(B / 1500)` opportunities, the first at or after the send time and after
//!   every opportunity already taken by earlier samples (a FIFO queue).
//! * `norway` (Riiser et al. HSDPA logs as packaged in `shared/traces/norway-3g`): lines
//!   `time_s <whitespace> Mbit/s`, times ascending from 0. The rate holds until the next
//!   line; the last line holds for the mean step; the trace loops.
//! * `fivegophers` (`car-driving-trace-*.csv`, `walking-trace.csv`): CSV with a header; the
//!   named `column` holds Mbit/s, one row per second; the trace loops. A 0 is an outage.
//!
//! Rate traces are fluid: a payload is sent as `ceil(B / 1500)` full packets
//! (`ceil(B/1500) · 12000` bits) through the time-varying rate, behind earlier payloads.
//!

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{HeaderCsv, InputError};

/// Bytes of one packet (MTU), as in Mahimahi.
pub const MTU_BYTES: u64 = 1500;
pub(crate) const MTU_BITS: f64 = (MTU_BYTES * 8) as f64;

/// Packets needed for `bytes`.
pub fn packets(bytes: u64) -> u64 {
    bytes.div_ceil(MTU_BYTES)
}

/// A base capacity trace, in trace time (ms).
#[derive(Debug, Clone, PartialEq)]
pub enum BaseTrace {
    /// Bits per millisecond.
    Constant { bits_per_ms: f64 },
    /// Mahimahi delivery opportunities (ms), sorted, looping with `period_ms`.
    Packets { stamps: Vec<u64>, period_ms: u64 },
    /// Piecewise-constant rate: segment `i` starts at `starts_ms[i]` with `bits_per_ms[i]`;
    /// `cum_bits[i]` = bits deliverable before `starts_ms[i]`; loops with `period_ms`.
    Rate {
        starts_ms: Vec<f64>,
        bits_per_ms: Vec<f64>,
        cum_bits: Vec<f64>,
        period_ms: f64,
    },
}

/// Where a link's capacity comes from, as configs name it (experiments and the link
/// emulator share this vocabulary). Relative paths are resolved by the config that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TraceSource {
    Constant { rate_mbps: f64 },
    Mahimahi { path: PathBuf },
    Norway { path: PathBuf },
    Fivegophers { path: PathBuf, column: String },
}

impl TraceSource {
    /// Reads the trace.
    pub fn load(&self) -> anyhow::Result<BaseTrace> {
        Ok(match self {
            TraceSource::Constant { rate_mbps } => {
                BaseTrace::constant(*rate_mbps).map_err(anyhow::Error::msg)?
            }
            TraceSource::Mahimahi { path } => BaseTrace::read_mahimahi(path)?,
            TraceSource::Norway { path } => BaseTrace::read_norway(path)?,
            TraceSource::Fivegophers { path, column } => BaseTrace::read_fivegophers(path, column)?,
        })
    }

    /// The trace file, for sources that have one.
    pub fn path_mut(&mut self) -> Option<&mut PathBuf> {
        match self {
            TraceSource::Constant { .. } => None,
            TraceSource::Mahimahi { path }
            | TraceSource::Norway { path }
            | TraceSource::Fivegophers { path, .. } => Some(path),
        }
    }
}

impl BaseTrace {
    pub fn constant(rate_mbps: f64) -> Result<Self, String> {
        if !(rate_mbps.is_finite() && rate_mbps > 0.0) {
            return Err(format!("rate {rate_mbps} Mbit/s must be > 0"));
        }
        Ok(BaseTrace::Constant {
            bits_per_ms: rate_mbps * 1000.0,
        })
    }

    /// Reads a Mahimahi trace.
    pub fn read_mahimahi(path: &Path) -> Result<Self, InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
        let mut stamps = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i as u64 + 1;
            let s = line.trim();
            if s.is_empty() {
                continue;
            }
            let v: u64 = s.parse().map_err(|_| {
                InputError::at(
                    path,
                    line_no,
                    format!("`{s}` is not a millisecond timestamp (non-negative integer)"),
                )
            })?;
            if let Some(&last) = stamps.last()
                && v < last
            {
                return Err(InputError::at(
                    path,
                    line_no,
                    format!("timestamp {v} is before the previous one ({last})"),
                ));
            }
            stamps.push(v);
        }
        let period_ms = *stamps
            .last()
            .ok_or_else(|| InputError::new(path, "no timestamps"))?;
        if period_ms == 0 {
            return Err(InputError::new(
                path,
                "the last timestamp must be > 0: it is the trace's period",
            ));
        }
        Ok(BaseTrace::Packets { stamps, period_ms })
    }

    /// Reads a Norway 3G trace (`time_s Mbit/s` per line).
    pub fn read_norway(path: &Path) -> Result<Self, InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
        let mut times = Vec::new();
        let mut rates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 2 {
                return Err(InputError::at(
                    path,
                    line_no,
                    format!("{} fields, expected `time_s Mbit/s`", fields.len()),
                ));
            }
            let t: f64 = fields[0].parse().map_err(|_| {
                InputError::at(path, line_no, format!("`{}` is not a time", fields[0]))
                    .in_column("1 (time_s)")
            })?;
            let r: f64 = fields[1].parse().map_err(|_| {
                InputError::at(path, line_no, format!("`{}` is not a rate", fields[1]))
                    .in_column("2 (Mbit/s)")
            })?;
            if !(t.is_finite() && t >= 0.0) || times.last().is_some_and(|&last| t * 1000.0 <= last)
            {
                return Err(
                    InputError::at(path, line_no, format!("time {t} s does not ascend"))
                        .in_column("1 (time_s)"),
                );
            }
            if !(r.is_finite() && r >= 0.0) {
                return Err(
                    InputError::at(path, line_no, format!("rate {r} is not ≥ 0"))
                        .in_column("2 (Mbit/s)"),
                );
            }
            times.push(t * 1000.0);
            rates.push(r);
        }
        if times.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        if times[0] != 0.0 {
            return Err(InputError::new(path, "the first time must be 0"));
        }
        let last_step = if times.len() > 1 {
            times[times.len() - 1] / (times.len() - 1) as f64
        } else {
            1000.0
        };
        let period = times[times.len() - 1] + last_step;
        Self::rate(times, rates, period).map_err(|m| InputError::new(path, m))
    }

    /// Reads a 5Gophers throughput CSV, one row per second, rate in `column` (Mbit/s).
    pub fn read_fivegophers(path: &Path, column: &str) -> Result<Self, InputError> {
        let mut csv = HeaderCsv::open(path)?;
        let col = csv.column(column)?;
        let mut rates = Vec::new();
        for row in csv.rows() {
            let (line, record) = row?;
            let s = record.get(col).unwrap_or("");
            let r: f64 = s.parse().map_err(|_| {
                InputError::at(path, line, format!("`{s}` is not a rate")).in_column(column)
            })?;
            if !(r.is_finite() && r >= 0.0) {
                return Err(
                    InputError::at(path, line, format!("rate {r} is not ≥ 0")).in_column(column)
                );
            }
            rates.push(r);
        }
        if rates.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        let times = (0..rates.len()).map(|i| i as f64 * 1000.0).collect();
        let period = rates.len() as f64 * 1000.0;
        Self::rate(times, rates, period).map_err(|m| InputError::new(path, m))
    }

    fn rate(starts_ms: Vec<f64>, mbps: Vec<f64>, period_ms: f64) -> Result<Self, String> {
        let bits_per_ms: Vec<f64> = mbps.iter().map(|r| r * 1000.0).collect();
        let mut cum_bits = Vec::with_capacity(starts_ms.len());
        let mut acc = 0.0;
        for i in 0..starts_ms.len() {
            cum_bits.push(acc);
            let end = starts_ms.get(i + 1).copied().unwrap_or(period_ms);
            acc += bits_per_ms[i] * (end - starts_ms[i]);
        }
        if acc <= 0.0 {
            return Err("the trace delivers nothing (every rate is 0)".into());
        }
        Ok(BaseTrace::Rate {
            starts_ms,
            bits_per_ms,
            cum_bits,
            period_ms,
        })
    }

    /// Bits the link can carry in trace time `[0, tau]`: the integral of the rate, or for
    /// Mahimahi `1500 × 8` bits per delivery opportunity at or before `tau`.
    pub fn capacity_bits(&self, tau: f64) -> f64 {
        match self {
            BaseTrace::Constant { bits_per_ms } => tau * bits_per_ms,
            BaseTrace::Packets { stamps, period_ms } => {
                let period = *period_ms as f64;
                let cycle = (tau / period).floor();
                let offset = tau - cycle * period;
                let in_cycle = stamps.partition_point(|&s| (s as f64) <= offset);
                (cycle * stamps.len() as f64 + in_cycle as f64) * MTU_BITS
            }
            BaseTrace::Rate {
                starts_ms,
                bits_per_ms,
                cum_bits,
                period_ms,
            } => {
                let cycle = (tau / period_ms).floor();
                let off = tau - cycle * period_ms;
                let s = starts_ms.partition_point(|&x| x <= off) - 1;
                let total = bits_per_loop(starts_ms, bits_per_ms, cum_bits, *period_ms);
                cycle * total + cum_bits[s] + bits_per_ms[s] * (off - starts_ms[s])
            }
        }
    }

    /// The earliest trace time by which the link can have carried `bits > 0` in total: the
    /// inverse of [`capacity_bits`](Self::capacity_bits) (for Mahimahi, the time of the
    /// `ceil(bits / 12000)`-th delivery opportunity).
    pub fn time_of_capacity(&self, bits: f64) -> f64 {
        match self {
            BaseTrace::Constant { bits_per_ms } => bits / bits_per_ms,
            BaseTrace::Packets { stamps, period_ms } => {
                let index = ((bits / MTU_BITS).ceil() as u64).max(1) - 1;
                let len = stamps.len() as u64;
                ((index / len) * period_ms + stamps[(index % len) as usize]) as f64
            }
            BaseTrace::Rate {
                starts_ms,
                bits_per_ms,
                cum_bits,
                period_ms,
            } => {
                let total = bits_per_loop(starts_ms, bits_per_ms, cum_bits, *period_ms);
                // Find the cycle, then the segment, then the offset.
                let cycle = (bits / total).floor();
                let mut rem = bits - cycle * total;
                let mut cyc = cycle;
                if rem <= 0.0 && cyc > 0.0 {
                    // Exactly at a cycle boundary: the end of the previous cycle.
                    cyc -= 1.0;
                    rem = total;
                }
                // The last segment with cum_bits[s] < rem ≤ cum_bits[s + 1]: it delivers
                // bits, so its rate is > 0 (rem > 0 because bits > 0).
                let s = cum_bits.partition_point(|&c| c < rem).saturating_sub(1);
                cyc * period_ms + starts_ms[s] + (rem - cum_bits[s]) / bits_per_ms[s]
            }
        }
    }

    /// Capacity in Mbit/s around trace time `tau` (for plots): for Mahimahi, opportunities
    /// in the surrounding second.
    pub(crate) fn rate_mbps(&self, tau: f64) -> f64 {
        match self {
            BaseTrace::Constant { bits_per_ms } => bits_per_ms / 1000.0,
            BaseTrace::Packets { stamps, period_ms } => {
                let period = *period_ms as f64;
                let count = |t: f64| -> f64 {
                    let cycle = (t / period).floor();
                    let off = t - cycle * period;
                    cycle * stamps.len() as f64
                        + stamps.partition_point(|&s| (s as f64) < off) as f64
                };
                let lo = (tau - 500.0).max(0.0);
                let n = count(lo + 1000.0) - count(lo);
                n * MTU_BITS / 1e6
            }
            BaseTrace::Rate {
                starts_ms,
                bits_per_ms,
                period_ms,
                ..
            } => {
                let off = tau - (tau / period_ms).floor() * period_ms;
                let s = starts_ms.partition_point(|&x| x <= off) - 1;
                bits_per_ms[s] / 1000.0
            }
        }
    }
}

/// Bits one loop of a per-second rate trace carries.
fn bits_per_loop(starts_ms: &[f64], bits_per_ms: &[f64], cum_bits: &[f64], period_ms: f64) -> f64 {
    let last = starts_ms.len() - 1;
    cum_bits[last] + bits_per_ms[last] * (period_ms - starts_ms[last])
}
