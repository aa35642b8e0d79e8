//! Every invalid configuration or input is a named error, never a panic.

use splitee_bandits::{
    Arm, ArmIndex, ArmSpace, BanditError, Controller, CostModel, DecisionRule, EdgeCost,
    Observation, OffloadCost, Policy, PolicyConfig, RewardKind, RewardModel, RewardRange,
};

fn build(config: PolicyConfig, num_arms: usize) -> Result<splitee_bandits::AnyPolicy, BanditError> {
    config.build(num_arms, RewardRange::default())
}

#[test]
fn empty_arm_set() {
    assert_eq!(
        ArmSpace::from_arms(12, vec![]),
        Err(BanditError::EmptyArmSet)
    );
    assert_eq!(
        ArmSpace::thresholds(12, 3, &[]),
        Err(BanditError::EmptyArmSet)
    );
    for config in [
        PolicyConfig::Ucb1 { c: 1.0 },
        PolicyConfig::SplitEeS { c: 1.0 },
        PolicyConfig::KlUcb { c: 0.0 },
        PolicyConfig::DiscountedUcb { gamma: 0.9, c: 1.0 },
        PolicyConfig::SlidingWindowUcb { window: 10, c: 1.0 },
        PolicyConfig::Thompson {
            sigma: 1.0,
            seed: 0,
        },
        PolicyConfig::EpsilonGreedy {
            epsilon: 0.1,
            seed: 0,
        },
        PolicyConfig::Random { seed: 0 },
        PolicyConfig::Oracle { means: vec![] },
    ] {
        assert_eq!(build(config, 0).unwrap_err(), BanditError::EmptyArmSet);
    }
}

#[test]
fn bad_arms() {
    assert_eq!(ArmSpace::splits(0, 0.5), Err(BanditError::NoLayers));
    assert_eq!(
        ArmSpace::thresholds(12, 13, &[0.5]),
        Err(BanditError::SplitOutOfRange {
            split: 13,
            num_layers: 12
        })
    );
    assert_eq!(
        ArmSpace::grid(12, &[0], &[0.5]),
        Err(BanditError::SplitOutOfRange {
            split: 0,
            num_layers: 12
        })
    );
    for t in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            ArmSpace::splits(12, t),
            Err(BanditError::ThresholdOutOfRange(_))
        ));
    }
    let arm = Arm {
        split: 2,
        threshold: 0.5,
    };
    assert_eq!(
        ArmSpace::from_arms(12, vec![arm, arm]),
        Err(BanditError::DuplicateArm { index: 1 })
    );
}

#[test]
fn bad_costs() {
    assert_eq!(
        CostModel::abstract_units(-0.1, 1.0),
        Err(BanditError::InvalidLambda(-0.1))
    );
    assert!(matches!(
        CostModel::abstract_units(f64::NAN, 1.0),
        Err(BanditError::InvalidLambda(_))
    ));
    assert_eq!(
        CostModel::measured(-1.0),
        Err(BanditError::InvalidLambda(-1.0))
    );
    assert_eq!(
        CostModel::abstract_units(0.1, -2.0),
        Err(BanditError::InvalidCost {
            what: "offload",
            value: -2.0
        })
    );
    let profile = CostModel {
        lambda: 0.1,
        edge: EdgeCost::Profile {
            cumulative: vec![1.0, 2.0],
            ref_tokens: 32.0,
        },
        offload: OffloadCost::Constant(1.0),
        per_kb: 0.0,
    };
    assert_eq!(
        profile.validate(12),
        Err(BanditError::CostProfileLength {
            got: 2,
            num_layers: 12
        })
    );
    let negative = CostModel {
        edge: EdgeCost::Profile {
            cumulative: vec![1.0, -2.0],
            ref_tokens: 32.0,
        },
        ..profile.clone()
    };
    assert!(matches!(
        negative.validate(2),
        Err(BanditError::InvalidCost { .. })
    ));
    let no_ref = CostModel {
        edge: EdgeCost::Profile {
            cumulative: vec![1.0, 2.0],
            ref_tokens: 0.0,
        },
        ..profile
    };
    assert!(matches!(
        no_ref.validate(2),
        Err(BanditError::InvalidCost {
            what: "profile ref_tokens",
            ..
        })
    ));
}

#[test]
fn bad_policy_parameters() {
    assert_eq!(
        build(PolicyConfig::Ucb1 { c: -1.0 }, 3).unwrap_err(),
        BanditError::InvalidExploration(-1.0)
    );
    assert!(matches!(
        build(PolicyConfig::SplitEeS { c: f64::NAN }, 3),
        Err(BanditError::InvalidExploration(_))
    ));
    assert!(matches!(
        build(PolicyConfig::KlUcb { c: -0.5 }, 3),
        Err(BanditError::InvalidExploration(_))
    ));
    for gamma in [0.0, -0.5, 1.01, f64::NAN] {
        assert!(matches!(
            build(PolicyConfig::DiscountedUcb { gamma, c: 1.0 }, 3),
            Err(BanditError::InvalidDiscount(_))
        ));
    }
    assert!(build(PolicyConfig::DiscountedUcb { gamma: 1.0, c: 1.0 }, 3).is_ok());
    assert_eq!(
        build(PolicyConfig::SlidingWindowUcb { window: 0, c: 1.0 }, 3).unwrap_err(),
        BanditError::ZeroWindow
    );
    assert!(matches!(
        build(
            PolicyConfig::SlidingWindowUcb {
                window: usize::MAX,
                c: 1.0
            },
            3
        ),
        Err(BanditError::WindowTooLarge { .. })
    ));
    for epsilon in [-0.1, 1.1, f64::NAN] {
        assert!(matches!(
            build(PolicyConfig::EpsilonGreedy { epsilon, seed: 0 }, 3),
            Err(BanditError::InvalidEpsilon(_))
        ));
    }
    for sigma in [0.0, -1.0, f64::INFINITY] {
        assert!(matches!(
            build(PolicyConfig::Thompson { sigma, seed: 0 }, 3),
            Err(BanditError::InvalidSigma(_))
        ));
    }
    assert_eq!(
        build(PolicyConfig::Fixed { arm: 3 }, 3).unwrap_err(),
        BanditError::ArmOutOfRange {
            arm: 3,
            num_arms: 3
        }
    );
    assert_eq!(
        build(
            PolicyConfig::Oracle {
                means: vec![0.1, f64::NAN]
            },
            2
        )
        .unwrap_err(),
        BanditError::NonFiniteMean { index: 1 }
    );
    assert!(matches!(
        RewardRange::new(1.0, 1.0),
        Err(BanditError::InvalidRewardRange { .. })
    ));
    assert!(matches!(
        RewardRange::new(f64::NEG_INFINITY, 1.0),
        Err(BanditError::InvalidRewardRange { .. })
    ));
}

#[test]
fn bad_updates_leave_the_policy_untouched() {
    let configs = [
        PolicyConfig::Ucb1 { c: 1.0 },
        PolicyConfig::SplitEeS { c: 1.0 },
        PolicyConfig::KlUcb { c: 0.0 },
        PolicyConfig::DiscountedUcb { gamma: 0.9, c: 1.0 },
        PolicyConfig::SlidingWindowUcb { window: 10, c: 1.0 },
        PolicyConfig::Thompson {
            sigma: 1.0,
            seed: 0,
        },
        PolicyConfig::EpsilonGreedy {
            epsilon: 0.1,
            seed: 0,
        },
        PolicyConfig::Fixed { arm: 0 },
        PolicyConfig::Random { seed: 0 },
        PolicyConfig::Oracle {
            means: vec![0.0, 1.0],
        },
    ];
    for config in configs {
        let mut policy = build(config, 2).unwrap();
        let before = policy.clone();
        for r in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                policy.update(ArmIndex(0), r),
                Err(BanditError::NonFiniteReward(_))
            ));
            assert!(matches!(
                policy.update_side(ArmIndex(0), r),
                Err(BanditError::NonFiniteReward(_))
            ));
        }
        assert_eq!(
            policy.update(ArmIndex(2), 0.5),
            Err(BanditError::ArmOutOfRange {
                arm: 2,
                num_arms: 2
            })
        );
        assert_eq!(policy, before);
    }
}

#[test]
fn bad_observations() {
    let model = RewardModel::new(
        RewardKind::SplitEe,
        CostModel::abstract_units(0.1, 1.0).unwrap(),
    );
    let conf = [0.6, 0.7];
    // Exited at a layer whose confidence the device never computed.
    assert_eq!(
        model.reward(12, &Observation::exited(&conf, 5)),
        Err(BanditError::MissingConfidence { layer: 5 })
    );
    assert_eq!(
        model.reward(12, &Observation::offloaded(&conf, 2, 1.5)),
        Err(BanditError::ConfidenceOutOfRange {
            layer: 12,
            value: 1.5
        })
    );
    assert_eq!(
        model.reward(12, &Observation::exited(&conf, 13)),
        Err(BanditError::LayerOutOfRange {
            layer: 13,
            num_layers: 12
        })
    );
    let measured = RewardModel::new(RewardKind::SplitEe, CostModel::measured(1.0).unwrap());
    assert_eq!(
        measured.reward(12, &Observation::exited(&conf, 2)),
        Err(BanditError::MissingEdgeCost { layer: 2 })
    );
    assert_eq!(
        measured.reward(
            12,
            &Observation::offloaded(&conf, 2, 0.9).with_edge_costs(&[1.0, 2.0])
        ),
        Err(BanditError::MissingOffloadCost)
    );
    assert_eq!(measured.range(12), Err(BanditError::RewardRangeUnknown));
    let uee = RewardModel::new(
        RewardKind::UeeProxy,
        CostModel::abstract_units(0.1, 0.0).unwrap(),
    );
    assert_eq!(
        uee.reward(12, &Observation::exited(&conf, 2)),
        Err(BanditError::MissingPredictions { layer: 2 })
    );
    assert_eq!(
        uee.reward(12, &Observation::offloaded(&conf, 2, 0.9)),
        Err(BanditError::OffloadNotSupported)
    );
    // The controller refuses measured costs without an explicit range, and bad arms.
    let space = ArmSpace::splits(12, 0.8).unwrap();
    assert_eq!(
        Controller::new(
            space.clone(),
            DecisionRule::SPLITEE,
            measured,
            &PolicyConfig::Ucb1 { c: 1.0 },
            None
        )
        .unwrap_err(),
        BanditError::RewardRangeUnknown
    );
    let mut controller = Controller::new(
        space,
        DecisionRule::SPLITEE,
        model,
        &PolicyConfig::Ucb1 { c: 1.0 },
        None,
    )
    .unwrap();
    assert_eq!(
        controller.learn(ArmIndex(12), &Observation::exited(&conf, 2)),
        Err(BanditError::ArmOutOfRange {
            arm: 12,
            num_arms: 12
        })
    );
}

#[test]
fn config_from_toml_like_structures() {
    let config: PolicyConfig =
        serde_json::from_str(r#"{"kind": "discounted-ucb", "gamma": 0.99}"#).unwrap();
    assert_eq!(
        config,
        PolicyConfig::DiscountedUcb {
            gamma: 0.99,
            c: 1.0
        }
    );
    let config: PolicyConfig = serde_json::from_str(r#"{"kind": "split-ee-s", "c": 2}"#).unwrap();
    assert_eq!(config, PolicyConfig::SplitEeS { c: 2.0 });
    assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind": "ucb1", "gama": 1}"#).is_err());
    assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind": "nope"}"#).is_err());
    // A range or arm space that breaks an invariant does not deserialize.
    assert!(serde_json::from_str::<RewardRange>(r#"{"lo": 1, "hi": 0}"#).is_err());
    assert!(serde_json::from_str::<ArmSpace>(r#"{"num_layers": 12, "arms": []}"#).is_err());
}

#[test]
fn structured_ucb_refuses_what_it_cannot_model() {
    let space = ArmSpace::splits(6, 0.9).unwrap();
    let measured = RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.01).unwrap());
    let range = Some(RewardRange::new(-2.0, 1.0).unwrap());
    let make = |policy: PolicyConfig, reward: &RewardModel| {
        Controller::new(
            space.clone(),
            DecisionRule::SPLITEE,
            reward.clone(),
            &policy,
            range,
        )
    };
    let structured = |c: f64, link_memory: f64| PolicyConfig::StructuredUcb { c, link_memory };
    assert!(make(structured(0.25, 100.0), &measured).is_ok());
    assert_eq!(
        make(structured(-1.0, 100.0), &measured),
        Err(BanditError::InvalidExploration(-1.0))
    );
    for memory in [0.5, f64::NAN, f64::INFINITY] {
        let error = make(structured(0.25, memory), &measured).unwrap_err();
        assert!(error.to_string().contains("link_memory"), "{error}");
    }
    let ada = RewardModel::new(RewardKind::AdaEe, CostModel::measured(0.01).unwrap());
    let error = make(structured(0.25, 100.0), &ada).unwrap_err();
    assert!(
        error.to_string().contains("split-ee or uee-proxy"),
        "{error}"
    );
    // It needs the arms and the cost model, which a bare policy build does not have.
    assert!(build(structured(0.25, 100.0), 6).is_err());
    let from_toml: PolicyConfig = toml::from_str("kind = \"structured-ucb\"").unwrap();
    assert_eq!(
        from_toml,
        structured(0.25, 100.0),
        "the documented defaults"
    );
}
