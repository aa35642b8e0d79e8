use serde::{Deserialize, Serialize};

use crate::arms::{Arm, ArmIndex, ArmSpace};
use crate::decision::decide;
use crate::decision::{Decision, DecisionRule};
use crate::error::BanditError;
use crate::measure::ExitsConfig;
use crate::observation::Observation;
use crate::observation::Outcome;
use crate::pass::DevicePass;
use crate::policy::{AnyPolicy, EdgeSeen, LinkSample, Policy, PolicyConfig, Reveal, StructuredUcb};
use crate::reward::{EdgeCost, OffloadCost, RewardKind, RewardModel, RewardRange};
use crate::settle::{self, Reported, SampleReport, Settlement};

/// Everything the edge agent and the simulator need, in one serializable value: the arm
/// space, the per-sample rule, the reward and the learning policy.
///
/// Per sample: [`select`](Self::select) an arm, run the device with a
/// [`DevicePass`] from [`device_pass`](Self::device_pass), report what happened, then
/// [`settle`](Self::settle). No step allocates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ControllerRepr")]
pub struct Controller {
    space: ArmSpace,
    rule: DecisionRule,
    reward: RewardModel,
    policy: AnyPolicy,
}

#[derive(Deserialize)]
struct ControllerRepr {
    space: ArmSpace,
    rule: DecisionRule,
    reward: RewardModel,
    policy: AnyPolicy,
}

impl TryFrom<ControllerRepr> for Controller {
    type Error = BanditError;
    fn try_from(r: ControllerRepr) -> Result<Self, BanditError> {
        r.reward.validate(r.space.num_layers())?;
        if r.policy.num_arms() != r.space.len() {
            return Err(BanditError::CorruptState(
                "policy and arm space disagree on the number of arms",
            ));
        }
        Ok(Controller {
            space: r.space,
            rule: r.rule,
            reward: r.reward,
            policy: r.policy,
        })
    }
}

impl Controller {
    /// `range` bounds the rewards for the policy; `None` derives it from the reward model,
    /// which fails with [`BanditError::RewardRangeUnknown`] for measured costs.
    pub fn new(
        space: ArmSpace,
        rule: DecisionRule,
        reward: RewardModel,
        policy: &PolicyConfig,
        range: Option<RewardRange>,
    ) -> Result<Self, BanditError> {
        reward.validate(space.num_layers())?;
        let range = match range {
            Some(r) => r,
            None => reward.range(space.num_layers())?,
        };
        let policy = match *policy {
            PolicyConfig::StructuredUcb { c, link_memory } => {
                if reward.kind == RewardKind::AdaEe {
                    return Err(BanditError::InvalidConfig(
                        "structured-ucb needs the split-ee or uee-proxy reward: AdaEE's gain \
                         depends on the offload"
                            .into(),
                    ));
                }
                let known_offload = match reward.cost.offload {
                    OffloadCost::Constant(o) => Some(o),
                    OffloadCost::Measured => None,
                };
                AnyPolicy::Structured(StructuredUcb::new(
                    &space,
                    c,
                    link_memory,
                    range,
                    reward.cost.lambda,
                    known_offload,
                )?)
            }
            _ => policy.build(space.len(), range)?,
        };
        Ok(Controller {
            space,
            rule,
            reward,
            policy,
        })
    }

    /// Chooses the arm for the next sample.
    #[inline]
    pub fn select(&mut self) -> (ArmIndex, Arm) {
        let index = self.policy.select();
        // The policy was built for exactly `space.len()` arms.
        (index, self.space.arms()[index.0])
    }

    /// A device pass for this controller's rule over a model with exit heads after
    /// `exit_layers`.
    pub fn device_pass(
        &self,
        exit_layers: &[usize],
        exits: ExitsConfig,
        evaluate_all_heads: bool,
    ) -> Result<DevicePass, BanditError> {
        DevicePass::new(
            self.space.num_layers(),
            exit_layers,
            self.rule,
            exits,
            evaluate_all_heads,
        )
    }

    /// Prices the sample a driver reports, learns from it, and returns its price and reward
    /// (see [`crate::settle`]). Nothing is learnt when it cannot be priced.
    pub fn settle(&mut self, report: &SampleReport<'_>) -> Result<Settlement, BanditError> {
        let (settlement, obs) = self.priced(report)?;
        let failed = matches!(report.outcome, Reported::Failed(_));
        self.update(report.arm, &obs, settlement.reward, failed)?;
        Ok(settlement)
    }

    /// What [`settle`](Self::settle) would charge and reward, without learning.
    pub fn price(&self, report: &SampleReport<'_>) -> Result<Settlement, BanditError> {
        self.priced(report).map(|(settlement, _)| settlement)
    }

    fn priced<'a>(
        &self,
        report: &SampleReport<'a>,
    ) -> Result<(Settlement, Observation<'a>), BanditError> {
        self.arm(report.arm)?;
        let num_layers = self.space.num_layers();
        let obs = settle::observation(report, &self.reward.cost)?;
        let reward = self.reward.reward(num_layers, &obs)?;
        let edge_cost = self
            .reward
            .cost
            .edge_cost(report.outcome.device_layers(), &obs)?;
        let offload_cost = match obs.outcome.decision() {
            Decision::Exit { .. } => 0.0,
            Decision::Offload { after } => self.reward.cost.offload_cost(after, &obs)?,
        };
        Ok((
            Settlement {
                reward,
                edge_cost,
                offload_cost,
            },
            obs,
        ))
    }

    fn arm(&self, index: ArmIndex) -> Result<Arm, BanditError> {
        self.space.get(index).ok_or(BanditError::ArmOutOfRange {
            arm: index.0,
            num_arms: self.space.len(),
        })
    }

    /// Learns from one sample played with `played`; returns its reward.
    ///
    /// With a side-information policy (SplitEE-S) every arm with a strictly shallower split
    /// whose reward is computable from `obs` alone (see
    /// [`RewardModel::counterfactual`]) is updated too. Nothing is updated when the played
    /// reward cannot be computed. Drivers call [`settle`](Self::settle), which builds the
    /// observation from what they report.
    pub fn learn(&mut self, played: ArmIndex, obs: &Observation<'_>) -> Result<f64, BanditError> {
        self.arm(played)?;
        let reward = self.reward.reward(self.space.num_layers(), obs)?;
        self.update(played, obs, reward, false)?;
        Ok(reward)
    }

    /// `failed`: the sample's offload failed and the device finished it; such a sample
    /// teaches only the played arm, and its answer is not the cloud's.
    fn update(
        &mut self,
        played: ArmIndex,
        obs: &Observation<'_>,
        reward: f64,
        failed: bool,
    ) -> Result<(), BanditError> {
        let arm = self.arm(played)?;
        let num_layers = self.space.num_layers();
        self.policy.update(played, reward)?;
        if let AnyPolicy::Structured(policy) = &mut self.policy {
            return reveal(policy, &self.space, self.rule, &self.reward, obs, failed);
        }
        if !failed && self.policy.uses_side_information() {
            for (index, other) in self.space.iter() {
                if other.split >= arm.split {
                    continue;
                }
                if let Some(r) = self
                    .reward
                    .counterfactual(other, self.rule, num_layers, obs)
                {
                    self.policy.update_side(index, r)?;
                }
            }
        }
        Ok(())
    }

    pub fn space(&self) -> &ArmSpace {
        &self.space
    }

    pub fn rule(&self) -> DecisionRule {
        self.rule
    }

    pub fn reward_model(&self) -> &RewardModel {
        &self.reward
    }

    pub fn policy(&self) -> &AnyPolicy {
        &self.policy
    }
}

/// Feeds the structured policy what one sample reveals: every arm whose decision the
/// observed confidences settle, and the link's cost when the sample was offloaded.
fn reveal(
    policy: &mut StructuredUcb,
    space: &ArmSpace,
    rule: DecisionRule,
    reward: &RewardModel,
    obs: &Observation<'_>,
    failed: bool,
) -> Result<(), BanditError> {
    let num_layers = space.num_layers();
    let tokens = obs.tokens.unwrap_or(0) as f64;
    for (index, arm) in space.iter() {
        let Some(decision) = decide(arm, rule, num_layers, obs.confidences) else {
            continue;
        };
        let (offloads, stop) = match decision {
            Decision::Exit { layer } => (false, layer),
            Decision::Offload { after } => (true, after),
        };
        // A failed offload's answer is the device's, not the cloud's `C_L`.
        let gain = if failed && (offloads || stop == num_layers) {
            None
        } else {
            reward.gain(decision, num_layers, obs)
        };
        let edge = match reward.cost.edge_cost(stop, obs) {
            Ok(cost) => EdgeSeen::Known(cost),
            // Measured, and the device stopped before `stop`.
            Err(_) => {
                let ran = obs.edge_costs.len();
                EdgeSeen::Partly {
                    cost: obs.edge_costs.last().copied().unwrap_or(0.0),
                    ran,
                    stop,
                }
            }
        };
        policy.reveal(
            index,
            Reveal {
                offloads,
                gain,
                edge,
                tokens,
            },
        )?;
    }
    if matches!(reward.cost.edge, EdgeCost::Measured) {
        policy.observe_device(obs.edge_costs)?;
    }
    if let Outcome::Offloaded { after, .. } = obs.outcome {
        let cloud_layers = num_layers.saturating_sub(after) as f64;
        policy.observe_link(LinkSample {
            cost: reward.cost.offload_cost(after, obs)?,
            cloud_cost: if failed {
                0.0
            } else {
                obs.cloud_layer_cost * cloud_layers
            },
            cloud_layer_cost: (!failed && obs.offload_cost.is_some())
                .then_some(obs.cloud_layer_cost),
            tokens,
            answer_confidence: if failed {
                None
            } else {
                obs.final_confidence(num_layers)
            },
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Ucb1;
    use crate::reward::{CostModel, RewardKind};

    fn controller(config: PolicyConfig) -> Controller {
        let model = RewardModel::new(
            RewardKind::SplitEe,
            CostModel::abstract_units(0.1, 1.0).unwrap(),
        );
        Controller::new(
            ArmSpace::splits(4, 0.9).unwrap(),
            DecisionRule::SPLITEE,
            model,
            &config,
            None,
        )
        .unwrap()
    }

    fn counts(c: &Controller) -> Vec<u64> {
        match c.policy() {
            AnyPolicy::Ucb1(p) => Ucb1::counts(p).to_vec(),
            other => panic!("unexpected policy {other:?}"),
        }
    }

    #[test]
    fn side_information_reaches_only_computable_shallower_arms() {
        let mut c = controller(PolicyConfig::SplitEeS { c: 1.0 });
        // Played split 3, exited there; layer 1 was confident (computable exit), layer 2 was
        // not (it would have offloaded: C_L unknown), split 4 is deeper.
        let conf = [0.95, 0.5, 0.97];
        c.learn(ArmIndex(2), &Observation::exited(&conf, 3))
            .unwrap();
        assert_eq!(counts(&c), vec![1, 0, 1, 0]);
        // Offloaded after 3: every shallower arm is computable.
        c.learn(
            ArmIndex(2),
            &Observation::offloaded(&[0.5, 0.5, 0.5], 3, 0.9),
        )
        .unwrap();
        assert_eq!(counts(&c), vec![2, 1, 2, 0]);
        assert_eq!(c.policy().steps(), 2);

        let mut plain = controller(PolicyConfig::Ucb1 { c: 1.0 });
        plain
            .learn(
                ArmIndex(2),
                &Observation::offloaded(&[0.5, 0.5, 0.5], 3, 0.9),
            )
            .unwrap();
        assert_eq!(counts(&plain), vec![0, 0, 1, 0]);
    }
}
