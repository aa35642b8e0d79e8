//! What one client may hold of the worker, with its default limits where the test can afford
//! them: connections (all peers', one peer's), each new connection's address validated first
//! (a QUIC Retry), a peer's share of the in-flight slots, and a connection's receive budget for
//! bodies that are still arriving.

use std::time::{Duration, Instant};

use splitee_protocol::{
    ErrorCode, HEADER_LEN, Limits, MAGIC, PROTOCOL_VERSION, PayloadEncoding, Response,
};
use splitee_service::transport;

use super::*;

/// A client endpoint on another loopback address: another peer.
fn peer_endpoint(harness: &Harness, address: [u8; 4]) -> Endpoint {
    let roots = transport::load_certs(&harness.certs.agent_ca).unwrap();
    let identity = Some((
        transport::load_certs(&harness.certs.client_cert).unwrap(),
        transport::load_key(&harness.certs.client_key).unwrap(),
    ));
    transport::client_endpoint(
        (address, 0).into(),
        transport::client_config(roots, identity, transport::IDLE_TIMEOUT).unwrap(),
    )
    .unwrap()
}

/// Connects and says hello: a connection the worker really serves.
async fn served(harness: &Harness, endpoint: &Endpoint) -> Option<Connection> {
    let connection = transport::connect(endpoint, harness.worker.local_addr(), "localhost")
        .await
        .ok()?;
    transport::hello(&connection, &harness.fingerprint, TIMEOUT)
        .await
        .ok()?;
    Some(connection)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_default_caps_are_refused_after_address_validation() {
    let harness = Harness::start(|_, _| {}).await;
    let defaults = WorkerConfig::default().limits;
    let (per_peer, all) = (defaults.max_connections_per_peer, defaults.max_connections);
    let mut attempts = 0;
    let mut open = Vec::new();
    // One peer gets its share and no more.
    let first = peer_endpoint(&harness, [127, 0, 0, 1]);
    let mut refused = 0;
    for _ in 0..per_peer + 4 {
        attempts += 1;
        match served(&harness, &first).await {
            Some(connection) => open.push(connection),
            None => refused += 1,
        }
    }
    assert_eq!((open.len(), refused), (per_peer, 4));
    // Other peers fill the worker up to its cap; then nobody gets in.
    let mut endpoints = Vec::new();
    for peer in 2u8.. {
        if open.len() == all {
            break;
        }
        let endpoint = peer_endpoint(&harness, [127, 0, 0, peer]);
        for _ in 0..per_peer.min(all - open.len()) {
            attempts += 1;
            open.push(served(&harness, &endpoint).await.expect("under both caps"));
        }
        endpoints.push(endpoint);
    }
    let newcomer = peer_endpoint(&harness, [127, 0, 1, 1]);
    attempts += 1;
    assert!(
        served(&harness, &newcomer).await.is_none(),
        "past the worker's cap"
    );
    let metrics = harness.worker.metrics();
    assert_eq!(metrics.connections_refused.get(), 5);
    assert!(
        metrics.retries.get() >= attempts,
        "{} Retries for {attempts} connection attempts",
        metrics.retries.get()
    );
    // Connections that close give their place back.
    for connection in open.drain(..per_peer) {
        connection.close(0u32.into(), b"done");
    }
    let started = Instant::now();
    let again = loop {
        attempts += 1;
        if let Some(connection) = served(&harness, &newcomer).await {
            break connection;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no place was given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let request = harness.request("let in", 5, PayloadEncoding::F32, 1);
    expect_answer(transport::offload(&again, &request, TIMEOUT).await.unwrap());
    println!(
        "{attempts} connection attempts, {} Retries sent",
        metrics.retries.get()
    );
    harness.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_its_share_of_the_slots_gets_busy_and_others_are_served() {
    // Admitted requests wait 300 ms for their batch, so they hold their slots meanwhile.
    let harness = Harness::start(|config, _| {
        config.limits.max_in_flight_per_peer = 2;
        config.batching.max_wait_us = 300_000;
        config.batching.max_batch_size = 8;
    })
    .await;
    let greedy = harness.connect().await;
    let request = harness.request("share", 5, PayloadEncoding::F32, 1);
    let send = |connection: &Connection| {
        let (connection, request) = (connection.clone(), request.clone());
        tokio::spawn(async move { transport::offload(&connection, &request, TIMEOUT).await })
    };
    let admitted = [send(&greedy), send(&greedy)];
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..2 {
        match transport::offload(&greedy, &request, TIMEOUT)
            .await
            .unwrap()
        {
            Response::Error(error) => {
                assert_eq!(error.code, ErrorCode::Busy);
                assert!(error.message.contains("share of 2"), "{}", error.message);
            }
            other => panic!("a third request of one peer was admitted: {other:?}"),
        }
    }
    let other_peer = served(&harness, &peer_endpoint(&harness, [127, 0, 0, 2]))
        .await
        .unwrap();
    expect_answer(
        transport::offload(&other_peer, &request, TIMEOUT)
            .await
            .unwrap(),
    );
    for task in admitted {
        expect_answer(task.await.unwrap().unwrap());
    }
    harness.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_still_arriving_hold_the_connections_budget_and_no_slot() {
    let harness = Harness::start(|config, _| config.limits.read_timeout_ms = 1_000).await;
    let budget = WorkerConfig::default().limits.receive_bytes_per_connection;
    let largest = Limits::for_model(384, 6, 512).max_body_bytes;
    let fits = budget / largest;
    let stalling = harness.connect().await;
    // Headers announcing the largest body, a few bytes of it, then nothing.
    let mut prefix = MAGIC.to_vec();
    prefix.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    prefix.push(1);
    prefix.extend_from_slice(&(largest as u32).to_le_bytes());
    assert_eq!(prefix.len(), HEADER_LEN);
    prefix.extend_from_slice(&[0; 1_000]);
    let mut streams = Vec::new();
    for _ in 0..fits + 3 {
        let (mut send, recv) = stalling.open_bi().await.unwrap();
        send.write_all(&prefix).await.unwrap();
        streams.push((send, recv));
    }
    // Those past the budget are told at once; the others wait for their bodies.
    let mut answers = Vec::new();
    for (_, recv) in &mut streams {
        answers.push(tokio::time::timeout(
            Duration::from_millis(300),
            recv.read_to_end(1 << 16),
        ));
    }
    let mut busy = 0;
    for answer in answers {
        if let Ok(Ok(bytes)) = answer.await {
            let Response::Error(error) = splitee_protocol::decode_response(&bytes).unwrap() else {
                panic!("a stalled request was answered")
            };
            assert_eq!(error.code, ErrorCode::Busy);
            assert!(
                error.message.contains("this connection"),
                "{}",
                error.message
            );
            busy += 1;
        }
    }
    let metrics = harness.worker.metrics();
    assert_eq!(busy, 3);
    assert_eq!(metrics.receiving_bytes.get(), (fits * largest) as i64);
    assert_eq!(
        metrics.in_flight.get(),
        0,
        "a body still arriving took a slot"
    );
    // Meanwhile another connection is served as usual.
    let other = harness.connect().await;
    let request = harness.request("unaffected", 5, PayloadEncoding::F32, 7);
    expect_answer(transport::offload(&other, &request, TIMEOUT).await.unwrap());
    // After the read timeout the stalled streams are answered and their budget is free.
    for (_, recv) in &mut streams {
        let _ = recv.read_to_end(1 << 16).await;
    }
    assert_eq!(metrics.receiving_bytes.get(), 0);
    harness.worker.shutdown().await.unwrap();
}
