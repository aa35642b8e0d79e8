//! Load benchmark of `edge-agent serve` (docs/edge-agent.md, "Edge agent", "As a device service"):
//! closed-loop clients (each sends its next request when the last is answered) against a real
//! `serve` process, per mode — device only (no `[cloud]`) and offloading (a cloud worker in
//! this process, on the same machine) — with requests/s and p50/p99 latency as the clients
//! see them (connection, queueing and answer included).
//!
//! `cargo bench --workspace --bench serve`; `SERVE_BENCH_SECONDS` sets each cell's length
//! (default 10). Not part of the test run.

#[path = "../tests/service/mod.rs"]
mod service;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_agent::report::percentile;
use serde_json::json;
use service::Service;

/// One cell of the table: `clients` closed loops of `texts` texts per request.
struct Cell {
    clients: usize,
    texts: usize,
}

const CELLS: [Cell; 4] = [
    Cell {
        clients: 1,
        texts: 1,
    },
    Cell {
        clients: 4,
        texts: 1,
    },
    Cell {
        clients: 16,
        texts: 1,
    },
    Cell {
        clients: 4,
        texts: 8,
    },
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("SERVE_BENCH_SECONDS")
        .ok()
        .map_or(10, |s| s.parse().expect("SERVE_BENCH_SECONDS is a number"));
    let sentences = repository_sentences();
    let dir = tempfile::tempdir().unwrap();
    let certs = support::certs(dir.path());
    let worker = support::start_worker(&certs, "127.0.0.1:0", |_| {}).await;
    // The shipped config's arms and policy (configs/edge-agent.toml).
    let tables = |fallback: &str| {
        format!(
            "[serve]\nmax_queued_texts = 1024\n[arms]\nsplits = \"exits\"\n\
             thresholds = [0.8, 0.9]\nfallback = \"{fallback}\"\n\
             [policy]\nkind = \"sliding-window-ucb\"\nwindow = 500\nc = 1.0\n"
        )
    };
    let modes = [
        (
            "device only",
            support::agent_toml(None, &tables("exit-at-split")),
        ),
        (
            "offloading",
            support::agent_toml(Some((&certs, worker.local_addr())), &tables("offload")),
        ),
    ];
    println!(
        "{} s per cell; load average before: {}",
        seconds,
        load_average()
    );
    println!(
        "| mode | clients | texts/request | requests/s | texts/s | p50 ms | p99 ms | offloaded | not 200 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (index, (mode, config)) in modes.iter().enumerate() {
        let mode_dir = dir.path().join(index.to_string());
        std::fs::create_dir_all(&mode_dir).unwrap();
        let mut service = Service::start(&mode_dir, config, &[]);
        // Warm-up: the bandit's first pulls and the allocator's first pages.
        measure(
            &service,
            &sentences,
            &Cell {
                clients: 2,
                texts: 1,
            },
            Duration::from_secs(2),
        );
        for cell in &CELLS {
            let row = measure(&service, &sentences, cell, Duration::from_secs(seconds));
            println!(
                "| {mode} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % | {} |",
                cell.clients,
                cell.texts,
                row.requests as f64 / row.seconds,
                (row.requests * cell.texts) as f64 / row.seconds,
                row.p50_ms,
                row.p99_ms,
                100.0 * row.offloaded as f64 / (row.requests * cell.texts).max(1) as f64,
                row.refused,
            );
        }
        service.signal("TERM");
        assert!(
            service.exit(Duration::from_secs(60)).success(),
            "{}",
            service.log()
        );
    }
    worker.shutdown().await.unwrap();
    println!("load average after: {}", load_average());
}

struct Row {
    requests: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Texts the arm sent to the cloud (answered there or, failing that, on the device).
    offloaded: usize,
    refused: usize,
}

fn measure(service: &Service, sentences: &[String], cell: &Cell, length: Duration) -> Row {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let per_client: Vec<(Vec<f64>, usize, usize)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..cell.clients)
            .map(|_| {
                scope.spawn(|| {
                    let (mut latencies, mut offloaded, mut refused) = (Vec::new(), 0, 0);
                    while started.elapsed() < length {
                        let texts: Vec<&String> = (0..cell.texts)
                            .map(|_| {
                                &sentences[next.fetch_add(1, Ordering::Relaxed) % sentences.len()]
                            })
                            .collect();
                        let sent = Instant::now();
                        let response = service.classify(&json!({ "texts": texts }));
                        if response.status != 200 {
                            refused += 1;
                            continue;
                        }
                        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                        offloaded += response.json()["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(|r| {
                                r["answered"] == "cloud" || r["answered"] == "device-fallback"
                            })
                            .count();
                    }
                    (latencies, offloaded, refused)
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = per_client.iter().flat_map(|(l, ..)| l.clone()).collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |q| percentile(&latencies, q).unwrap_or(f64::NAN);
    Row {
        requests: latencies.len(),
        seconds,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        offloaded: per_client.iter().map(|(_, o, _)| o).sum(),
        refused: per_client.iter().map(|(.., r)| r).sum(),
    }
}

/// The labelled test sentences kept in the repository (no ../shared needed).
fn repository_sentences() -> Vec<String> {
    let path = support::repo().join("simulations/data/sentences/sentence-polarity-test.tsv");
    support::read_tsv(&path, usize::MAX)
        .into_iter()
        .filter_map(|r| r.text.ok())
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
