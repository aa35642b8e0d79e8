//! `/readyz`: not ready while the model loads, while the admission queue is at its bound and
//! while draining; ready otherwise. `/healthz` stays 200 until the drain.

use std::time::{Duration, Instant};

use cloud_worker::StatusEndpoint;
use splitee_protocol::{OffloadRequest, PayloadEncoding, ReplyOptions, encode_hidden};

use super::*;

/// `/readyz`'s status and its JSON body.
async fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_get(addr, "/readyz").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

/// Polls `/readyz` until its body satisfies `want`, for up to 10 s.
async fn wait_until(
    addr: std::net::SocketAddr,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(addr).await;
        if want(&body) {
            return (status, body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/readyz never said {what}; last {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_state(addr: std::net::SocketAddr, state: &str) -> (u16, serde_json::Value) {
    wait_until(addr, state, |body| body["state"] == state).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_loading_then_ready_then_draining() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_certs(dir.path());
    let mut config = test_config(&certs);
    // A request waits 400 ms in the batcher: the drain surely overlaps it.
    config.batching.max_wait_us = 400_000;
    // Bound before the model is loaded, as `cloud-worker serve` does.
    let status = StatusEndpoint::bind(&config).await.unwrap();
    let addr = status.addr().unwrap();
    let (code, body) = readyz(addr).await;
    assert_eq!((code, &body["state"]), (503, &"loading".into()), "{body}");
    assert_eq!(body["ready"], false);
    assert!(body["model"].is_null(), "{body}");
    let (code, _) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200, "alive while loading");

    let device = device();
    let loaded = model_with_random_exits(&device);
    let short = loaded.fingerprint.short();
    let fingerprint = loaded.fingerprint.0;
    let worker = Worker::start_with_status(&config, loaded, device, status)
        .await
        .unwrap();
    assert_eq!(worker.metrics_addr(), Some(addr));
    let (code, body) = readyz(addr).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["state"], "serving");
    assert_eq!(body["model"], short.as_str());
    assert_eq!(body["in_flight"], 0);
    assert_eq!(body["max_in_flight"], 256);
    assert_eq!(body["not_ready_at"], 256);

    // A request in flight, then SIGTERM's drain: not ready (and not alive) until it is done.
    let connection = transport::connect(
        &client_endpoint(&certs, Some(&certs)),
        worker.local_addr(),
        "localhost",
    )
    .await
    .unwrap();
    let request = OffloadRequest {
        request_id: 9,
        fingerprint,
        deadline_ms: TIMEOUT.as_millis() as u32,
        split_layer: 3,
        seq_len: 2,
        encoding: PayloadEncoding::F32,
        options: ReplyOptions::default(),
        payload: encode_hidden(&[0.5; 2 * 384], 384, PayloadEncoding::F32),
    };
    let in_flight =
        tokio::spawn(async move { transport::offload(&connection, &request, TIMEOUT).await });
    let (code, body) = wait_until(addr, "one in flight", |body| {
        assert!(!in_flight.is_finished(), "answered early: {body}");
        body["in_flight"] == 1
    })
    .await;
    assert_eq!((code, &body["state"]), (200, &"serving".into()), "{body}");
    worker.begin_shutdown();
    let (code, body) = readyz(addr).await;
    assert_eq!((code, &body["state"]), (503, &"draining".into()), "{body}");
    assert_eq!(body["in_flight"], 1, "{body}");
    assert_eq!(http_get(addr, "/healthz").await.0, 503);
    assert_eq!(
        expect_answer(in_flight.await.unwrap().unwrap()).request_id,
        9
    );
    worker.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_queue_is_over_its_bound() {
    // Two slots, not ready from one in flight; a request waits 500 ms for company in the
    // batcher, so it is surely in flight while /readyz is asked.
    let harness = Harness::start(|config, _| {
        config.batching.max_in_flight = 2;
        config.batching.ready_in_flight_fraction = 0.5;
        config.batching.max_wait_us = 500_000;
    })
    .await;
    let addr = harness.worker.metrics_addr().unwrap();
    let (code, body) = readyz(addr).await;
    assert_eq!((code, &body["state"]), (200, &"serving".into()), "{body}");
    assert_eq!(body["not_ready_at"], 1);

    let connection = harness.connect().await;
    let request = harness.request("hold a slot", 3, PayloadEncoding::F16, 5);
    let in_flight = tokio::spawn(async move {
        transport::offload(&connection, &request, TIMEOUT)
            .await
            .unwrap()
    });
    let (code, body) = wait_for_state(addr, "busy").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["in_flight"], 1);
    // Still alive: the liveness probe must not restart a busy worker.
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    assert_eq!(expect_answer(in_flight.await.unwrap()).request_id, 5);
    let (code, body) = wait_for_state(addr, "serving").await;
    assert_eq!(code, 200, "{body}");
    harness.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_to_start_stops_its_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_certs(dir.path());
    let mut config = test_config(&certs);
    config.tls.cert = dir.path().join("missing.pem");
    let status = StatusEndpoint::bind(&config).await.unwrap();
    let addr = status.addr().unwrap();
    assert_eq!(readyz(addr).await.0, 503);
    let device = device();
    let error =
        Worker::start_with_status(&config, model_with_random_exits(&device), device, status)
            .await
            .err()
            .expect("a missing certificate is an error");
    assert!(error.to_string().contains("missing.pem"), "{error}");
    // The endpoint goes with the failed start: nothing answers for a worker that is not there.
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the endpoint still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
