use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Policy, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::measure::first_max_index;

/// Always the same arm: a fixed split/threshold as deployed without learning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixedArm {
    num_arms: usize,
    arm: usize,
    steps: u64,
}

impl FixedArm {
    pub fn new(num_arms: usize, arm: usize) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        if arm >= num_arms {
            return Err(BanditError::ArmOutOfRange { arm, num_arms });
        }
        Ok(FixedArm {
            num_arms,
            arm,
            steps: 0,
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        Self::new(self.num_arms, self.arm).map(|_| ())
    }
}

impl Policy for FixedArm {
    fn num_arms(&self) -> usize {
        self.num_arms
    }

    fn select(&mut self) -> ArmIndex {
        ArmIndex(self.arm)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        check_update(arm, reward, self.num_arms)?;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

/// Uniformly random arm each round (seeded ChaCha8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniformRandom {
    num_arms: usize,
    steps: u64,
    rng: ChaCha8Rng,
}

impl UniformRandom {
    pub fn new(num_arms: usize, seed: u64) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        Ok(UniformRandom {
            num_arms,
            steps: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_num_arms(self.num_arms)
    }
}

impl Policy for UniformRandom {
    fn num_arms(&self) -> usize {
        self.num_arms
    }

    fn select(&mut self) -> ArmIndex {
        ArmIndex(self.rng.random_range(0..self.num_arms))
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        check_update(arm, reward, self.num_arms)?;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

/// Knows the arm means in hindsight and always plays the best (lowest index among equals).
/// Its purpose is the yardstick for regret: `regret = Σ_t (μ* − μ_{a_t})`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Oracle {
    means: Vec<f64>,
    best: usize,
    steps: u64,
}

impl Oracle {
    pub fn new(means: Vec<f64>) -> Result<Self, BanditError> {
        check_num_arms(means.len())?;
        if let Some(index) = means.iter().position(|m| !m.is_finite()) {
            return Err(BanditError::NonFiniteMean { index });
        }
        let best = first_max_index(means.iter().copied());
        Ok(Oracle {
            means,
            best,
            steps: 0,
        })
    }

    pub fn best(&self) -> ArmIndex {
        ArmIndex(self.best)
    }

    pub fn means(&self) -> &[f64] {
        &self.means
    }

    /// Expected regret of playing `arm` once: `μ* − μ_arm`; `None` for an arm out of range.
    pub fn gap(&self, arm: ArmIndex) -> Option<f64> {
        self.means.get(arm.0).map(|m| self.means[self.best] - m)
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        let fresh = Self::new(std::mem::take(&mut self.means))?;
        self.means = fresh.means;
        self.best = fresh.best;
        Ok(())
    }
}

impl Policy for Oracle {
    fn num_arms(&self) -> usize {
        self.means.len()
    }

    fn select(&mut self) -> ArmIndex {
        ArmIndex(self.best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        check_update(arm, reward, self.means.len())?;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}
