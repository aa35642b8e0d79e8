//! Certified thresholds: the arms whose accuracy drop against the final exit is at most `ε`,
//! with probability at least `1 − δ` over a labelled calibration set.
//!
//! # Method: Learn-then-Test with exact binomial p-values
//!
//! Learn-then-Test (Angelopoulos, Bates, Candès, Jordan and Lei, *Learn then Test:
//! Calibrating Predictive Algorithms to Achieve Risk Control*, 2021) turns risk control into
//! multiple testing: for every arm `k` test the null hypothesis `H_k: R_k > ε`, where
//! `R_k = P(arm k's answer wrong) − P(the final exit's answer wrong)` is its accuracy drop, and
//! certify the arms whose null is rejected by a procedure that controls the family-wise error
//! rate at `δ`. Then `P(some certified arm has R_k > ε) ≤ δ`, distribution-free: it holds for
//! any model and data, as long as the calibration samples and the samples served are
//! exchangeable (drawn from the same distribution).
//!
//! * **The loss.** Arm `k` answers a sample with the exit its rule stops at, or the cloud's
//!   final exit when it offloads. Its loss against the final exit is
//!   `ℓ = 1[arm wrong] − 1[final wrong] ≤ ℓ⁺ = 1[arm wrong ∧ final right]`, so
//!   `R_k ≤ E[ℓ⁺]`, a Bernoulli mean.
//! * **The p-value.** With `x` of the `n` samples having `ℓ⁺ = 1`, under `E[ℓ⁺] > ε` the
//!   count is stochastically larger than `Bin(n, ε)`, so `p = P(Bin(n, ε) ≤ x)` is a valid
//!   p-value for `H_k` (the exact binomial tail, as in Clopper–Pearson and Bates et al.'s
//!   *Distribution-free, risk-controlling prediction sets*, 2021). Testing the upper bound
//!   `ℓ⁺` only makes the test conservative.
//! * **The multiple testing.** Within one split, the drop can only grow as `α` falls (an exit
//!   that fires at `α` fires at every lower `α`), so thresholds are tested in descending order
//!   — fixed-sequence testing, each at level `δ / S` for `S` splits, stopping at the first that
//!   is not rejected — and the `S` sequences are combined by Bonferroni. Fixed-sequence
//!   testing controls the family-wise error within a sequence without splitting its level;
//!   it is valid whatever the true ordering (a mis-ordered sequence only loses power).
//!
//! The arm that runs the whole model on the device has `ℓ⁺ = 0` on every sample and is
//! certified whenever `(1 − ε)^n ≤ δ / S`.

use serde::Serialize;

use crate::arms::{ArmIndex, ArmSpace};
use crate::decision::{Decision, DecisionRule, decide};
use crate::error::BanditError;

/// One labelled calibration sample: every exit's confidence (under the agent's measure; NaN
/// where a layer has no exit) and predicted class, and the true class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelledSample<'a> {
    pub confidences: &'a [f64],
    pub predictions: &'a [u32],
    pub label: u32,
}

/// The test of one arm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ArmTest {
    pub index: usize,
    pub split: usize,
    pub threshold: f64,
    /// Samples it answers on the device.
    pub exits: usize,
    /// Samples it gets wrong where the final exit is right (`ℓ⁺ = 1`).
    pub worse: usize,
    /// The empirical accuracy drop `mean(ℓ)` (may be negative).
    pub drop: f64,
    pub p_value: f64,
    pub certified: bool,
}

/// What [`certify`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Certificate {
    pub epsilon: f64,
    pub delta: f64,
    pub samples: usize,
    /// Every arm of the space, in index order.
    pub tests: Vec<ArmTest>,
}

impl Certificate {
    /// The certified arms, in index order.
    pub fn certified(&self) -> impl Iterator<Item = ArmIndex> + '_ {
        self.tests
            .iter()
            .filter(|t| t.certified)
            .map(|t| ArmIndex(t.index))
    }
}

/// Certifies the arms of `space` under `rule` at `(ε, δ)` on `samples` (see the module docs).
pub fn certify(
    space: &ArmSpace,
    rule: DecisionRule,
    samples: &[LabelledSample<'_>],
    epsilon: f64,
    delta: f64,
) -> Result<Certificate, BanditError> {
    if !(epsilon > 0.0 && epsilon < 1.0) {
        return Err(BanditError::InvalidConfig(format!(
            "epsilon must be in (0, 1), got {epsilon}"
        )));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(BanditError::InvalidConfig(format!(
            "delta must be in (0, 1), got {delta}"
        )));
    }
    if samples.is_empty() {
        return Err(BanditError::InvalidConfig("no calibration samples".into()));
    }
    let layers = space.num_layers();
    for (i, s) in samples.iter().enumerate() {
        if s.confidences.len() != layers || s.predictions.len() != layers {
            return Err(BanditError::InvalidConfig(format!(
                "calibration sample {i} has {} confidences and {} predictions for {layers} layers",
                s.confidences.len(),
                s.predictions.len()
            )));
        }
    }
    let n = samples.len();
    let mut tests = Vec::with_capacity(space.len());
    for (index, arm) in space.iter() {
        let (mut exits, mut worse, mut loss) = (0usize, 0usize, 0i64);
        for s in samples {
            let answer = match decide(arm, rule, layers, s.confidences) {
                Some(Decision::Exit { layer }) => {
                    exits += 1;
                    s.predictions[layer - 1]
                }
                Some(Decision::Offload { .. }) => s.predictions[layers - 1],
                None => {
                    return Err(BanditError::MissingConfidence { layer: arm.split });
                }
            };
            let arm_right = answer == s.label;
            let final_right = s.predictions[layers - 1] == s.label;
            worse += usize::from(!arm_right && final_right);
            loss += i64::from(final_right) - i64::from(arm_right);
        }
        tests.push(ArmTest {
            index: index.0,
            split: arm.split,
            threshold: arm.threshold,
            exits,
            worse,
            drop: loss as f64 / n as f64,
            p_value: binomial_cdf(worse, n, epsilon),
            certified: false,
        });
    }
    // Fixed-sequence testing per split, thresholds descending; Bonferroni over splits.
    let mut splits: Vec<usize> = tests.iter().map(|t| t.split).collect();
    splits.sort_unstable();
    splits.dedup();
    let level = delta / splits.len() as f64;
    for split in splits {
        let mut sequence: Vec<usize> = (0..tests.len())
            .filter(|&i| tests[i].split == split)
            .collect();
        sequence.sort_by(|&a, &b| tests[b].threshold.total_cmp(&tests[a].threshold));
        for i in sequence {
            if tests[i].p_value > level {
                break;
            }
            tests[i].certified = true;
        }
    }
    Ok(Certificate {
        epsilon,
        delta,
        samples: n,
        tests,
    })
}

/// `P(Bin(n, p) ≤ x)`, summed in log space (exact for the sizes of calibration sets).
fn binomial_cdf(x: usize, n: usize, p: f64) -> f64 {
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    // ln C(n, k) by the running product, term by term.
    let mut ln_choose = 0.0f64;
    let mut total = 0.0f64;
    for k in 0..=x.min(n) {
        if k > 0 {
            ln_choose += ((n - k + 1) as f64).ln() - (k as f64).ln();
        }
        total += (ln_choose + k as f64 * ln_p + (n - k) as f64 * ln_q).exp();
    }
    total.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binomial_tail_is_exact() {
        // P(Bin(10, 0.5) ≤ 2) = (1 + 10 + 45) / 1024.
        assert!((binomial_cdf(2, 10, 0.5) - 56.0 / 1024.0).abs() < 1e-12);
        assert!((binomial_cdf(0, 100, 0.01) - 0.99f64.powi(100)).abs() < 1e-12);
        assert!((binomial_cdf(10, 10, 0.3) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bad_parameters_are_errors() {
        let space = ArmSpace::splits(2, 0.9).unwrap();
        let c = [0.9, 0.9];
        let p = [0, 0];
        let s = [LabelledSample {
            confidences: &c,
            predictions: &p,
            label: 0,
        }];
        assert!(certify(&space, DecisionRule::SPLITEE, &s, 0.0, 0.1).is_err());
        assert!(certify(&space, DecisionRule::SPLITEE, &s, 0.1, 1.0).is_err());
        assert!(certify(&space, DecisionRule::SPLITEE, &[], 0.1, 0.1).is_err());
        let short = [LabelledSample {
            confidences: &c[..1],
            predictions: &p,
            label: 0,
        }];
        assert!(certify(&space, DecisionRule::SPLITEE, &short, 0.1, 0.1).is_err());
    }
}
