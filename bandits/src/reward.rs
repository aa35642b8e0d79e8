use serde::{Deserialize, Serialize};

use crate::arms::Arm;
use crate::decision::{Decision, DecisionRule, decide};
use crate::error::BanditError;
use crate::observation::{Observation, Outcome};

/// Device cost `cost_edge(i)` of running layers `1..=i`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeCost {
    /// Abstract units as in the papers: `cost_edge(i) = i`.
    Layers,
    /// Abstract units per layer, cumulative: `cost_edge(i) = units[i − 1]` (a cost setting of
    /// UEE-UCB's kind, where exits cost other than their depth).
    Units(Vec<f64>),
    /// A device profile: `cost_edge(i) = cumulative[i − 1] · n / ref_tokens` for a sample of
    /// `n` tokens ([`Observation::tokens`]), where `cumulative[i − 1]` is the profile's cost of
    /// embedding and layers `1..=i` at `ref_tokens` tokens (e.g. milliseconds). Linear in the
    /// token count: a documented approximation (attention is quadratic, but small at sentence
    /// lengths).
    Profile {
        cumulative: Vec<f64>,
        ref_tokens: f64,
    },
    /// Measured per sample and carried by [`Observation::edge_costs`].
    Measured,
}

/// Cost `cost_offload` of sending a sample to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffloadCost {
    /// The papers' constant `o`, or a fixed price. A failed offload is charged `o` plus the
    /// device's extra layers: the settlement puts that into [`Observation::offload_cost`],
    /// which, when present, overrides `o`.
    Constant(f64),
    /// Measured per sample (the round trip the device waited, plus bytes × [`CostModel::per_kb`])
    /// and carried by [`Observation::offload_cost`].
    Measured,
}

/// Costs and their price `λ` (reward units per cost unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub lambda: f64,
    pub edge: EdgeCost,
    pub offload: OffloadCost,
    /// Cost per KiB sent, in the measured offload cost's units (radio energy, metered data);
    /// only with [`OffloadCost::Measured`].
    #[serde(default)]
    pub per_kb: f64,
}

impl CostModel {
    /// The papers' setting: `cost_edge(i) = i`, constant offload cost `o`.
    pub fn abstract_units(lambda: f64, offload: f64) -> Result<Self, BanditError> {
        let model = CostModel {
            lambda,
            edge: EdgeCost::Layers,
            offload: OffloadCost::Constant(offload),
            per_kb: 0.0,
        };
        model.check_scalars()?;
        Ok(model)
    }

    /// Both costs measured by the caller for every sample.
    pub fn measured(lambda: f64) -> Result<Self, BanditError> {
        let model = CostModel {
            lambda,
            edge: EdgeCost::Measured,
            offload: OffloadCost::Measured,
            per_kb: 0.0,
        };
        model.check_scalars()?;
        Ok(model)
    }

    fn check_scalars(&self) -> Result<(), BanditError> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(BanditError::InvalidLambda(self.lambda));
        }
        if let OffloadCost::Constant(o) = self.offload {
            check_cost("offload", o)?;
        }
        check_cost("per KB", self.per_kb)?;
        Ok(())
    }

    pub fn validate(&self, num_layers: usize) -> Result<(), BanditError> {
        self.check_scalars()?;
        if let EdgeCost::Units(units) = &self.edge {
            if units.len() != num_layers {
                return Err(BanditError::CostProfileLength {
                    got: units.len(),
                    num_layers,
                });
            }
            for &c in units {
                check_cost("edge units", c)?;
            }
        }
        if let EdgeCost::Profile {
            cumulative,
            ref_tokens,
        } = &self.edge
        {
            if cumulative.len() != num_layers {
                return Err(BanditError::CostProfileLength {
                    got: cumulative.len(),
                    num_layers,
                });
            }
            for &c in cumulative {
                check_cost("edge profile", c)?;
            }
            if !(ref_tokens.is_finite() && *ref_tokens > 0.0) {
                return Err(BanditError::InvalidCost {
                    what: "profile ref_tokens",
                    value: *ref_tokens,
                });
            }
        }
        Ok(())
    }

    /// The profile's cost of layers `1..=layer` (0: the embedding alone is not priced) for
    /// the observation's token count.
    fn profile_cost(&self, layer: usize, obs: &Observation<'_>) -> Result<f64, BanditError> {
        let EdgeCost::Profile {
            cumulative,
            ref_tokens,
        } = &self.edge
        else {
            unreachable!("only called for profiles")
        };
        if layer == 0 {
            return Ok(0.0);
        }
        let at_ref = cumulative
            .get(layer - 1)
            .copied()
            .ok_or(BanditError::MissingEdgeCost { layer })?;
        let tokens = obs.tokens.ok_or(BanditError::MissingTokens)?;
        Ok(at_ref * tokens as f64 / ref_tokens)
    }

    /// `cost_edge(layer)`, from the model or from the observation.
    pub fn edge_cost(&self, layer: usize, obs: &Observation<'_>) -> Result<f64, BanditError> {
        match &self.edge {
            EdgeCost::Layers => Ok(layer as f64),
            EdgeCost::Units(units) => units_at(units, layer),
            EdgeCost::Profile { .. } => self.profile_cost(layer, obs),
            EdgeCost::Measured => {
                let c = obs
                    .edge_cost(layer)
                    .ok_or(BanditError::MissingEdgeCost { layer })?;
                check_cost("measured edge", c)?;
                Ok(c)
            }
        }
    }

    /// The cost of carrying a sample on the device from layer `from` to layer `to` after its
    /// offload failed, priced like the edge layers before the split: the profile's
    /// difference, `to − from` abstract units, or `measured` (what finishing took) when edge
    /// costs are measured. Charging a profiled device its real clock here would make a failed
    /// offload look cheaper than running the same layers on purpose.
    pub fn device_finish_cost(
        &self,
        from: usize,
        to: usize,
        measured: f64,
        obs: &Observation<'_>,
    ) -> Result<f64, BanditError> {
        match &self.edge {
            EdgeCost::Layers => Ok(to.saturating_sub(from) as f64),
            EdgeCost::Units(units) => Ok((units_at(units, to)? - units_at(units, from)?).max(0.0)),
            EdgeCost::Profile { .. } => {
                Ok((self.profile_cost(to, obs)? - self.profile_cost(from, obs)?).max(0.0))
            }
            EdgeCost::Measured => {
                check_cost("measured device finish", measured)?;
                Ok(measured)
            }
        }
    }

    /// `cost_offload` of an offload after layer `after`. A measured cost was observed for the
    /// played split; a shallower split leaves more layers to the cloud, each costing
    /// [`Observation::cloud_layer_cost`] more (the cloud's layers are identical), which is
    /// how side information prices the offload of an arm that was not played.
    pub fn offload_cost(&self, after: usize, obs: &Observation<'_>) -> Result<f64, BanditError> {
        match self.offload {
            OffloadCost::Constant(o) => Ok(obs.offload_cost.unwrap_or(o)),
            OffloadCost::Measured => {
                let c = obs.offload_cost.ok_or(BanditError::MissingOffloadCost)?;
                check_cost("measured offload", c)?;
                let played = match obs.outcome {
                    Outcome::Offloaded { after, .. } => after,
                    Outcome::Exited { .. } => return Err(BanditError::MissingOffloadCost),
                };
                let extra_layers = played.saturating_sub(after) as f64;
                Ok(c + extra_layers * obs.cloud_layer_cost)
            }
        }
    }

    /// Largest possible `cost_edge`, when known without observations.
    fn max_edge(&self, num_layers: usize) -> Option<f64> {
        match &self.edge {
            EdgeCost::Layers => Some(num_layers as f64),
            EdgeCost::Units(units) => Some(units.iter().copied().fold(0.0, f64::max)),
            EdgeCost::Profile { .. } | EdgeCost::Measured => None,
        }
    }
}

/// `units[layer − 1]`, 0 for no layers.
fn units_at(units: &[f64], layer: usize) -> Result<f64, BanditError> {
    match layer {
        0 => Ok(0.0),
        layer => units
            .get(layer - 1)
            .copied()
            .ok_or(BanditError::MissingEdgeCost { layer }),
    }
}

fn check_cost(what: &'static str, value: f64) -> Result<(), BanditError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(BanditError::InvalidCost { what, value })
    }
}

/// Which reward a sample earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardKind {
    /// SplitEE: exit at `i`: `C_i − λ·cost_edge(i)`; offload after `s`:
    /// `C_L − λ·(cost_edge(s) + cost_offload)`.
    SplitEe,
    /// AdaEE / UCBEE: exit: `0`; offload after `s`: `max(C_L − C_s, 0) − λ·cost_offload`.
    AdaEe,
    /// UEE-UCB label-free proxy: exit at `i`: `1[ŷ_1 ≠ ŷ_i] − λ·cost_edge(i)`; no offload.
    UeeProxy,
}

/// A reward function: a [`RewardKind`] priced by a [`CostModel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardModel {
    pub kind: RewardKind,
    pub cost: CostModel,
}

impl RewardModel {
    pub fn new(kind: RewardKind, cost: CostModel) -> Self {
        RewardModel { kind, cost }
    }

    pub fn validate(&self, num_layers: usize) -> Result<(), BanditError> {
        if num_layers == 0 {
            return Err(BanditError::NoLayers);
        }
        self.cost.validate(num_layers)
    }

    /// Reward of what actually happened to the sample.
    pub fn reward(&self, num_layers: usize, obs: &Observation<'_>) -> Result<f64, BanditError> {
        self.decision_reward(obs.outcome.decision(), num_layers, obs)
    }

    /// Reward that `arm` would have earned on this sample, if it can be computed from what
    /// was observed; `None` otherwise. Never uses `C_L` unless the cloud returned it or the
    /// device computed it.
    pub fn counterfactual(
        &self,
        arm: Arm,
        rule: DecisionRule,
        num_layers: usize,
        obs: &Observation<'_>,
    ) -> Option<f64> {
        let decision = decide(arm, rule, num_layers, obs.confidences)?;
        self.decision_reward(decision, num_layers, obs).ok()
    }

    /// Reward of `decision`, using only values present in `obs`.
    pub fn decision_reward(
        &self,
        decision: Decision,
        num_layers: usize,
        obs: &Observation<'_>,
    ) -> Result<f64, BanditError> {
        let lambda = self.cost.lambda;
        let reward = match (self.kind, decision) {
            (RewardKind::SplitEe, Decision::Exit { layer }) => {
                let c = confidence(obs, layer, num_layers)?;
                c - lambda * self.cost.edge_cost(layer, obs)?
            }
            (RewardKind::SplitEe, Decision::Offload { after }) => {
                let c_final = final_confidence(obs, num_layers)?;
                c_final
                    - lambda
                        * (self.cost.edge_cost(after, obs)? + self.cost.offload_cost(after, obs)?)
            }
            (RewardKind::AdaEe, Decision::Exit { .. }) => 0.0,
            (RewardKind::AdaEe, Decision::Offload { after }) => {
                let c_branch = confidence(obs, after, num_layers)?;
                let c_final = final_confidence(obs, num_layers)?;
                (c_final - c_branch).max(0.0) - lambda * self.cost.offload_cost(after, obs)?
            }
            (RewardKind::UeeProxy, Decision::Exit { layer }) => {
                check_layer(layer, num_layers)?;
                let first = obs.prediction(1);
                let here = obs.prediction(layer);
                let (Some(first), Some(here)) = (first, here) else {
                    return Err(BanditError::MissingPredictions { layer });
                };
                let disagree = if first != here { 1.0 } else { 0.0 };
                disagree - lambda * self.cost.edge_cost(layer, obs)?
            }
            (RewardKind::UeeProxy, Decision::Offload { .. }) => {
                return Err(BanditError::OffloadNotSupported);
            }
        };
        if reward.is_finite() {
            Ok(reward)
        } else {
            Err(BanditError::NonFiniteReward(reward))
        }
    }

    /// The part of `decision`'s reward that is not a priced cost — SplitEE: the answer's
    /// confidence; UEE-UCB: the disagreement with exit 1 — when `obs` holds it. The structured
    /// policy estimates it apart from the costs; AdaEE's gain depends on the offload and has
    /// no such split (`None`).
    pub(crate) fn gain(
        &self,
        decision: Decision,
        num_layers: usize,
        obs: &Observation<'_>,
    ) -> Option<f64> {
        match (self.kind, decision) {
            (RewardKind::SplitEe, Decision::Exit { layer }) => {
                confidence(obs, layer, num_layers).ok()
            }
            (RewardKind::SplitEe, Decision::Offload { .. }) => {
                final_confidence(obs, num_layers).ok()
            }
            (RewardKind::UeeProxy, Decision::Exit { layer }) => {
                let (first, here) = (obs.prediction(1)?, obs.prediction(layer)?);
                Some(if first != here { 1.0 } else { 0.0 })
            }
            (RewardKind::UeeProxy, Decision::Offload { .. }) | (RewardKind::AdaEe, _) => None,
        }
    }

    /// Bounds on every reward this model can produce, when they follow from the configuration
    /// alone (not with measured edge costs, nor with a measured offload cost where it counts).
    pub fn range(&self, num_layers: usize) -> Result<RewardRange, BanditError> {
        self.validate(num_layers)?;
        let lambda = self.cost.lambda;
        let offload = match self.cost.offload {
            OffloadCost::Constant(o) => Some(o),
            OffloadCost::Measured => None,
        };
        let max_edge = self.cost.max_edge(num_layers);
        let lo = match self.kind {
            RewardKind::SplitEe => {
                -lambda
                    * (max_edge.ok_or(BanditError::RewardRangeUnknown)?
                        + offload.ok_or(BanditError::RewardRangeUnknown)?)
            }
            RewardKind::AdaEe => -lambda * offload.ok_or(BanditError::RewardRangeUnknown)?,
            RewardKind::UeeProxy => -lambda * max_edge.ok_or(BanditError::RewardRangeUnknown)?,
        };
        // Costs are >= 0 and confidences <= 1, so lo <= 0 < 1 = hi: never an empty range.
        RewardRange::new(lo, 1.0)
    }
}

fn check_layer(layer: usize, num_layers: usize) -> Result<(), BanditError> {
    if layer == 0 || layer > num_layers {
        Err(BanditError::LayerOutOfRange { layer, num_layers })
    } else {
        Ok(())
    }
}

fn confidence(obs: &Observation<'_>, layer: usize, num_layers: usize) -> Result<f64, BanditError> {
    check_layer(layer, num_layers)?;
    let c = if layer == num_layers {
        obs.final_confidence(num_layers)
    } else {
        obs.confidence(layer)
    }
    .ok_or(BanditError::MissingConfidence { layer })?;
    check_confidence(layer, c)
}

fn final_confidence(obs: &Observation<'_>, num_layers: usize) -> Result<f64, BanditError> {
    let c = obs
        .final_confidence(num_layers)
        .ok_or(BanditError::MissingConfidence { layer: num_layers })?;
    check_confidence(num_layers, c)
}

fn check_confidence(layer: usize, c: f64) -> Result<f64, BanditError> {
    if (0.0..=1.0).contains(&c) {
        Ok(c)
    } else {
        Err(BanditError::ConfidenceOutOfRange { layer, value: c })
    }
}

/// Known bounds `[lo, hi]` on rewards, used to scale exploration (UCB family, Thompson) and to
/// normalise rewards into `[0, 1]` (KL-UCB).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRange")]
pub struct RewardRange {
    lo: f64,
    hi: f64,
}

#[derive(Deserialize)]
struct RawRange {
    lo: f64,
    hi: f64,
}

impl TryFrom<RawRange> for RewardRange {
    type Error = BanditError;
    fn try_from(raw: RawRange) -> Result<Self, BanditError> {
        RewardRange::new(raw.lo, raw.hi)
    }
}

impl Default for RewardRange {
    fn default() -> Self {
        RewardRange { lo: 0.0, hi: 1.0 }
    }
}

impl RewardRange {
    pub fn new(lo: f64, hi: f64) -> Result<Self, BanditError> {
        if lo.is_finite() && hi.is_finite() && lo < hi && (hi - lo).is_finite() {
            Ok(RewardRange { lo, hi })
        } else {
            Err(BanditError::InvalidRewardRange { lo, hi })
        }
    }

    pub fn lo(&self) -> f64 {
        self.lo
    }

    pub fn hi(&self) -> f64 {
        self.hi
    }

    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }

    /// Maps into `[0, 1]`, clamping rewards that fall outside the declared range.
    pub fn normalize(&self, reward: f64) -> f64 {
        ((reward - self.lo) / self.width()).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{ExitCheck, Fallback};

    const L: usize = 4;

    #[test]
    fn a_failed_offloads_device_finish_is_priced_like_the_edge_layers() {
        let profiled = CostModel {
            lambda: 0.01,
            edge: EdgeCost::Profile {
                cumulative: vec![10.0, 25.0, 45.0, 70.0],
                ref_tokens: 16.0,
            },
            offload: OffloadCost::Measured,
            per_kb: 0.0,
        };
        let at_ref = Observation::offloaded(&[0.5], 1, 0.9).with_tokens(16);
        // Layers 2..=4 after a split at 1: the profile says 70 − 10, whatever the clock said.
        assert_eq!(profiled.device_finish_cost(1, 4, 3.0, &at_ref), Ok(60.0));
        assert_eq!(profiled.device_finish_cost(4, 4, 0.0, &at_ref), Ok(0.0));
        // Twice the tokens, twice the price.
        let long = at_ref.with_tokens(32);
        assert_eq!(profiled.device_finish_cost(1, 4, 3.0, &long), Ok(120.0));
        assert_eq!(
            profiled.device_finish_cost(1, 5, 3.0, &at_ref),
            Err(BanditError::MissingEdgeCost { layer: 5 })
        );
        assert_eq!(
            profiled.device_finish_cost(1, 4, 3.0, &Observation::offloaded(&[0.5], 1, 0.9)),
            Err(BanditError::MissingTokens)
        );
        let measured = CostModel {
            edge: EdgeCost::Measured,
            ..profiled.clone()
        };
        assert_eq!(measured.device_finish_cost(1, 4, 3.0, &at_ref), Ok(3.0));
        assert!(
            measured
                .device_finish_cost(1, 4, f64::NAN, &at_ref)
                .is_err()
        );
        let units = CostModel::abstract_units(0.1, 2.0).unwrap();
        assert_eq!(units.device_finish_cost(1, 4, 3.0, &at_ref), Ok(3.0));
    }

    fn splitee(lambda: f64, o: f64) -> RewardModel {
        RewardModel::new(
            RewardKind::SplitEe,
            CostModel::abstract_units(lambda, o).unwrap(),
        )
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn splitee_formulas() {
        let m = splitee(0.1, 2.0);
        let c = [0.6, 0.92];
        // Exit at 2: C_2 − λ·2.
        assert!(close(
            m.reward(L, &Observation::exited(&c, 2)).unwrap(),
            0.92 - 0.2
        ));
        // Offload after 1: C_L − λ·(1 + o).
        let off = Observation::offloaded(&c[..1], 1, 0.97);
        assert!(close(m.reward(L, &off).unwrap(), 0.97 - 0.3));
        // Whole model on device: C_L − λ·L.
        let all = [0.6, 0.7, 0.8, 0.9];
        assert!(close(
            m.reward(L, &Observation::exited(&all, L)).unwrap(),
            0.9 - 0.4
        ));
        let range = m.range(L).unwrap();
        assert!(close(range.lo(), -0.6) && range.hi() == 1.0);
    }

    #[test]
    fn adaee_and_uee_formulas() {
        let cost = CostModel::abstract_units(1.0, 0.1).unwrap();
        let ada = RewardModel::new(RewardKind::AdaEe, cost.clone());
        let c = [0.6, 0.7];
        assert_eq!(ada.reward(L, &Observation::exited(&c, 2)).unwrap(), 0.0);
        let off = Observation::offloaded(&c, 2, 0.95);
        assert!(close(ada.reward(L, &off).unwrap(), 0.25 - 0.1));
        let worse = Observation::offloaded(&c, 2, 0.65);
        assert!(close(ada.reward(L, &worse).unwrap(), -0.1));

        let uee = RewardModel::new(
            RewardKind::UeeProxy,
            CostModel::abstract_units(0.01, 0.0).unwrap(),
        );
        let obs = Observation::exited(&c, 2).with_predictions(&[1, 0]);
        assert!(close(uee.reward(L, &obs).unwrap(), 1.0 - 0.02));
        let agree = Observation::exited(&c, 2).with_predictions(&[1, 1]);
        assert!(close(uee.reward(L, &agree).unwrap(), -0.02));
    }

    #[test]
    fn measured_costs_come_from_the_observation() {
        let m = RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.01).unwrap());
        let c = [0.5, 0.6];
        let obs = Observation::offloaded(&c, 2, 0.9)
            .with_edge_costs(&[3.0, 7.0])
            .with_offload_cost(20.0);
        assert!(close(m.reward(L, &obs).unwrap(), 0.9 - 0.27));
        let profile = CostModel {
            lambda: 0.01,
            edge: EdgeCost::Profile {
                cumulative: vec![3.0, 7.0, 9.0, 12.0],
                ref_tokens: 10.0,
            },
            offload: OffloadCost::Constant(20.0),
            per_kb: 0.0,
        };
        let m = RewardModel::new(RewardKind::SplitEe, profile);
        assert!(close(
            m.reward(L, &Observation::offloaded(&c, 2, 0.9).with_tokens(10))
                .unwrap(),
            0.63
        ));
        // 20 tokens: the profile's 7 ms become 14.
        assert!(close(
            m.reward(L, &Observation::offloaded(&c, 2, 0.9).with_tokens(20))
                .unwrap(),
            0.9 - 0.01 * (14.0 + 20.0)
        ));
    }

    #[test]
    fn counterfactuals_never_peek_at_an_unobserved_final_confidence() {
        let m = splitee(0.1, 2.0);
        let rule = DecisionRule::SPLITEE;
        let arm1 = Arm {
            split: 1,
            threshold: 0.9,
        };
        // Exited at 2 after a non-confident layer 1: arm 1 would have offloaded, and C_L
        // was never seen.
        let c = [0.6, 0.95];
        assert_eq!(
            m.counterfactual(arm1, rule, L, &Observation::exited(&c, 2)),
            None
        );
        // Same sample offloaded after 2: C_L is known, so arm 1's reward is too.
        let off = Observation::offloaded(&[0.6, 0.7], 2, 0.97);
        assert!(close(
            m.counterfactual(arm1, rule, L, &off).unwrap(),
            0.97 - 0.3
        ));
        // A confident layer 1 gives arm 1's exit reward without C_L.
        let easy = [0.93, 0.95];
        let r = m.counterfactual(arm1, rule, L, &Observation::exited(&easy, 2));
        assert!(close(r.unwrap(), 0.93 - 0.1));
        // Under EveryLayer the played arm exited at 1, so arm 1 shares its reward.
        let every = DecisionRule {
            check: ExitCheck::EveryLayer,
            fallback: Fallback::Offload,
        };
        let exited_first = Observation::exited(&easy[..1], 1);
        assert!(close(
            m.counterfactual(arm1, every, L, &exited_first).unwrap(),
            0.83
        ));
        // A deeper arm needs confidences the device never computed.
        let deep = Arm {
            split: 3,
            threshold: 0.99,
        };
        assert_eq!(m.counterfactual(deep, rule, L, &off), None);
    }
}
