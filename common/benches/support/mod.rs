//! What the encoder benchmarks share: the timing rule, the FLOP count and the inputs.

use std::time::{Duration, Instant};

use burn::prelude::*;
use splitee_model::BertConfig;

/// Enough repetitions for a stable median on a noisy shared machine.
pub const MIN_RUNS: usize = 15;

/// Median duration of `run` after two warm-up calls: at least [`MIN_RUNS`] runs, more while
/// `budget` lasts (at most 200).
pub fn median_of(budget: Duration, mut run: impl FnMut()) -> Duration {
    run();
    run();
    let started = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < MIN_RUNS || (started.elapsed() < budget && samples.len() < 200) {
        let start = Instant::now();
        run();
        samples.push(start.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

/// Multiply-adds ×2 of one encoder layer for one sequence: Q, K, V and output projections
/// (4·n·h²), scores and context (2·n²·h), and the feed-forward pair (2·n·h·f).
pub fn layer_flops(config: &BertConfig, seq: usize) -> f64 {
    let (n, h, f) = (
        seq as f64,
        config.hidden_size as f64,
        config.intermediate_size as f64,
    );
    2.0 * (4.0 * n * h * h + 2.0 * n * n * h + 2.0 * n * h * f)
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// `[batch, seq]` arbitrary in-vocabulary ids: cost does not depend on which tokens they are.
pub fn token_ids(batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| 1000 + 37 * (i % seq) as i64 + i as i64 / seq as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

/// Rayon's thread count as the benchmark runs it, and how it was set.
pub fn threads_line() -> String {
    format!(
        "rayon threads: {} (RAYON_NUM_THREADS={})",
        rayon::current_num_threads(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    )
}
