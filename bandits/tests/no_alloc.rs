//! `select`, `update`, `update_side` and `Controller::learn` must not allocate: counted with a
//! global allocator wrapper.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use splitee_bandits::{
    ArmIndex, ArmSpace, Controller, CostModel, DecisionRule, Observation, Policy, PolicyConfig,
    RewardKind, RewardModel, RewardRange,
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

    let model = RewardModel::new(
        RewardKind::SplitEe,
        CostModel::abstract_units(0.05, 5.0).unwrap(),
    );
    let mut controller = Controller::new(
        ArmSpace::splits(12, 0.8).unwrap(),
        DecisionRule::SPLITEE,
        model,
        &PolicyConfig::SplitEeS { c: 1.0 },
        None,
    )
    .unwrap();
    let row = [
        0.55, 0.6, 0.7, 0.75, 0.79, 0.85, 0.9, 0.9, 0.92, 0.95, 0.96, 0.97,
    ];
    let before = allocations();
    for _ in 0..1000 {
        let (index, arm) = controller.select();
        let mut sample = controller.start_sample(arm);
        let mut decision = None;
        for (j, &c) in row.iter().enumerate() {
            if let splitee_bandits::Step::Done(d) = sample.observe(j + 1, Some(c)).unwrap() {
                decision = Some(d);
                break;
            }
        }
        let obs = match decision.unwrap() {
            splitee_bandits::Decision::Exit { layer } => Observation::exited(&row[..layer], layer),
            splitee_bandits::Decision::Offload { after } => {
                Observation::offloaded(&row[..after], after, row[11])
            }
        };
        controller.learn(index, &obs).unwrap();
    }
    assert_eq!(allocations(), before, "controller");
}
