//! A synthetic confidence matrix, for proving the pipeline end to end before real recordings
//! exist. Files it writes carry `synthetic=true`, and every output derived from them says
//! SYNTHETIC.
//!
//! Generative model (per sample): a label uniform over `C` classes; a difficulty
//! `z ~ N(0, 1)`; a token count `round(exp(N(ln 22, 0.5)))` clamped to `[4, 128]`. At exit `j`
//! (every layer has one) the margin is `m_j = a_j − z + ε_j`, with `a_j` rising linearly
//! from 0.6 (layer 1) to 1.6 (layer L) and `ε_j` an AR(1) noise (ρ = 0.7, σ = 0.5), so exits
//! are correlated and deeper ones are better (≈ 70 % → 92 % accuracy with 2 classes). The
//! true class gets probability `σ(2.5·m_j)`; one random wrong class gets 70 % of the rest and
//! the others share the remainder. Layer times are `1.2 ms · (0.5 + 0.5·tokens/32)` with 5 %
//! Gaussian jitter (a desktop CPU running MiniLM, roughly).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::matrix::{ConfidenceMatrix, SampleRow};

#[derive(Debug, Clone, Copy)]
pub struct SynthSpec {
    pub samples: usize,
    pub layers: usize,
    pub classes: usize,
    pub hidden: usize,
    pub seed: u64,
}

fn normal<R: Rng>(rng: &mut R) -> f64 {
    // Box–Muller; 1 − u keeps the logarithm finite.
    let u: f64 = rng.random();
    let v: f64 = rng.random();
    (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

pub fn generate(spec: SynthSpec) -> anyhow::Result<ConfidenceMatrix> {
    anyhow::ensure!(spec.layers >= 1 && spec.classes >= 2 && spec.samples >= 1);
    let l = spec.layers;
    let c = spec.classes;
    let mut m = ConfidenceMatrix::new(l, (1..=l).collect(), c, true).map_err(anyhow::Error::msg)?;
    for (k, v) in [
        ("synthetic", "true".to_owned()),
        ("generator", "splitee-synth".to_owned()),
        ("seed", spec.seed.to_string()),
        ("hidden", spec.hidden.to_string()),
        ("layers", l.to_string()),
        ("model", "synthetic".to_owned()),
    ] {
        m.set_metadata(k, &v).map_err(anyhow::Error::msg)?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut probs = vec![0f32; l * c];
    let mut layer_ms = vec![0f64; l];
    for i in 0..spec.samples {
        let label = rng.random_range(0..c);
        let z = normal(&mut rng);
        let tokens = (22f64.ln() + 0.5 * normal(&mut rng))
            .exp()
            .round()
            .clamp(4.0, 128.0) as u32;
        let mut eps = 0.5 * normal(&mut rng);
        for j in 0..l {
            if j > 0 {
                eps = 0.7 * eps + (1.0f64 - 0.49).sqrt() * 0.5 * normal(&mut rng);
            }
            let a = if l == 1 {
                1.6
            } else {
                0.6 + (j as f64) / (l as f64 - 1.0)
            };
            let margin = a - z + eps;
            let p_true = 1.0 / (1.0 + (-2.5 * margin).exp());
            let wrong = (label + 1 + rng.random_range(0..c - 1)) % c;
            let row = &mut probs[j * c..(j + 1) * c];
            let others = if c > 2 {
                (1.0 - p_true) * 0.3 / (c - 2) as f64
            } else {
                0.0
            };
            for (class, p) in row.iter_mut().enumerate() {
                *p = if class == label {
                    p_true
                } else if class == wrong {
                    if c > 2 {
                        (1.0 - p_true) * 0.7
                    } else {
                        1.0 - p_true
                    }
                } else {
                    others
                } as f32;
            }
            let jitter = (1.0 + 0.05 * normal(&mut rng)).max(0.5);
            layer_ms[j] = 1.2 * (0.5 + 0.5 * tokens as f64 / 32.0) * jitter;
        }
        m.push(SampleRow {
            id: &format!("synth-{i}"),
            label: Some(label as u32),
            tokens,
            probs: &probs,
            layer_ms: &layer_ms,
        })
        .map_err(anyhow::Error::msg)?;
    }
    Ok(m)
}
