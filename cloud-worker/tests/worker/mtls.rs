//! Mutual TLS: only clients with a certificate from the configured CA get in; and clients
//! never accept a worker whose certificate they cannot verify.

use splitee_protocol::PayloadEncoding;
use splitee_service::transport::{self, TransportError};

use super::*;

async fn try_offload(
    endpoint: &Endpoint,
    harness: &Harness,
) -> Result<splitee_protocol::Response, TransportError> {
    let connection = transport::connect(endpoint, harness.worker.local_addr(), "localhost").await?;
    let request = harness.request("hello", 5, PayloadEncoding::F32, 1);
    transport::offload(&connection, &request, TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_clients_are_rejected_under_mutual_tls() {
    let harness =
        Harness::start(|config, certs| config.tls.client_ca = Some(certs.ca_cert.clone())).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = gen_certs(other_dir.path());

    // Known client: served.
    let known = client_endpoint(&harness.certs, Some(&harness.certs));
    expect_answer(try_offload(&known, &harness).await.unwrap());

    // A client certificate signed by another CA, and no client certificate at all: refused.
    // (In TLS 1.3 the client may believe the handshake done before the server has checked its
    // certificate, so the refusal can surface on connect or on the first request.)
    let foreign = client_endpoint(&harness.certs, Some(&other));
    let anonymous = client_endpoint(&harness.certs, None);
    for (who, endpoint) in [
        ("foreign client", &foreign),
        ("anonymous client", &anonymous),
    ] {
        let result = try_offload(endpoint, &harness).await;
        assert!(
            matches!(
                result,
                Err(TransportError::Connection(_)
                    | TransportError::Write(_)
                    | TransportError::Read(_))
            ),
            "{who} was not rejected: {result:?}"
        );
    }
    assert!(harness.worker.metrics().handshake_failures.get() >= 2);

    // The other way round: a client that trusts only another CA refuses this worker.
    let distrustful = client_endpoint(&other, Some(&harness.certs));
    let result = transport::connect(&distrustful, harness.worker.local_addr(), "localhost").await;
    assert!(
        result.is_err(),
        "a worker with an unverifiable certificate was accepted"
    );
    // And a name the certificate does not carry is refused too.
    let result = transport::connect(&known, harness.worker.local_addr(), "not-the-worker").await;
    assert!(
        result.is_err(),
        "a certificate for the wrong name was accepted"
    );

    // The worker still serves its known client.
    expect_answer(try_offload(&known, &harness).await.unwrap());
    harness.worker.shutdown().await.unwrap();
}
