//! Answers equal the whole model run locally.

use futures::future::join_all;
use splitee_protocol::{PayloadEncoding, ReplyOptions, Response};
use splitee_service::transport;

use super::*;

const TEXTS: [&str; 3] = [
    "a gripping, beautifully acted film",
    "ok",
    "the plot collapses under its own weight long before the tedious final act drags to an end",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_the_local_model_for_every_split_and_encoding() {
    let harness = Harness::start(|_, _| {}).await;
    let connection = harness.connect().await;
    let mut worst = [0.0f32; 3];
    let mut id = 0;
    for split in [0, 1, 3, 5] {
        for text in TEXTS {
            let local = harness.local_probs(text, 6);
            for (e, encoding) in PayloadEncoding::ALL.into_iter().enumerate() {
                id += 1;
                let request = harness.request(text, split, encoding, id);
                let answer = expect_answer(
                    transport::offload(&connection, &request, TIMEOUT)
                        .await
                        .unwrap(),
                );
                assert_eq!(answer.request_id, id);
                assert_eq!(answer.exit_layer, 6);
                assert_eq!(answer.probs.len(), local.len());
                let diff = max_abs_diff(&answer.probs, &local);
                worst[e] = worst[e].max(diff);
                if encoding == PayloadEncoding::F32 {
                    assert!(
                        diff <= 1e-5,
                        "split {split}, {text:?}: probs differ by {diff}"
                    );
                    let local_class = if local[1] > local[0] { 1 } else { 0 };
                    assert_eq!(answer.predicted, local_class, "split {split}, {text:?}");
                } else {
                    // Lossy encodings: bounded, measured in `encoding_accuracy`.
                    assert!(diff <= 0.05, "{} split {split}: {diff}", encoding.name());
                }
            }
        }
    }
    println!(
        "max |Δprob| over splits 0,1,3,5: f32 {:.2e}, f16 {:.2e}, int8 {:.2e}",
        worst[0], worst[1], worst[2]
    );
    assert!(harness.worker.metrics().answers.get() == id);

    let metrics_addr = harness.worker.metrics_addr().unwrap();
    let (status, body) = http_get(metrics_addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        format!("splitee_worker_requests_total {id}"),
        format!("splitee_worker_answers_total {id}"),
        "splitee_worker_batch_size_bucket".to_owned(),
        "splitee_worker_request_duration_seconds_bucket".to_owned(),
        "splitee_worker_in_flight 0".to_owned(),
    ] {
        assert!(body.contains(&needle), "/metrics lacks {needle:?}:\n{body}");
    }
    harness.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_different_lengths_are_batched_invisibly() {
    // A long wait makes the six concurrent requests share batches deterministically.
    let harness = Harness::start(|config, _| {
        config.batching.max_wait_us = 200_000;
        config.batching.max_batch_size = 4;
    })
    .await;
    let connection = harness.connect().await;
    let texts = [
        TEXTS[0],
        TEXTS[1],
        TEXTS[2],
        "fine",
        TEXTS[2],
        "not my cup of tea at all",
    ];
    let requests: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| harness.request(text, 2, PayloadEncoding::F32, i as u64))
        .collect();
    let answers = join_all(
        requests
            .iter()
            .map(|r| transport::offload(&connection, r, TIMEOUT)),
    )
    .await;
    let mut biggest = 0;
    for (text, answer) in texts.iter().zip(answers) {
        let answer = expect_answer(answer.unwrap());
        biggest = biggest.max(answer.batch_size);
        assert!(answer.batch_size <= 4);
        let diff = max_abs_diff(&answer.probs, &harness.local_probs(text, 6));
        assert!(
            diff <= 1e-5,
            "{text:?} in a batch of {}: {diff}",
            answer.batch_size
        );
        assert!(answer.compute_us > 0);
    }
    assert!(biggest >= 2, "no two concurrent requests shared a batch");
    harness.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_exits_answer_at_the_first_confident_layer() {
    let harness = Harness::start(|config, _| config.batching.max_wait_us = 100_000).await;
    let connection = harness.connect().await;
    let text = TEXTS[0];
    let split = 2;
    let with_threshold = |id, threshold| {
        let mut request = harness.request(text, split, PayloadEncoding::F32, id);
        request.options = ReplyOptions {
            cloud_exit_threshold: threshold,
        };
        request
    };
    // Threshold 0 exits at the first cloud-side exit, threshold 1 never exits early (two
    // classes from random heads are never exactly certain), none runs to the end; sent
    // together so that one batch holds rows that leave it at different layers.
    let requests = [
        with_threshold(1, Some(0.0)),
        with_threshold(2, Some(1.0)),
        with_threshold(3, None),
    ];
    let answers = join_all(
        requests
            .iter()
            .map(|r| transport::offload(&connection, r, TIMEOUT)),
    )
    .await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|a| expect_answer(a.unwrap()))
        .collect();
    assert_eq!(answers[0].exit_layer as usize, split + 1);
    let early = harness.local_probs(text, split + 1);
    assert!(max_abs_diff(&answers[0].probs, &early) <= 1e-5);
    let last = harness.local_probs(text, 6);
    for answer in &answers[1..] {
        assert_eq!(answer.exit_layer, 6);
        assert!(max_abs_diff(&answer.probs, &last) <= 1e-5);
    }
    assert!(
        answers.iter().any(|a| a.batch_size > 1),
        "the requests were meant to share a batch"
    );
    harness.worker.shutdown().await.unwrap();

    // A worker configured without cloud exits ignores the threshold.
    let harness = Harness::start(|config, _| config.limits.cloud_exits = false).await;
    let connection = harness.connect().await;
    let mut request = harness.request(text, split, PayloadEncoding::F32, 7);
    request.options.cloud_exit_threshold = Some(0.0);
    let Response::Answer(answer) = transport::offload(&connection, &request, TIMEOUT)
        .await
        .unwrap()
    else {
        panic!("expected an answer")
    };
    assert_eq!(answer.exit_layer, 6);
    harness.worker.shutdown().await.unwrap();
}
