use serde::{Deserialize, Serialize};

use super::{Policy, check_exploration, check_lengths, check_num_arms, check_update};
use crate::arms::{ArmIndex, ArmSpace};
use crate::error::BanditError;
use crate::reward::RewardRange;

/// Structured UCB: every arm's expected reward built from estimates that all arms share,
/// with optimism only where they are uncertain.
///
/// One sample tells more than the played arm's reward. The arm is chosen before the sample is
/// seen, so the exits the device evaluated are an unbiased draw for every arm whose decision
/// they settle: an arm `(s, α)` is *revealed* by a sample whose observed confidences decide
/// it (the device ran at least the layers its rule tests) — most arms, on most samples. What a
/// revealed arm would have earned splits into parts, estimated separately
/// ([`Reveal`], filled in by [`Controller`](crate::Controller)):
///
/// * `q_k`: the share of arm `k`'s revealed samples it would offload;
/// * `ĝ_k = (1 − q_k)·ḡᵉˣⁱᵗ_k + q_k·ḡᵒᶠᶠ_k`: the reward's gain (SplitEE: the answer's
///   confidence `C_j` on an exit, the cloud's `C_L` on an offload), each from the revealed
///   samples where it was observed (`C_L` only when a sample was offloaded; before that, the
///   mean answer confidence of all offloads);
/// * `ê_k`: the mean edge cost of the layers it would run, where known;
/// * `ô_k`: the offload's cost from one link model shared by every arm: a discounted
///   least-squares line `ô = a + b·tokens` fitted to every offload's charged cost net of its
///   cloud layers, plus `(L − s_k)` cloud layers at their discounted mean cost, at the mean
///   token count of the samples arm `k` offloads; or the constant `o` when the cost model has one.
///
/// Index: `μ̂_k + c·(W·sqrt(ln t / n_k) + q_k·sqrt(ln t / (mᵒᶠᶠ_k + 5)) + q_k·λ·σ_k·sqrt(ln t / (N + 1)))`,
/// with `μ̂_k = ĝ_k − λ·ê_k − λ·q_k·ô_k`, `W = hi − lo` of the reward range, `n_k` the samples
/// that revealed arm `k`, `mᵒᶠᶠ_k` those with an observed `C_L` (`ḡᵒᶠᶠ_k` holds 5
/// pseudo-observations of the mean answer confidence of every offload), `N` the link's
/// discounted count of offloads and `σ_k` the residual spread of its fit (no link term with
/// a constant `o`). The link forgets with
/// `γ = 1 − 1/link_memory` per sample settled, against one undiscounted pseudo-offload with
/// the mean and variance of every offload ever seen: when nothing has been offloaded for a
/// while its estimate drifts back to the link's long-run cost, its spread to the long-run
/// spread, and its bonus grows, so a link that recovered gets probed. (Reverting to the cheapest cost ever seen instead probed an
/// intermittent 5G link into its outages again and again: 40 two-second timeouts in 2,000
/// samples, against 3–4 with the long-run mean.)
/// Device-side estimates (`q`, `ĝ`, `ê`) do not forget: the samples' distribution does not
/// change with the network.
///
/// Never-revealed arms are played first, the deepest split first (its sample reveals every
/// shallower arm), lowest index among equals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StructuredUcb {
    c: f64,
    link_memory: f64,
    range: RewardRange,
    lambda: f64,
    /// The constant offload cost, when the cost model has one.
    known_offload: Option<f64>,
    num_layers: usize,
    splits: Vec<usize>,
    steps: u64,
    arms: Vec<ArmStats>,
    /// `beyond[k · L + j]`: how many of arm `k`'s revealed samples stopped before layer
    /// `j + 1` that the arm would have run, whose measured cost comes from [`Self::layers`].
    beyond: Vec<f64>,
    /// Measured device cost of each layer (layer 1 with the embedding), from every sample
    /// that ran it: the layers are identical, so they also share one pooled mean as a prior.
    layers: Vec<Mean>,
    link: LinkModel,
    /// Answer confidences of all offloads seen (the prior of `ḡᵒᶠᶠ`).
    answers: Mean,
}

/// Running sums of one arm's revealed samples.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct ArmStats {
    revealed: f64,
    offloads: f64,
    exit_gain: Mean,
    offload_gain: Mean,
    edge: Mean,
    offload_tokens: Mean,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct Mean {
    sum: f64,
    n: f64,
}

impl Mean {
    fn add(&mut self, value: f64) {
        self.sum += value;
        self.n += 1.0;
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0.0).then(|| self.sum / self.n)
    }
}

/// Discounted least squares of `y = a + b·x` anchored to the link's long-run mean, and the
/// discounted mean cost of one cloud layer.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
struct LinkModel {
    /// Σ w, Σ w·x, Σ w·x², Σ w·y, Σ w·x·y, Σ w·y² with w decaying by γ per sample.
    w: f64,
    wx: f64,
    wxx: f64,
    wy: f64,
    wxy: f64,
    wyy: f64,
    cloud_layer: f64,
    cloud_layer_w: f64,
    /// Every net offload cost seen, undiscounted, and the sum of their squares: the mean and
    /// the spread the estimate reverts to when the recent offloads are forgotten.
    all_time: Mean,
    #[serde(default)]
    all_time_squares: f64,
}

impl LinkModel {
    fn decay(&mut self, gamma: f64) {
        for s in [
            &mut self.w,
            &mut self.wx,
            &mut self.wxx,
            &mut self.wy,
            &mut self.wxy,
            &mut self.wyy,
            &mut self.cloud_layer_w,
        ] {
            *s *= gamma;
        }
        self.cloud_layer *= gamma;
    }

    fn observe(&mut self, net_cost: f64, tokens: f64, cloud_layer_cost: Option<f64>) {
        self.w += 1.0;
        self.wx += tokens;
        self.wxx += tokens * tokens;
        self.wy += net_cost;
        self.wxy += tokens * net_cost;
        self.wyy += net_cost * net_cost;
        self.all_time.add(net_cost);
        self.all_time_squares += net_cost * net_cost;
        if let Some(c) = cloud_layer_cost {
            self.cloud_layer += c;
            self.cloud_layer_w += 1.0;
        }
    }

    /// The net cost of offloading `tokens` tokens and its spread: the discounted fit plus one
    /// pseudo-sample of the long-run distribution (its mean, flat in tokens, and its
    /// variance); the spread is the fit's residual standard deviation. Before any offload:
    /// free, the optimistic start.
    ///
    /// The pseudo-sample carries the variance, not only the mean, because otherwise the
    /// spread is forgotten with the data: after an outage whose failures raised the long-run
    /// mean above the device's cost, the bonus shrank to nothing as the fit decayed and the
    /// policy never offloaded again (`a_recovered_link_is_probed_after_an_outage`).
    fn predict(&self, tokens: f64) -> (f64, f64) {
        let Some(floor) = self.all_time.get() else {
            return (0.0, 0.0);
        };
        let variance = (self.all_time_squares / self.all_time.n - floor * floor).max(0.0);
        let (w, wx, wxx, wy, wxy, wyy) = (
            self.w + 1.0,
            self.wx + tokens,
            self.wxx + tokens * tokens,
            self.wy + floor,
            self.wxy + tokens * floor,
            self.wyy + floor * floor + variance,
        );
        let det = w * wxx - wx * wx;
        // Too little spread in token counts for a slope: the weighted mean.
        let (a, b) = if det <= 1e-9 * w * wxx.max(1.0) {
            (wy / w, 0.0)
        } else {
            let b = (w * wxy - wx * wy) / det;
            ((wy - b * wx) / w, b)
        };
        let residual = (wyy - a * wy - b * wxy).max(0.0);
        let spread = (residual / w).sqrt();
        ((a + b * tokens).max(0.0), spread)
    }

    fn cloud_layer_cost(&self) -> f64 {
        if self.cloud_layer_w > 0.0 {
            self.cloud_layer / self.cloud_layer_w
        } else {
            0.0
        }
    }
}

/// What one settled sample tells about one arm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reveal {
    /// The arm would have offloaded this sample.
    pub offloads: bool,
    /// The reward's gain, when observed (on an exit: `C_j`; on an offload: `C_L` from the
    /// cloud, when the sample was offloaded and answered).
    pub gain: Option<f64>,
    pub edge: EdgeSeen,
    pub tokens: f64,
}

/// The edge cost of the layers an arm would have run on a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EdgeSeen {
    /// Priced, or measured because the device ran them.
    Known(f64),
    /// Measured up to layer `ran`, where the device stopped, short of the arm's `stop`:
    /// the rest is the policy's per-layer estimate.
    Partly { cost: f64, ran: usize, stop: usize },
}

/// What a settled offload tells about the link, in the cost model's units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSample {
    /// The offload's charged cost.
    pub cost: f64,
    /// Of which the cloud's layers.
    pub cloud_cost: f64,
    /// The cost of one cloud layer, when the cloud answered.
    pub cloud_layer_cost: Option<f64>,
    pub tokens: f64,
    /// The answer's confidence, when the cloud answered.
    pub answer_confidence: Option<f64>,
}

/// Pseudo-observations of the mean answer confidence behind each arm's own `C_L` estimate:
/// the cloud's final exit answers every arm's offloads, so arms differ in it only through which
/// samples they offload.
const ANSWER_PRIOR_WEIGHT: f64 = 5.0;

/// Pseudo-samples of the pooled layer cost behind each layer's own measured mean.
const LAYER_PRIOR_WEIGHT: f64 = 5.0;

impl StructuredUcb {
    /// `lambda` and `known_offload` come from the controller's cost model.
    pub fn new(
        space: &ArmSpace,
        c: f64,
        link_memory: f64,
        range: RewardRange,
        lambda: f64,
        known_offload: Option<f64>,
    ) -> Result<Self, BanditError> {
        check_num_arms(space.len())?;
        check_exploration(c)?;
        check_memory(link_memory)?;
        Ok(StructuredUcb {
            c,
            link_memory,
            range,
            lambda,
            known_offload,
            num_layers: space.num_layers(),
            splits: space.arms().iter().map(|a| a.split).collect(),
            steps: 0,
            arms: vec![ArmStats::default(); space.len()],
            beyond: vec![0.0; space.len() * space.num_layers()],
            layers: vec![Mean::default(); space.num_layers()],
            link: LinkModel::default(),
            answers: Mean::default(),
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_exploration(self.c)?;
        check_memory(self.link_memory)?;
        check_lengths(self.splits.len(), &[self.arms.len()])?;
        if self.layers.len() != self.num_layers
            || self.beyond.len() != self.splits.len() * self.num_layers
        {
            return Err(BanditError::CorruptState(
                "per-layer vectors differ in length",
            ));
        }
        if self.splits.iter().any(|&s| s == 0 || s > self.num_layers) {
            return Err(BanditError::CorruptState("split outside the model"));
        }
        Ok(())
    }

    /// Arm `arm` on the sample just settled.
    pub fn reveal(&mut self, arm: ArmIndex, reveal: Reveal) -> Result<(), BanditError> {
        let stats = self.arms.get_mut(arm.0).ok_or(BanditError::ArmOutOfRange {
            arm: arm.0,
            num_arms: self.splits.len(),
        })?;
        let edge = match reveal.edge {
            EdgeSeen::Known(cost) => cost,
            EdgeSeen::Partly { cost, ran, stop } => {
                if stop > self.num_layers || ran >= stop {
                    return Err(BanditError::LayerOutOfRange {
                        layer: stop,
                        num_layers: self.num_layers,
                    });
                }
                let row = &mut self.beyond[arm.0 * self.num_layers..][..self.num_layers];
                for count in &mut row[ran..stop] {
                    *count += 1.0;
                }
                cost
            }
        };
        if reveal.gain.is_some_and(|g| !g.is_finite())
            || !edge.is_finite()
            || !reveal.tokens.is_finite()
        {
            return Err(BanditError::NonFiniteReward(f64::NAN));
        }
        stats.revealed += 1.0;
        stats.edge.add(edge);
        if reveal.offloads {
            stats.offloads += 1.0;
            stats.offload_tokens.add(reveal.tokens);
            if let Some(g) = reveal.gain {
                stats.offload_gain.add(g);
            }
        } else if let Some(g) = reveal.gain {
            stats.exit_gain.add(g);
        }
        Ok(())
    }

    /// The measured cumulative device cost of the layers a sample ran (`cumulative[j − 1]`:
    /// layers `1..=j`, embedding included).
    pub fn observe_device(&mut self, cumulative: &[f64]) -> Result<(), BanditError> {
        if cumulative.len() > self.num_layers || cumulative.iter().any(|c| !c.is_finite()) {
            return Err(BanditError::InvalidCost {
                what: "measured device layer",
                value: f64::NAN,
            });
        }
        let mut before = 0.0;
        for (layer, &c) in self.layers.iter_mut().zip(cumulative) {
            layer.add((c - before).max(0.0));
            before = c;
        }
        Ok(())
    }

    /// The mean measured cost of layers 2..=L, pooled.
    fn pooled_layer_cost(&self) -> Option<f64> {
        self.layers[1..]
            .iter()
            .fold(Mean::default(), |acc, m| Mean {
                sum: acc.sum + m.sum,
                n: acc.n + m.n,
            })
            .get()
    }

    /// Mean measured cost of layer `j + 1`, shrunk toward the mean over layers 2..=L (the
    /// identical encoder layers; layer 1 carries the embedding) with 5 pseudo-samples.
    fn layer_cost(&self, j: usize, pooled: Option<f64>) -> f64 {
        let prior = pooled.or(self.layers[j].get()).unwrap_or(0.0);
        let own = &self.layers[j];
        (own.sum + LAYER_PRIOR_WEIGHT * prior) / (own.n + LAYER_PRIOR_WEIGHT)
    }

    /// An offload's cost, settled (answered or failed).
    pub fn observe_link(&mut self, sample: LinkSample) -> Result<(), BanditError> {
        if ![sample.cost, sample.cloud_cost, sample.tokens]
            .iter()
            .all(|v| v.is_finite())
        {
            return Err(BanditError::NonFiniteReward(sample.cost));
        }
        self.link.observe(
            (sample.cost - sample.cloud_cost).max(0.0),
            sample.tokens,
            sample.cloud_layer_cost,
        );
        if let Some(c) = sample.answer_confidence {
            self.answers.add(c);
        }
        Ok(())
    }

    /// The estimated mean reward of every arm (no bonus), for reports.
    pub fn estimates(&self) -> impl Iterator<Item = Option<f64>> + '_ {
        let pooled = self.pooled_layer_cost();
        (0..self.arms.len()).map(move |k| self.estimate(k, pooled).map(|(mean, ..)| mean))
    }

    /// `(μ̂_k, q_k, sd of ô_k)`, `None` for a never-revealed arm.
    fn estimate(&self, k: usize, pooled: Option<f64>) -> Option<(f64, f64, f64)> {
        let a = &self.arms[k];
        if a.revealed == 0.0 {
            return None;
        }
        let q = a.offloads / a.revealed;
        // Optimism where nothing is known yet: the best gain, no edge cost.
        let exit_gain = a.exit_gain.get().unwrap_or(self.range.hi());
        let answer_prior = self.answers.get().unwrap_or(self.range.hi());
        let offload_gain = (a.offload_gain.sum + ANSWER_PRIOR_WEIGHT * answer_prior)
            / (a.offload_gain.n + ANSWER_PRIOR_WEIGHT);
        let beyond = &self.beyond[k * self.num_layers..][..self.num_layers];
        let extrapolated: f64 = beyond
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0.0)
            .map(|(j, &count)| count * self.layer_cost(j, pooled))
            .sum();
        let edge = (a.edge.sum + extrapolated) / a.revealed;
        let (offload, spread) = match (q > 0.0, self.known_offload) {
            (false, _) => (0.0, 0.0),
            (true, Some(o)) => (o, 0.0),
            (true, None) => {
                let tokens = a.offload_tokens.get().unwrap_or(0.0);
                let (net, spread) = self.link.predict(tokens);
                let cloud =
                    (self.num_layers - self.splits[k]) as f64 * self.link.cloud_layer_cost();
                (net + cloud, spread)
            }
        };
        let gain = (1.0 - q) * exit_gain + q * offload_gain;
        Some((gain - self.lambda * (edge + q * offload), q, spread))
    }
}

fn check_memory(memory: f64) -> Result<(), BanditError> {
    if memory.is_finite() && memory >= 1.0 {
        Ok(())
    } else {
        Err(BanditError::InvalidConfig(format!(
            "link_memory must be at least 1 (samples), got {memory}"
        )))
    }
}

impl Policy for StructuredUcb {
    fn num_arms(&self) -> usize {
        self.arms.len()
    }

    fn select(&mut self) -> ArmIndex {
        // Never-revealed arms first, deepest split first: a sample the device runs further
        // reveals every arm that stops before it, and offloads nothing it need not.
        let unrevealed = (0..self.arms.len())
            .filter(|&k| self.arms[k].revealed == 0.0)
            .fold(None, |best: Option<usize>, k| match best {
                Some(b) if self.splits[b] >= self.splits[k] => Some(b),
                _ => Some(k),
            });
        if let Some(k) = unrevealed {
            return ArmIndex(k);
        }
        let log_t = (self.steps.max(1) as f64).ln();
        let pooled = self.pooled_layer_cost();
        let link_count = (log_t / (self.link.w + 1.0)).sqrt();
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for k in 0..self.arms.len() {
            let (mean, q, spread) = self.estimate(k, pooled).expect("every arm revealed");
            let a = &self.arms[k];
            // Each part's width: the whole reward's for the arm's own mean, a confidence's
            // (1) for `C_L`, the link cost's spread (priced) for the link.
            let bonus = self.range.width() * (log_t / a.revealed).sqrt()
                + q * (log_t / (a.offload_gain.n + ANSWER_PRIOR_WEIGHT)).sqrt()
                + q * self.lambda * spread * link_count;
            let v = mean + self.c * bonus;
            if v > best_value {
                best = k;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        check_update(arm, reward, self.num_arms())?;
        self.steps += 1;
        self.link.decay(1.0 - 1.0 / self.link_memory);
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(known_offload: Option<f64>) -> StructuredUcb {
        let space = ArmSpace::splits(2, 0.9).unwrap();
        let range = RewardRange::new(-1.0, 1.0).unwrap();
        StructuredUcb::new(&space, 0.25, 10.0, range, 0.01, known_offload).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn an_arm_never_played_is_estimated_from_what_samples_revealed_of_it() {
        let mut p = policy(None);
        // Arm 0 (split 1) revealed by four samples: it would exit two (gains 0.95, 0.97) and
        // offload two (one with C_L = 0.8 observed); its edge cost is 10 ms.
        for (offloads, gain) in [
            (false, Some(0.95)),
            (false, Some(0.97)),
            (true, Some(0.8)),
            (true, None),
        ] {
            p.reveal(
                ArmIndex(0),
                Reveal {
                    offloads,
                    gain,
                    edge: EdgeSeen::Known(10.0),
                    tokens: 20.0,
                },
            )
            .unwrap();
        }
        // The link: two offloads of 20 tokens at 50 and 70 ms, no cloud layers.
        for cost in [50.0, 70.0] {
            p.observe_link(LinkSample {
                cost,
                cloud_cost: 0.0,
                cloud_layer_cost: None,
                tokens: 20.0,
                answer_confidence: Some(0.8),
            })
            .unwrap();
        }
        let (mean, q, _) = p.estimate(0, None).unwrap();
        assert!(close(q, 0.5));
        // C_L: one observation with five pseudo-observations of the mean answer (0.8).
        let offload_gain = (0.8 + 5.0 * 0.8) / 6.0;
        // The link: the fit of (50, 70) plus one pseudo-offload at their long-run mean, 60.
        let gain = 0.5 * 0.96 + 0.5 * offload_gain;
        assert!(close(mean, gain - 0.01 * (10.0 + 0.5 * 60.0)), "{mean}");
        assert_eq!(p.estimate(1, None), None, "arm 1 was never revealed");
    }

    #[test]
    fn a_forgotten_link_reverts_to_its_long_run_cost_and_measured_layers_extrapolate() {
        let mut p = policy(None);
        for cost in [40.0, 40.0, 40.0, 400.0] {
            p.observe_link(LinkSample {
                cost,
                cloud_cost: 0.0,
                cloud_layer_cost: None,
                tokens: 10.0,
                answer_confidence: None,
            })
            .unwrap();
        }
        let recent = p.link.predict(10.0).0;
        // 200 samples later (memory 10), the recent offloads are forgotten.
        for _ in 0..200 {
            p.update(ArmIndex(0), 0.5).unwrap();
        }
        let (forgotten, _) = p.link.predict(10.0);
        assert!(close(forgotten, 130.0), "{forgotten}: the mean of all four");
        assert!(recent < 130.0 + 1e-9 && recent > 40.0);
        // Layer 2 measured on one sample (8 ms after layer 1's 5): an arm revealed by a sample
        // that stopped at layer 1 is charged layer 2 from that measurement.
        p.observe_device(&[5.0, 13.0]).unwrap();
        p.reveal(
            ArmIndex(1),
            Reveal {
                offloads: false,
                gain: Some(0.9),
                edge: EdgeSeen::Partly {
                    cost: 5.0,
                    ran: 1,
                    stop: 2,
                },
                tokens: 10.0,
            },
        )
        .unwrap();
        let (mean, ..) = p.estimate(1, p.pooled_layer_cost()).unwrap();
        assert!(close(mean, 0.9 - 0.01 * (5.0 + 8.0)), "{mean}");
        let bad = Reveal {
            offloads: false,
            gain: Some(0.9),
            edge: EdgeSeen::Partly {
                cost: 5.0,
                ran: 2,
                stop: 2,
            },
            tokens: 10.0,
        };
        assert!(p.reveal(ArmIndex(1), bad).is_err());
        assert!(p.reveal(ArmIndex(7), bad).is_err());
    }

    #[test]
    fn a_recovered_link_is_probed_after_an_outage() {
        // Arm 0 offloads everything after a 10 ms device part; arm 1 runs 40 ms on the device.
        // Equal gains: offloading pays while the link costs under 30 ms.
        let mut p = policy(None);
        let settle = |p: &mut StructuredUcb, arm: usize, link: Option<f64>| {
            let answered = link.is_some_and(|cost| cost < 50.0);
            let revealed = |offloads, gain, edge| Reveal {
                offloads,
                gain,
                edge: EdgeSeen::Known(edge),
                tokens: 10.0,
            };
            p.reveal(ArmIndex(0), revealed(true, answered.then_some(0.9), 10.0))
                .unwrap();
            p.reveal(ArmIndex(1), revealed(false, Some(0.9), 40.0))
                .unwrap();
            if let Some(cost) = link {
                p.observe_link(LinkSample {
                    cost,
                    cloud_cost: 0.0,
                    cloud_layer_cost: None,
                    tokens: 10.0,
                    answer_confidence: answered.then_some(0.9),
                })
                .unwrap();
            }
            p.update(ArmIndex(arm), 0.5).unwrap();
        };
        // 300 offloads at 5 ms, then an outage: 100 offloads that fail after 400 ms each. The
        // long-run mean (103.75 ms) is now far worse than the device. (Without the long-run
        // variance in the pseudo-offload, the link's spread decays to 0 with the fit and arm 0
        // is never chosen again.)
        for cost in [5.0; 300].into_iter().chain([400.0; 100]) {
            settle(&mut p, 0, Some(cost));
        }
        // The link is back at 5 ms; the policy sees it only by offloading.
        let mut chosen = Vec::new();
        for _ in 0..1000 {
            let arm = p.select().0;
            settle(&mut p, arm, (arm == 0).then_some(5.0));
            chosen.push(arm);
        }
        assert_eq!(chosen[0], 1, "the outage is remembered at first");
        let offloaded_at_the_end = chosen[900..].iter().filter(|&&a| a == 0).count();
        assert!(
            offloaded_at_the_end > 90,
            "the link is probed and offloading resumes: {offloaded_at_the_end} of the last 100; \
             first offload at step {:?}",
            chosen.iter().position(|&a| a == 0)
        );
    }
}
