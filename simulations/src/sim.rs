//! The simulator core: one policy, one link, one seed, `samples` rounds of simulated time.
//!
//! Pure and deterministic: no clock is read, no file is touched; the same [`RunSpec`] gives
//! the same [`RunResult`] bit for bit. Each round does what the edge agent does, through the
//! same `splitee_bandits` calls:
//!
//! 1. The next sample arrives (fixed or Poisson inter-arrival times); samples are drawn
//!    from the matrix in a random order, reshuffled after every pass.
//! 2. [`Controller::select`] picks an arm; the device runs layers through a
//!    [`SampleDecision`](splitee_bandits::SampleDecision), feeding it the recorded exit
//!    confidences, until it exits or offloads.
//! 3. Time: the device is one FIFO server (a sample waits for the previous one), taking the
//!    sample's per-layer edge times; an offloaded payload queues on the uplink
//!    ([`Link::transmit`]); the answer arrives one RTT after the last byte, plus the cloud's
//!    compute time for the remaining layers. Latency = answer time − arrival time.
//! 4. The [`Observation`] holds only what the device saw (confidences up to where it stopped,
//!    `C_L` only when offloaded or computed on the device, measured costs), and
//!    [`Controller::learn`] turns it into the reward and the update.
//!
//! Measured costs (`costs = "measured"`): `cost_edge(i)` = the sample's cumulative edge
//! compute time of layers `1..=i` (ms, without queueing), `cost_offload` = the network time
//! of this payload (queueing + transmission + RTT, ms). Cloud compute time counts in latency
//! but is not priced, as in SplitEE (and it keeps `cost_offload` independent of the split,
//! which the bandits crate assumes for side information).
//!
//! Regret needs every arm's reward on every sample. The simulator computes it with full
//! information (all recorded confidences, `C_L`), in the state the link and device are in
//! for this sample (a one-step counterfactual: the link queue is copied, not disturbed).
//! The pseudo-regret curve is `R(t) = Σ_{τ ≤ t} (μ* − μ_{a_τ})`, `μ_k` = mean of arm `k`'s
//! rewards over the run, `μ*` = the best (the best fixed arm in hindsight).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use splitee_bandits::{Controller, Decision, EdgeCost, Observation, SampleDecision, Step, decide};

use crate::device::DeviceTimes;
use crate::matrix::ConfidenceMatrix;
use crate::network::{Link, LinkQueue};

const UNKNOWN: u32 = u32::MAX;

/// Matrix and device times laid out per layer for the inner loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    num_layers: usize,
    n: usize,
    /// `n × L`: `C_j` at exit layers, NaN elsewhere.
    conf: Vec<f64>,
    /// `n × L`: prediction at exit layers, [`UNKNOWN`] elsewhere.
    pred: Vec<u32>,
    labels: Vec<u32>,
    /// `n × (L + 1)`: edge time of layers `1..=j` at index `j`.
    edge_cum: Vec<f64>,
    /// `n × (L + 1)`: cloud time of layers `s + 1..=L` at index `s`.
    cloud_suffix: Vec<f64>,
    bytes: Vec<u64>,
    has_confidences: bool,
}

impl Workload {
    pub fn new(matrix: &ConfidenceMatrix, device: &DeviceTimes) -> anyhow::Result<Self> {
        let l = matrix.num_layers();
        let n = matrix.len();
        anyhow::ensure!(n > 0, "the matrix has no samples");
        anyhow::ensure!(
            device.num_layers == l,
            "device and matrix layer counts differ"
        );
        let mut conf = vec![f64::NAN; n * l];
        let mut pred = vec![UNKNOWN; n * l];
        for i in 0..n {
            for (e, &layer) in matrix.exit_layers().iter().enumerate() {
                conf[i * l + layer - 1] = matrix.confidences(i)[e];
                pred[i * l + layer - 1] = matrix.predictions(i)[e];
            }
        }
        let mut edge_cum = Vec::with_capacity(n * (l + 1));
        let mut cloud_suffix = vec![0.0; n * (l + 1)];
        for i in 0..n {
            let mut acc = 0.0;
            edge_cum.push(0.0);
            for j in 0..l {
                acc += device.edge_ms[i * l + j];
                edge_cum.push(acc);
            }
            let row = &mut cloud_suffix[i * (l + 1)..(i + 1) * (l + 1)];
            for s in (0..l).rev() {
                row[s] = row[s + 1] + device.cloud_ms[i * l + s];
            }
        }
        Ok(Workload {
            num_layers: l,
            n,
            conf,
            pred,
            labels: (0..n).map(|i| matrix.label(i).unwrap_or(UNKNOWN)).collect(),
            edge_cum,
            cloud_suffix,
            bytes: device.bytes.clone(),
            has_confidences: matrix.has_confidences(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn has_confidences(&self) -> bool {
        self.has_confidences
    }

    /// Mean payload bytes.
    pub fn mean_bytes(&self) -> f64 {
        self.bytes.iter().sum::<u64>() as f64 / self.n as f64
    }

    /// Mean edge time of the whole model on the device (ms).
    pub fn mean_full_edge_ms(&self) -> f64 {
        let l = self.num_layers;
        (0..self.n)
            .map(|i| self.edge_cum[i * (l + 1) + l])
            .sum::<f64>()
            / self.n as f64
    }
}

/// How samples arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrivals {
    Fixed { interval_ms: f64 },
    Poisson { rate_per_s: f64 },
}

impl Arrivals {
    pub fn check(&self) -> Result<(), String> {
        let ok = match *self {
            Arrivals::Fixed { interval_ms } => interval_ms.is_finite() && interval_ms >= 0.0,
            Arrivals::Poisson { rate_per_s } => rate_per_s.is_finite() && rate_per_s > 0.0,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("arrivals {self:?}: interval ≥ 0 / rate > 0"))
        }
    }

    pub fn mean_gap_ms(&self) -> f64 {
        match *self {
            Arrivals::Fixed { interval_ms } => interval_ms,
            Arrivals::Poisson { rate_per_s } => 1000.0 / rate_per_s,
        }
    }

    fn gap<R: Rng>(&self, rng: &mut R) -> f64 {
        match *self {
            Arrivals::Fixed { interval_ms } => interval_ms,
            Arrivals::Poisson { rate_per_s } => {
                let u: f64 = rng.random();
                -(1000.0 / rate_per_s) * (1.0 - u).ln()
            }
        }
    }
}

/// Everything one run needs.
pub struct RunSpec<'a> {
    pub workload: &'a Workload,
    /// A fresh controller (arm space, rule, reward, policy).
    pub controller: Controller,
    pub link: &'a Link,
    pub arrivals: Arrivals,
    pub samples: usize,
    /// Seeds sample order, arrivals and RTT draws. Runs of different policies with the same
    /// seed see the same samples at the same times (common random numbers).
    pub seed: u64,
    /// Whether the device evaluates every exit head up to where it stops (true), or only the
    /// heads the rule tests. Side information (SplitEE-S) needs the former.
    pub evaluate_all_heads: bool,
    /// Keep every arm's reward on every sample (`samples × arms` f32) for windowed analyses.
    pub keep_arm_rewards: bool,
    /// Record a [`SeriesPoint`] every this many samples (0: none).
    pub series_every: usize,
}

/// One row of the time series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeriesPoint {
    pub t: usize,
    pub time_s: f64,
    pub arm: usize,
    pub split: usize,
    pub threshold: f64,
    pub reward: f64,
    pub offloaded: bool,
    pub latency_ms: f64,
    pub link_mbps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub num_arms: usize,
    /// Played arm per sample.
    pub arms: Vec<u16>,
    /// Arrival time per sample (ms).
    pub arrivals_ms: Vec<f64>,
    pub latencies_ms: Vec<f32>,
    /// `Σ_t r_t(k)` with full information, per arm.
    pub arm_reward_sums: Vec<f64>,
    /// `samples × arms`, when kept.
    pub arm_rewards: Vec<f32>,
    pub reward_sum: f64,
    pub correct: u64,
    pub labelled: u64,
    pub offloaded: u64,
    /// Σ cost (reward units before λ: layers + o, or ms).
    pub cost_sum: f64,
    pub bytes_sent: u64,
    pub series: Vec<SeriesPoint>,
}

impl RunResult {
    pub fn samples(&self) -> usize {
        self.arms.len()
    }

    pub fn accuracy(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }

    pub fn offload_rate(&self) -> f64 {
        self.offloaded as f64 / self.samples() as f64
    }

    pub fn mean_latency_ms(&self) -> f64 {
        self.latencies_ms.iter().map(|&l| l as f64).sum::<f64>() / self.samples() as f64
    }

    /// Nearest-rank percentile, `p` in (0, 100].
    pub fn latency_percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f32::total_cmp);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1] as f64
    }

    /// Arm means over the run (full information).
    pub fn arm_means(&self) -> Vec<f64> {
        let n = self.samples() as f64;
        self.arm_reward_sums.iter().map(|s| s / n).collect()
    }

    /// The best fixed arm in hindsight and its mean reward.
    pub fn best_arm(&self) -> (usize, f64) {
        let means = self.arm_means();
        let mut best = 0;
        for (k, &m) in means.iter().enumerate() {
            if m > means[best] {
                best = k;
            }
        }
        (best, means[best])
    }

    /// `R(t)` for `t = 1..=samples` (see the module docs).
    pub fn pseudo_regret_curve(&self) -> Vec<f64> {
        let means = self.arm_means();
        let (_, best) = self.best_arm();
        let mut acc = 0.0;
        self.arms
            .iter()
            .map(|&a| {
                acc += best - means[a as usize];
                acc
            })
            .collect()
    }

    /// `max_k Σ_t r_t(k) − Σ_t r_t(a_t)`.
    pub fn realized_regret(&self) -> f64 {
        let best = self
            .arm_reward_sums
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        best - self.reward_sum
    }
}

/// Derives independent stream seeds from one run seed (SplitMix64 finaliser).
pub fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs one simulation.
pub fn run(spec: RunSpec<'_>) -> anyhow::Result<RunResult> {
    let RunSpec {
        workload: w,
        mut controller,
        link,
        arrivals,
        samples,
        seed,
        evaluate_all_heads,
        keep_arm_rewards,
        series_every,
    } = spec;
    arrivals.check().map_err(anyhow::Error::msg)?;
    let l = w.num_layers;
    anyhow::ensure!(
        controller.space().num_layers() == l,
        "the arm space has {} layers, the matrix {l}",
        controller.space().num_layers()
    );
    let rule = controller.rule();
    if !w.has_confidences {
        // Without confidences only a rule whose outcome cannot depend on them is simulable.
        anyhow::ensure!(
            rule.check == splitee_bandits::ExitCheck::SplitOnly
                && rule.fallback == splitee_bandits::Fallback::ExitAtSplit,
            "this matrix has predictions but no confidences: only check = \"split-only\" with \
             fallback = \"exit-at-split\" can be simulated"
        );
    }
    let model = controller.reward_model().clone();
    let measured = matches!(model.cost.edge, EdgeCost::Measured);
    let arms: Vec<_> = controller.space().arms().to_vec();
    let k = arms.len();
    anyhow::ensure!(k <= u16::MAX as usize, "too many arms");

    let mut order_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 1));
    let mut arrival_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 2));
    let mut rtt_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 3));
    let mut order: Vec<u32> = (0..w.n as u32).collect();
    let mut pos = w.n;

    let mut result = RunResult {
        num_arms: k,
        arms: Vec::with_capacity(samples),
        arrivals_ms: Vec::with_capacity(samples),
        latencies_ms: Vec::with_capacity(samples),
        arm_reward_sums: vec![0.0; k],
        arm_rewards: Vec::with_capacity(if keep_arm_rewards { samples * k } else { 0 }),
        reward_sum: 0.0,
        correct: 0,
        labelled: 0,
        offloaded: 0,
        cost_sum: 0.0,
        bytes_sent: 0,
        series: Vec::new(),
    };
    let mut obs_conf = vec![f64::NAN; l];
    let (mut memo, mut memo_known) = if measured {
        (Vec::new(), Vec::new())
    } else {
        (vec![0.0f64; w.n * k], vec![false; w.n])
    };
    let mut now = 0.0f64;
    let mut edge_free = 0.0f64;
    let mut queue = LinkQueue::default();

    for t in 0..samples {
        if pos == w.n {
            order.shuffle(&mut order_rng);
            pos = 0;
        }
        let i = order[pos] as usize;
        pos += 1;
        if t > 0 {
            now += arrivals.gap(&mut arrival_rng);
        }
        // Drawn for every sample, offloaded or not, so that all policies see the same RTTs.
        let rtt = link.rtt().sample(&mut rtt_rng);
        let conf = &w.conf[i * l..(i + 1) * l];
        let pred = &w.pred[i * l..(i + 1) * l];
        let edge_cum = &w.edge_cum[i * (l + 1)..(i + 1) * (l + 1)];
        let cloud_suffix = &w.cloud_suffix[i * (l + 1)..(i + 1) * (l + 1)];
        let bytes = w.bytes[i];

        let (played, arm) = controller.select();
        let decision = if w.has_confidences {
            let mut state = controller.start_sample(arm);
            run_device(&mut state, conf, &mut obs_conf, evaluate_all_heads)?
        } else {
            Decision::Exit { layer: arm.split }
        };
        let start = now.max(edge_free);
        let queue_before = queue;
        let (stop, done, network_ms) = match decision {
            Decision::Exit { layer } => (layer, start + edge_cum[layer], None),
            Decision::Offload { after } => {
                let sent = start + edge_cum[after];
                let delivered = link.transmit(sent, bytes, &mut queue);
                let net = delivered + rtt - sent;
                (after, sent + net + cloud_suffix[after], Some(net))
            }
        };
        edge_free = start + edge_cum[stop];

        let seen = &obs_conf[..stop];
        let mut obs = match decision {
            Decision::Exit { layer } => Observation::exited(seen, layer),
            Decision::Offload { after } => Observation::offloaded(seen, after, conf[l - 1]),
        }
        .with_predictions(&pred[..stop]);
        if measured {
            obs = obs.with_edge_costs(&edge_cum[1..=stop]);
            if let Some(net) = network_ms {
                obs = obs.with_offload_cost(net);
            }
        }
        let reward = controller.learn(played, &obs)?;
        result.reward_sum += reward;
        let mut cost = model.cost.edge_cost(stop, &obs)?;
        if network_ms.is_some() {
            cost += model.cost.offload_cost(&obs)?;
            result.offloaded += 1;
            result.bytes_sent += bytes;
        }
        result.cost_sum += cost;
        let label = w.labels[i];
        if label != UNKNOWN {
            result.labelled += 1;
            let answer = match decision {
                Decision::Exit { layer } => pred[layer - 1],
                Decision::Offload { .. } => pred[l - 1],
            };
            result.correct += u64::from(answer == label);
        }

        // Every arm's reward on this sample, with full information. Without measured costs
        // they depend on the sample only: computed on its first draw and memoised.
        let full = Observation::exited(conf, l)
            .with_predictions(pred)
            .with_edge_costs(if measured { &edge_cum[1..] } else { &[] });
        if !measured && memo_known[i] {
            let row = &memo[i * k..(i + 1) * k];
            for (sum, &r) in result.arm_reward_sums.iter_mut().zip(row) {
                *sum += r;
            }
            if keep_arm_rewards {
                result.arm_rewards.extend(row.iter().map(|&r| r as f32));
            }
        } else {
            for (a, &other) in arms.iter().enumerate() {
                let d = if w.has_confidences {
                    decide(other, rule, l, conf).ok_or_else(|| {
                        anyhow::anyhow!("arm {other:?} needs a confidence the matrix does not have")
                    })?
                } else {
                    Decision::Exit { layer: other.split }
                };
                let r = match d {
                    Decision::Offload { after } if measured => {
                        let sent = start + edge_cum[after];
                        let mut q = queue_before;
                        let net = link.transmit(sent, bytes, &mut q) + rtt - sent;
                        model.decision_reward(d, l, &full.with_offload_cost(net))?
                    }
                    _ => model.decision_reward(d, l, &full)?,
                };
                result.arm_reward_sums[a] += r;
                if keep_arm_rewards {
                    result.arm_rewards.push(r as f32);
                }
                if !measured {
                    memo[i * k + a] = r;
                }
            }
            if !measured {
                memo_known[i] = true;
            }
        }

        let latency = done - now;
        result.arms.push(played.0 as u16);
        result.arrivals_ms.push(now);
        result.latencies_ms.push(latency as f32);
        if series_every > 0 && t % series_every == 0 {
            result.series.push(SeriesPoint {
                t,
                time_s: now / 1000.0,
                arm: played.0,
                split: arm.split,
                threshold: arm.threshold,
                reward,
                offloaded: network_ms.is_some(),
                latency_ms: latency,
                link_mbps: link.rate_mbps(now),
            });
        }
    }
    Ok(result)
}

/// Runs the device layer by layer as the edge agent does, recording what it evaluated.
fn run_device(
    state: &mut SampleDecision,
    conf: &[f64],
    seen: &mut [f64],
    evaluate_all_heads: bool,
) -> anyhow::Result<Decision> {
    for (j, (&c, slot)) in conf.iter().zip(seen.iter_mut()).enumerate() {
        let layer = j + 1;
        *slot = if evaluate_all_heads || state.needs_confidence(layer) {
            c
        } else {
            f64::NAN
        };
        let given = (!slot.is_nan()).then_some(*slot);
        if let Step::Done(d) = state.observe(layer, given)? {
            return Ok(d);
        }
    }
    anyhow::bail!("the decision did not finish by the last layer")
}
