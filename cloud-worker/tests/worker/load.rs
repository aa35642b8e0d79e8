//! Many clients at once: all served without errors; past the in-flight bound, `busy` at once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use splitee_protocol::{ErrorCode, PayloadEncoding, Response};
use splitee_service::transport;

use super::*;

const CLIENTS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_times_two_hundred_requests_complete_without_errors() {
    let run = many_clients(200, |_| {}).await;
    assert!(
        run.biggest_batch > 1,
        "concurrent clients never shared a batch"
    );
}

/// The soak: 64 clients × 10,000 requests (640,000, several minutes here), no error and a flat
/// resident set. `cargo test --workspace --release --test worker -- --ignored soak`; its
/// figures are in docs/cloud-worker.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run on demand"]
async fn soak_sixty_four_clients_times_ten_thousand_requests_with_flat_memory() {
    let mut samples = Vec::new();
    let run = many_clients(10_000, |done| samples.push((done, resident_kib()))).await;
    // After the first tenth (buffers, allocator arenas and batch shapes warmed up), the
    // process may grow by a few MB at most over the other nine tenths.
    let warm = samples
        .iter()
        .find(|(done, _)| *done >= run.total / 10)
        .map_or(samples[0].1, |s| s.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap();
    let last = samples.last().unwrap().1;
    println!(
        "soak: resident set {} MiB after a tenth, {} MiB at the end, {} MiB at the peak",
        warm / 1024,
        last / 1024,
        peak / 1024
    );
    assert!(
        peak <= warm + 32 * 1024,
        "the resident set grew from {warm} KiB to {peak} KiB"
    );
}

/// What [`many_clients`] saw.
struct ClientsRun {
    total: u64,
    biggest_batch: u16,
}

/// `CLIENTS` connections sending `requests` each, one at a time, every answer checked against
/// the local model; `progress` is called with the requests answered so far about every second.
async fn many_clients(requests: usize, mut progress: impl FnMut(u64)) -> ClientsRun {
    let harness = Harness::start(|config, _| {
        config.batching.max_batch_size = 64;
        config.batching.max_wait_us = 500;
        // 64 devices, but all on one loopback address: one peer.
        config.limits.max_connections_per_peer = CLIENTS;
    })
    .await;
    // Short sequences and split 5 (the cloud runs one layer) keep the compute cheap: this
    // test is about the server, not the model.
    let texts = ["ok", "fine film", "not good", "great"];
    let templates: Vec<_> = texts
        .iter()
        .map(|text| harness.request(text, 5, PayloadEncoding::F32, 0))
        .collect();
    let expected: Vec<_> = texts
        .iter()
        .map(|text| harness.local_probs(text, 6))
        .collect();
    let addr = harness.worker.local_addr();
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let endpoint = harness.client_endpoint();
        let templates = templates.clone();
        let expected = expected.clone();
        clients.spawn(async move {
            let connection = transport::connect(&endpoint, addr, "localhost")
                .await
                .unwrap();
            let mut biggest_batch = 0;
            for i in 0..requests {
                let which = (client + i) % templates.len();
                let mut request = templates[which].clone();
                request.request_id = (client * requests + i) as u64;
                let answer = match transport::offload(&connection, &request, TIMEOUT).await {
                    Ok(Response::Answer(answer)) => answer,
                    other => panic!("client {client} request {i}: {other:?}"),
                };
                assert!(max_abs_diff(&answer.probs, &expected[which]) <= 1e-5);
                biggest_batch = biggest_batch.max(answer.batch_size);
            }
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            biggest_batch
        });
    }
    let metrics = harness.worker.metrics();
    let mut biggest_batch = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !clients.is_empty() {
        tokio::select! {
            Some(result) = clients.join_next() => {
                biggest_batch = biggest_batch.max(result.unwrap());
            }
            _ = tick.tick() => progress(metrics.answers.get()),
        }
    }
    progress(metrics.answers.get());
    let elapsed = started.elapsed();
    let total = (CLIENTS * requests) as u64;
    println!(
        "{total} requests from {CLIENTS} clients in {elapsed:.2?} ({:.0} requests/s), largest batch {biggest_batch}",
        total as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(metrics.answers.get(), total);
    assert_eq!(metrics.requests.get(), total);
    harness.worker.shutdown().await.unwrap();
    ClientsRun {
        total,
        biggest_batch,
    }
}

/// This process's resident set (the worker runs in it), in KiB.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_bound_requests_are_refused_busy_at_once() {
    // One slot, held for 300 ms by the first request waiting for its batch to fill.
    let harness = Harness::start(|config, _| {
        config.batching.max_in_flight = 1;
        config.batching.max_batch_size = 8;
        config.batching.max_wait_us = 300_000;
    })
    .await;
    let connection = harness.connect().await;
    let request = harness.request("busy busy", 5, PayloadEncoding::F32, 5);
    let started = Instant::now();
    let send = || {
        let connection = connection.clone();
        let request = request.clone();
        tokio::spawn(async move {
            let response = transport::offload(&connection, &request, TIMEOUT).await;
            (response, started.elapsed())
        })
    };
    let mut tasks = vec![send()];
    // Let the first request take the slot before the others arrive.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..15 {
        tasks.push(send());
    }
    let results: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let (first, _) = &results[0];
    assert!(matches!(first, Ok(Response::Answer(_))), "{first:?}");
    for (result, elapsed) in &results[1..] {
        match result {
            Ok(Response::Error(error)) => {
                assert_eq!(error.code, ErrorCode::Busy, "{error:?}");
                assert!(error.message.contains("in flight"), "{}", error.message);
                // Answered at once, not after the slot freed up (300 ms after the start).
                assert!(
                    *elapsed < Duration::from_millis(250),
                    "busy after {elapsed:?}"
                );
            }
            other => panic!("expected busy, got {other:?}"),
        }
    }
    assert_eq!(harness.worker.metrics().errors(ErrorCode::Busy), 15);
    // Once the slot is free again, requests are served.
    expect_answer(
        transport::offload(&connection, &request, TIMEOUT)
            .await
            .unwrap(),
    );
    harness.worker.shutdown().await.unwrap();
}
