use serde::{Deserialize, Serialize};

use super::{Policy, check_exploration, check_lengths, check_num_arms, check_update};
use crate::arms::ArmIndex;
use crate::error::BanditError;
use crate::reward::RewardRange;

/// Discounted UCB (Garivier & Moulines, 2011) for rewards whose means drift, e.g. when the
/// link to the cloud degrades.
///
/// After every round all statistics decay by `γ`:
/// `N_i ← γ·N_i + 1[i played]`, `S_i ← γ·S_i + r·1[i played]`, `n = Σ_i N_i`, and the index is
/// `S_i/N_i + c·(hi − lo)·sqrt(ln n / N_i)`. Old rewards weigh `γ^age`, so the effective
/// memory is about `1/(1 − γ)` rounds; `γ = 1` is plain UCB1. An arm whose discounted count
/// underflowed to zero counts as unplayed and is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscountedUcb {
    gamma: f64,
    c: f64,
    range: RewardRange,
    steps: u64,
    total: f64,
    counts: Vec<f64>,
    sums: Vec<f64>,
}

impl DiscountedUcb {
    pub fn new(
        num_arms: usize,
        gamma: f64,
        c: f64,
        range: RewardRange,
    ) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_gamma(gamma)?;
        check_exploration(c)?;
        Ok(DiscountedUcb {
            gamma,
            c,
            range,
            steps: 0,
            total: 0.0,
            counts: vec![0.0; num_arms],
            sums: vec![0.0; num_arms],
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_gamma(self.gamma)?;
        check_exploration(self.c)?;
        check_lengths(self.counts.len(), &[self.sums.len()])?;
        let finite = self.counts.iter().chain(&self.sums).all(|v| v.is_finite());
        if !finite || self.counts.iter().any(|&n| n < 0.0) {
            return Err(BanditError::CorruptState("invalid discounted statistics"));
        }
        Ok(())
    }
}

fn check_gamma(gamma: f64) -> Result<(), BanditError> {
    if gamma > 0.0 && gamma <= 1.0 {
        Ok(())
    } else {
        Err(BanditError::InvalidDiscount(gamma))
    }
}

impl Policy for DiscountedUcb {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    fn select(&mut self) -> ArmIndex {
        if let Some(i) = self.counts.iter().position(|&n| n == 0.0) {
            return ArmIndex(i);
        }
        let scale = self.c * self.range.width();
        let ln_n = self.total.max(1.0).ln();
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for (i, (&n, &s)) in self.counts.iter().zip(&self.sums).enumerate() {
            let v = s / n + scale * (ln_n / n).sqrt();
            if v > best_value {
                best = i;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        let gamma = self.gamma;
        for (n, s) in self.counts.iter_mut().zip(self.sums.iter_mut()) {
            *n *= gamma;
            *s *= gamma;
        }
        self.counts[arm] += 1.0;
        self.sums[arm] += reward;
        self.total = self.total * gamma + 1.0;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}

/// Upper bound on the sliding window, so its ring buffer (16 bytes per round) can be
/// preallocated without risking an abort on absurd configurations.
pub const MAX_WINDOW: usize = 1 << 22;

/// Sliding-window UCB (Garivier & Moulines, 2011): only the last `τ` rounds count.
///
/// With `N_i` and `S_i` the count and reward sum of arm `i` within the window, the index is
/// `S_i/N_i + c·(hi − lo)·sqrt(ln min(t, τ) / N_i)`; an arm absent from the window is
/// unplayed and is retried. The window is a preallocated ring buffer, so updates are O(1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindowUcb {
    window: usize,
    c: f64,
    range: RewardRange,
    steps: u64,
    counts: Vec<u64>,
    sums: Vec<f64>,
    /// `(arm, reward)` of the last `min(t, τ)` rounds; `head` is the oldest once full.
    history: Vec<(usize, f64)>,
    head: usize,
}

impl SlidingWindowUcb {
    pub fn new(
        num_arms: usize,
        window: usize,
        c: f64,
        range: RewardRange,
    ) -> Result<Self, BanditError> {
        check_num_arms(num_arms)?;
        check_window(window)?;
        check_exploration(c)?;
        Ok(SlidingWindowUcb {
            window,
            c,
            range,
            steps: 0,
            counts: vec![0; num_arms],
            sums: vec![0.0; num_arms],
            history: Vec::with_capacity(window),
            head: 0,
        })
    }

    pub(crate) fn check_state(&mut self) -> Result<(), BanditError> {
        check_window(self.window)?;
        check_exploration(self.c)?;
        check_lengths(self.counts.len(), &[self.sums.len()])?;
        let full = self.history.len() == self.window;
        if self.history.len() > self.window || self.head >= self.window || (!full && self.head != 0)
        {
            return Err(BanditError::CorruptState("window history is inconsistent"));
        }
        // The running sums are kept as saved (recomputing them would change their rounding and
        // so, possibly, later choices); the counts must match the history exactly.
        let mut recount = vec![0u64; self.counts.len()];
        for &(arm, reward) in &self.history {
            if arm >= recount.len() || !reward.is_finite() {
                return Err(BanditError::CorruptState("window history is inconsistent"));
            }
            recount[arm] += 1;
        }
        if recount != self.counts || self.sums.iter().any(|s| !s.is_finite()) {
            return Err(BanditError::CorruptState(
                "window statistics disagree with history",
            ));
        }
        // A deserialized Vec has no spare capacity; restore it so updates stay allocation-free.
        self.history.reserve_exact(self.window - self.history.len());
        Ok(())
    }
}

fn check_window(window: usize) -> Result<(), BanditError> {
    if window == 0 {
        Err(BanditError::ZeroWindow)
    } else if window > MAX_WINDOW {
        Err(BanditError::WindowTooLarge {
            window,
            max: MAX_WINDOW,
        })
    } else {
        Ok(())
    }
}

impl Policy for SlidingWindowUcb {
    fn num_arms(&self) -> usize {
        self.counts.len()
    }

    fn select(&mut self) -> ArmIndex {
        if let Some(i) = self.counts.iter().position(|&n| n == 0) {
            return ArmIndex(i);
        }
        let scale = self.c * self.range.width();
        let ln_t = (self.history.len().max(1) as f64).ln();
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for (i, (&n, &s)) in self.counts.iter().zip(&self.sums).enumerate() {
            let n = n as f64;
            let v = s / n + scale * (ln_t / n).sqrt();
            if v > best_value {
                best = i;
                best_value = v;
            }
        }
        ArmIndex(best)
    }

    fn update(&mut self, arm: ArmIndex, reward: f64) -> Result<(), BanditError> {
        let arm = check_update(arm, reward, self.num_arms())?;
        let entry = (arm, reward);
        if self.history.len() < self.window {
            self.history.push(entry);
        } else {
            let (old, old_reward) = std::mem::replace(&mut self.history[self.head], entry);
            self.counts[old] -= 1;
            self.sums[old] = if self.counts[old] == 0 {
                // Exact zero, so rounding residue never outlives the arm's last window entry.
                0.0
            } else {
                self.sums[old] - old_reward
            };
            self.head = (self.head + 1) % self.window;
        }
        self.counts[arm] += 1;
        self.sums[arm] += reward;
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }
}
