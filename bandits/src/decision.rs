use serde::{Deserialize, Serialize};

use crate::arms::Arm;
use crate::error::BanditError;

/// Where the device evaluates the exit test `C_j >= α`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitCheck {
    /// After every device layer `j <= s`; the first confident exit wins.
    EveryLayer,
    /// Only after the split layer `s` (SplitEE, AdaEE).
    SplitOnly,
}

/// What happens when the exit test fails at the split layer `s < L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Send the hidden state after layer `s` to the cloud (SplitEE, AdaEE, UCBEE).
    Offload,
    /// Infer at `s` anyway; there is no cloud (UEE-UCB, device-only CeeBERT).
    ExitAtSplit,
}

/// The per-sample rule shared by the edge agent and the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRule {
    pub check: ExitCheck,
    pub fallback: Fallback,
}

impl DecisionRule {
    /// SplitEE as published: test only at the split layer, offload on failure.
    pub const SPLITEE: DecisionRule = DecisionRule {
        check: ExitCheck::SplitOnly,
        fallback: Fallback::Offload,
    };
}

/// The final fate of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Infer on the device with the exit head of `layer`.
    Exit { layer: usize },
    /// Send the hidden state after layer `after` to the cloud.
    Offload { after: usize },
}

/// Result of feeding one layer to a [`SampleDecision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run the next layer on the device.
    Continue,
    Done(Decision),
}

/// Incremental, allocation-free exit/offload state machine for one sample.
///
/// The caller runs layer `j` on the device, then calls [`observe`](Self::observe) with the
/// confidence of exit `j` if it evaluated that head. [`needs_confidence`](Self::needs_confidence)
/// tells whether the head at `j` matters to the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleDecision {
    arm: Arm,
    rule: DecisionRule,
    num_layers: usize,
    next_layer: usize,
    done: Option<Decision>,
}

impl SampleDecision {
    pub fn new(arm: Arm, rule: DecisionRule, num_layers: usize) -> Self {
        SampleDecision {
            arm,
            rule,
            num_layers,
            next_layer: 1,
            done: None,
        }
    }

    /// The layer the device must compute next (1-based).
    pub fn next_layer(&self) -> usize {
        self.next_layer
    }

    pub fn decision(&self) -> Option<Decision> {
        self.done
    }

    /// Whether the exit test runs at `layer` under this arm and rule. It never runs when the
    /// whole model is on the device and `layer` is the last one: that sample exits there anyway.
    pub fn needs_confidence(&self, layer: usize) -> bool {
        let s = self.arm.split;
        let tested = match self.rule.check {
            ExitCheck::EveryLayer => layer <= s,
            ExitCheck::SplitOnly => layer == s,
        };
        tested && !(layer == s && s == self.num_layers)
    }

    /// Feed layer `layer` (must be [`next_layer`](Self::next_layer)) and the confidence of its
    /// exit head, `None` if it was not evaluated.
    pub fn observe(&mut self, layer: usize, confidence: Option<f64>) -> Result<Step, BanditError> {
        if self.done.is_some() {
            return Err(BanditError::DecisionAlreadyMade);
        }
        if layer != self.next_layer {
            return Err(BanditError::LayerOutOfOrder {
                expected: self.next_layer,
                got: layer,
            });
        }
        if layer > self.num_layers {
            return Err(BanditError::LayerOutOfRange {
                layer,
                num_layers: self.num_layers,
            });
        }
        let s = self.arm.split;
        let decision = if layer == s && s == self.num_layers {
            // Nothing is left to offload to: the last layer always infers on the device.
            Some(Decision::Exit { layer })
        } else if self.needs_confidence(layer) {
            let c = confidence.ok_or(BanditError::MissingConfidence { layer })?;
            if !(0.0..=1.0).contains(&c) {
                return Err(BanditError::ConfidenceOutOfRange { layer, value: c });
            }
            if c >= self.arm.threshold {
                Some(Decision::Exit { layer })
            } else if layer == s {
                Some(match self.rule.fallback {
                    Fallback::Offload => Decision::Offload { after: s },
                    Fallback::ExitAtSplit => Decision::Exit { layer: s },
                })
            } else {
                None
            }
        } else {
            None
        };
        self.next_layer += 1;
        match decision {
            Some(d) => {
                self.done = Some(d);
                Ok(Step::Done(d))
            }
            None => Ok(Step::Continue),
        }
    }
}

/// Decide from the confidences the device has (`confidences[j - 1]` is `C_j`; NaN or a short
/// slice mean "not evaluated"). Returns `None` when the decision needs a confidence that is not
/// there, which is how counterfactual rewards avoid inventing data.
pub fn decide(
    arm: Arm,
    rule: DecisionRule,
    num_layers: usize,
    confidences: &[f64],
) -> Option<Decision> {
    let mut state = SampleDecision::new(arm, rule, num_layers);
    for layer in 1..=arm.split.min(num_layers) {
        let c = confidences.get(layer - 1).copied().filter(|c| !c.is_nan());
        if state.needs_confidence(layer) && c.is_none() {
            return None;
        }
        match state.observe(layer, c) {
            Ok(Step::Done(d)) => return Some(d),
            Ok(Step::Continue) => {}
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: DecisionRule = DecisionRule {
        check: ExitCheck::EveryLayer,
        fallback: Fallback::Offload,
    };

    fn arm(split: usize, threshold: f64) -> Arm {
        Arm { split, threshold }
    }

    #[test]
    fn every_layer_exits_at_the_first_confident_layer() {
        let c = [0.5, 0.95, 0.7, 0.99];
        assert_eq!(
            decide(arm(4, 0.9), EVERY, 6, &c),
            Some(Decision::Exit { layer: 2 })
        );
        assert_eq!(
            decide(arm(1, 0.9), EVERY, 6, &c),
            Some(Decision::Offload { after: 1 })
        );
    }

    #[test]
    fn split_only_ignores_earlier_exits() {
        let c = [0.5, 0.95, 0.7, 0.99];
        let rule = DecisionRule::SPLITEE;
        assert_eq!(
            decide(arm(3, 0.9), rule, 6, &c),
            Some(Decision::Offload { after: 3 })
        );
        assert_eq!(
            decide(arm(4, 0.9), rule, 6, &c),
            Some(Decision::Exit { layer: 4 })
        );
        // Earlier heads need not be evaluated.
        let sparse = [f64::NAN, f64::NAN, 0.95];
        assert_eq!(
            decide(arm(3, 0.9), rule, 6, &sparse),
            Some(Decision::Exit { layer: 3 })
        );
    }

    #[test]
    fn the_last_layer_always_exits_and_exit_at_split_never_offloads() {
        let c = [0.1; 6];
        assert_eq!(
            decide(arm(6, 0.9), EVERY, 6, &c),
            Some(Decision::Exit { layer: 6 })
        );
        let no_cloud = DecisionRule {
            check: ExitCheck::SplitOnly,
            fallback: Fallback::ExitAtSplit,
        };
        assert_eq!(
            decide(arm(3, 0.9), no_cloud, 6, &c),
            Some(Decision::Exit { layer: 3 })
        );
    }

    #[test]
    fn threshold_is_inclusive() {
        assert_eq!(
            decide(arm(2, 0.8), EVERY, 4, &[0.8, 0.1]),
            Some(Decision::Exit { layer: 1 })
        );
    }

    #[test]
    fn missing_confidence_gives_no_decision() {
        assert_eq!(decide(arm(3, 0.9), EVERY, 6, &[0.5, f64::NAN, 0.95]), None);
        assert_eq!(decide(arm(3, 0.9), EVERY, 6, &[0.5]), None);
    }

    #[test]
    fn state_machine_rejects_misuse() {
        let mut s = SampleDecision::new(arm(2, 0.9), EVERY, 4);
        assert!(s.needs_confidence(1));
        assert_eq!(
            s.observe(2, Some(0.5)),
            Err(BanditError::LayerOutOfOrder {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(
            s.observe(1, None),
            Err(BanditError::MissingConfidence { layer: 1 })
        );
        assert_eq!(
            s.observe(1, Some(1.5)),
            Err(BanditError::ConfidenceOutOfRange {
                layer: 1,
                value: 1.5
            })
        );
        assert_eq!(s.observe(1, Some(0.5)), Ok(Step::Continue));
        assert_eq!(
            s.observe(2, Some(0.5)),
            Ok(Step::Done(Decision::Offload { after: 2 }))
        );
        assert_eq!(s.decision(), Some(Decision::Offload { after: 2 }));
        assert_eq!(
            s.observe(3, Some(0.5)),
            Err(BanditError::DecisionAlreadyMade)
        );
    }
}
