//! The simulator core: one policy, one link, one seed, `samples` samples in simulated time.
//!
//! Pure and deterministic: no clock is read, no file is touched; the same [`RunSpec`] gives
//! the same [`RunResult`] bit for bit. It is a discrete-event model of the live edge agent
//! (`edge_agent::Agent`), driving the same `splitee_bandits` calls:
//!
//! * Samples arrive at fixed or Poisson intervals, drawn from the matrix in its own order or
//!   shuffled (reshuffled after every pass).
//! * One driver owns the device, as the agent's does: it is busy during a sample's edge pass
//!   and during a device finish after a failed offload, and free otherwise. When free it first
//!   handles offloads that have completed (in completion order), then starts the next arrived
//!   sample if the pipeline window has room: at most `window` samples between the oldest
//!   unanswered one and the newest started.
//! * Starting a sample: [`Controller::select`] picks the arm, and a
//!   [`DevicePass`](splitee_bandits::DevicePass) — the agent's own loop — runs the device
//!   layers over the recorded exit probabilities, under the configured confidence measure,
//!   with the device clock of the [`crate::clock`] module.
//! * An offloaded payload queues on the uplink ([`Link::transmit`]), waits for the cloud (one
//!   FIFO worker: queue, then compute of the layers it runs, stopping at an earlier cloud exit
//!   when the request allows one, [`ReplyOptions::exits_at`]), and its answer arrives one RTT
//!   after the cloud finishes. An answer later than `request_timeout_ms` is a failure at the
//!   timeout: the device finishes the sample at its deepest exit (the worker still computes
//!   the abandoned request, as a real one does).
//! * Every sample is settled by [`Controller::settle`] when the agent would learn it: a device
//!   exit at the end of its pass, an offload when its answer (or failure) is handled — delayed
//!   feedback, as live.
//!
//! Latency is measured as the agent does: from the start of the sample's edge pass to its
//! answer (the cloud's arrival, or the end of the device finish); [`RunResult::waits_ms`] is
//! the time each sample waited for the device or the window before that.
//!
//! Regret needs a reference: the experiment runs every arm as a fixed policy on the same
//! samples, arrivals and link ([`crate::experiment`]); the best of those is the best fixed arm
//! in hindsight.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use splitee_bandits::{
    ArmIndex, CloudAnswered, ConfidenceMeasure, Controller, Decision, DevicePass, ExitCheck,
    ExitsConfig, Fallback, NOT_EVALUATED, OffloadFailed, Reported, SampleReport, Step,
};
use splitee_protocol::ReplyOptions;

use crate::clock::Clocks;
use crate::matrix::ConfidenceMatrix;
use splitee_link::{Link, LinkQueue};

const UNKNOWN: u32 = u32::MAX;

/// Matrix and clocks laid out per layer for the inner loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    num_layers: usize,
    n: usize,
    exit_layers: Vec<usize>,
    classes: usize,
    /// `n × L × classes`: exit probabilities at exit layers (zero elsewhere).
    probs: Vec<f32>,
    /// Whether `probs` were recorded; otherwise each exit's distribution is rebuilt from its
    /// recorded top probability (at the predicted class, the rest spread evenly), which gives
    /// back that probability and class exactly but nothing else: max-prob only.
    recorded_probs: bool,
    /// `n × L`: prediction at exit layers, [`UNKNOWN`] elsewhere.
    pred: Vec<u32>,
    labels: Vec<u32>,
    tokens: Vec<usize>,
    /// `n × (L + 1)`: device time of layers `1..=j` at index `j`.
    edge_cum: Vec<f64>,
    /// `n × L`: cloud time of each layer.
    cloud_ms: Vec<f64>,
    bytes: Vec<u64>,
    has_confidences: bool,
}

impl Workload {
    pub fn new(matrix: &ConfidenceMatrix, clocks: &Clocks) -> anyhow::Result<Self> {
        let l = matrix.num_layers();
        let n = matrix.len();
        anyhow::ensure!(n > 0, "the matrix has no samples");
        anyhow::ensure!(
            clocks.num_layers == l,
            "clock and matrix layer counts differ"
        );
        let exits = matrix.exit_layers();
        let recorded_probs = matrix.num_classes().is_some() && matrix.probs(0).is_some();
        let max_pred = (0..n)
            .flat_map(|i| matrix.predictions(i).iter().copied())
            .max()
            .unwrap_or(0) as usize;
        let classes = match matrix.num_classes() {
            Some(c) if recorded_probs => c,
            other => other.unwrap_or(2).max(max_pred + 1).max(2),
        };
        let mut probs = vec![0.0f32; n * l * classes];
        let mut pred = vec![UNKNOWN; n * l];
        for i in 0..n {
            for (e, &layer) in exits.iter().enumerate() {
                let slot = &mut probs[(i * l + layer - 1) * classes..][..classes];
                let p = matrix.predictions(i)[e];
                pred[i * l + layer - 1] = p;
                match matrix.probs(i).filter(|_| recorded_probs) {
                    Some(row) => slot.copy_from_slice(&row[e * classes..(e + 1) * classes]),
                    None if matrix.has_confidences() => {
                        let top = matrix.confidences(i)[e] as f32;
                        slot.fill((1.0 - top) / (classes - 1) as f32);
                        slot[p as usize] = top;
                    }
                    None => {}
                }
            }
        }
        let mut edge_cum = Vec::with_capacity(n * (l + 1));
        for i in 0..n {
            let mut acc = 0.0;
            edge_cum.push(0.0);
            for j in 0..l {
                acc += clocks.edge_ms[i * l + j];
                edge_cum.push(acc);
            }
        }
        Ok(Workload {
            num_layers: l,
            n,
            exit_layers: exits.to_vec(),
            classes,
            probs,
            recorded_probs,
            pred,
            labels: (0..n).map(|i| matrix.label(i).unwrap_or(UNKNOWN)).collect(),
            tokens: clocks.tokens.clone(),
            edge_cum,
            cloud_ms: clocks.cloud_ms.clone(),
            bytes: clocks.bytes.clone(),
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

    pub fn exit_layers(&self) -> &[usize] {
        &self.exit_layers
    }

    pub fn has_confidences(&self) -> bool {
        self.has_confidences
    }

    /// Mean payload bytes.
    pub fn mean_bytes(&self) -> f64 {
        self.bytes.iter().sum::<u64>() as f64 / self.n as f64
    }

    fn probs(&self, i: usize, layer: usize) -> &[f32] {
        &self.probs[(i * self.num_layers + layer - 1) * self.classes..][..self.classes]
    }

    fn prediction(&self, i: usize, layer: usize) -> u32 {
        self.pred[i * self.num_layers + layer - 1]
    }

    /// Device time of layers `1..=layer` of sample `i`.
    fn edge_ms(&self, i: usize, layer: usize) -> f64 {
        self.edge_cum[i * (self.num_layers + 1) + layer]
    }

    /// Cloud time of layers `from + 1..=to` of sample `i`.
    fn cloud_time(&self, i: usize, from: usize, to: usize) -> f64 {
        self.cloud_ms[i * self.num_layers..][from..to].iter().sum()
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

/// The order samples are drawn from the matrix in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SampleOrder {
    /// A random permutation per pass over the matrix.
    #[default]
    Shuffled,
    /// The matrix's own order, looping: a replay of a file streamed as it is.
    Sequential,
}

/// What the simulated agent lives with: its config's `[exits]`, `[pipeline]`, `[cloud]` and
/// `edge_layers`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentModel {
    pub exits: ExitsConfig,
    pub evaluate_all_heads: bool,
    /// `pipeline.window`.
    pub window: usize,
    /// `cloud.request_timeout_ms`: a later answer is a failure at this time.
    pub request_timeout_ms: f64,
    /// `cloud.cloud_exit_threshold`.
    pub cloud_exit_threshold: Option<f32>,
    /// `edge_layers`: the deepest layer the device holds (its finish after a failure ends
    /// at its deepest exit).
    pub edge_layers: usize,
}

/// Everything one run needs.
pub struct RunSpec<'a> {
    pub workload: &'a Workload,
    /// A fresh controller (arm space, rule, reward, policy).
    pub controller: Controller,
    pub agent: AgentModel,
    pub link: &'a Link,
    pub arrivals: Arrivals,
    pub order: SampleOrder,
    pub samples: usize,
    /// Seeds sample order, arrivals and RTT draws. Runs of different policies with the same
    /// seed see the same samples at the same times (common random numbers).
    pub seed: u64,
}

/// One run, per sample in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub num_arms: usize,
    /// Played arm per sample.
    pub arms: Vec<u16>,
    /// Arrival time per sample (ms).
    pub arrivals_ms: Vec<f64>,
    /// From the start of the edge pass to the answer (ms).
    pub latencies_ms: Vec<f32>,
    /// From arrival to the start of the edge pass (ms).
    pub waits_ms: Vec<f32>,
    /// The settlement's reward per sample.
    pub rewards: Vec<f64>,
    /// Whether the sample's arm sent it to the cloud (answered there or not).
    pub offloaded_flags: Vec<bool>,
    pub reward_sum: f64,
    pub correct: u64,
    pub labelled: u64,
    pub offloaded: u64,
    /// Offloads that timed out and were finished on the device.
    pub fallbacks: u64,
    /// Σ settled cost (before λ: layers + o, or ms).
    pub cost_sum: f64,
    pub bytes_sent: u64,
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

    pub fn mean_cost(&self) -> f64 {
        self.cost_sum / self.samples() as f64
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

/// An offload on its way: what its completion will report.
struct InFlight {
    /// Matrix row.
    row: usize,
    arm: ArmIndex,
    pass: DevicePass,
    started: f64,
    after: usize,
    bytes: u64,
    /// When the answer arrives or the failure is known.
    at: f64,
    /// `Some((exit layer, round trip, compute))` when the cloud answers in time.
    answer: Option<(usize, f64, f64)>,
}

/// Completions ordered by time (then arrival index), earliest first in a max-heap.
struct ByTime(f64, usize);

impl PartialEq for ByTime {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for ByTime {}
impl PartialOrd for ByTime {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByTime {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}

/// Runs one simulation.
pub fn run(spec: RunSpec<'_>) -> anyhow::Result<RunResult> {
    let RunSpec {
        workload: w,
        mut controller,
        agent,
        link,
        arrivals,
        order,
        samples,
        seed,
    } = spec;
    arrivals.check().map_err(anyhow::Error::msg)?;
    let l = w.num_layers;
    anyhow::ensure!(
        controller.space().num_layers() == l,
        "the arm space has {} layers, the matrix {l}",
        controller.space().num_layers()
    );
    anyhow::ensure!(agent.window >= 1, "the pipeline window must be at least 1");
    anyhow::ensure!(
        (1..=l).contains(&agent.edge_layers),
        "edge_layers = {} is outside 1..={l}",
        agent.edge_layers
    );
    let rule = controller.rule();
    if !w.has_confidences {
        // Without confidences only a rule whose outcome cannot depend on them is simulable.
        anyhow::ensure!(
            rule.check == ExitCheck::SplitOnly && rule.fallback == Fallback::ExitAtSplit,
            "this matrix has predictions but no confidences: only check = \"split-only\" with \
             fallback = \"exit-at-split\" can be simulated"
        );
    }
    anyhow::ensure!(
        w.recorded_probs || agent.exits.measure == ConfidenceMeasure::MaxProb,
        "exits.measure = {:?} needs each exit's class probabilities; this matrix records only \
         the top one",
        agent.exits.measure
    );
    let k = controller.space().len();
    anyhow::ensure!(k <= u16::MAX as usize, "too many arms");
    anyhow::ensure!(
        controller
            .space()
            .arms()
            .iter()
            .all(|a| a.split <= agent.edge_layers),
        "every arm's split must fit in edge_layers = {}",
        agent.edge_layers
    );
    let mut pass = controller.device_pass(&w.exit_layers, agent.exits, agent.evaluate_all_heads)?;
    let deepest_held = w
        .exit_layers
        .iter()
        .copied()
        .filter(|&e| e <= agent.edge_layers)
        .max();
    let reply = ReplyOptions {
        cloud_exit_threshold: agent.cloud_exit_threshold,
    };
    let no_confidences = vec![NOT_EVALUATED; l];

    // The stream: which row arrives when, and its RTT (drawn for every sample, offloaded or
    // not, so that all policies see the same ones).
    let mut order_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 1));
    let mut arrival_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 2));
    let mut rtt_rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 3));
    let mut permutation: Vec<u32> = (0..w.n as u32).collect();
    let mut rows = Vec::with_capacity(samples);
    let mut arrivals_ms = Vec::with_capacity(samples);
    let mut rtts = Vec::with_capacity(samples);
    let mut now = 0.0;
    for t in 0..samples {
        if t % w.n == 0 && order == SampleOrder::Shuffled {
            permutation.shuffle(&mut order_rng);
        }
        rows.push(permutation[t % w.n] as usize);
        if t > 0 {
            now += arrivals.gap(&mut arrival_rng);
        }
        arrivals_ms.push(now);
        rtts.push(link.rtt().sample(&mut rtt_rng));
    }

    let mut result = RunResult {
        num_arms: k,
        arms: vec![0; samples],
        arrivals_ms,
        latencies_ms: vec![0.0; samples],
        waits_ms: vec![0.0; samples],
        rewards: vec![0.0; samples],
        offloaded_flags: vec![false; samples],
        reward_sum: 0.0,
        correct: 0,
        labelled: 0,
        offloaded: 0,
        fallbacks: 0,
        cost_sum: 0.0,
        bytes_sent: 0,
    };
    let mut answered = vec![false; samples];
    let settle = |t: usize,
                  row: usize,
                  answer_layer: usize,
                  report: &SampleReport<'_>,
                  controller: &mut Controller,
                  result: &mut RunResult,
                  answered: &mut [bool]|
     -> anyhow::Result<()> {
        let settlement = controller.settle(report)?;
        result.rewards[t] = settlement.reward;
        result.reward_sum += settlement.reward;
        result.cost_sum += settlement.cost();
        let label = w.labels[row];
        if label != UNKNOWN {
            result.labelled += 1;
            result.correct += u64::from(w.prediction(row, answer_layer) == label);
        }
        answered[t] = true;
        Ok(())
    };

    let mut clock = 0.0f64;
    let mut cloud_free = 0.0f64;
    let mut queue = LinkQueue::default();
    let mut in_flight: Vec<Option<InFlight>> = (0..samples).map(|_| None).collect();
    let mut completions: BinaryHeap<ByTime> = BinaryHeap::new();
    let (mut next_start, mut next_out) = (0usize, 0usize);
    loop {
        while next_out < next_start && answered[next_out] {
            next_out += 1;
        }
        // 1. An offload that has completed.
        if let Some(ByTime(at, t)) = completions.peek()
            && *at <= clock
        {
            let t = *t;
            completions.pop();
            let mut flight = in_flight[t].take().expect("one completion per offload");
            let row = flight.row;
            let (outcome, answer_layer, done_at) = match flight.answer {
                Some((exit_layer, round_trip_ms, compute_ms)) => {
                    let confidence = flight.pass.answer_confidence(w.probs(row, exit_layer));
                    let outcome = Reported::Answered(CloudAnswered {
                        after: flight.after,
                        exit_layer,
                        confidence,
                        round_trip_ms,
                        cloud_compute_ms: compute_ms,
                        bytes_sent: flight.bytes,
                    });
                    (outcome, exit_layer, flight.at)
                }
                None => {
                    result.fallbacks += 1;
                    let (layer, confidence, finish_ms) = match deepest_held {
                        Some(deepest) if deepest > flight.after => (
                            deepest,
                            flight.pass.answer_confidence(w.probs(row, deepest)),
                            w.edge_ms(row, deepest) - w.edge_ms(row, flight.after),
                        ),
                        _ => (
                            flight.after,
                            flight.pass.confidences()[flight.after - 1],
                            0.0,
                        ),
                    };
                    // The driver finishes it when it is free, on the device.
                    clock += finish_ms;
                    let outcome = Reported::Failed(OffloadFailed {
                        after: flight.after,
                        waited_ms: agent.request_timeout_ms,
                        bytes_sent: flight.bytes,
                        finish_layer: layer,
                        confidence,
                        finish_ms,
                    });
                    (outcome, layer, clock)
                }
            };
            result.latencies_ms[t] = (done_at - flight.started) as f32;
            let report = flight.pass.report(flight.arm, w.tokens[row], outcome);
            settle(
                t,
                row,
                answer_layer,
                &report,
                &mut controller,
                &mut result,
                &mut answered,
            )?;
            continue;
        }
        // 2. The next sample, when it has arrived and the window has room.
        let room = next_start - next_out < agent.window;
        if next_start < samples && room && result.arrivals_ms[next_start] <= clock {
            let t = next_start;
            next_start += 1;
            let row = rows[t];
            let started = clock;
            result.waits_ms[t] = (started - result.arrivals_ms[t]) as f32;
            let (played, arm) = controller.select();
            result.arms[t] = played.0 as u16;
            let decision = if w.has_confidences {
                pass.start(arm);
                loop {
                    let layer = pass.next_layer().expect("undecided until Step::Done");
                    let probs = pass.wants_head(layer).then(|| w.probs(row, layer));
                    if let Step::Done(d) = pass.observe(layer, probs, w.edge_ms(row, layer))? {
                        break d;
                    }
                }
            } else {
                Decision::Exit { layer: arm.split }
            };
            match decision {
                Decision::Exit { layer } => {
                    clock += w.edge_ms(row, layer);
                    result.latencies_ms[t] = (clock - started) as f32;
                    let device_ms = &w.edge_cum[row * (l + 1) + 1..][..layer];
                    let predictions = &w.pred[row * l..][..layer];
                    let report = if w.has_confidences {
                        pass.report(played, w.tokens[row], Reported::Exited { layer })
                    } else {
                        SampleReport {
                            arm: played,
                            tokens: w.tokens[row],
                            confidences: &no_confidences[..layer],
                            predictions,
                            device_ms,
                            outcome: Reported::Exited { layer },
                        }
                    };
                    settle(
                        t,
                        row,
                        layer,
                        &report,
                        &mut controller,
                        &mut result,
                        &mut answered,
                    )?;
                }
                Decision::Offload { after } => {
                    clock += w.edge_ms(row, after);
                    let bytes = w.bytes[row];
                    result.offloaded += 1;
                    result.offloaded_flags[t] = true;
                    result.bytes_sent += bytes;
                    let sent = clock;
                    let delivered = link.transmit(sent, bytes, &mut queue);
                    let exit_layer = (after + 1..l)
                        .find(|&e| w.exit_layers.contains(&e) && reply.exits_at(w.probs(row, e)))
                        .unwrap_or(l);
                    let compute = w.cloud_time(row, after, exit_layer);
                    let cloud_start = delivered.max(cloud_free);
                    cloud_free = cloud_start + compute;
                    let round_trip = cloud_free + rtts[t] - sent;
                    let (at, answer) = if round_trip <= agent.request_timeout_ms {
                        (sent + round_trip, Some((exit_layer, round_trip, compute)))
                    } else {
                        (sent + agent.request_timeout_ms, None)
                    };
                    completions.push(ByTime(at, t));
                    in_flight[t] = Some(InFlight {
                        row,
                        arm: played,
                        pass: pass.clone(),
                        started,
                        after,
                        bytes,
                        at,
                        answer,
                    });
                }
            }
            continue;
        }
        // 3. Nothing to do now: wait for the next event.
        let next_completion = completions.peek().map(|c| c.0);
        let next_arrival = (next_start < samples && room).then(|| result.arrivals_ms[next_start]);
        match (next_completion, next_arrival) {
            (None, None) => break,
            (a, b) => {
                let next = a.into_iter().chain(b).fold(f64::INFINITY, f64::min);
                clock = clock.max(next);
            }
        }
    }
    debug_assert!(answered.iter().all(|&a| a) && in_flight.iter().all(Option::is_none));
    Ok(result)
}
