//! The replay check: the live demo's configuration (a real worker, the link emulator on the
//! LTE trace, an edge agent) and the same configuration through the simulator, on the same
//! sentences and the same trace. The simulator must decide and pay like the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::prelude::Device;
use splitee_bandits::Reported;
use splitee_link::LinkConfig;
use splitee_model::BackendChoice;
use splitee_replay::experiment::{ExperimentConfig, Player, Prepared};
use splitee_testbed::demo::{self, LocalCloud};
use tokio_util::sync::CancellationToken;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn device() -> Device {
    BackendChoice::Flex.device().unwrap()
}

const SAMPLES: usize = 400;
const INTERVAL_MS: u64 = 40;

/// The simulator's run of `configs/demo.toml` over `configs/links/lte.toml`: the recorded
/// confidences of the same sentences, streamed in file order at the demo's pace, on clocks
/// running at the speeds `calibration` measured on this machine.
fn simulated(calibration: &Calibration, dir: &Path) -> splitee_replay::sim::RunResult {
    let profile = dir.join("measured.toml");
    std::fs::write(
        &profile,
        format!(
            "description = \"measured in the live run\"\nlayer_ms = {:?}\nref_tokens = 1\n",
            vec![calibration.device_layer_ms; 6]
        ),
    )
    .unwrap();
    let text = format!(
        r#"
name = "replay-demo"
samples = {SAMPLES}
seeds = [1]
order = "sequential"
[matrix]
path = "simulations/data/sentence-polarity-test.csv"
[arrivals]
kind = "fixed"
interval_ms = {INTERVAL_MS}
[clock]
edge = {profile:?}
cloud_speedup = {speedup}
[agent]
config = "configs/demo.toml"
[[links]]
name = "lte"
emulator = "configs/links/lte.toml"
"#,
        speedup = calibration.device_layer_ms / calibration.cloud_layer_ms,
    );
    let config: ExperimentConfig = toml::from_str(&text).unwrap();
    let matrix = config.matrix.load(None).unwrap();
    let prepared = Prepared::new(config, &matrix).unwrap();
    prepared.run_one(0, 0, Player::Policy(0), 1).unwrap()
}

/// How fast this machine ran the device's and the worker's layers during the live run (its
/// two cores are shared by the agent, the worker and the link): the one input the replay takes
/// from the live run. The matrix's own timings were recorded on another day, under other load.
struct Calibration {
    device_layer_ms: f64,
    cloud_layer_ms: f64,
}

fn calibrate(records: &[(f64, edge_agent::SampleRecord)]) -> Calibration {
    let (mut device, mut first, mut cloud) = (Vec::new(), Vec::new(), Vec::new());
    for (_, record) in records {
        let Some(observed) = &record.observed else {
            continue;
        };
        device.extend(observed.device_ms.windows(2).map(|w| w[1] - w[0]));
        first.extend(observed.device_ms.first());
        if let Reported::Answered(a) = observed.outcome {
            cloud.push(a.cloud_compute_ms / (a.exit_layer - a.after) as f64);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Calibration {
        // Layers after the first, or (when no sample went deeper) the first with the embedding.
        device_layer_ms: if device.is_empty() {
            mean(&first)
        } else {
            mean(&device)
        },
        cloud_layer_ms: mean(&cloud),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_replays_the_live_demo() {
    std::env::set_current_dir(repo()).unwrap();

    let config_text = std::fs::read_to_string("configs/demo.toml").unwrap();
    let cloud = LocalCloud::start(Path::new("models/default"), device())
        .await
        .unwrap();
    let config = demo::agent_config_for(&config_text, Some(&cloud.certs)).unwrap();
    let link = LinkConfig::load(Path::new("configs/links/lte.toml")).unwrap();
    let sentences = edge_agent::input::read_tsv_file(
        Path::new("simulations/data/sentences/sentence-polarity-test.tsv"),
        SAMPLES,
    )
    .unwrap();
    let live = demo::run_over_link(
        "bandit",
        config,
        &link,
        cloud.worker.local_addr(),
        device(),
        sentences,
        Duration::from_millis(INTERVAL_MS),
        &CancellationToken::new(),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    cloud.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let calibration = calibrate(&live.records);
    eprintln!(
        "measured here during the live run: a device layer {:.2} ms, a worker layer {:.2} ms",
        calibration.device_layer_ms, calibration.cloud_layer_ms
    );
    let sim = simulated(&calibration, dir.path());
    let s = &live.summary;
    assert_eq!(s.answered, SAMPLES as u64);
    let rows = [
        ("offload rate", s.offload_rate.unwrap(), sim.offload_rate()),
        (
            "mean charged cost (ms)",
            s.cost_mean_ms.unwrap(),
            sim.mean_cost(),
        ),
        ("accuracy", s.accuracy.unwrap(), sim.accuracy().unwrap()),
    ];
    eprintln!("| | live | simulated | relative difference |\n|---|---|---|---|");
    for (name, live, simulated) in rows {
        eprintln!(
            "| {name} | {live:.4} | {simulated:.4} | {:+.1} % |",
            100.0 * (simulated - live) / live
        );
    }
    eprintln!(
        "| latency p50 / p99 (ms) | {:.1} / {:.1} | {:.1} / {:.1} | |",
        s.latency_p50_ms.unwrap(),
        s.latency_p99_ms.unwrap(),
        sim.latency_percentile_ms(50.0),
        sim.latency_percentile_ms(99.0)
    );
    for (name, live, simulated) in rows {
        let relative = (simulated - live).abs() / live;
        assert!(
            relative <= 0.10,
            "{name}: simulated {simulated:.4} vs live {live:.4} ({:.1} % apart)",
            100.0 * relative
        );
    }
}
