use serde::{Deserialize, Serialize};

use super::{Policy, check_exploration, check_lengths, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::reward::RewardRange;

/// UCB1 with index `μ̂_i + c·(hi − lo)·sqrt(ln t / n_i)`, and SplitEE-S when side information
/// is enabled.
///
/// Scaling the bonus by the range width makes `c` mean the same thing whatever the units of
/// the costs: with rewards in `[0, 1]` it is the papers' constant. Unplayed arms are played
/// first, lowest index first.
///
/// `ln t` is computed once per step, and `1/sqrt(n_i)` once per update of arm `i`, so a
/// selection costs one multiply-add per arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ucb1 {
    c: f64,
    range: RewardRange,
    side_information: bool,
    steps: u64,
    counts: Vec<u64>,
    means: Vec<f64>,
    cache: Cache,
}

/// Derived values; serialized so the type round-trips on its own, and rebuilt by
/// [`AnyPolicy`](super::AnyPolicy)'s deserialization rather than trusted from a file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct Cache {
    inv_sqrt_counts: Vec<f64>,
    bonus: f64,
    unplayed: usize,
}

impl Ucb1 {
    pub fn new(num_arms: usize, c: f64, range: RewardRange) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_exploration(c)?;
        let mut policy = Ucb1 {
            c,
            range,
            side_information: false,
            steps: 0,
            counts: vec![0; num_arms],
            means: vec![0.0; num_arms],
            cache: Cache::default(),
        };
        policy.rebuild_cache();
        Ok(policy)
    }

    /// SplitEE-S: side rewards update `n_i` and `μ̂_i` like played rewards, but not `t`.
    pub fn with_side_information(
        num_arms: usize,
        c: f64,
        range: RewardRange,
    ) -> Result<Self, BanditError> {
        let mut policy = Self::new(num_arms, c, range)?;
        policy.side_information = true;
        Ok(policy)
    }

    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    pub fn means(&self) -> &[f64] {
        &self.means
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_exploration(self.c)?;
        check_lengths(self.counts.len(), &[self.means.len()])?;
        if self.means.iter().any(|m| !m.is_finite()) {
            return Err(BanditError::CorruptState("non-finite mean"));
        }
        self.rebuild_cache();
        Ok(())
    }

    fn rebuild_cache(&mut self) {
        self.cache.inv_sqrt_counts = self.counts.iter().map(|&n| inv_sqrt(n)).collect();
        self.cache.unplayed = self.counts.iter().filter(|&&n| n == 0).count();
        self.refresh_bonus();
    }

    fn refresh_bonus(&mut self) {
        let t = self.steps.max(1) as f64;
        self.cache.bonus = self.c * self.range.width() * t.ln().sqrt();
    }

    fn record(&mut self, arm: usize, reward: f64) {
        let n = self.counts[arm] + 1;
        if n == 1 {
            self.cache.unplayed -= 1;
        }
        self.counts[arm] = n;
        self.means[arm] += (reward - self.means[arm]) / n as f64;
        self.cache.inv_sqrt_counts[arm] = inv_sqrt(n);
    }
}

fn inv_sqrt(n: u64) -> f64 {
    if n == 0 { 0.0 } else { 1.0 / (n as f64).sqrt() }
}

impl Policy for Ucb1 {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    #[inline]
    fn select(&mut self) -> ArmIndex {
        if self.cache.unplayed > 0
            && let Some(i) = self.counts.iter().position(|&n| n == 0)
        {
            return ArmIndex(i);
        }
        let bonus = self.cache.bonus;
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for (i, (&m, &w)) in self
            .means
            .iter()
            .zip(&self.cache.inv_sqrt_counts)
            .enumerate()
        {
            // Plain multiply-add: `mul_add` is a libm call without a target FMA feature.
            let v = m + bonus * w;
            if v > best_value {
                best = i;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    #[inline]
    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        self.record(arm, reward);
        self.steps += 1;
        self.refresh_bonus();
        Ok(())
    }

    fn update_side(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        if self.side_information {
            self.record(arm, reward);
        }
        Ok(())
    }

    fn uses_side_information(&self) -> bool {
        self.side_information
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}
