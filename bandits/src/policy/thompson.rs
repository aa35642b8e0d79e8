use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Policy, check_lengths, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::reward::RewardRange;

/// Gaussian Thompson sampling (Agrawal & Goyal, 2013).
///
/// Each arm's posterior is `N(μ̃_i, (σ·(hi − lo))² / (n_i + 1))` with
/// `μ̃_i = (S_i + m_0) / (n_i + 1)`, where one pseudo-observation at the middle of the reward
/// range `m_0 = (lo + hi)/2` stands in for the prior. Each round draws one sample per arm and
/// plays the largest (ties, which have probability zero, go to the lowest index). Normal
/// draws use Box–Muller on the seeded ChaCha8 stream, whose state is serialized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaussianThompson {
    sigma: f64,
    range: RewardRange,
    steps: u64,
    counts: Vec<u64>,
    sums: Vec<f64>,
    rng: ChaCha8Rng,
    /// Cached posterior mean and standard deviation per arm, so a draw is one multiply-add.
    post_mean: Vec<f64>,
    post_std: Vec<f64>,
}

impl GaussianThompson {
    pub fn new(
        num_arms: usize,
        sigma: f64,
        range: RewardRange,
        seed: u64,
    ) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_sigma(sigma)?;
        let mut policy = GaussianThompson {
            sigma,
            range,
            steps: 0,
            counts: vec![0; num_arms],
            sums: vec![0.0; num_arms],
            rng: ChaCha8Rng::seed_from_u64(seed),
            post_mean: vec![0.0; num_arms],
            post_std: vec![0.0; num_arms],
        };
        for arm in 0..num_arms {
            policy.refresh(arm);
        }
        Ok(policy)
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_sigma(self.sigma)?;
        let n = self.counts.len();
        check_lengths(
            n,
            &[self.sums.len(), self.post_mean.len(), self.post_std.len()],
        )?;
        if self.sums.iter().any(|s| !s.is_finite()) {
            return Err(BanditError::CorruptState("non-finite reward sum"));
        }
        for arm in 0..n {
            self.refresh(arm);
        }
        Ok(())
    }

    fn refresh(&mut self, arm: usize) {
        let prior = 0.5 * (self.range.lo() + self.range.hi());
        let n1 = self.counts[arm] as f64 + 1.0;
        self.post_mean[arm] = (self.sums[arm] + prior) / n1;
        self.post_std[arm] = self.sigma * self.range.width() / n1.sqrt();
    }
}

fn check_sigma(sigma: f64) -> Result<(), BanditError> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(BanditError::InvalidSigma(sigma))
    }
}

/// Two independent standard normals (Box–Muller).
#[inline]
fn normal_pair(rng: &mut ChaCha8Rng) -> (f64, f64) {
    // 1 − U lies in (0, 1], keeping ln finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

impl Policy for GaussianThompson {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    fn select(&mut self) -> ArmIndex {
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        let mut spare = None;
        for (i, (&m, &sd)) in self.post_mean.iter().zip(&self.post_std).enumerate() {
            let z = match spare.take() {
                Some(z) => z,
                None => {
                    let (a, b) = normal_pair(&mut self.rng);
                    spare = Some(b);
                    a
                }
            };
            let v = m + sd * z;
            if v > best_value {
                best = i;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        self.counts[arm] += 1;
        self.sums[arm] += reward;
        self.refresh(arm);
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}
