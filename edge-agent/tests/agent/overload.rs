//! More offloads than the worker can compute in time: eight agents, every sample offloaded
//! after layer 1, against one worker sharing this machine's cores with them. What the worker
//! computes should reach the agents: at least 90 % of the computed requests arrive as cloud
//! answers, and every sample is answered exactly once (on the device when not by the cloud).

use futures::future::join_all;

use super::*;

const AGENTS: usize = 8;
const SAMPLES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_worker_delivers_what_it_computes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let worker = start_worker(&certs, "127.0.0.1:0").await;
    let mut config = agent_config(
        Some((&certs, worker.local_addr())),
        "[arms]\nsplits = [1]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    // The shipped default.
    config.cloud.as_mut().unwrap().request_timeout_ms = 2_000;
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        agents.push(
            Agent::start(&config, device(), Arc::new(Metrics::new()), true)
                .await
                .unwrap(),
        );
    }
    let runs = join_all(
        agents
            .iter_mut()
            .map(|agent| run(agent, sentences(SAMPLES), |_, _| {})),
    )
    .await;
    let computed = worker.metrics().computed.get();
    let mut delivered = 0;
    let mut reasons = std::collections::BTreeMap::new();
    let mut p99 = 0.0f64;
    for (records, summary) in &runs {
        assert_each_answered_once(records, SAMPLES);
        assert_eq!(summary.answered, SAMPLES as u64, "{summary:?}");
        delivered += summary.in_cloud;
        for (reason, count) in &summary.fallback_reasons {
            *reasons.entry(reason.clone()).or_insert(0) += count;
        }
        p99 = p99.max(summary.latency_p99_ms.unwrap_or(0.0));
    }
    let metrics = worker.metrics();
    // The compute spent on answers nobody got: layers run for requests dropped mid-batch.
    let (useful, abandoned) = (computed * 5, metrics.abandoned_layers.get());
    println!(
        "{AGENTS} agents × {SAMPLES} samples: the worker computed {computed} requests, \
         {delivered} cloud answers arrived; dropped before their answer: {} past their deadline, \
         {} for clients gone, with {abandoned} layers run for them against {useful} for the \
         computed ones; fallbacks {reasons:?}; worst agent p99 {p99:.0} ms",
        metrics.expired.get(),
        metrics.cancelled.get(),
    );
    assert!(
        delivered as f64 >= 0.9 * computed as f64,
        "only {delivered} of the {computed} requests the worker computed reached an agent"
    );
    for agent in agents {
        agent.shutdown().await.unwrap();
    }
    worker.shutdown().await.unwrap();
}
