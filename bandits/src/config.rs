//! The `[arms]` table that the edge agent and the simulator both read: which arms to play and
//! where the exit test runs. One definition, so a configuration means the same on both sides.

use serde::{Deserialize, Serialize};

use crate::arms::ArmSpace;
use crate::decision::{DecisionRule, ExitCheck, Fallback};
use crate::error::BanditError;

/// Split layers of the arm grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Splits {
    /// `"exits"`: every layer that has an exit head.
    Keyword(String),
    List(Vec<usize>),
}

/// ```toml
/// splits = "exits"        # every exit layer; or a list [1, 2, 6]
/// thresholds = [0.9]      # grid splits × thresholds, split-major
/// check = "split-only"    # | "every-layer"
/// fallback = "offload"    # | "exit-at-split"
/// evaluate_all_heads = true
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmsConfig {
    pub splits: Splits,
    pub thresholds: Vec<f64>,
    #[serde(default = "split_only")]
    pub check: ExitCheck,
    #[serde(default = "offload")]
    pub fallback: Fallback,
    /// Evaluate every exit head up to the split, also those the rule does not test: costs a
    /// head per layer, and gives side-information policies (SplitEE-S) more to learn from.
    #[serde(default = "yes")]
    pub evaluate_all_heads: bool,
}

fn split_only() -> ExitCheck {
    ExitCheck::SplitOnly
}

fn offload() -> Fallback {
    Fallback::Offload
}

fn yes() -> bool {
    true
}

impl ArmsConfig {
    /// The split layers, `"exits"` resolved against the model's `exit_layers`.
    pub fn split_layers(&self, exit_layers: &[usize]) -> Result<Vec<usize>, BanditError> {
        match &self.splits {
            Splits::Keyword(k) if k == "exits" => Ok(exit_layers.to_vec()),
            Splits::Keyword(k) => Err(BanditError::UnknownSplits(k.clone())),
            Splits::List(list) => Ok(list.clone()),
        }
    }

    /// The arm grid and decision rule over a model of `num_layers` layers with exit heads after
    /// `exit_layers`. Every layer the rule may test must have a head.
    pub fn build(
        &self,
        num_layers: usize,
        exit_layers: &[usize],
    ) -> Result<(ArmSpace, DecisionRule), BanditError> {
        let splits = self.split_layers(exit_layers)?;
        let space = ArmSpace::grid(num_layers, &splits, &self.thresholds)?;
        let rule = DecisionRule {
            check: self.check,
            fallback: self.fallback,
        };
        for arm in space.arms() {
            let state = crate::SampleDecision::new(*arm, rule, num_layers);
            if let Some(layer) =
                (1..=arm.split).find(|&l| state.needs_confidence(l) && !exit_layers.contains(&l))
            {
                return Err(BanditError::NoExitHead {
                    layer,
                    split: arm.split,
                });
            }
        }
        Ok((space, rule))
    }

    /// `"exits"` or the list, for reports.
    pub fn describe_splits(&self) -> String {
        match &self.splits {
            Splits::Keyword(k) => k.clone(),
            Splits::List(l) => format!("{l:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ArmsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn exits_keyword_resolves_to_the_model_heads() {
        let arms = config("splits = \"exits\"\nthresholds = [0.8, 0.9]");
        let (space, rule) = arms.build(6, &[2, 4, 6]).unwrap();
        assert_eq!(space.len(), 6);
        assert_eq!(space.arms()[2].split, 4);
        assert_eq!(rule, DecisionRule::SPLITEE);
    }

    #[test]
    fn a_tested_layer_without_a_head_is_rejected() {
        let arms = config("splits = [3]\nthresholds = [0.9]");
        assert_eq!(
            arms.build(6, &[2, 4, 6]),
            Err(BanditError::NoExitHead { layer: 3, split: 3 })
        );
        let every = config("splits = [4]\nthresholds = [0.9]\ncheck = \"every-layer\"");
        assert_eq!(
            every.build(6, &[2, 4, 6]),
            Err(BanditError::NoExitHead { layer: 1, split: 4 })
        );
    }

    #[test]
    fn unknown_keyword_is_named() {
        let arms = config("splits = \"all\"\nthresholds = [0.9]");
        assert_eq!(
            arms.build(6, &[6]),
            Err(BanditError::UnknownSplits("all".into()))
        );
    }
}
