//! Graceful shutdown: in-flight requests finish, new ones are refused, the worker stops.

use std::time::Duration;

use splitee_protocol::{ErrorCode, PayloadEncoding, Response};
use splitee_service::transport;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    // The in-flight request sits 400 ms in the batcher, so the shutdown surely overlaps it.
    let harness = Harness::start(|config, _| {
        config.batching.max_wait_us = 400_000;
        config.batching.max_batch_size = 8;
    })
    .await;
    let connection = harness.connect().await;
    let request = harness.request("finish me", 4, PayloadEncoding::F16, 11);
    let in_flight = {
        let connection = connection.clone();
        let request = request.clone();
        tokio::spawn(async move { transport::offload(&connection, &request, TIMEOUT).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics_addr = harness.worker.metrics_addr().unwrap();
    harness.worker.begin_shutdown();
    // Load balancers see the worker leaving...
    let (status, _) = http_get(metrics_addr, "/healthz").await;
    assert_eq!(status, 503);
    // ...new requests are refused with a clear code...
    match transport::offload(&connection, &request, TIMEOUT)
        .await
        .unwrap()
    {
        Response::Error(error) => assert_eq!(error.code, ErrorCode::ShuttingDown),
        answer => panic!("a request after the shutdown began was served: {answer:?}"),
    }
    // ...and new connections are not accepted.
    let late = tokio::time::timeout(Duration::from_secs(5), async {
        let connection = transport::connect(
            &harness.client_endpoint(),
            harness.worker.local_addr(),
            "localhost",
        )
        .await?;
        transport::offload(&connection, &request, TIMEOUT).await
    })
    .await
    .expect("a refused connection fails fast");
    assert!(
        !matches!(late, Ok(Response::Answer(_))),
        "a new connection was served during shutdown: {late:?}"
    );
    // The in-flight request is answered in full.
    let answer = expect_answer(in_flight.await.unwrap().unwrap());
    assert_eq!(answer.request_id, 11);
    assert!(
        answer.queue_us >= 300_000,
        "queued only {} µs",
        answer.queue_us
    );
    tokio::time::timeout(Duration::from_secs(10), harness.worker.wait())
        .await
        .expect("the worker stops once in-flight requests are done")
        .unwrap();
}
