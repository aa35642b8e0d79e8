//! SIGTERM (what `systemctl stop` and `docker stop` send) in the middle of a run: the agent
//! answers the samples it started, writes each record whole, saves the bandit state and exits
//! 0.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_answers_every_started_sample_and_saves_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // Offloads wait 100 ms for their batch to fill, so several are in flight at any time.
    let worker = support::start_worker(&certs, "127.0.0.1:0", |config| {
        config.batching.max_wait_us = 100_000;
    })
    .await;

    let state = dir.path().join("state.json");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nstate_file = {:?}\nsave_state_every = 100000\n\
             [cloud]\naddress = \"{}\"\nca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n\
             request_timeout_ms = 5000\n\
             [arms]\nsplits = [1, 2]\nthresholds = [1.0]\n[policy]\nkind = \"ucb1\"\n",
            support::model_dir(),
            state,
            worker.local_addr(),
            certs.agent_ca,
            certs.client_cert,
            certs.client_key,
        ),
    )
    .unwrap();
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "a gripping, beautifully shot film\n".repeat(5_000)).unwrap();
    let output = dir.path().join("answers.jsonl");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .args(["run", "--fresh-state", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = agent.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    // Mid-run: once 100 records are out (a few seconds), and well before the 5,000th.
    let started = Instant::now();
    while std::fs::read_to_string(&output).map_or(0, |text| text.lines().count()) < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the agent is stuck"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    let log = log.join().unwrap();
    let log = log.join("\n");
    assert!(
        exit.success(),
        "the agent exited with {exit:?} after SIGTERM:\n{log}"
    );

    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.ends_with('\n'), "the last record is cut short");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    // The agent says how many samples it had started when the signal came; each got its
    // record, in input order, none failed.
    let started: usize = log
        .lines()
        .find_map(|line| {
            line.contains("stopping")
                .then(|| line.split("started=").nth(1))
                .flatten()
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count of started samples in the log:\n{log}"));
    assert!(
        (100..5_000).contains(&started),
        "{started} samples started: not mid-run"
    );
    assert_eq!(records.len(), started, "one record per started sample");
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record["line"], index + 1, "{record}");
        assert_ne!(record["answered"], "error", "{record}");
    }
    // The state holds every sample the records say was learnt.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let learned = records
        .iter()
        .filter_map(|r| r["learned"].as_u64())
        .max()
        .unwrap();
    assert_eq!(saved["samples_learned"], learned);
    assert_eq!(learned, started as u64);
    worker.shutdown().await.unwrap();
}
