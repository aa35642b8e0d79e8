//! The tables that the edge agent and the simulator both read: `[arms]` (which arms to play and
//! where the exit test runs), `[reward]` (what a sample costs and earns) and `[device]` (a
//! device's per-layer cost profile). `[exits]` is [`ExitsConfig`](crate::ExitsConfig) and
//! `[policy]` [`PolicyConfig`](crate::PolicyConfig). One definition each, so a configuration
//! means the same on both sides: any agent config runs unchanged in the simulator.

use serde::{Deserialize, Serialize};

use crate::arms::ArmSpace;
use crate::decision::{DecisionRule, ExitCheck, Fallback};
use crate::error::BanditError;
use crate::reward::{CostModel, EdgeCost, OffloadCost, RewardKind, RewardModel, RewardRange};

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
/// # allowed = [[2, 0.9], [6, 0.9]]   # only these (split, threshold) of the grid, e.g. the
/// #                                   # certified ones `simulations calibrate` writes
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
    /// Restricts the grid to these `(split, threshold)` pairs (a certified set: see
    /// [`crate::calibrate`]); each must be in the grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<(usize, f64)>>,
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
        let mut space = ArmSpace::grid(num_layers, &splits, &self.thresholds)?;
        if let Some(allowed) = &self.allowed {
            let grid = space.arms();
            for &(split, threshold) in allowed {
                if !grid
                    .iter()
                    .any(|a| a.split == split && a.threshold == threshold)
                {
                    return Err(BanditError::InvalidConfig(format!(
                        "arms.allowed: ({split}, {threshold}) is not in the grid of splits {} × \
                         thresholds {:?}",
                        self.describe_splits(),
                        self.thresholds
                    )));
                }
            }
            let kept = grid
                .iter()
                .copied()
                .filter(|a| allowed.contains(&(a.split, a.threshold)))
                .collect();
            space = ArmSpace::from_arms(num_layers, kept)?;
        }
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

/// What an edge layer costs the bandit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeCosts {
    /// Each sample's own device clock (ms).
    #[default]
    Measured,
    /// The `[device]` profile's per-layer times, scaled by the sample's tokens: steadier than
    /// single measurements, and a way to price a device other than the one running.
    Profile,
    /// Abstract units as in the papers: `cost_edge(i) = i`.
    Layers,
}

/// The `[reward]` table.
///
/// ```toml
/// kind = "split-ee"         # | "ada-ee" | "uee-proxy"
/// lambda = 0.002            # reward units per cost unit (per millisecond when measured)
/// edge_costs = "measured"   # | "profile" (the [device] table) | "layers" (abstract)
/// # layer_costs = [1, 1, 2]  # edge_costs = "layers": each layer's units (default 1 each)
/// # offload = 0.5           # a constant offload cost o (abstract units); absent: measured
/// ms_per_kb = 0.0           # measured offloads: cost per KiB sent (radio energy, data plans)
/// cost_scale_ms = 200       # rewards are assumed ≥ −λ·cost_scale_ms (exploration width)
/// ```
///
/// With `edge_costs = "layers"` and a constant `offload` (the papers' setting) the reward range
/// follows from the model and `cost_scale_ms` is not used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    pub kind: RewardKind,
    pub lambda: f64,
    pub edge_costs: EdgeCosts,
    pub layer_costs: Option<Vec<f64>>,
    pub offload: Option<f64>,
    pub ms_per_kb: f64,
    pub cost_scale_ms: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            kind: RewardKind::SplitEe,
            lambda: 0.002,
            edge_costs: EdgeCosts::Measured,
            layer_costs: None,
            offload: None,
            ms_per_kb: 0.0,
            cost_scale_ms: 200.0,
        }
    }
}

impl RewardConfig {
    /// Checks what can be checked without the model: the scalars, and that a profile has a
    /// `[device]` table to come from.
    pub fn validate(&self, device: Option<&DeviceProfile>) -> Result<(), BanditError> {
        let invalid = |message: String| Err(BanditError::InvalidConfig(message));
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return invalid(format!(
                "reward.lambda must be finite and >= 0, got {}",
                self.lambda
            ));
        }
        if !(self.ms_per_kb.is_finite() && self.ms_per_kb >= 0.0) {
            return invalid(format!(
                "reward.ms_per_kb must be finite and >= 0, got {}",
                self.ms_per_kb
            ));
        }
        if let Some(o) = self.offload {
            if !(o.is_finite() && o >= 0.0) {
                return invalid(format!("reward.offload must be finite and >= 0, got {o}"));
            }
            if self.ms_per_kb != 0.0 {
                return invalid(
                    "reward.ms_per_kb prices measured offloads; with a constant reward.offload \
                     it must be 0"
                        .into(),
                );
            }
        }
        if !(self.cost_scale_ms.is_finite() && self.cost_scale_ms > 0.0) {
            return invalid(format!(
                "reward.cost_scale_ms must be finite and > 0, got {}",
                self.cost_scale_ms
            ));
        }
        if self.layer_costs.is_some() && self.edge_costs != EdgeCosts::Layers {
            return invalid("reward.layer_costs goes with edge_costs = \"layers\"".into());
        }
        if self.edge_costs == EdgeCosts::Profile && device.is_none() {
            return invalid(
                "reward.edge_costs = \"profile\" needs a [device] profile (run `edge-agent \
                 profile`, or copy one from configs/devices/)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The reward model and the range the policy scales its exploration by, for a model of
    /// `num_layers` layers; `device` is the `[device]` table, needed by `edge_costs = "profile"`.
    pub fn build(
        &self,
        num_layers: usize,
        device: Option<&DeviceProfile>,
    ) -> Result<(RewardModel, RewardRange), BanditError> {
        self.validate(device)?;
        let edge = match self.edge_costs {
            EdgeCosts::Measured => EdgeCost::Measured,
            EdgeCosts::Layers => match &self.layer_costs {
                None => EdgeCost::Layers,
                Some(per_layer) => EdgeCost::Units(
                    per_layer
                        .iter()
                        .scan(0.0, |total, c| {
                            *total += c;
                            Some(*total)
                        })
                        .collect(),
                ),
            },
            EdgeCosts::Profile => {
                let device = device.expect("validated: a profile has its [device] table");
                device.validate(num_layers)?;
                EdgeCost::Profile {
                    cumulative: device.cumulative_ms(),
                    ref_tokens: device.ref_tokens,
                }
            }
        };
        let cost = CostModel {
            lambda: self.lambda,
            edge,
            offload: self
                .offload
                .map_or(OffloadCost::Measured, OffloadCost::Constant),
            per_kb: self.ms_per_kb,
        };
        let model = RewardModel::new(self.kind, cost);
        model.validate(num_layers)?;
        let range = match model.range(num_layers) {
            Ok(range) => range,
            Err(BanditError::RewardRangeUnknown) => {
                RewardRange::new(-self.lambda * self.cost_scale_ms, 1.0)?
            }
            Err(error) => return Err(error),
        };
        Ok((model, range))
    }
}

/// A device's cost per encoder layer: the `[device]` table of an agent config (written by
/// `edge-agent profile`) and the presets in `configs/devices/`.
///
/// ```toml
/// name = "raspberry-pi-4-minilm"                 # optional
/// description = "ESTIMATE, not a measurement: …" # say where the figures come from
/// layer_ms = [8.0, 8.0, 8.0, 8.0, 8.0, 8.0]      # encoder layer j (index j − 1), exit head included
/// embed_ms = 0.5                                 # tokenizing and embedding (default 0)
/// ref_tokens = 32                                # the token count these times are for
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub layer_ms: Vec<f64>,
    #[serde(default)]
    pub embed_ms: f64,
    pub ref_tokens: f64,
}

impl DeviceProfile {
    /// Checks the values that parse but cannot be used; `num_layers` is the model's.
    pub fn validate(&self, num_layers: usize) -> Result<(), BanditError> {
        let invalid = |message: String| Err(BanditError::InvalidConfig(message));
        if self.layer_ms.len() != num_layers {
            return invalid(format!(
                "device.layer_ms has {} entries but the model has {num_layers} layers",
                self.layer_ms.len()
            ));
        }
        if !self
            .layer_ms
            .iter()
            .chain([&self.embed_ms])
            .all(|ms| ms.is_finite() && *ms >= 0.0)
        {
            return invalid("device.layer_ms and device.embed_ms must be finite and >= 0".into());
        }
        if !(self.ref_tokens.is_finite() && self.ref_tokens > 0.0) {
            return invalid(format!(
                "device.ref_tokens must be > 0, got {}",
                self.ref_tokens
            ));
        }
        Ok(())
    }

    /// `cumulative[i − 1]`: embedding and layers `1..=i`, at `ref_tokens` tokens.
    pub fn cumulative_ms(&self) -> Vec<f64> {
        self.layer_ms
            .iter()
            .scan(self.embed_ms, |total, ms| {
                *total += ms;
                Some(*total)
            })
            .collect()
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
    fn allowed_restricts_the_grid_to_known_arms() {
        let arms =
            config("splits = [2, 6]\nthresholds = [0.8, 0.9]\nallowed = [[6, 0.9], [2, 0.9]]");
        let (space, _) = arms.build(6, &[2, 4, 6]).unwrap();
        let pairs: Vec<(usize, f64)> = space
            .arms()
            .iter()
            .map(|a| (a.split, a.threshold))
            .collect();
        assert_eq!(pairs, [(2, 0.9), (6, 0.9)], "grid order kept");
        let stray = config("splits = [2, 6]\nthresholds = [0.9]\nallowed = [[4, 0.9]]");
        let error = stray.build(6, &[2, 4, 6]).unwrap_err().to_string();
        assert!(error.contains("(4, 0.9) is not in the grid"), "{error}");
        let none = config("splits = [2]\nthresholds = [0.9]\nallowed = []");
        assert_eq!(none.build(6, &[2, 6]), Err(BanditError::EmptyArmSet));
    }

    #[test]
    fn unknown_keyword_is_named() {
        let arms = config("splits = \"all\"\nthresholds = [0.9]");
        assert_eq!(
            arms.build(6, &[6]),
            Err(BanditError::UnknownSplits("all".into()))
        );
    }

    #[test]
    fn the_reward_table_builds_the_papers_and_the_measured_settings() {
        let abstract_units: RewardConfig =
            toml::from_str("edge_costs = \"layers\"\nlambda = 0.1\noffload = 2.0").unwrap();
        let (model, range) = abstract_units.build(6, None).unwrap();
        assert_eq!(model.cost, CostModel::abstract_units(0.1, 2.0).unwrap());
        assert!((range.lo() + 0.8).abs() < 1e-12, "derived: −λ·(L + o)");

        let measured = RewardConfig::default();
        let (model, range) = measured.build(6, None).unwrap();
        assert_eq!(model.cost.edge, EdgeCost::Measured);
        assert_eq!(model.cost.offload, OffloadCost::Measured);
        assert!((range.lo() + 0.4).abs() < 1e-12, "−λ·cost_scale_ms");
    }

    #[test]
    fn a_profile_needs_a_device_table_that_fits_the_model() {
        let profile: RewardConfig = toml::from_str("edge_costs = \"profile\"").unwrap();
        let error = profile.build(2, None).unwrap_err().to_string();
        assert!(error.contains("[device]"), "{error}");
        let device: DeviceProfile =
            toml::from_str("layer_ms = [3.0, 4.0]\nembed_ms = 1.0\nref_tokens = 16").unwrap();
        assert_eq!(device.cumulative_ms(), [4.0, 8.0]);
        let (model, _) = profile.build(2, Some(&device)).unwrap();
        assert_eq!(
            model.cost.edge,
            EdgeCost::Profile {
                cumulative: vec![4.0, 8.0],
                ref_tokens: 16.0
            }
        );
        let error = profile.build(3, Some(&device)).unwrap_err().to_string();
        assert!(error.contains("device.layer_ms has 2 entries"), "{error}");
        let units: RewardConfig =
            toml::from_str("edge_costs = \"layers\"\nlayer_costs = [1, 3]\noffload = 1.0").unwrap();
        let (model, range) = units.build(2, None).unwrap();
        assert_eq!(model.cost.edge, EdgeCost::Units(vec![1.0, 4.0]));
        assert!((range.lo() + 0.002 * 5.0).abs() < 1e-12);
        assert!(units.build(3, None).is_err(), "one cost per layer");
        let bytes: RewardConfig = toml::from_str("offload = 1.0\nms_per_kb = 0.5").unwrap();
        assert!(
            bytes
                .build(2, None)
                .unwrap_err()
                .to_string()
                .contains("ms_per_kb")
        );
        let typo = toml::from_str::<RewardConfig>("lamda = 0.1").unwrap_err();
        assert!(typo.to_string().contains("lamda"), "{typo}");
    }
}
