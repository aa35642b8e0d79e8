//! The simulator's fluid uplink, in simulated time (milliseconds, `f64`).
//!
//! A [`Link`] is a base trace in *trace time* `τ`, a piecewise-constant capacity factor
//! `f(t) ≥ 0` over wall time `t` (step changes and a Gilbert–Elliott process, multiplied),
//! with `τ(t) = ∫₀ᵗ f`, and a round-trip-time model. A factor of 0.5 halves the link's
//! capacity for that stretch; 0 is an outage (nothing is delivered until it ends).
//!
//! The base traces are `trace.rs`'s ([`BaseTrace`]).
//!
//! # Round-trip time
//!
//! `constant` (`ms`), or `fivegophers` samples (`rtt.csv`: `rtt_ms,carrier,server_location`,
//! optionally filtered by `carrier` and `server`), drawn independently for each sample. An
//! offloaded sample's answer arrives `RTT` after its last byte left (propagation both ways;
//! the answer itself is small), plus the cloud's compute time.
//!
//! # Gilbert–Elliott
//!
//! A two-state (good/bad) continuous-time Markov chain with exponential sojourns of mean
//! `mean_good_s` and `mean_bad_s`, starting good. In each state a fraction `loss_good` /
//! `loss_bad` of packets is lost and retransmitted, which this fluid model counts as a
//! capacity factor `1 − loss` (so `loss_bad = 1` is an outage). The chain is drawn from the
//! run's seed up to a horizon; after it the link stays good.

use std::path::Path;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::trace::{BaseTrace, MTU_BITS, packets};
use crate::{HeaderCsv, InputError};

impl BaseTrace {
    /// Sends `n ≥ 1` packets that are ready at trace time `begin`, behind the queue state
    /// `queue`; returns the trace time at which the last one is delivered and updates `queue`.
    fn deliver(&self, begin: f64, n: u64, queue: &mut LinkQueue) -> f64 {
        match self {
            BaseTrace::Constant { bits_per_ms } => {
                let start = begin.max(queue.free_tau);
                let end = start + n as f64 * MTU_BITS / bits_per_ms;
                queue.free_tau = end;
                end
            }
            BaseTrace::Packets { stamps, period_ms } => {
                let len = stamps.len() as u64;
                let period = *period_ms as f64;
                let cycle = (begin / period).floor();
                let offset = begin - cycle * period;
                let i = stamps.partition_point(|&s| (s as f64) < offset) as u64;
                let first = (cycle as u64 * len + i).max(queue.next_opportunity);
                let last = first + n - 1;
                queue.next_opportunity = last + 1;
                let end = (last / len) as f64 * period + stamps[(last % len) as usize] as f64;
                queue.free_tau = end;
                end
            }
            BaseTrace::Rate { .. } => {
                let start = begin.max(queue.free_tau);
                let target = self.capacity_bits(start) + n as f64 * MTU_BITS;
                let end = self.time_of_capacity(target).max(start);
                queue.free_tau = end;
                end
            }
        }
    }
}

/// FIFO state of the uplink: where the previous payload ended, in trace time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkQueue {
    free_tau: f64,
    /// Mahimahi: the first unused delivery opportunity (global, loop-unrolled index).
    next_opportunity: u64,
}

/// One step of the capacity factor at wall time `at_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepChange {
    pub at_s: f64,
    pub factor: f64,
}

/// Good and bad spells of the uplink's capacity: a Gilbert–Elliott chain in continuous time
/// (see "Gilbert–Elliott" above), which the fluid model counts as a capacity factor. The
/// emulator's per-datagram counterpart, which drops datagrams, is [`crate::BurstLoss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySpells {
    pub mean_good_s: f64,
    pub mean_bad_s: f64,
    #[serde(default)]
    pub loss_good: f64,
    #[serde(default = "one")]
    pub loss_bad: f64,
}

fn one() -> f64 {
    1.0
}

impl CapacitySpells {
    fn check(&self) -> Result<(), String> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(pos(self.mean_good_s) && pos(self.mean_bad_s)) {
            return Err("Gilbert–Elliott mean sojourns must be > 0".into());
        }
        if !(unit(self.loss_good) && unit(self.loss_bad)) || self.loss_good >= 1.0 {
            return Err("Gilbert–Elliott losses must be in [0, 1], loss_good < 1".into());
        }
        Ok(())
    }
}

/// Piecewise-constant capacity factor over wall time and its integral.
#[derive(Debug, Clone, PartialEq)]
struct Warp {
    starts: Vec<f64>,
    factors: Vec<f64>,
    tau_at: Vec<f64>,
}

impl Warp {
    fn new(breaks: Vec<(f64, f64)>) -> Self {
        let mut starts = Vec::with_capacity(breaks.len());
        let mut factors = Vec::with_capacity(breaks.len());
        let mut tau_at = Vec::with_capacity(breaks.len());
        let mut tau = 0.0;
        for (i, &(s, f)) in breaks.iter().enumerate() {
            if i > 0 {
                tau += factors[i - 1] * (s - starts[i - 1]);
            }
            starts.push(s);
            factors.push(f);
            tau_at.push(tau);
        }
        Warp {
            starts,
            factors,
            tau_at,
        }
    }

    fn segment(&self, t: f64) -> usize {
        self.starts.partition_point(|&s| s <= t).saturating_sub(1)
    }

    fn factor(&self, t: f64) -> f64 {
        self.factors[self.segment(t)]
    }

    fn tau(&self, t: f64) -> f64 {
        let i = self.segment(t);
        self.tau_at[i] + self.factors[i] * (t - self.starts[i])
    }

    /// Smallest wall time `t` with `τ(t) ≥ tau`. The last factor is > 0, so it exists.
    fn wall(&self, tau: f64) -> f64 {
        let j = self.tau_at.partition_point(|&x| x < tau);
        if j == 0 {
            return 0.0;
        }
        let i = j - 1;
        // Segment i has tau_at[i] < tau ≤ tau_at[i + 1] (or is last), so its factor is > 0.
        self.starts[i] + (tau - self.tau_at[i]) / self.factors[i]
    }
}

/// Round-trip time model.
#[derive(Debug, Clone, PartialEq)]
pub enum Rtt {
    Constant(f64),
    Samples(Vec<f64>),
}

impl Rtt {
    /// Reads `rtt.csv` of 5Gophers, keeping rows of `carrier`/`server` when given
    /// (case-insensitive).
    pub fn read_fivegophers(
        path: &Path,
        carrier: Option<&str>,
        server: Option<&str>,
    ) -> Result<Self, InputError> {
        let mut csv = HeaderCsv::open(path)?;
        let (c_rtt, c_carrier, c_server) = (
            csv.column("rtt_ms")?,
            csv.column("carrier")?,
            csv.column("server_location")?,
        );
        let mut samples = Vec::new();
        for row in csv.rows() {
            let (line, record) = row?;
            let keep = |col: usize, want: Option<&str>| {
                want.is_none_or(|w| record.get(col).is_some_and(|v| v.eq_ignore_ascii_case(w)))
            };
            if !(keep(c_carrier, carrier) && keep(c_server, server)) {
                continue;
            }
            let s = record.get(c_rtt).unwrap_or("");
            let v: f64 = s.parse().map_err(|_| {
                InputError::at(path, line, format!("`{s}` is not a time")).in_column("rtt_ms")
            })?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(InputError::at(path, line, format!("RTT {v} ms is not ≥ 0"))
                    .in_column("rtt_ms"));
            }
            samples.push(v);
        }
        if samples.is_empty() {
            return Err(InputError::new(
                path,
                format!("no RTT samples for carrier {carrier:?}, server {server:?}"),
            ));
        }
        Ok(Rtt::Samples(samples))
    }

    pub fn sample<R: Rng>(&self, rng: &mut R) -> f64 {
        match self {
            Rtt::Constant(ms) => *ms,
            Rtt::Samples(s) => s[rng.random_range(0..s.len())],
        }
    }

    pub fn mean(&self) -> f64 {
        match self {
            Rtt::Constant(ms) => *ms,
            Rtt::Samples(s) => s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// An uplink as one run sees it: base trace, capacity factor (steps × Gilbert–Elliott drawn
/// for this run), RTT model.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    base: Arc<BaseTrace>,
    warp: Option<Warp>,
    rtt: Arc<Rtt>,
}

impl Link {
    /// `horizon_ms` bounds the Gilbert–Elliott draw; `rng` draws it.
    pub fn new<R: Rng>(
        base: Arc<BaseTrace>,
        rtt: Arc<Rtt>,
        steps: &[StepChange],
        loss: Option<&CapacitySpells>,
        horizon_ms: f64,
        rng: &mut R,
    ) -> Result<Self, String> {
        let mut step_breaks: Vec<(f64, f64)> = vec![(0.0, 1.0)];
        for s in steps {
            if !(s.at_s.is_finite() && s.at_s >= 0.0 && s.factor.is_finite() && s.factor >= 0.0) {
                return Err(format!("step {s:?}: at_s and factor must be ≥ 0"));
            }
            let t = s.at_s * 1000.0;
            if step_breaks.last().is_some_and(|&(last, _)| t < last) {
                return Err("steps must be in ascending at_s".into());
            }
            if t == 0.0 {
                step_breaks[0].1 = s.factor;
            } else {
                step_breaks.push((t, s.factor));
            }
        }
        if step_breaks.last().expect("non-empty").1 <= 0.0 {
            return Err("the last step's factor must be > 0 (a link that never recovers)".into());
        }
        let mut ge_breaks: Vec<(f64, f64)> = vec![(0.0, 1.0)];
        if let Some(ge) = loss {
            ge.check()?;
            let mut t = 0.0;
            let mut good = true;
            while t < horizon_ms {
                let mean = if good { ge.mean_good_s } else { ge.mean_bad_s } * 1000.0;
                let u: f64 = rng.random();
                t += -mean * (1.0 - u).ln();
                good = !good;
                let loss = if good { ge.loss_good } else { ge.loss_bad };
                ge_breaks.push((t, 1.0 - loss));
            }
            if !good {
                ge_breaks.push((t + ge.mean_bad_s * 1000.0, 1.0 - ge.loss_good));
            }
            ge_breaks[0].1 = 1.0 - ge.loss_good;
        }
        let warp = if step_breaks.len() == 1 && ge_breaks.len() == 1 {
            let f = step_breaks[0].1 * ge_breaks[0].1;
            (f != 1.0).then(|| Warp::new(vec![(0.0, f)]))
        } else {
            let mut times: Vec<f64> = step_breaks
                .iter()
                .chain(&ge_breaks)
                .map(|&(t, _)| t)
                .collect();
            times.sort_by(f64::total_cmp);
            times.dedup();
            let at = |b: &[(f64, f64)], t: f64| b[b.partition_point(|&(s, _)| s <= t) - 1].1;
            Some(Warp::new(
                times
                    .into_iter()
                    .map(|t| (t, at(&step_breaks, t) * at(&ge_breaks, t)))
                    .collect(),
            ))
        };
        Ok(Link { base, warp, rtt })
    }

    /// A link with no steps or losses.
    pub fn plain(base: Arc<BaseTrace>, rtt: Arc<Rtt>) -> Self {
        Link {
            base,
            warp: None,
            rtt,
        }
    }

    /// Sends `bytes` handed to the link at wall time `send_ms`, behind `queue`; returns the
    /// wall time at which the last byte is delivered. Pure given `queue`: the simulator
    /// copies the queue to price arms it did not play.
    pub fn transmit(&self, send_ms: f64, bytes: u64, queue: &mut LinkQueue) -> f64 {
        let n = packets(bytes).max(1);
        match &self.warp {
            None => self.base.deliver(send_ms, n, queue),
            Some(w) => {
                let end_tau = self.base.deliver(w.tau(send_ms), n, queue);
                w.wall(end_tau).max(send_ms)
            }
        }
    }

    /// Capacity at wall time `t_ms`, Mbit/s (for plots and series).
    pub fn rate_mbps(&self, t_ms: f64) -> f64 {
        match &self.warp {
            None => self.base.rate_mbps(t_ms),
            Some(w) => self.base.rate_mbps(w.tau(t_ms)) * w.factor(t_ms),
        }
    }

    pub fn rtt(&self) -> &Rtt {
        &self.rtt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn constant_link_queues_fifo() {
        // 12 Mbit/s = one packet per ms.
        let link = Link::plain(
            Arc::new(BaseTrace::constant(12.0).unwrap()),
            Arc::new(Rtt::Constant(0.0)),
        );
        let mut q = LinkQueue::default();
        assert_eq!(link.transmit(10.0, 3000, &mut q), 12.0);
        // Sent at 11 but the link is busy until 12.
        assert_eq!(link.transmit(11.0, 1, &mut q), 13.0);
        assert_eq!(link.transmit(100.0, 1501, &mut q), 102.0);
    }

    #[test]
    fn warp_steps_and_outages() {
        let base = Arc::new(BaseTrace::constant(12.0).unwrap());
        let rtt = Arc::new(Rtt::Constant(0.0));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let steps = [
            StepChange {
                at_s: 1.0,
                factor: 0.0,
            },
            StepChange {
                at_s: 2.0,
                factor: 0.5,
            },
        ];
        let link = Link::new(base, rtt, &steps, None, 0.0, &mut rng).unwrap();
        let mut q = LinkQueue::default();
        // 10 packets from 995 ms: 5 before the outage, the rest after it at half rate.
        assert_eq!(link.transmit(995.0, 15_000, &mut q), 2010.0);
        assert_eq!(link.rate_mbps(1500.0), 0.0);
        assert_eq!(link.rate_mbps(2500.0), 6.0);
    }
}
