use serde::{Deserialize, Serialize};

use crate::error::BanditError;

/// Index of an arm inside an [`ArmSpace`]. Indices are stable: they depend only on how the
/// space was built, so they can be stored, logged and compared across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArmIndex(pub usize);

impl ArmIndex {
    pub fn get(self) -> usize {
        self.0
    }
}

/// One arm: run layers `1..=split` on the device, with exit threshold `threshold`.
///
/// `split == num_layers` means the whole model runs on the device (nothing is offloaded).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// Last layer computed on the device, 1-based.
    pub split: usize,
    /// Exit when the max softmax probability is `>= threshold`.
    pub threshold: f64,
}

/// A finite, validated, ordered set of arms over a model with `num_layers` layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawArmSpace")]
pub struct ArmSpace {
    num_layers: usize,
    arms: Vec<Arm>,
}

/// Unvalidated wire form, so a deserialized space goes through the same checks as a built one.
#[derive(Deserialize)]
struct RawArmSpace {
    num_layers: usize,
    arms: Vec<Arm>,
}

impl TryFrom<RawArmSpace> for ArmSpace {
    type Error = BanditError;
    fn try_from(raw: RawArmSpace) -> Result<Self, BanditError> {
        ArmSpace::from_arms(raw.num_layers, raw.arms)
    }
}

impl ArmSpace {
    /// Any list of arms; index `i` is `arms[i]`. Duplicates are rejected because side
    /// information looks arms up by value.
    pub fn from_arms(num_layers: usize, arms: Vec<Arm>) -> Result<Self, BanditError> {
        if num_layers == 0 {
            return Err(BanditError::NoLayers);
        }
        if arms.is_empty() {
            return Err(BanditError::EmptyArmSet);
        }
        for (index, arm) in arms.iter().enumerate() {
            if arm.split == 0 || arm.split > num_layers {
                return Err(BanditError::SplitOutOfRange {
                    split: arm.split,
                    num_layers,
                });
            }
            check_threshold(arm.threshold)?;
            if arms[..index].contains(arm) {
                return Err(BanditError::DuplicateArm { index });
            }
        }
        Ok(ArmSpace { num_layers, arms })
    }

    /// SplitEE: every split layer `1..=num_layers` with one fixed threshold; arm `i` splits
    /// after layer `i + 1`.
    pub fn splits(num_layers: usize, threshold: f64) -> Result<Self, BanditError> {
        Self::from_arms(
            num_layers,
            (1..=num_layers)
                .map(|split| Arm { split, threshold })
                .collect(),
        )
    }

    /// CeeBERT / UCBEE / AdaEE: a fixed exit (split) layer, the threshold is learned; arm `i`
    /// uses `thresholds[i]`.
    pub fn thresholds(
        num_layers: usize,
        split: usize,
        thresholds: &[f64],
    ) -> Result<Self, BanditError> {
        Self::from_arms(
            num_layers,
            thresholds
                .iter()
                .map(|&threshold| Arm { split, threshold })
                .collect(),
        )
    }

    /// The joint grid, split-major: arm `i * thresholds.len() + j` is
    /// `(splits[i], thresholds[j])`.
    pub fn grid(
        num_layers: usize,
        splits: &[usize],
        thresholds: &[f64],
    ) -> Result<Self, BanditError> {
        Self::from_arms(
            num_layers,
            splits
                .iter()
                .flat_map(|&split| {
                    thresholds
                        .iter()
                        .map(move |&threshold| Arm { split, threshold })
                })
                .collect(),
        )
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn len(&self) -> usize {
        self.arms.len()
    }

    /// Always false: an empty space cannot be built. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.arms.is_empty()
    }

    pub fn arms(&self) -> &[Arm] {
        &self.arms
    }

    pub fn get(&self, index: ArmIndex) -> Option<Arm> {
        self.arms.get(index.0).copied()
    }

    /// The index of `arm`, if present (exact comparison of the threshold).
    pub fn index_of(&self, arm: Arm) -> Option<ArmIndex> {
        self.arms.iter().position(|a| *a == arm).map(ArmIndex)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ArmIndex, Arm)> + '_ {
        self.arms.iter().enumerate().map(|(i, a)| (ArmIndex(i), *a))
    }
}

pub(crate) fn check_threshold(threshold: f64) -> Result<(), BanditError> {
    if (0.0..=1.0).contains(&threshold) {
        Ok(())
    } else {
        Err(BanditError::ThresholdOutOfRange(threshold))
    }
}
