//! Synthetic environments shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{AnyPolicy, ArmIndex, Policy, PolicyConfig, RewardRange};

pub fn build(config: PolicyConfig, num_arms: usize) -> AnyPolicy {
    config
        .build(num_arms, RewardRange::default())
        .expect("valid test configuration")
}

pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Reward noise model of a synthetic arm.
#[derive(Debug, Clone, Copy)]
pub enum Noise {
    Bernoulli,
    Gaussian(f64),
}

pub fn draw(rng: &mut ChaCha8Rng, mean: f64, noise: Noise) -> f64 {
    match noise {
        Noise::Bernoulli => {
            if rng.random::<f64>() < mean {
                1.0
            } else {
                0.0
            }
        }
        Noise::Gaussian(sd) => mean + sd * normal(rng),
    }
}

/// Runs `policy` for `horizon` rounds; `means(t)` gives the arm means at round `t`. Returns the
/// per-round pseudo-regret `max_i μ_i(t) − μ_{a_t}(t)` and the arms played.
pub fn run(
    policy: &mut AnyPolicy,
    horizon: usize,
    means: impl Fn(usize) -> Vec<f64>,
    noise: Noise,
    seed: u64,
) -> (Vec<f64>, Vec<ArmIndex>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut regret = Vec::with_capacity(horizon);
    let mut arms = Vec::with_capacity(horizon);
    for t in 0..horizon {
        let mu = means(t);
        let best = mu.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let arm = policy.select();
        let r = draw(&mut rng, mu[arm.0], noise);
        policy.update(arm, r).expect("finite reward");
        regret.push(best - mu[arm.0]);
        arms.push(arm);
    }
    (regret, arms)
}

/// A synthetic `samples × layers` matrix of max-softmax confidences of a binary classifier,
/// shaped like ElasticBERT on an easy task: most samples ("easy", 85 %) become confident
/// quickly, at an onset layer `e` uniform in [2, 4.5]; the rest only approach confidence past
/// the last layer (`e` uniform in [13, 16]). `C_j = 0.5 + 0.5·σ(1.5·(j − e))` plus Gaussian
/// noise (sd 0.03), clamped to [0.5, 1].
pub fn confidence_matrix(samples: usize, layers: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..samples)
        .map(|_| {
            let easy = rng.random::<f64>() < 0.85;
            let u: f64 = rng.random();
            let onset = if easy { 2.0 + 2.5 * u } else { 13.0 + 3.0 * u };
            (1..=layers)
                .map(|j| {
                    let sigmoid = 1.0 / (1.0 + (-1.5 * (j as f64 - onset)).exp());
                    (0.5 + 0.5 * sigmoid + 0.03 * normal(&mut rng)).clamp(0.5, 1.0)
                })
                .collect()
        })
        .collect()
}
