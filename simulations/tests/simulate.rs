//! Parsers (good and malformed files), network models and the simulator, end to end.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::SeedableRng;
use splitee_bandits::{
    ArmSpace, Controller, CostModel, DecisionRule, ExitCheck, ExitsConfig, Fallback, PolicyConfig,
    RewardKind, RewardModel, RewardRange,
};
use splitee_link::InputError;
use splitee_link::LinkConfig as EmulatorConfig;
use splitee_link::{BaseTrace, CapacitySpells, Link, LinkQueue, Rtt, StepChange, TraceSource};
use splitee_protocol::PayloadEncoding;
use splitee_replay::clock::ClockConfig;
use splitee_replay::experiment::{
    ExperimentConfig, Hindsight, Prepared, reconvergence, replay_emulator, run_experiment,
};
use splitee_replay::matrix::{ConfidenceMatrix, MatrixFormat, SampleRow};
use splitee_replay::sim::{AgentModel, Arrivals, RunResult, RunSpec, SampleOrder, Workload, run};
use splitee_replay::synth::{SynthSpec, generate};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn matrix_err(text: &str) -> InputError {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.csv", text);
    ConfidenceMatrix::read_csv(&p).unwrap_err()
}

const HEADER: &str = "id,label,tokens,exit1_p0,exit1_p1,exit2_p0,exit2_p1,layer1_ms,layer2_ms";

#[test]
fn splitee_matrix_reads_metadata_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.csv",
        &format!(
            "# model=abc hidden=8 layers=2 machine=test\n{HEADER}\ns0,1,4,0.2,0.8,0.1,0.9,1.0,2.0\ns1,,6,0.6,0.4,0.3,0.7,1.0,4.0\n"
        ),
    );
    let m = ConfidenceMatrix::read_csv(&p).unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m.metadata()["machine"], "test");
    assert_eq!(m.exit_layers(), &[1, 2]);
    assert_eq!(m.label(1), None);
    assert_eq!(m.predictions(1), &[0, 1]);
    assert_eq!(m.confidences(0), &[0.8f32 as f64, 0.9f32 as f64]);
    assert_eq!(m.mean_layer_ms().unwrap(), vec![1.0, 3.0]);
}

#[test]
fn malformed_splitee_matrices_name_line_and_column() {
    let e = matrix_err(&format!(
        "# c\n{HEADER}\ns0,1,4,0.2,0.8,0.1,0.9,1.0,2.0\ns1,1,4,0.2,abc,0.1,0.9,1.0,2.0\n"
    ));
    assert_eq!(e.line, Some(4), "{e}");
    assert_eq!(e.column.as_deref(), Some("exit1_p1"), "{e}");
    assert!(e.message.contains("abc"), "{e}");

    let e = matrix_err(&format!("{HEADER}\ns0,1,4,0.2,0.7,0.1,0.9,1.0,2.0\n"));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("sum"), "{e}");

    let e = matrix_err(&format!("{HEADER}\ns0,1,4,0.2,0.8,0.1,0.9,1.0\n"));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("fields"), "{e}");

    let e = matrix_err(&format!("{HEADER}\ns0,2,4,0.2,0.8,0.1,0.9,1.0,2.0\n"));
    assert!(e.message.contains("label 2"), "{e}");

    let e = matrix_err(&format!("{HEADER}\ns0,1,4,0.2,0.8,0.1,0.9,1.0,-2.0\n"));
    assert_eq!(e.column.as_deref(), Some("layer2_ms"), "{e}");

    let e =
        matrix_err("id,label,tokens,exit2_p0,exit2_p1,exit1_p0,exit1_p1\ns,0,1,0.5,0.5,0.5,0.5\n");
    assert!(e.message.contains("ascend"), "{e}");
    let e =
        matrix_err("id,label,tokens,exit1_p0,exit1_p1,exit2_p1,exit2_p0\ns,0,1,0.5,0.5,0.5,0.5\n");
    assert!(e.message.contains("in order"), "{e}");
    let e = matrix_err("id,label,tokens,exit1_p0,exit1_p1,layer2_ms\ns,0,1,0.5,0.5,1\n");
    assert!(e.message.contains("layer1_ms"), "{e}");
    // Exits at 1 and 2 but three timed layers: no final classifier.
    let e = matrix_err(
        "id,label,tokens,exit1_p0,exit1_p1,layer1_ms,layer2_ms,layer3_ms\ns,0,1,0.5,0.5,1,1,1\n",
    );
    assert!(e.message.contains("last exit"), "{e}");
    let e = matrix_err(&format!(
        "# layers=3\n{HEADER}\ns0,1,4,0.2,0.8,0.1,0.9,1.0,2.0\n"
    ));
    assert!(e.message.contains("layers=3"), "{e}");
    let e = matrix_err(&format!("{HEADER}\n"));
    assert!(e.message.contains("no samples"), "{e}");
    // The Display form carries everything a user needs.
    let e = matrix_err(&format!("{HEADER}\ns0,x,4,0.2,0.8,0.1,0.9,1.0,2.0\n"));
    let shown = e.to_string();
    assert!(
        shown.ends_with("m.csv:2: column `label`: `x` is not a non-negative integer"),
        "{shown}"
    );
}

#[test]
fn published_formats_read_and_reject_malformed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "u.tsv",
        "0\t1\t2\top_labels\n1\t1\t0\t0\n0 1 1 1\n",
    );
    let m = MatrixFormat::UeeTsv.read(&p).unwrap();
    assert_eq!((m.len(), m.num_layers()), (2, 3));
    assert_eq!(m.predictions(1), &[0, 1, 1]);
    assert!(!m.has_confidences());
    let p = write(
        dir.path(),
        "u2.tsv",
        "0\t1\top_labels\n1\t1\t0\n1\t0.5\t1\n",
    );
    let e = MatrixFormat::UeeTsv.read(&p).unwrap_err();
    assert_eq!((e.line, e.column.as_deref()), (Some(3), Some("1")), "{e}");
    let p = write(dir.path(), "u3.tsv", "0\t1\top_labels\n1\t1\n");
    assert!(
        MatrixFormat::UeeTsv
            .read(&p)
            .unwrap_err()
            .message
            .contains("2 fields")
    );
    let p = write(dir.path(), "u4.tsv", "1\t0\top_labels\n1\t1\t1\n");
    assert_eq!(MatrixFormat::UeeTsv.read(&p).unwrap_err().line, Some(1));

    let header =
        ",conf_branch_1,infered_class_branches_1,conf_branch_2,infered_class_branches_2,target";
    let p = write(
        dir.path(),
        "a.csv",
        &format!("{header}\n0,0.7,3,0.9,4.0,4\n1,0.55,2,0.8,2,\n"),
    );
    let m = MatrixFormat::AdaeeCsv.read(&p).unwrap();
    assert_eq!(m.confidences(0), &[0.7, 0.9]);
    assert_eq!(m.predictions(0), &[3, 4]);
    assert_eq!((m.label(0), m.label(1)), (Some(4), None));
    let p = write(
        dir.path(),
        "a2.csv",
        &format!("{header}\n0,1.7,3,0.9,4,4\n"),
    );
    let e = MatrixFormat::AdaeeCsv.read(&p).unwrap_err();
    assert_eq!(
        (e.line, e.column.as_deref()),
        (Some(2), Some("conf_branch_1")),
        "{e}"
    );
    let p = write(dir.path(), "a3.csv", "conf_branch_1,target\n0.5,1\n");
    assert!(
        MatrixFormat::AdaeeCsv
            .read(&p)
            .unwrap_err()
            .message
            .contains("infered_class_branches_1")
    );
}

#[test]
fn traces_parse_and_reject_malformed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let e = BaseTrace::read_mahimahi(&write(dir.path(), "a.up", "1\n2\nx\n")).unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = BaseTrace::read_mahimahi(&write(dir.path(), "b.up", "5\n3\n")).unwrap_err();
    assert!(e.message.contains("before"), "{e}");
    assert!(BaseTrace::read_mahimahi(&write(dir.path(), "c.up", "0\n")).is_err());
    let e = BaseTrace::read_norway(&write(dir.path(), "n", "0.0\t1.0\n1.0\tfast\n")).unwrap_err();
    assert_eq!(
        (e.line, e.column.as_deref()),
        (Some(2), Some("2 (Mbit/s)")),
        "{e}"
    );
    let e = BaseTrace::read_norway(&write(dir.path(), "n2", "0.0\t1.0\n0.0\t1.0\n")).unwrap_err();
    assert!(e.message.contains("ascend"), "{e}");
    assert!(BaseTrace::read_norway(&write(dir.path(), "n3", "0.0\t0\n1.0\t0\n")).is_err());
    let g = write(dir.path(), "g.csv", "seq_num,A_mbps\n0,12\n1,-3\n");
    let e = BaseTrace::read_fivegophers(&g, "A_mbps").unwrap_err();
    assert_eq!(
        (e.line, e.column.as_deref()),
        (Some(3), Some("A_mbps")),
        "{e}"
    );
    assert!(
        BaseTrace::read_fivegophers(&g, "B_mbps")
            .unwrap_err()
            .message
            .contains("no column")
    );
    let r = write(
        dir.path(),
        "rtt.csv",
        "rtt_ms,carrier,server_location\n40,X,E\n50,Y,E\nabc,X,W\n",
    );
    let e = Rtt::read_fivegophers(&r, Some("x"), None).unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    assert_eq!(
        Rtt::read_fivegophers(&r, Some("Y"), Some("E")).unwrap(),
        Rtt::Samples(vec![50.0])
    );
}

#[test]
fn shared_traces_parse() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
    if !shared.exists() {
        eprintln!("shared/traces not present; skipped");
        return;
    }
    for f in fs::read_dir(shared.join("mahimahi")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "up" || e == "down") {
            BaseTrace::read_mahimahi(&p).unwrap();
        }
    }
    for f in fs::read_dir(shared.join("norway-3g")).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("norway_")
        {
            BaseTrace::read_norway(&p).unwrap();
        }
    }
    let g = shared.join("5gophers");
    for col in [
        "Sprint_throughput_mbps",
        "TMobile_throughput_mbps",
        "Verizon_throughput_mbps",
    ] {
        BaseTrace::read_fivegophers(&g.join("car-driving-trace-1.csv"), col).unwrap();
    }
    BaseTrace::read_fivegophers(&g.join("walking-trace.csv"), "throughput_mbps").unwrap();
    let rtt = Rtt::read_fivegophers(&g.join("rtt.csv"), Some("VERIZON"), Some("US-East")).unwrap();
    assert!(matches!(rtt, Rtt::Samples(s) if s.len() == 120));
}

fn plain(base: BaseTrace) -> Link {
    Link::plain(Arc::new(base), Arc::new(Rtt::Constant(0.0)))
}

#[test]
fn mahimahi_payloads_take_delivery_opportunities_in_fifo_order() {
    // Opportunities at 2, 2, 5, 9, then the trace loops with period 9 (2+9 = 11, …).
    let link = plain(BaseTrace::Packets {
        stamps: vec![2, 2, 5, 9],
        period_ms: 9,
    });
    let mut q = LinkQueue::default();
    // 3000 bytes = 2 packets at t = 0: both opportunities at 2.
    assert_eq!(link.transmit(0.0, 3000, &mut q), 2.0);
    // 1 packet sent at 1 ms: the 2 ms ones are taken, next is 5.
    assert_eq!(link.transmit(1.0, 10, &mut q), 5.0);
    // 3 packets at 6: 9, then 11 and 11 (second loop).
    assert_eq!(link.transmit(6.0, 4500, &mut q), 11.0);
    // Idle until 30: loop 3 (from 27) has 29, 29, 32: the first at or after 30 is 32.
    assert_eq!(link.transmit(30.0, 1, &mut q), 32.0);
    // Rate around t: 4 opportunities per 9 ms ≈ 5.3 Mbit/s.
    let r = link.rate_mbps(100.0);
    assert!(
        (r - 444.0 * 12000.0 / 1e6).abs() < 12000.0 * 2.0 / 1e6,
        "{r}"
    );
}

#[test]
fn rate_traces_integrate_through_segments_and_outages() {
    let dir = tempfile::tempdir().unwrap();
    // 1.2 Mbit/s for 1 s (100 packets), then 0 for 1 s, then 2.4 Mbit/s; loops after 3 s.
    let p = write(dir.path(), "n", "0\t1.2\n1\t0\n2\t2.4\n");
    let link = plain(BaseTrace::read_norway(&p).unwrap());
    let mut q = LinkQueue::default();
    // 150 packets from 0.5 s: 50 until 1 s, pause, 100 more at 200 per s = 0.5 s after 2 s.
    let end = link.transmit(500.0, 150 * 1500, &mut q);
    assert!((end - 2500.0).abs() < 1e-6, "{end}");
    assert_eq!(link.rate_mbps(1500.0), 0.0);
    assert_eq!(link.rate_mbps(3500.0), 1.2);
}

#[test]
fn gilbert_elliott_outages_delay_transfers() {
    let ge = CapacitySpells {
        mean_good_s: 1.0,
        mean_bad_s: 1.0,
        loss_good: 0.0,
        loss_bad: 1.0,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let base = Arc::new(BaseTrace::constant(12.0).unwrap());
    let link = Link::new(
        base,
        Arc::new(Rtt::Constant(0.0)),
        &[],
        Some(&ge),
        60_000.0,
        &mut rng,
    )
    .unwrap();
    let zero = (0..600)
        .filter(|i| link.rate_mbps(*i as f64 * 100.0) == 0.0)
        .count();
    // About half the time in outage with equal means.
    assert!((150..450).contains(&zero), "{zero}");
    for i in 0..600 {
        let t = i as f64 * 100.0;
        let end = link.transmit(t, 1500, &mut LinkQueue::default());
        // One packet takes 1 ms at full rate; in an outage it waits for the outage to end.
        if link.rate_mbps(t) == 0.0 {
            assert!(end > t + 1.0, "{t} {end}");
        } else {
            assert!(
                end <= t + 1.0 + 1e-9 || link.rate_mbps(end - 0.5) == 0.0,
                "{t} {end}"
            );
        }
    }
    assert!(
        Link::new(
            Arc::new(BaseTrace::constant(1.0).unwrap()),
            Arc::new(Rtt::Constant(0.0)),
            &[StepChange {
                at_s: 1.0,
                factor: 0.0
            }],
            None,
            0.0,
            &mut rng
        )
        .is_err()
    );
}

/// One sample, L = 2, exits at 1 and 2.
fn one_sample(c1: f32, c2: f32, label: u32) -> ConfidenceMatrix {
    let mut m = ConfidenceMatrix::new(2, vec![1, 2], 2, true).unwrap();
    m.set_metadata("hidden", "100").unwrap();
    m.push(SampleRow {
        id: "x",
        label: Some(label),
        tokens: 15,
        probs: &[1.0 - c1, c1, 1.0 - c2, c2],
        layer_ms: &[10.0, 20.0],
    })
    .unwrap();
    m
}

fn clock() -> ClockConfig {
    ClockConfig {
        cloud_speedup: 10.0,
        ..ClockConfig::default()
    }
}

fn f32_workload(m: &ConfidenceMatrix) -> Workload {
    Workload::new(m, &clock().resolve(m, None, PayloadEncoding::F32).unwrap()).unwrap()
}

/// 12 Mbit/s (one 1500-byte packet a millisecond), RTT 30 ms; measured costs at λ = 0.01.
fn packet_a_ms_link() -> (Link, RewardModel) {
    let link = Link::plain(
        Arc::new(BaseTrace::constant(12.0).unwrap()),
        Arc::new(Rtt::Constant(30.0)),
    );
    let model = RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.01).unwrap());
    (link, model)
}

/// The agent's defaults, but a window and timeout that never bind.
fn agent(layers: usize) -> AgentModel {
    AgentModel {
        exits: ExitsConfig::default(),
        evaluate_all_heads: true,
        window: usize::MAX,
        request_timeout_ms: f64::INFINITY,
        cloud_exit_threshold: None,
        edge_layers: layers,
    }
}

fn fixed_controller(arms: usize, arm: usize, model: &RewardModel) -> Controller {
    Controller::new(
        ArmSpace::splits(arms, 0.8).unwrap(),
        DecisionRule::SPLITEE,
        model.clone(),
        &PolicyConfig::Fixed { arm },
        Some(RewardRange::new(-5.0, 1.0).unwrap()),
    )
    .unwrap()
}

#[test]
fn a_hand_computed_offload_matches_the_simulator() {
    let m = one_sample(0.6, 0.9, 1);
    let w = f32_workload(&m);
    // 15 tokens × 100 × 4 B = 6000 B = 4 packets at one packet a ms; RTT 30.
    let (link, model) = packet_a_ms_link();
    let go = |arm: usize, agent: AgentModel, interval_ms: f64| {
        run(RunSpec {
            workload: &w,
            controller: fixed_controller(2, arm, &model),
            agent,
            link: &link,
            arrivals: Arrivals::Fixed { interval_ms },
            order: SampleOrder::Shuffled,
            samples: 2,
            seed: 0,
        })
        .unwrap()
    };
    let r = go(0, agent(2), 1000.0);
    // Split 1, C_1 = 0.6 < 0.8: offload after 10 ms; 4 ms on the link, 2 ms in the cloud
    // (layer 2 at a tenth of the device's 20 ms), 30 ms RTT.
    assert_eq!(r.latencies_ms, vec![46.0, 46.0]);
    assert_eq!(r.offloaded, 2);
    // Charged: edge 10 + the round trip 36 = 46 ms; reward = C_L − 0.01·46.
    assert!((r.cost_sum - 92.0).abs() < 1e-9);
    assert!((r.reward_sum - 2.0 * (0.9f32 as f64 - 0.46)).abs() < 1e-6);
    assert_eq!(r.accuracy(), Some(1.0));
    assert_eq!(r.bytes_sent, 12_000);
    // Arm 1 (all on the device): 0.9 − 0.01·30 = 0.6 > 0.44: the best fixed arm.
    let all_on_device = go(1, agent(2), 1000.0);
    let hindsight = Hindsight::new(vec![&r, &all_on_device]);
    assert_eq!(hindsight.best_arm, 1);
    assert!((hindsight.regret(&r) - 2.0 * 0.16).abs() < 1e-6);
    assert!((hindsight.pseudo_regret_curve(&r)[1] - 2.0 * 0.16).abs() < 1e-6);
    assert!((hindsight.share(&r).unwrap() - 0.44 / 0.6).abs() < 1e-6);

    // A 20 ms timeout: the answer (36 ms) is too late; at 30 ms the device finishes layer 2
    // (20 ms more), charged the wait and the layer.
    let timeout = go(
        0,
        AgentModel {
            request_timeout_ms: 20.0,
            ..agent(2)
        },
        1000.0,
    );
    assert_eq!(timeout.fallbacks, 2);
    assert_eq!(timeout.latencies_ms, vec![50.0, 50.0]);
    assert!((timeout.cost_sum - 2.0 * (10.0 + 20.0 + 20.0)).abs() < 1e-9);
    assert!((timeout.reward_sum - 2.0 * (0.9f32 as f64 - 0.5)).abs() < 1e-6);

    // A window of one: the second sample (arriving at 1 ms) waits for the first answer.
    let windowed = go(
        0,
        AgentModel {
            window: 1,
            ..agent(2)
        },
        1.0,
    );
    assert_eq!(windowed.waits_ms, vec![0.0, 45.0]);
    assert_eq!(windowed.latencies_ms, vec![46.0, 46.0]);
    // Without it, it starts as soon as the device is free (10 ms).
    let unbounded = go(0, agent(2), 1.0);
    assert_eq!(unbounded.waits_ms, vec![0.0, 9.0]);
    assert_eq!(unbounded.latencies_ms, vec![46.0, 46.0]);
}

#[test]
fn the_cloud_exit_and_the_confidence_measure_are_replayed() {
    // L = 3, exits at 1, 2, 3: a confident layer 2 lets the cloud answer there.
    let mut m = ConfidenceMatrix::new(3, vec![1, 2, 3], 2, true).unwrap();
    m.set_metadata("hidden", "100").unwrap();
    m.push(SampleRow {
        id: "x",
        label: Some(1),
        tokens: 15,
        probs: &[0.4, 0.6, 0.05, 0.95, 0.3, 0.7],
        layer_ms: &[10.0, 20.0, 30.0],
    })
    .unwrap();
    let w = f32_workload(&m);
    let (link, model) = packet_a_ms_link();
    let go = |agent: AgentModel| {
        let controller = Controller::new(
            ArmSpace::splits(3, 0.8).unwrap(),
            DecisionRule::SPLITEE,
            model.clone(),
            &PolicyConfig::Fixed { arm: 0 },
            Some(RewardRange::new(-5.0, 1.0).unwrap()),
        )
        .unwrap();
        run(RunSpec {
            workload: &w,
            controller,
            agent,
            link: &link,
            arrivals: Arrivals::Fixed {
                interval_ms: 1000.0,
            },
            order: SampleOrder::Sequential,
            samples: 1,
            seed: 0,
        })
        .unwrap()
    };
    let to_the_end = go(agent(3));
    let early = go(AgentModel {
        cloud_exit_threshold: Some(0.9),
        ..agent(3)
    });
    // The cloud skips layer 3 (3 ms at a tenth of 30): 3 ms sooner, and the answer's
    // confidence is exit 2's.
    assert!((to_the_end.latencies_ms[0] - early.latencies_ms[0] - 3.0).abs() < 1e-4);
    assert!(
        (early.reward_sum - (0.95f32 as f64 - 0.01 * early.cost_sum)).abs() < 1e-6,
        "{early:?}"
    );
    assert!((to_the_end.reward_sum - (0.7f32 as f64 - 0.01 * to_the_end.cost_sum)).abs() < 1e-6);
    // Entropy instead of max-prob: the same sample, another confidence.
    let entropy = go(AgentModel {
        exits: ExitsConfig {
            measure: splitee_bandits::ConfidenceMeasure::Entropy,
            patience: 2,
        },
        ..agent(3)
    });
    assert!(entropy.reward_sum < to_the_end.reward_sum);
}

fn synth_workload(samples: usize, layers: usize, edge_scale: f64) -> (ConfidenceMatrix, Workload) {
    let m = generate(SynthSpec {
        samples,
        layers,
        classes: 2,
        hidden: 384,
        seed: 11,
    })
    .unwrap();
    let mut c = clock();
    c.edge_scale = edge_scale;
    let w = Workload::new(&m, &c.resolve(&m, None, PayloadEncoding::F32).unwrap()).unwrap();
    (m, w)
}

fn splitee_run(w: &Workload, policy: PolicyConfig, seed: u64, samples: usize) -> RunResult {
    let link = Link::plain(
        Arc::new(BaseTrace::constant(20.0).unwrap()),
        Arc::new(Rtt::Constant(30.0)),
    );
    let controller = Controller::new(
        ArmSpace::splits(w.num_layers(), 0.9).unwrap(),
        DecisionRule::SPLITEE,
        RewardModel::new(
            RewardKind::SplitEe,
            CostModel::abstract_units(0.1, 0.3).unwrap(),
        ),
        &policy,
        None,
    )
    .unwrap();
    run(RunSpec {
        workload: w,
        controller,
        agent: agent(w.num_layers()),
        link: &link,
        arrivals: Arrivals::Poisson { rate_per_s: 10.0 },
        order: SampleOrder::Shuffled,
        samples,
        seed,
    })
    .unwrap()
}

#[test]
fn runs_are_deterministic_and_learning_beats_random() {
    let (_, w) = synth_workload(2000, 6, 1.0);
    let a = splitee_run(&w, PolicyConfig::Ucb1 { c: 1.0 }, 5, 4000);
    let b = splitee_run(&w, PolicyConfig::Ucb1 { c: 1.0 }, 5, 4000);
    assert_eq!(a, b);
    let c = splitee_run(&w, PolicyConfig::Ucb1 { c: 1.0 }, 6, 4000);
    assert_ne!(a.arrivals_ms, c.arrivals_ms);
    let fixed: Vec<RunResult> = (0..6)
        .map(|arm| splitee_run(&w, PolicyConfig::Fixed { arm }, 5, 4000))
        .collect();
    let hindsight = Hindsight::new(fixed.iter().collect());
    let random = splitee_run(&w, PolicyConfig::Random { seed: 1 }, 5, 4000);
    let side = splitee_run(&w, PolicyConfig::SplitEeS { c: 1.0 }, 5, 4000);
    let regret = |r: &RunResult| *hindsight.pseudo_regret_curve(r).last().unwrap();
    assert!(
        regret(&a) < 0.5 * regret(&random),
        "{} vs {}",
        regret(&a),
        regret(&random)
    );
    assert!(
        regret(&side) < regret(&a),
        "{} vs {}",
        regret(&side),
        regret(&a)
    );
    // Same seed, same stream: every policy saw the same samples at the same times.
    assert_eq!(a.arrivals_ms, random.arrivals_ms);
    // The best fixed arm has no regret against itself.
    let best = &fixed[hindsight.best_arm];
    assert!(regret(best).abs() < 1e-9);
    assert!(hindsight.regret(best).abs() < 1e-9);
}

#[test]
fn predictions_only_matrices_need_a_rule_that_ignores_confidences() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("0\t1\t2\top_labels\n");
    for i in 0..50 {
        text.push_str(&format!("{}\t{}\t1\t1\n", i % 2, i % 3 % 2));
    }
    let m = MatrixFormat::UeeTsv
        .read(&write(dir.path(), "u.tsv", &text))
        .unwrap();
    let c = ClockConfig {
        edge: write(
            dir.path(),
            "pi.toml",
            "name = \"t\"\nlayer_ms = [1.0, 1.0, 1.0]\nref_tokens = 32\n",
        )
        .to_string_lossy()
        .into_owned(),
        hidden: Some(8),
        ..clock()
    };
    let w = Workload::new(&m, &c.resolve(&m, None, PayloadEncoding::F32).unwrap()).unwrap();
    let link = plain(BaseTrace::constant(10.0).unwrap());
    let make = |fallback| {
        Controller::new(
            ArmSpace::splits(3, 0.0).unwrap(),
            DecisionRule {
                check: ExitCheck::SplitOnly,
                fallback,
            },
            RewardModel::new(
                RewardKind::UeeProxy,
                CostModel::abstract_units(0.1, 0.0).unwrap(),
            ),
            &PolicyConfig::Fixed { arm: 2 },
            None,
        )
        .unwrap()
    };
    let spec = |controller| RunSpec {
        workload: &w,
        controller,
        agent: agent(3),
        link: &link,
        arrivals: Arrivals::Fixed { interval_ms: 10.0 },
        order: SampleOrder::Shuffled,
        samples: 50,
        seed: 0,
    };
    let r = run(spec(make(Fallback::ExitAtSplit))).unwrap();
    assert_eq!(r.accuracy(), Some(1.0));
    assert_eq!(r.offloaded, 0);
    assert!(run(spec(make(Fallback::Offload))).is_err());
}

#[test]
fn sliding_window_ucb_reconverges_after_a_link_drop() {
    let (_, w) = synth_workload(3000, 6, 20.0);
    let steps = [StepChange {
        at_s: 200.0,
        factor: 0.02,
    }];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let link = Link::new(
        Arc::new(BaseTrace::constant(40.0).unwrap()),
        Arc::new(Rtt::Constant(20.0)),
        &steps,
        None,
        1e9,
        &mut rng,
    )
    .unwrap();
    let go = |policy: PolicyConfig| {
        let controller = Controller::new(
            ArmSpace::splits(6, 0.9).unwrap(),
            DecisionRule::SPLITEE,
            RewardModel::new(RewardKind::SplitEe, CostModel::measured(0.004).unwrap()),
            &policy,
            Some(RewardRange::new(-0.5, 1.0).unwrap()),
        )
        .unwrap();
        run(RunSpec {
            workload: &w,
            controller,
            agent: AgentModel {
                window: 16,
                request_timeout_ms: 2000.0,
                ..agent(6)
            },
            link: &link,
            arrivals: Arrivals::Fixed { interval_ms: 200.0 },
            order: SampleOrder::Shuffled,
            samples: 8000,
            seed: 2,
        })
        .unwrap()
    };
    let fixed: Vec<RunResult> = (0..6).map(|arm| go(PolicyConfig::Fixed { arm })).collect();
    let hindsight = Hindsight::new(fixed.iter().collect());
    let sw = go(PolicyConfig::SlidingWindowUcb {
        window: 500,
        c: 1.0,
    });
    let rc = reconvergence(&sw, &hindsight, &steps, 200, 0.8);
    assert_eq!(rc.len(), 1);
    // The drop makes offloading expensive: the best split moves deeper.
    assert!(rc[0].best_after > rc[0].best_before, "{rc:?}");
    let sw_samples = rc[0].samples.expect("sliding window re-converges");
    let ucb = go(PolicyConfig::Ucb1 { c: 1.0 });
    let rc_ucb = reconvergence(&ucb, &hindsight, &steps, 200, 0.8);
    assert!(
        rc_ucb[0].samples.is_none_or(|s| s > sw_samples),
        "UCB1 {rc_ucb:?} vs SW {sw_samples}"
    );
}

#[test]
fn a_link_emulator_config_replays_as_its_uplink_trace_delays_and_outages() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lte = EmulatorConfig::load(&repo.join("configs/links/lte.toml")).unwrap();
    let replay = replay_emulator(&lte).unwrap();
    assert!(
        matches!(&replay.trace, TraceSource::Mahimahi { path } if path.ends_with("verizon-lte-60s.up"))
    );
    assert_eq!(
        replay.rtt,
        splitee_replay::experiment::RttSource::Constant { ms: 40.0 }
    );
    assert!(replay.steps.is_empty());
    let outage = EmulatorConfig::load(&repo.join("configs/links/outage.toml")).unwrap();
    let steps: Vec<(f64, f64)> = replay_emulator(&outage)
        .unwrap()
        .steps
        .iter()
        .map(|s| (s.at_s, s.factor))
        .collect();
    assert_eq!(steps, [(10.0, 0.0), (15.0, 1.0), (30.0, 0.0), (32.0, 1.0)]);
    let lossy = EmulatorConfig::load(&repo.join("configs/links/lossy.toml")).unwrap();
    let error = replay_emulator(&lossy).unwrap_err().to_string();
    assert!(error.contains("loss"), "{error}");
    let switched = EmulatorConfig::load(&repo.join("configs/links/lte-to-3g.toml")).unwrap();
    assert!(replay_emulator(&switched).is_err());
}

#[test]
fn an_experiment_config_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let m = generate(SynthSpec {
        samples: 300,
        layers: 4,
        classes: 3,
        hidden: 64,
        seed: 1,
    })
    .unwrap();
    let mpath = dir.path().join("m.csv");
    m.write_csv(&mpath).unwrap();
    let up = write(
        dir.path(),
        "t.up",
        &(1..=50).map(|i| format!("{}\n", i * 2)).collect::<String>(),
    );
    let config = format!(
        r#"
name = "tiny"
samples = 400
seeds = [1, 2]
series_every = 10
[matrix]
path = "{m}"
[arrivals]
kind = "poisson"
rate_per_s = 20
[clock]
edge = "recorded"
cloud_speedup = 5
[agent.arms]
splits = "exits"
thresholds = [0.8, 0.95]
[agent.reward]
kind = "split-ee"
edge_costs = "layers"
lambda = 0.1
offload = 0.2
[agent.cloud]
encoding = "f16"
[sweep]
offload = [0.2, 0.5]
[[links]]
name = "mm"
trace = {{ kind = "mahimahi", path = "{up}" }}
rtt = {{ kind = "constant", ms = 20 }}
steps = [{{ at_s = 10, factor = 0.1 }}]
loss = {{ mean_good_s = 5, mean_bad_s = 0.5, loss_bad = 0.5 }}
[[policies]]
name = "SplitEE"
policy = {{ kind = "ucb1" }}
[[policies]]
name = "final"
policy = {{ kind = "fixed", arm = 7 }}
[report]
baseline = "final"
"#,
        m = mpath.display(),
        up = up.display()
    );
    let cfg: ExperimentConfig = toml::from_str(&config).unwrap();
    let prepared = Prepared::new(cfg.clone(), &m).unwrap();
    let out = dir.path().join("out");
    let report = run_experiment(&prepared, &out, false).unwrap();
    assert!(report.contains("SYNTHETIC"));
    assert!(report.contains("cost cut against `final`"));
    assert!(report.contains("re-convergence"));
    for f in [
        "runs.csv",
        "summary.csv",
        "series.csv",
        "report.md",
        "reconvergence.csv",
        "regret_mm_lambda0.1_o0.2.png",
        "regret_mm_lambda0.1_o0.5.svg",
        "arms_mm_lambda0.1_o0.2.png",
        "accuracy_vs_cost.svg",
    ] {
        assert!(out.join(f).metadata().is_ok_and(|m| m.len() > 0), "{f}");
    }
    assert!(report.contains("best fixed arm per seed"));
    let runs = fs::read_to_string(out.join("runs.csv")).unwrap();
    // link × o × policy × seed; the eight fixed arms ran too, as the reference.
    assert_eq!(runs.lines().count(), 1 + 2 * 2 * 2);
    let header: Vec<&str> = runs.lines().next().unwrap().split(',').collect();
    let share = header
        .iter()
        .position(|&c| c == "share_of_best_fixed")
        .unwrap();
    let final_share: f64 = runs
        .lines()
        .find(|l| l.contains(",final,"))
        .unwrap()
        .split(',')
        .nth(share)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        final_share > 0.0 && final_share <= 1.0 + 1e-12,
        "{final_share}"
    );
    // Deterministic: a second run writes the same numbers.
    let again = dir.path().join("again");
    run_experiment(&Prepared::new(cfg, &m).unwrap(), &again, false).unwrap();
    assert_eq!(runs, fs::read_to_string(again.join("runs.csv")).unwrap());
}

#[test]
fn every_shipped_experiment_prepares() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Experiments name their files relative to the repository root.
    std::env::set_current_dir(&repo).unwrap();
    let mut seen = 0;
    for entry in fs::read_dir("configs").unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("exp") && name.ends_with(".toml")) {
            continue;
        }
        let cfg = ExperimentConfig::load(&path).unwrap();
        let matrix = cfg.matrix.load(None).unwrap();
        Prepared::new(cfg, &matrix).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        seen += 1;
    }
    assert!(seen >= 3);
}

/// Every device preset parses, fits a shipped model and says it is an estimate; the base-size
/// model's agent presets (and its demo config) carry their `configs/devices/` profile exactly,
/// so the simulator's clock and the agent's `[device]` are one estimate.
#[test]
fn device_presets_parse_and_the_mpnet_agents_carry_them() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seen = 0;
    for entry in fs::read_dir(repo.join("configs/devices")).unwrap() {
        let path = entry.unwrap().path();
        let profile = splitee_replay::clock::load_profile(&path).unwrap();
        let layers = profile.layer_ms.len();
        assert!(layers == 6 || layers == 12, "{}", path.display());
        profile.validate(layers).unwrap();
        assert!(
            profile.description.contains("ESTIMATE"),
            "{}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 4);
    let mpnet_layers =
        splitee_model::BertConfig::from_file(&repo.join("models/mpnet-base/config.json"))
            .unwrap()
            .num_hidden_layers;
    for (agent, profile) in [
        (
            "configs/edge/raspberry-pi-4-mpnet.toml",
            "configs/devices/rpi4-mpnet.toml",
        ),
        (
            "configs/edge/raspberry-pi-5-mpnet.toml",
            "configs/devices/rpi5-mpnet.toml",
        ),
        (
            "configs/edge/jetson-orin-nano-mpnet.toml",
            "configs/devices/orin-nano-cpu-mpnet.toml",
        ),
        ("configs/demo-mpnet.toml", "configs/devices/rpi4-mpnet.toml"),
    ] {
        let device = splitee_replay::experiment::AgentTables::from_file(&repo.join(agent))
            .unwrap()
            .device
            .unwrap_or_else(|| panic!("{agent} has no [device]"));
        let preset = splitee_replay::clock::load_profile(&repo.join(profile)).unwrap();
        assert_eq!(device.layer_ms.len(), mpnet_layers, "{agent}");
        assert_eq!(device.layer_ms, preset.layer_ms, "{agent}");
        assert_eq!(device.embed_ms, preset.embed_ms, "{agent}");
        assert_eq!(device.ref_tokens, preset.ref_tokens, "{agent}");
        assert_eq!(device.description, preset.description, "{agent}");
    }
}

#[test]
fn every_shipped_agent_config_means_the_same_to_the_simulator() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut paths = vec![
        repo.join("configs/edge-agent.toml"),
        repo.join("configs/demo.toml"),
    ];
    for entry in fs::read_dir(repo.join("configs/edge")).unwrap() {
        paths.push(entry.unwrap().path());
    }
    for path in paths {
        let text = fs::read_to_string(&path).unwrap();
        // The demo's config gets its address and CA from the demo; the agent needs them.
        let live = splitee_testbed::demo::agent_config_for(&text, None)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let simulated = splitee_replay::experiment::AgentTables::from_file(&path).unwrap();
        simulated.validate().unwrap();
        let name = path.display();
        assert_eq!(simulated.arms, live.arms, "{name}");
        assert_eq!(simulated.reward, live.reward, "{name}");
        assert_eq!(simulated.policy.as_ref(), Some(&live.policy), "{name}");
        assert_eq!(simulated.exits, live.exits, "{name}");
        assert_eq!(simulated.device, live.device, "{name}");
        assert_eq!(simulated.edge_layers, live.edge_layers, "{name}");
        assert_eq!(simulated.pipeline.window, live.pipeline.window, "{name}");
        let cloud = live.cloud.expect("every shipped agent has a cloud");
        assert_eq!(simulated.cloud.encoding, cloud.encoding, "{name}");
        assert_eq!(
            simulated.cloud.request_timeout_ms, cloud.request_timeout_ms,
            "{name}"
        );
        assert_eq!(
            simulated.cloud.cloud_exit_threshold, cloud.cloud_exit_threshold,
            "{name}"
        );
    }
    // A key neither the agent nor the simulator knows is an error in both.
    let typo = "[arms]\nsplits = \"exits\"\nthresholds = [0.9]\n[pipeline]\nwindw = 3\n";
    assert!(splitee_replay::experiment::AgentTables::from_agent_toml(typo).is_err());
}

#[test]
fn certified_arms_keep_their_bound_on_held_out_data_and_restrict_the_agent() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = fs::read_to_string(repo.join("configs/edge-agent.toml")).unwrap();
    let agent = splitee_replay::experiment::AgentTables::from_agent_toml(&text).unwrap();
    let read =
        |name: &str| ConfidenceMatrix::read_csv(&repo.join("simulations/data").join(name)).unwrap();
    // Calibrated on the dev split, held out: the test split (the same model's recordings).
    let (dev, test) = (
        read("sentence-polarity-dev.csv"),
        read("sentence-polarity-test.csv"),
    );
    let epsilon = 0.01;
    let calibrated =
        splitee_replay::calibrate::calibrate(&agent, &dev, Some(&test), epsilon, 0.05).unwrap();
    let certified: Vec<_> = calibrated.certificate.certified().collect();
    assert!(certified.len() >= 2, "{}", calibrated.table());
    let worst = calibrated.worst_held_out().unwrap();
    assert!(
        worst <= epsilon,
        "a certified arm lost {worst} on held-out data"
    );
    // Written into the config, the agent and the simulator play only the certified arms.
    let written = calibrated.write_into(&text, Path::new("dev.csv")).unwrap();
    assert!(written.contains("certified by `simulations calibrate`"));
    let live = splitee_testbed::demo::agent_config_for(&written, None).unwrap();
    let (space, _) = live.arms.build(6, &[1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(space.len(), certified.len());
    let simulated = splitee_replay::experiment::AgentTables::from_agent_toml(&written).unwrap();
    assert_eq!(simulated.arms, live.arms);
}
