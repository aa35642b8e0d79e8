//! `select`, `update`, `update_side`, a device pass and `Controller::settle` must not allocate:
//! counted with a global allocator wrapper.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use splitee_bandits::{
    ArmIndex, ArmSpace, CloudAnswered, Controller, CostModel, Decision, DecisionRule, ExitsConfig,
    OffloadFailed, Policy, PolicyConfig, Reported, RewardKind, RewardModel, RewardRange, Step,
};

struct Counting;

thread_local! {
    // Per thread: the test harness allocates on its own threads while this test runs. A const
    // initialiser with no destructor, so touching it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

fn count() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decisions_do_not_allocate() {
    let configs = [
        PolicyConfig::Ucb1 { c: 1.0 },
        PolicyConfig::SplitEeS { c: 1.0 },
        PolicyConfig::KlUcb { c: 0.0 },
        PolicyConfig::DiscountedUcb {
            gamma: 0.99,
            c: 1.0,
        },
        PolicyConfig::SlidingWindowUcb { window: 64, c: 1.0 },
        PolicyConfig::Thompson {
            sigma: 1.0,
            seed: 1,
        },
        PolicyConfig::EpsilonGreedy {
            epsilon: 0.1,
            seed: 1,
        },
        PolicyConfig::Fixed { arm: 3 },
        PolicyConfig::Random { seed: 1 },
        PolicyConfig::Oracle {
            means: vec![0.5; 12],
        },
    ];
    for config in configs {
        let mut policy = config.build(12, RewardRange::default()).unwrap();
        let before = allocations();
        for t in 0..1000u32 {
            let arm = policy.select();
            let reward = f64::from(t % 7) / 7.0;
            policy.update(arm, reward).unwrap();
            policy.update_side(ArmIndex(0), reward).unwrap();
        }
        assert_eq!(allocations(), before, "{config:?}");
    }

    // SplitEE-S with abstract costs; the structured policy with measured ones, so that its
    // link model and per-layer costs are fed too.
    let cases = [
        (
            PolicyConfig::SplitEeS { c: 1.0 },
            CostModel::abstract_units(0.05, 5.0).unwrap(),
        ),
        (
            PolicyConfig::StructuredUcb {
                c: 0.25,
                link_memory: 100.0,
            },
            CostModel::measured(0.01).unwrap(),
        ),
    ];
    for (policy, cost) in cases {
        let model = RewardModel::new(RewardKind::SplitEe, cost);
        let mut controller = Controller::new(
            ArmSpace::splits(12, 0.8).unwrap(),
            DecisionRule::SPLITEE,
            model,
            &policy,
            Some(RewardRange::new(-3.0, 1.0).unwrap()),
        )
        .unwrap();
        // Exit probabilities of a 12-layer sample, as a driver reads them from its model.
        let row: Vec<[f32; 2]> = [
            0.55, 0.6, 0.7, 0.75, 0.79, 0.85, 0.9, 0.9, 0.92, 0.95, 0.96, 0.97,
        ]
        .iter()
        .map(|&p: &f32| [1.0 - p, p])
        .collect();
        let layers: Vec<usize> = (1..=12).collect();
        let mut pass = controller
            .device_pass(&layers, ExitsConfig::default(), true)
            .unwrap();
        let before = allocations();
        for t in 0..1000 {
            let (index, arm) = controller.select();
            pass.start(arm);
            let decision = loop {
                let layer = pass.next_layer().unwrap();
                let probs = pass.wants_head(layer).then(|| &row[layer - 1][..]);
                if let Step::Done(d) = pass.observe(layer, probs, layer as f64).unwrap() {
                    break d;
                }
            };
            let outcome = match decision {
                Decision::Exit { layer } => Reported::Exited { layer },
                Decision::Offload { after } if t % 5 == 0 => Reported::Failed(OffloadFailed {
                    after,
                    waited_ms: 100.0,
                    bytes_sent: 1000,
                    finish_layer: 12,
                    confidence: pass.answer_confidence(&row[11]),
                    finish_ms: 10.0,
                }),
                Decision::Offload { after } => Reported::Answered(CloudAnswered {
                    after,
                    exit_layer: 12,
                    confidence: pass.answer_confidence(&row[11]),
                    round_trip_ms: 40.0,
                    cloud_compute_ms: 5.0,
                    bytes_sent: 1000,
                }),
            };
            controller.settle(&pass.report(index, 20, outcome)).unwrap();
        }
        assert_eq!(allocations(), before, "controller with {policy:?}");
    }
}
