//! Throughput of one decision (`select` + `update`, plus the side updates for SplitEE-S) for
//! 12, 60 and 240 arms; and of one whole sample through the controller as a driver runs it
//! (`select`, a device pass over recorded exit probabilities, `settle` with measured costs:
//! everything the structured policy learns from a sample) on 18 arms, 6 splits × 3 thresholds.
//! Criterion reports it as elements/s = decisions/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{
    ArmIndex, ArmSpace, CloudAnswered, Controller, CostModel, Decision, DecisionRule, ExitsConfig,
    Policy, PolicyConfig, Reported, RewardKind, RewardModel, RewardRange, Step,
};

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

/// One sample through the controller: the unit the structured policy must be measured in, as
/// its learning happens in `settle` (every revealed arm, the link model), not in `update`.
fn samples(c: &mut Criterion) {
    let layers = 6;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Exit probabilities of 4096 samples, confidence rising with depth.
    let rows: Vec<Vec<[f32; 2]>> = (0..REWARDS)
        .map(|_| {
            let base: f32 = rng.random_range(0.5..0.9);
            (0..layers)
                .map(|l| {
                    let p = (base + 0.02 * l as f32).min(0.99);
                    [1.0 - p, p]
                })
                .collect()
        })
        .collect();
    let exit_layers: Vec<usize> = (1..=layers).collect();
    let policies = [
        ("ucb1", PolicyConfig::Ucb1 { c: 1.0 }),
        ("splitee-s", PolicyConfig::SplitEeS { c: 1.0 }),
        (
            "structured-ucb",
            PolicyConfig::StructuredUcb {
                c: 0.25,
                link_memory: 100.0,
            },
        ),
    ];
    let mut group = c.benchmark_group("samples");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (name, config) in &policies {
        let space = ArmSpace::grid(layers, &exit_layers, &[0.8, 0.9, 0.95]).unwrap();
        let reward = RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.002).unwrap());
        let range = Some(RewardRange::new(-0.4, 1.0).unwrap());
        let mut controller =
            Controller::new(space, DecisionRule::SPLITEE, reward, config, range).unwrap();
        let mut pass = controller
            .device_pass(&exit_layers, ExitsConfig::default(), true)
            .unwrap();
        let mut t = 0usize;
        group.bench_function(BenchmarkId::new(*name, 18), |b| {
            b.iter(|| {
                let row = &rows[t % REWARDS];
                t = t.wrapping_add(1);
                let (index, arm) = controller.select();
                pass.start(arm);
                let decision = loop {
                    let layer = pass.next_layer().unwrap();
                    let probs = pass.wants_head(layer).then(|| &row[layer - 1][..]);
                    if let Step::Done(d) = pass.observe(layer, probs, 8.0 * layer as f64).unwrap() {
                        break d;
                    }
                };
                let outcome = match decision {
                    Decision::Exit { layer } => Reported::Exited { layer },
                    Decision::Offload { after } => Reported::Answered(CloudAnswered {
                        after,
                        exit_layer: layers,
                        confidence: pass.answer_confidence(&row[layers - 1]),
                        round_trip_ms: 40.0 + (t % 13) as f64,
                        cloud_compute_ms: 3.0,
                        bytes_sent: 20_000,
                    }),
                };
                black_box(controller.settle(&pass.report(index, 24, outcome)).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, samples);
criterion_main!(benches);
