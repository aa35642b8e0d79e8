//! What an agent learns when it connects, once per connection rather than once per sample: a
//! worker serving another model, a worker refusing the agent's certificate.

use std::time::Duration;

use super::*;

/// An edge whose weights are not the worker's (here one bit of one weight flipped, as a
/// corrupted copy would be): the hello at connect says so, offloading is disabled, and every
/// sample is answered on the device without one request being sent to be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_models_agent_learns_it_once_at_connect_and_answers_on_the_device() {
    const SAMPLES: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;

    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(support::model_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    // The lowest mantissa bit of the last weight: a valid file, another model.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 4;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();

    let mut config = agent_config(
        Some((&certs, worker.local_addr())),
        "[arms]\nsplits = [2]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    config.model = model;
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();
    // Past the hello, so that every sample meets the verdict rather than a link still coming up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (records, summary) = run(&mut agent, sentences(SAMPLES), |_, _| {}).await;

    assert_each_answered_once(&records, SAMPLES);
    assert_eq!(summary.in_cloud, 0, "{summary:?}");
    // Every stream the worker saw was a hello it refused (one per look, at the longest
    // backoff), none a sample sent to be refused.
    let metrics = worker.metrics();
    let refused = metrics.errors(splitee_protocol::ErrorCode::WrongFingerprint);
    assert_eq!(
        metrics.requests.get(),
        refused,
        "streams besides the hellos"
    );
    assert!(
        (1..SAMPLES as u64 / 3).contains(&refused),
        "{refused} hellos refused for {SAMPLES} samples"
    );
    assert_eq!(metrics.computed.get(), 0);
    for record in &records {
        assert_eq!(record.answered, Answered::DeviceFallback, "{record:?}");
        let error = record.error.as_deref().unwrap_or("");
        assert!(
            error.contains("the worker serves another model"),
            "{record:?}"
        );
    }
    agent.shutdown().await.unwrap();
    worker.shutdown().await.unwrap();
}

/// An agent without a client certificate, against a worker that requires one: each attempt is
/// one refused handshake, retried with growing backoff (100, 200, 400, 400 … ms here), not at
/// the shortest backoff forever; every sample is answered on the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_retried_with_growing_backoff() {
    const SAMPLES: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    let mut config = agent_config(
        Some((&certs, worker.local_addr())),
        "[arms]\nsplits = [2]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    let cloud = config.cloud.as_mut().unwrap();
    (cloud.client_cert, cloud.client_key) = (None, None);
    let mut agent = Agent::start(&config, device(), Arc::new(Metrics::new()), true)
        .await
        .unwrap();
    // 120 samples, one every 25 ms: 3 s of offloads asking for the link.
    let started = std::time::Instant::now();
    let (records, summary) = run_paced(
        &mut agent,
        sentences(SAMPLES),
        Some(Duration::from_millis(25)),
        |_, _| {},
    )
    .await;
    let elapsed = started.elapsed();
    assert_each_answered_once(&records, SAMPLES);
    assert_eq!(summary.in_cloud, 0, "{summary:?}");
    let attempts = worker.metrics().handshake_failures.get();
    // At the shortest backoff (100 ms) 3 s would hold about 30 attempts; doubling to the
    // longest (400 ms), about 10.
    let at_shortest = elapsed.as_millis() as u64 / 100;
    println!(
        "{attempts} refused handshakes in {elapsed:.2?} (at the shortest backoff: {at_shortest})"
    );
    assert!(
        (2..=at_shortest / 2).contains(&attempts),
        "{attempts} refused handshakes in {elapsed:?}"
    );
    assert_eq!(worker.metrics().requests.get(), 0);
    agent.shutdown().await.unwrap();
    worker.shutdown().await.unwrap();
}
