//! A policy (or a whole controller) saved mid-run and restored makes exactly the choices the
//! uninterrupted one makes.

mod common;

use common::{Noise, draw};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use splitee_bandits::{
    AnyPolicy, ArmSpace, Controller, CostModel, Decision, DecisionRule, Observation, Policy,
    PolicyConfig, RewardKind, RewardModel, RewardRange, decide,
};

fn all_configs(num_arms: usize) -> Vec<PolicyConfig> {
    vec![
        PolicyConfig::Ucb1 { c: 1.0 },
        PolicyConfig::SplitEeS { c: 2.0 },
        PolicyConfig::KlUcb { c: 0.0 },
        PolicyConfig::DiscountedUcb {
            gamma: 0.97,
            c: 1.0,
        },
        PolicyConfig::SlidingWindowUcb { window: 50, c: 1.0 },
        PolicyConfig::Thompson {
            sigma: 0.7,
            seed: 42,
        },
        PolicyConfig::EpsilonGreedy {
            epsilon: 0.3,
            seed: 43,
        },
        PolicyConfig::Fixed { arm: 1 },
        PolicyConfig::Random { seed: 44 },
        PolicyConfig::Oracle {
            means: (0..num_arms).map(|i| i as f64 * 0.1).collect(),
        },
    ]
}

fn step(policy: &mut AnyPolicy, rng: &mut ChaCha8Rng, means: &[f64]) -> usize {
    let arm = policy.select();
    let reward = draw(rng, means[arm.0], Noise::Gaussian(0.3));
    policy.update(arm, reward).unwrap();
    if policy.uses_side_information() && arm.0 > 0 {
        policy
            .update_side(splitee_bandits::ArmIndex(arm.0 - 1), reward * 0.5)
            .unwrap();
    }
    arm.0
}

#[test]
fn every_policy_round_trips_mid_run() {
    let means = [0.2, 0.5, 0.45, 0.1, 0.3];
    for config in all_configs(means.len()) {
        let mut policy = config
            .build(means.len(), RewardRange::new(-1.0, 2.0).unwrap())
            .unwrap();
        let mut env = ChaCha8Rng::seed_from_u64(1);
        // Past the sliding window, so the restored ring buffer has wrapped.
        for _ in 0..237 {
            step(&mut policy, &mut env, &means);
        }
        let json = serde_json::to_string(&policy).unwrap();
        let mut restored: AnyPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, policy, "{config:?}");
        let mut env_restored = env.clone();
        let original: Vec<usize> = (0..500)
            .map(|_| step(&mut policy, &mut env, &means))
            .collect();
        let replayed: Vec<usize> = (0..500)
            .map(|_| step(&mut restored, &mut env_restored, &means))
            .collect();
        assert_eq!(original, replayed, "{config:?}");
        // And the configuration itself.
        let config_json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<PolicyConfig>(&config_json).unwrap(),
            config
        );
    }
}

#[test]
fn corrupt_state_is_an_error() {
    let policy = PolicyConfig::Ucb1 { c: 1.0 }
        .build(3, RewardRange::default())
        .unwrap();
    let mut value = serde_json::to_value(&policy).unwrap();
    value["Ucb1"]["means"] = serde_json::json!([0.0]);
    assert!(serde_json::from_value::<AnyPolicy>(value).is_err());
}

#[test]
fn controllers_round_trip_mid_run() {
    let layers = 12;
    let matrix = common::confidence_matrix(600, layers, 3);
    let rule = DecisionRule::SPLITEE;
    // The structured policy with measured costs, so its link model holds real state.
    let cases = [
        (
            PolicyConfig::SplitEeS { c: 1.0 },
            CostModel::abstract_units(0.05, 10.0).unwrap(),
        ),
        (
            PolicyConfig::StructuredUcb {
                c: 0.25,
                link_memory: 50.0,
            },
            CostModel::measured(0.01).unwrap(),
        ),
    ];
    for (policy, cost) in cases {
        let space = ArmSpace::grid(layers, &[1, 3, 6, 12], &[0.8, 0.95]).unwrap();
        let model = RewardModel::new(RewardKind::SplitEe, cost);
        let range = RewardRange::new(-3.0, 1.0).unwrap();
        let mut controller = Controller::new(space, rule, model, &policy, Some(range)).unwrap();
        let clock: Vec<f64> = (1..=layers).map(|l| 4.0 * l as f64).collect();
        let play = |controller: &mut Controller, row: &[f64], t: usize| {
            let (index, arm) = controller.select();
            let obs = match decide(arm, rule, layers, row).unwrap() {
                Decision::Exit { layer } => Observation::exited(&row[..layer], layer),
                Decision::Offload { after } => {
                    Observation::offloaded(&row[..after], after, row[layers - 1])
                        .with_offload_cost(20.0 + (t % 7) as f64)
                        .with_cloud_layer_cost(0.5)
                }
            };
            let stop = obs.outcome.decision();
            let ran = match stop {
                Decision::Exit { layer } => layer,
                Decision::Offload { after } => after,
            };
            let obs = obs.with_edge_costs(&clock[..ran]).with_tokens(10 + t % 5);
            controller.learn(index, &obs).unwrap();
            index.0
        };
        for (t, row) in matrix[..300].iter().enumerate() {
            play(&mut controller, row, t);
        }
        let json = serde_json::to_string(&controller).unwrap();
        let mut restored: Controller = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, controller, "{policy:?}");
        for (t, row) in matrix[300..].iter().enumerate() {
            assert_eq!(
                play(&mut controller, row, t),
                play(&mut restored, row, t),
                "{policy:?}"
            );
        }
    }
}
