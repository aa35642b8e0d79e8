//! The edge agent against a real cloud worker on loopback (QUIC + TLS, certificates from
//! `gen-certs`), on the repository's default model and the shared labelled sentences. One test
//! binary (modules below) because each binary links all of burn.

mod attack;
mod connect;
mod fleet;
mod overload;
mod sigterm;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use cloud_worker::GeneratedCerts;
use edge_agent::input::InputRecord;
use edge_agent::metrics::Metrics;
use edge_agent::{Agent, AgentConfig, Answered, SampleRecord, Summary};
use splitee_model::{LoadedModel, ModelDir};
use tokio_util::sync::CancellationToken;

#[path = "../support/mod.rs"]
mod support;
use support::{certs, device, load_model, repo, sentences};

async fn start_worker(certs: &GeneratedCerts, listen: &str) -> cloud_worker::Worker {
    support::start_worker(certs, listen, |_| {}).await
}

/// An agent config on the default model; `tables` holds [arms], [policy], … as TOML.
fn agent_config(
    cloud: Option<(&GeneratedCerts, std::net::SocketAddr)>,
    tables: &str,
) -> AgentConfig {
    AgentConfig::from_toml(&support::agent_toml(cloud, tables)).unwrap()
}

/// Runs `records` through `agent`, calling `on_record` with each output record.
async fn run(
    agent: &mut Agent,
    records: Vec<InputRecord>,
    on_record: impl FnMut(usize, &SampleRecord),
) -> (Vec<SampleRecord>, Summary) {
    run_paced(agent, records, None, on_record).await
}

/// [`run`], feeding one sample every `every` (as fast as the agent takes them when `None`).
async fn run_paced(
    agent: &mut Agent,
    records: Vec<InputRecord>,
    every: Option<std::time::Duration>,
    mut on_record: impl FnMut(usize, &SampleRecord),
) -> (Vec<SampleRecord>, Summary) {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for record in records {
            if let Some(every) = every {
                tokio::time::sleep(every).await;
            }
            if sender.send(record).await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let summary = agent
        .run(receiver, CancellationToken::new(), &mut |record| {
            on_record(out.len(), record);
            out.push(record.clone());
        })
        .await
        .unwrap();
    feeder.await.unwrap();
    (out, summary)
}

/// Probabilities of exit `layer` of the whole model run locally, one sample at a time.
fn local_probs(loaded: &LoadedModel, text: &str, layer: usize) -> Vec<f32> {
    let batch = loaded.tokenizer.batch(&[text]).unwrap();
    let (ids, mask) = batch.to_tensors(&device());
    let hidden = loaded.model.embed(ids, mask).unwrap();
    let hidden = loaded.model.run_layers(hidden, 0..layer).unwrap();
    loaded
        .model
        .exit_probs(layer, &hidden)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Exactly one answer per sample of the `samples` first test sentences, in input order.
fn assert_each_answered_once(records: &[SampleRecord], samples: usize) {
    assert_eq!(records.len(), samples);
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.line, index + 2, "{record:?}");
        assert!(record.prediction.is_some(), "{record:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloading_at_every_split_matches_the_local_model_and_alpha_zero_matches_the_exit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    let address = worker.local_addr();
    let samples = sentences(24);
    let local = load_model();
    let texts: Vec<String> = samples.iter().map(|s| s.text.clone().unwrap()).collect();
    let final_probs: Vec<Vec<f32>> = texts.iter().map(|t| local_probs(&local, t, 6)).collect();

    for split in 1..=5 {
        // α = 1: no exit is ever that sure, so every sample goes to the cloud.
        let config = agent_config(
            Some((&certs, address)),
            &format!(
                "[arms]\nsplits = [{split}]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n"
            ),
        );
        let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
            .await
            .unwrap();
        let (records, summary) = run(&mut agent, samples.clone(), |_, _| {}).await;
        assert_eq!(
            summary.in_cloud,
            samples.len() as u64,
            "split {split}: {summary:?}"
        );
        for (record, expected) in records.iter().zip(&final_probs) {
            assert_eq!(record.answered, Answered::Cloud);
            assert_eq!(record.exit_layer, Some(6));
            assert_eq!(
                record.prediction,
                Some(splitee_bandits::argmax(expected)),
                "split {split}, {record:?}"
            );
            let confidence = record.confidence.unwrap();
            let local_confidence = f64::from(expected.iter().copied().fold(0.0, f32::max));
            assert!(
                (confidence - local_confidence).abs() < 1e-4,
                "split {split}: cloud {confidence} vs local {local_confidence}"
            );
            assert!(record.bytes_sent > 0 && record.latency_ms.network >= 0.0);
        }
        agent.shutdown().await.unwrap();
    }

    // α = 0: the first tested exit always fires, on the device.
    for (check, split, layer) in [("every-layer", 4, 1), ("split-only", 3, 3)] {
        let config = agent_config(
            Some((&certs, address)),
            &format!(
                "[arms]\nsplits = [{split}]\nthresholds = [0.0]\ncheck = \"{check}\"\n\
                 [policy]\nkind = \"fixed\"\narm = 0\n"
            ),
        );
        let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
            .await
            .unwrap();
        let (records, _) = run(&mut agent, samples.clone(), |_, _| {}).await;
        for (record, text) in records.iter().zip(&texts) {
            assert_eq!(record.answered, Answered::Device);
            assert_eq!(record.exit_layer, Some(layer));
            assert_eq!(
                record.prediction,
                Some(splitee_bandits::argmax(&local_probs(&local, text, layer)))
            );
            assert_eq!(record.bytes_sent, 0);
        }
        agent.shutdown().await.unwrap();
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_outage_loses_no_sample_and_offloading_resumes_after_the_restart() {
    const SAMPLES: usize = 500;
    const STOP_AT: usize = 150;
    const RESTART_AT: usize = 300;
    const WINDOW: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let certs = Arc::new(certs(dir.path()));
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    let address = worker.local_addr();
    let config = agent_config(
        Some((&certs, address)),
        &format!(
            "[pipeline]\nwindow = {WINDOW}\n[arms]\nsplits = [2]\nthresholds = [1.0]\n\
             [policy]\nkind = \"fixed\"\narm = 0\n"
        ),
    );
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();

    // The worker is stopped and restarted from another task while the agent keeps going.
    let (events, mut commands) = tokio::sync::mpsc::unbounded_channel();
    let supervisor = {
        let certs = certs.clone();
        tokio::spawn(async move {
            let mut worker = Some(worker);
            while let Some(event) = commands.recv().await {
                match event {
                    "stop" => worker.take().unwrap().shutdown().await.unwrap(),
                    "restart" => {
                        worker = Some(start_worker(&certs, &address.to_string()).await);
                    }
                    _ => unreachable!(),
                }
            }
            worker.unwrap().shutdown().await.unwrap();
        })
    };
    let (records, summary) = run(&mut agent, sentences(SAMPLES), |index, _| {
        if index + 1 == STOP_AT {
            events.send("stop").unwrap();
        } else if index + 1 == RESTART_AT {
            events.send("restart").unwrap();
        }
    })
    .await;
    drop(events);
    supervisor.await.unwrap();
    agent.shutdown().await.unwrap();

    assert_each_answered_once(&records, SAMPLES);
    let answered = |range: std::ops::Range<usize>, how: Answered| {
        records[range].iter().filter(|r| r.answered == how).count()
    };
    assert_eq!(
        answered(0..STOP_AT, Answered::Cloud),
        STOP_AT,
        "{summary:?}"
    );
    // Once the shutdown began (a window after the stop at most), nothing reaches the cloud
    // until the restart, and those samples say they were answered on the device.
    let outage = STOP_AT + 2 * WINDOW..RESTART_AT;
    assert_eq!(answered(outage.clone(), Answered::Cloud), 0, "{summary:?}");
    for record in &records[outage] {
        assert_eq!(record.answered, Answered::DeviceFallback);
        assert_eq!(record.exit_layer, Some(6), "the device holds all layers");
        assert!(record.error.is_some());
    }
    // Offloading resumes after the restart.
    let after = answered(RESTART_AT..SAMPLES, Answered::Cloud);
    assert!(
        after >= 100,
        "only {after} cloud answers after the restart: {summary:?}"
    );
    assert!(
        records[SAMPLES - 20..]
            .iter()
            .all(|r| r.answered == Answered::Cloud)
    );
    assert_eq!(summary.answered, SAMPLES as u64);
    assert_eq!(summary.in_cloud + summary.fallbacks, SAMPLES as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandit_state_survives_a_restart_and_costs_are_measured() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let tables = format!(
        "state_file = {:?}\nsave_state_every = 7\n[arms]\nsplits = [1, 3, 6]\nthresholds = [0.9]\n\
         fallback = \"exit-at-split\"\n[policy]\nkind = \"ucb1\"\n",
        state.to_str().unwrap()
    );
    let config = agent_config(None, &tables);
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), false)
        .await
        .unwrap();
    let (records, summary) = run(&mut agent, sentences(30), |_, _| {}).await;
    assert_eq!(summary.on_device, 30);
    // Each arm was played, and deeper exits cost more device time.
    assert_eq!(summary.pulls.len(), 3, "{summary:?}");
    let cost_at = |layer: usize| {
        let costs: Vec<f64> = records
            .iter()
            .filter(|r| r.exit_layer == Some(layer))
            .map(|r| r.cost_ms.unwrap())
            .collect();
        costs.iter().sum::<f64>() / costs.len() as f64
    };
    assert!(cost_at(6) > cost_at(1), "{} vs {}", cost_at(6), cost_at(1));
    agent.shutdown().await.unwrap();

    let restarted = Agent::start(&config, device(), Arc::new(Metrics::new()), false)
        .await
        .unwrap();
    assert_eq!(restarted.learned(), 30);
    assert_eq!(restarted.controller(), &saved_controller(&state));
    // One agent per state file: the next one starts once this one is gone.
    drop(restarted);
    let fresh = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();
    assert_eq!(fresh.learned(), 0);
}

/// The controller saved in a state file, read back independently of the agent.
fn saved_controller(state: &Path) -> splitee_bandits::Controller {
    let text = std::fs::read_to_string(state).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(value["controller"].clone()).unwrap()
}

#[test]
fn bad_input_lines_get_error_records_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[arms]\nsplits = [2]\nthresholds = [0.9]\nfallback = \"exit-at-split\"\n",
    )
    .unwrap();
    let input = dir.path().join("samples.jsonl");
    let mut file = std::fs::File::create(&input).unwrap();
    file.write_all(b"{\"text\": \"a gorgeous, witty film\", \"label\": 1}\n")
        .unwrap();
    file.write_all(b"\n").unwrap();
    file.write_all(b"{\"text\": \"bytes \xff\xfe here\"}\n")
        .unwrap();
    file.write_all(format!("{{\"text\": \"{}\"}}\n", "long ".repeat(20_000)).as_bytes())
        .unwrap();
    file.write_all(b"{\"text\": \"unterminated\n").unwrap();
    file.write_all(b"{\"id\": \"last\", \"text\": \"dull and lifeless\", \"label\": 0}\n")
        .unwrap();
    drop(file);
    let output = dir.path().join("out.jsonl");
    let summary = dir.path().join("summary.json");
    let run_agent = |extra: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .current_dir(repo())
            .args(["run", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(
        run_agent(&["--summary-json".as_ref(), summary.as_os_str()])
            .status
            .success()
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 6);
    let errors: Vec<&str> = records
        .iter()
        .map(|r| r["error"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(records[0]["answered"], "device");
    assert_eq!(errors[1], "empty line");
    assert!(errors[2].starts_with("not UTF-8"), "{}", errors[2]);
    assert!(
        errors[3].contains("exceeds the limit of 65536"),
        "{}",
        errors[3]
    );
    assert!(errors[4].starts_with("malformed JSON"), "{}", errors[4]);
    for record in &records[1..5] {
        assert_eq!(record["answered"], "error");
    }
    assert_eq!(records[5]["id"], "last");
    assert_eq!(records[5]["answered"], "device");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["errors"], 4);
    assert_eq!(summary["answered"], 2);
    assert_eq!(summary["labelled"], 2);

    // A rerun does not destroy the answers it would replace, unless told to.
    let refused = run_agent(&[]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("--overwrite"), "{message}");
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 6);
    assert!(run_agent(&["--overwrite".as_ref()]).status.success());
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 6);
}

/// A fresh controller of `config`, built as the agent builds its own.
fn fresh_controller(config: &AgentConfig) -> splitee_bandits::Controller {
    let dir = ModelDir::open(&config.model).unwrap();
    let layers = dir.config.num_hidden_layers;
    let (space, rule) = config.arms.build(layers, &dir.exits.layers).unwrap();
    let (reward, range) = config.reward.build(layers, config.device.as_ref()).unwrap();
    splitee_bandits::Controller::new(space, rule, reward, &config.policy, Some(range)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_records_replay_through_the_settlement_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    // Side information, a token-scaled device profile and a per-KB price: every part of the
    // settlement that could drift between the agent's record and a replay.
    let tables = "[arms]\nsplits = \"exits\"\nthresholds = [0.8, 0.95]\n\
                  [reward]\nedge_costs = \"profile\"\nms_per_kb = 0.05\nlambda = 0.004\n\
                  [policy]\nkind = \"split-ee-s\"\nc = 0.5\n\
                  [device]\nlayer_ms = [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]\nembed_ms = 1.0\nref_tokens = 16\n";
    let config = agent_config(Some((&certs, worker.local_addr())), tables);
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();
    let (mut records, _) = run(&mut agent, sentences(60), |_, _| {}).await;
    // The worker gone: the offloads fail and the device finishes them.
    worker.shutdown().await.unwrap();
    let (more, _) = run(&mut agent, sentences(20), |_, _| {}).await;
    records.extend(more);
    let answered = |kind: Answered| records.iter().filter(|r| r.answered == kind).count();
    assert!(answered(Answered::Cloud) > 0 && answered(Answered::Device) > 0);
    assert!(
        answered(Answered::DeviceFallback) > 0,
        "the failures are replayed too"
    );

    // The JSON lines, as `edge-agent run` writes them, read back as a user's script would.
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let mut logged: Vec<(u64, splitee_bandits::SampleLog, f64, f64)> = lines
        .iter()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                value["learned"].as_u64().unwrap(),
                serde_json::from_value(value["observed"].clone()).unwrap(),
                value["reward"].as_f64().unwrap(),
                value["cost_ms"].as_f64().unwrap(),
            )
        })
        .collect();
    logged.sort_by_key(|(learned, ..)| *learned);
    let mut replay = fresh_controller(&config);
    for (learned, log, reward, cost) in &logged {
        let settled = replay.settle(&log.as_report()).unwrap();
        assert_eq!(
            settled.reward.to_bits(),
            reward.to_bits(),
            "sample {learned}"
        );
        assert_eq!(settled.cost().to_bits(), cost.to_bits(), "sample {learned}");
    }
    // Learnt in the same order, the replayed bandit is the agent's, bit for bit.
    assert_eq!(&replay, agent.controller());
}
