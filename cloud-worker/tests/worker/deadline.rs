//! Nothing is computed for nobody: a request whose deadline passes in the queue is answered
//! `deadline_exceeded` unrun, and one whose client reset its stream is dropped unrun.

use std::time::Duration;

use splitee_protocol::{ErrorCode, PayloadEncoding, Response};
use splitee_service::transport::{self, TransportError};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_deadline_or_for_a_gone_client_is_never_computed() {
    // Every batch waits 300 ms to fill: both requests are still queued when their clients stop
    // waiting.
    let harness = Harness::start(|config, _| {
        config.batching.max_wait_us = 300_000;
        config.batching.max_batch_size = 8;
    })
    .await;
    let connection = harness.connect().await;
    let mut late = harness.request("too late", 4, PayloadEncoding::F32, 1);
    late.deadline_ms = 100;
    // This client says it waits a minute, but gives up after 100 ms and resets the stream.
    let gone = harness.request("gone", 4, PayloadEncoding::F32, 2);
    let (late, gone) = tokio::join!(
        transport::offload(&connection, &late, TIMEOUT),
        transport::offload(&connection, &gone, Duration::from_millis(100)),
    );
    match late.unwrap() {
        Response::Error(error) => {
            assert_eq!(
                (error.code, error.request_id),
                (ErrorCode::DeadlineExceeded, 1)
            );
            assert!(error.message.contains("deadline"), "{}", error.message);
        }
        other => panic!("a request past its deadline was answered: {other:?}"),
    }
    assert!(matches!(gone, Err(TransportError::TimedOut(_))), "{gone:?}");
    let metrics = harness.worker.metrics();
    let started = std::time::Instant::now();
    while metrics.cancelled.get() == 0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((metrics.expired.get(), metrics.cancelled.get()), (1, 1));
    assert_eq!(metrics.computed.get(), 0, "the worker computed for nobody");
    // The worker computes what can still be answered.
    let good = harness.request("in time", 4, PayloadEncoding::F32, 3);
    expect_answer(
        transport::offload(&connection, &good, TIMEOUT)
            .await
            .unwrap(),
    );
    assert_eq!(metrics.computed.get(), 1);
    harness.worker.shutdown().await.unwrap();
}
