//! Throughput of one decision (`select` + `update`, plus the side updates for SplitEE-S) for
//! 12, 60 and 240 arms. Criterion reports it as elements/s = decisions/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{ArmIndex, Policy, PolicyConfig, RewardRange};

/// Rewards are drawn up front so the benchmark measures the policy, not a random generator.
const REWARDS: usize = 4096;

fn decisions(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rewards: Vec<f64> = (0..REWARDS).map(|_| rng.random()).collect();
    let policies = [
        ("ucb1", PolicyConfig::Ucb1 { c: 1.0 }),
        ("splitee-s", PolicyConfig::SplitEeS { c: 1.0 }),
        (
            "discounted-ucb",
            PolicyConfig::DiscountedUcb {
                gamma: 0.99,
                c: 1.0,
            },
        ),
        (
            "sliding-window-ucb",
            PolicyConfig::SlidingWindowUcb {
                window: 1000,
                c: 1.0,
            },
        ),
        (
            "thompson",
            PolicyConfig::Thompson {
                sigma: 1.0,
                seed: 1,
            },
        ),
    ];
    let mut group = c.benchmark_group("decisions");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for arms in [12usize, 60, 240] {
        for (name, config) in &policies {
            let mut policy = config.build(arms, RewardRange::default()).unwrap();
            // Past the initial round-robin, into the steady state.
            for t in 0..10 * arms {
                let arm = policy.select();
                policy.update(arm, rewards[t % REWARDS]).unwrap();
            }
            let side = policy.uses_side_information();
            let mut t = 0usize;
            group.bench_function(BenchmarkId::new(*name, arms), |b| {
                b.iter(|| {
                    let arm = policy.select();
                    let r = rewards[t % REWARDS];
                    t = t.wrapping_add(1);
                    policy.update(arm, r).unwrap();
                    if side {
                        // SplitEE-S learns every shallower arm; model that worst case.
                        for shallower in 0..arm.0 {
                            policy.update_side(ArmIndex(shallower), r).unwrap();
                        }
                    }
                    black_box(arm)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
