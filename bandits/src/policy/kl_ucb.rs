use serde::{Deserialize, Serialize};

use super::{Policy, check_exploration, check_lengths, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::reward::RewardRange;

/// KL-UCB for bounded rewards (Garivier & Cappé, 2011).
///
/// Rewards are mapped into `[0, 1]` by the declared [`RewardRange`] (values outside it are
/// clamped), and the index of arm `i` is
/// `max { q ∈ [μ̂_i, 1] : n_i · kl(μ̂_i, q) ≤ ln t + c·ln ln t }` with the Bernoulli divergence
/// `kl(p, q) = p·ln(p/q) + (1−p)·ln((1−p)/(1−q))`, found by bisection. Bernoulli KL is the
/// tightest bound valid for every distribution on `[0, 1]`, so it never explores less than
/// it should and usually much less than UCB1. `c = 0` is the recommended practical choice;
/// `c = 3` is the one the regret proof covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlUcb {
    c: f64,
    range: RewardRange,
    steps: u64,
    counts: Vec<u64>,
    /// Means of the normalised rewards, in `[0, 1]`.
    means: Vec<f64>,
}

/// 2^-30 precision: far below any difference between arm means that matters.
const BISECTION_STEPS: u32 = 30;

impl KlUcb {
    pub fn new(num_arms: usize, c: f64, range: RewardRange) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_exploration(c)?;
        Ok(KlUcb {
            c,
            range,
            steps: 0,
            counts: vec![0; num_arms],
            means: vec![0.0; num_arms],
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_exploration(self.c)?;
        check_lengths(self.counts.len(), &[self.means.len()])?;
        if self.means.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err(BanditError::CorruptState("KL-UCB mean outside [0, 1]"));
        }
        Ok(())
    }
}

/// Bernoulli KL divergence, with `0·ln 0 = 0`.
fn kl_bernoulli(p: f64, q: f64) -> f64 {
    const EPS: f64 = 1e-15;
    let q = q.clamp(EPS, 1.0 - EPS);
    let mut kl = 0.0;
    if p > 0.0 {
        kl += p * (p / q).ln();
    }
    if p < 1.0 {
        kl += (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln();
    }
    kl
}

/// Largest `q ∈ [p, 1]` with `kl(p, q) ≤ budget`.
fn kl_upper(p: f64, budget: f64) -> f64 {
    if budget <= 0.0 {
        return p;
    }
    let (mut lo, mut hi) = (p, 1.0);
    for _ in 0..BISECTION_STEPS {
        let mid = 0.5 * (lo + hi);
        if kl_bernoulli(p, mid) > budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    lo
}

impl Policy for KlUcb {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    fn select(&mut self) -> ArmIndex {
        if let Some(i) = self.counts.iter().position(|&n| n == 0) {
            return ArmIndex(i);
        }
        let ln_t = (self.steps.max(1) as f64).ln();
        let exploration = ln_t + self.c * ln_t.ln().max(0.0);
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for (i, (&n, &m)) in self.counts.iter().zip(&self.means).enumerate() {
            let v = kl_upper(m, exploration / n as f64);
            if v > best_value {
                best = i;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        let x = self.range.normalize(reward);
        self.counts[arm] += 1;
        let mean = &mut self.means[arm];
        *mean = (*mean + (x - *mean) / self.counts[arm] as f64).clamp(0.0, 1.0);
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_upper_satisfies_the_budget_tightly() {
        for &p in &[0.0, 0.1, 0.5, 0.9, 1.0] {
            for &budget in &[0.001, 0.1, 1.0] {
                let q = kl_upper(p, budget);
                assert!(q >= p && q <= 1.0);
                assert!(kl_bernoulli(p, q) <= budget + 1e-9);
                if q < 1.0 - 1e-6 {
                    assert!(kl_bernoulli(p, q + 1e-6) > budget - 1e-6);
                }
            }
        }
    }
}
