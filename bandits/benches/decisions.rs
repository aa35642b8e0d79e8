//! Throughput of one decision (`select` + `update`, plus the side updates for SplitEE-S) for
//! 12, 60 and 240 arms; and of one whole sample through the controller as a driver runs it
//! (`select`, a device pass over recorded exit probabilities, `settle` with measured costs:
//! everything the structured policy learns from a sample) on 18 arms, 6 splits × 3 thresholds.
//! Prints one markdown table: decisions (or samples) per second, the median of five timed
//! rounds after a warm-up.
//!
//! A plain bench binary rather than criterion: criterion's dependencies turn on default
//! features of crates burn shares, so as a dev-dependency it made `cargo test` rebuild burn
//! after `cargo build` (`simulations/tests/architecture.rs` now holds the two builds equal).

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{
    ArmIndex, ArmSpace, CloudAnswered, Controller, CostModel, Decision, DecisionRule, ExitsConfig,
    Policy, PolicyConfig, Reported, RewardKind, RewardModel, RewardRange, Step,
};

/// Rewards are drawn up front so the benchmark measures the policy, not a random generator.
const REWARDS: usize = 4096;

const WARM_UP: Duration = Duration::from_millis(300);
const ROUND: Duration = Duration::from_millis(400);
const ROUNDS: usize = 5;

/// Calls of `step` per second: the median over [`ROUNDS`] rounds of [`ROUND`] each, after
/// [`WARM_UP`]. The clock is read once per batch of calls so that reading it costs nothing
/// next to a decision.
fn per_second(mut step: impl FnMut()) -> f64 {
    const BATCH: u32 = 1024;
    let mut run_for = |budget: Duration| {
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < budget {
            for _ in 0..BATCH {
                step();
            }
            calls += u64::from(BATCH);
        }
        calls as f64 / start.elapsed().as_secs_f64()
    };
    run_for(WARM_UP);
    let mut rates: Vec<f64> = (0..ROUNDS).map(|_| run_for(ROUND)).collect();
    rates.sort_by(f64::total_cmp);
    rates[ROUNDS / 2]
}

fn row(group: &str, name: &str, arms: usize, rate: f64) {
    println!("| {group} | {name} | {arms} | {:.2} M/s |", rate / 1e6);
}

fn decisions() {
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
            let rate = per_second(|| {
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
                black_box(arm);
            });
            row("select + update", name, arms, rate);
        }
    }
}

/// One sample through the controller: the unit the structured policy must be measured in, as
/// its learning happens in `settle` (every revealed arm, the link model), not in `update`.
fn samples() {
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
        let rate = per_second(|| {
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
            black_box(controller.settle(&pass.report(index, 24, outcome)).unwrap());
        });
        row("one sample through the controller", name, 18, rate);
    }
}

fn main() {
    println!("| unit | policy | arms | per second (median of {ROUNDS} rounds) |");
    println!("|---|---|---|---|");
    decisions();
    samples();
}
