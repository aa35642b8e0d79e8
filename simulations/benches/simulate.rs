//! Simulated samples per second, single-threaded, for a 12-arm SplitEE run (12-layer
//! synthetic matrix, one exit per layer, split-only rule, abstract costs λ = 0.1, o = 0.5;
//! the agent's pipeline window of 16 and 2 s timeout), plus one run with measured costs over
//! a Mahimahi-like packet link. Prints a table.
//!
//! `cargo bench -p simulations --bench simulate` (samples per run: `SIM_BENCH_SAMPLES`).

use std::sync::Arc;
use std::time::Instant;

use splitee_bandits::{
    ArmSpace, Controller, CostModel, DecisionRule, ExitsConfig, PolicyConfig, RewardKind,
    RewardModel, RewardRange,
};
use splitee_link::{BaseTrace, Link, Rtt};
use splitee_protocol::PayloadEncoding;
use splitee_replay::clock::ClockConfig;
use splitee_replay::sim::{AgentModel, Arrivals, RunSpec, SampleOrder, Workload, run};
use splitee_replay::synth::{SynthSpec, generate};

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::var("SIM_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let matrix = generate(SynthSpec {
        samples: 10_000,
        layers: 12,
        classes: 2,
        hidden: 768,
        seed: 3,
    })?;
    let clocks = ClockConfig {
        edge_scale: 4.0,
        cloud_speedup: 10.0,
        ..ClockConfig::default()
    }
    .resolve(&matrix, None, PayloadEncoding::F16)?;
    let workload = Workload::new(&matrix, &clocks)?;
    let space = ArmSpace::splits(12, 0.9)?;
    let constant = Link::plain(
        Arc::new(BaseTrace::constant(20.0).map_err(anyhow::Error::msg)?),
        Arc::new(Rtt::Constant(30.0)),
    );
    // One opportunity every ms with bursts: a packet trace of 1000 stamps.
    let stamps: Vec<u64> = (1..=1000).map(|i| i + (i % 7 == 0) as u64).collect();
    let packet = Link::plain(
        Arc::new(BaseTrace::Packets {
            period_ms: *stamps.last().unwrap(),
            stamps,
        }),
        Arc::new(Rtt::Constant(30.0)),
    );

    println!("| run | policy | samples | seconds | samples/s (1 core) |");
    println!("|---|---|---|---|---|");
    let structured = PolicyConfig::StructuredUcb {
        c: 0.25,
        link_memory: 100.0,
    };
    let cases: [(&str, PolicyConfig, bool); 6] = [
        ("abstract", PolicyConfig::Ucb1 { c: 1.0 }, false),
        ("abstract", PolicyConfig::SplitEeS { c: 1.0 }, false),
        ("abstract", PolicyConfig::Random { seed: 1 }, false),
        ("abstract", structured.clone(), false),
        ("measured+packets", PolicyConfig::Ucb1 { c: 1.0 }, true),
        ("measured+packets", structured, true),
    ];
    for (name, policy, measured) in cases {
        let (model, range) = if measured {
            (
                RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.002)?),
                Some(RewardRange::new(-0.002 * 200.0, 1.0)?),
            )
        } else {
            (
                RewardModel::new(RewardKind::SplitEe, CostModel::abstract_units(0.1, 0.5)?),
                None,
            )
        };
        let controller =
            Controller::new(space.clone(), DecisionRule::SPLITEE, model, &policy, range)?;
        let link = if measured { &packet } else { &constant };
        let start = Instant::now();
        let result = run(RunSpec {
            workload: &workload,
            controller,
            agent: AgentModel {
                exits: ExitsConfig::default(),
                evaluate_all_heads: true,
                window: 16,
                request_timeout_ms: 2000.0,
                cloud_exit_threshold: None,
                edge_layers: 12,
            },
            link,
            arrivals: Arrivals::Poisson { rate_per_s: 20.0 },
            order: SampleOrder::Shuffled,
            samples,
            seed: 1,
        })?;
        let secs = start.elapsed().as_secs_f64();
        // Keeps the optimiser from discarding the run.
        assert_eq!(result.samples(), samples);
        println!(
            "| {name} | {policy:?} | {samples} | {secs:.3} | {:.0} |",
            samples as f64 / secs
        );
    }
    Ok(())
}
