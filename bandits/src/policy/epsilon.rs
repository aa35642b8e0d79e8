use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Policy, check_lengths, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::measure::first_max_index;

/// ε-greedy: after playing every arm once (lowest index first), explore a uniformly random
/// arm with probability `ε`, otherwise play the best empirical mean (ties: lowest index).
///
/// With a constant `ε` its regret is linear (`≈ ε·T·mean gap`); it is here as the simple
/// baseline the papers compare against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpsilonGreedy {
    epsilon: f64,
    steps: u64,
    counts: Vec<u64>,
    means: Vec<f64>,
    rng: ChaCha8Rng,
}

impl EpsilonGreedy {
    pub fn new(num_arms: usize, epsilon: f64, seed: u64) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_epsilon(epsilon)?;
        Ok(EpsilonGreedy {
            epsilon,
            steps: 0,
            counts: vec![0; num_arms],
            means: vec![0.0; num_arms],
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_epsilon(self.epsilon)?;
        check_lengths(self.counts.len(), &[self.means.len()])?;
        if self.means.iter().any(|m| !m.is_finite()) {
            return Err(BanditError::CorruptState("non-finite mean"));
        }
        Ok(())
    }
}

fn check_epsilon(epsilon: f64) -> Result<(), BanditError> {
    if (0.0..=1.0).contains(&epsilon) {
        Ok(())
    } else {
        Err(BanditError::InvalidEpsilon(epsilon))
    }
}

impl Policy for EpsilonGreedy {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    fn select(&mut self) -> ArmIndex {
        if let Some(i) = self.counts.iter().position(|&n| n == 0) {
            return ArmIndex(i);
        }
        if self.rng.random::<f64>() < self.epsilon {
            ArmIndex(self.rng.random_range(0..self.counts.len()))
        } else {
            ArmIndex(first_max_index(self.means.iter().copied()))
        }
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        self.counts[arm] += 1;
        self.means[arm] += (reward - self.means[arm]) / self.counts[arm] as f64;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}
