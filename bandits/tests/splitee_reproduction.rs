//! A small SplitEE reproduction on a synthetic 12-exit confidence matrix: the best split under
//! the SplitEE reward is known from full information; SplitEE (UCB1 over splits), SplitEE-S and
//! the oracle must agree on it, and the side information must pay off in regret.

mod common;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{
    ArmIndex, ArmSpace, Controller, CostModel, Decision, DecisionRule, NOT_EVALUATED, Observation,
    Oracle, Policy, PolicyConfig, RewardKind, RewardModel, decide,
};

const LAYERS: usize = 12;
const SAMPLES: usize = 20_000;
/// The stream replays the matrix in this many independently shuffled passes.
const PASSES: usize = 5;
const THRESHOLD: f64 = 0.9;
const LAMBDA: f64 = 0.05;
const OFFLOAD: f64 = 10.0;

fn model() -> RewardModel {
    RewardModel::new(
        RewardKind::SplitEe,
        CostModel::abstract_units(LAMBDA, OFFLOAD).unwrap(),
    )
}

/// Mean reward of every split over the whole matrix, with full information (what the oracle
/// knows in hindsight).
fn arm_means(space: &ArmSpace, rule: DecisionRule, matrix: &[Vec<f64>]) -> Vec<f64> {
    let model = model();
    space
        .arms()
        .iter()
        .map(|&arm| {
            matrix
                .iter()
                .map(|row| {
                    // The device ran every layer: everything is observed.
                    let full = Observation::exited(row, LAYERS);
                    model.counterfactual(arm, rule, LAYERS, &full).unwrap()
                })
                .sum::<f64>()
                / matrix.len() as f64
        })
        .collect()
}

/// Plays the stream with `config`; returns the cumulative pseudo-regret and the pull counts.
fn play(
    config: PolicyConfig,
    rule: DecisionRule,
    matrix: &[Vec<f64>],
    order: &[usize],
    means: &[f64],
) -> (f64, Vec<u64>) {
    let space = ArmSpace::splits(LAYERS, THRESHOLD).unwrap();
    let mut controller = Controller::new(space, rule, model(), &config, None).unwrap();
    let best = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut pulls = vec![0u64; LAYERS];
    let mut regret = 0.0;
    let mut seen = [NOT_EVALUATED; LAYERS];
    for &i in order {
        let row = &matrix[i];
        let (index, arm) = controller.select();
        // The device evaluates every exit head up to the split (SplitEE-S's side
        // observations), and never sees C_L unless it offloads or runs the whole model.
        let decision = decide(arm, rule, LAYERS, row).unwrap();
        let stop = match decision {
            Decision::Exit { layer } => layer,
            Decision::Offload { after } => after,
        };
        seen.fill(NOT_EVALUATED);
        seen[..stop].copy_from_slice(&row[..stop]);
        let obs = match decision {
            Decision::Exit { layer } => Observation::exited(&seen[..stop], layer),
            Decision::Offload { after } => {
                Observation::offloaded(&seen[..stop], after, row[LAYERS - 1])
            }
        };
        controller.learn(index, &obs).unwrap();
        pulls[index.0] += 1;
        regret += best - means[index.0];
    }
    (regret, pulls)
}

fn most_pulled(pulls: &[u64]) -> usize {
    (0..pulls.len())
        .max_by_key(|&i| (pulls[i], std::cmp::Reverse(i)))
        .unwrap()
}

fn reproduce(rule: DecisionRule) {
    let matrix = common::confidence_matrix(SAMPLES, LAYERS, 7);
    let space = ArmSpace::splits(LAYERS, THRESHOLD).unwrap();
    let means = arm_means(&space, rule, &matrix);
    let oracle = Oracle::new(means.clone()).unwrap();
    let best = oracle.best().0;
    eprintln!(
        "rule {rule:?}: arm means {means:.4?}, best split {}",
        best + 1
    );
    // The generator must make the problem non-trivial: an interior optimum.
    assert!(
        best > 0 && best < LAYERS - 1,
        "best split {} is at an end",
        best + 1
    );

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let order: Vec<usize> = (0..PASSES)
        .flat_map(|_| {
            let mut pass: Vec<usize> = (0..SAMPLES).collect();
            pass.shuffle(&mut rng);
            pass
        })
        .collect();

    let (r_plain, pulls_plain) = play(PolicyConfig::Ucb1 { c: 1.0 }, rule, &matrix, &order, &means);
    let (r_side, pulls_side) = play(
        PolicyConfig::SplitEeS { c: 1.0 },
        rule,
        &matrix,
        &order,
        &means,
    );
    let mut oracle_policy = oracle.clone();
    assert_eq!(oracle_policy.select(), ArmIndex(best));
    eprintln!("SplitEE   regret {r_plain:.1}, pulls {pulls_plain:?}");
    eprintln!("SplitEE-S regret {r_side:.1}, pulls {pulls_side:?}");

    assert_eq!(
        most_pulled(&pulls_plain),
        best,
        "SplitEE disagrees with the oracle"
    );
    assert_eq!(
        most_pulled(&pulls_side),
        best,
        "SplitEE-S disagrees with the oracle"
    );
    assert!(
        r_side < r_plain,
        "SplitEE-S regret {r_side} is not below SplitEE regret {r_plain}"
    );
}

/// SplitEE's published rule: exit test at the split layer only, offload otherwise.
#[test]
fn splitee_split_only_rule() {
    reproduce(DecisionRule::SPLITEE);
}
