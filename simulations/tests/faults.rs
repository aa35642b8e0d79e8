//! Fault tests of the whole system over the link emulator: a real cloud worker, real QUIC
//! through `simulations::link`, an edge agent with its bandit, and the demo itself.
//! (The worker killed and restarted mid-run is edge-agent's test.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use burn::prelude::Device;
use edge_agent::{Answered, SampleRecord};
use splitee_link::LinkConfig;
use splitee_testbed::demo::{self, DemoOptions, LinkRun, LocalCloud, agent_config_for};
use tokio_util::sync::CancellationToken;

/// One system at a time: each test runs a worker, a link and an agent against wall-clock
/// deadlines, and on two cores concurrent ones would measure each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn device() -> Device {
    Device::flex()
}

/// The embedded labelled sentences (no `../shared` needed).
fn sentences(n: usize) -> Vec<edge_agent::input::InputRecord> {
    let records = edge_agent::input::read_tsv_file(
        &repo().join("simulations/data/sentences/sentence-polarity-test.tsv"),
        n,
    )
    .unwrap();
    assert_eq!(records.len(), n);
    records
}

/// Every sample answered exactly once, in input order, and none an error.
fn assert_each_answered_once(records: &[(f64, SampleRecord)], samples: usize) {
    let lines: Vec<usize> = records.iter().map(|(_, r)| r.line).collect();
    let expected: Vec<usize> = (2..samples + 2).collect(); // line 1 is the TSV header
    assert_eq!(lines, expected, "one answer per sample, in order");
    for (_, record) in records {
        assert_ne!(record.answered, Answered::Error, "{record:?}");
    }
}

/// The agent's TOML on the default model with `tables` ([arms], [policy], …) appended.
fn agent_toml(tables: &str) -> String {
    format!(
        "model = {:?}\n{tables}",
        repo().join("models/default").to_str().unwrap()
    )
}

/// Two arms whose costs differ by the network alone: offload everything after layer 1, or
/// run all six layers on the device. The device is charged 60 ms a layer (a profile, not this
/// machine's clock), so that offloading costs clearly less on a good link and more on a bad
/// one. With 30 ms a layer the gap (≈ 180 against 60–90 ms) was small enough that the worker's
/// compute time, which shares this machine's two cores with the agent and climbed to 80–170 ms
/// at times, made the bandit flip between the arms on a steady link.
/// (At the last layer the threshold plays no part: nothing is left to offload.)
///
/// The policy is sliding-window UCB over 100 samples with c = 0.25. With c = 1 its exploration
/// width, ≈ 1.6·sqrt(ln 100 / n) in reward units, stays above the arms' reward gap for every
/// count n a 100-sample window can hold, so it plays both arms about equally whatever the
/// link does (measured with the 30 ms profile: offload rate 0.57 before a link outage and 0.56
/// after it).
const NON_STATIONARY: &str = "[policy]\nkind = \"sliding-window-ucb\"\nwindow = 100\nc = 0.25\n";

/// The structured policy with its defaults (`splitee_bandits::StructuredUcb`).
const STRUCTURED: &str = "[policy]\nkind = \"structured-ucb\"\n";

/// Both non-stationary policies face each fault, one after the other.
const POLICIES: [(&str, &str); 2] = [("SW-UCB", NON_STATIONARY), ("structured", STRUCTURED)];

/// The all-device arm's charge at the profile's 32 tokens: embedding and six 60 ms layers.
const LOCAL_MS: f64 = 1.5 + 6.0 * 60.0;

const OFFLOAD_OR_LOCAL: &str = "[arms]\nsplits = [1, 6]\nthresholds = [1.0]\n\
     [reward]\nkind = \"split-ee\"\nlambda = 0.002\nedge_costs = \"profile\"\ncost_scale_ms = 500\n\
     [device]\ndescription = \"test profile\"\nlayer_ms = [60.0, 60.0, 60.0, 60.0, 60.0, 60.0]\n\
     embed_ms = 1.5\nref_tokens = 32\n";

async fn run(
    cloud: &LocalCloud,
    link: &str,
    agent: &str,
    samples: usize,
    interval: Duration,
) -> LinkRun {
    let link = LinkConfig::from_toml(link, &repo().join("configs/links")).unwrap();
    let config = agent_config_for(agent, Some(&cloud.certs)).unwrap();
    demo::run_over_link(
        "test",
        config,
        &link,
        cloud.worker.local_addr(),
        device(),
        sentences(samples),
        interval,
        &CancellationToken::new(),
        &mut |_, _| {},
    )
    .await
    .unwrap()
}

/// Offload rate of the samples started in each second of the run, for failure messages.
fn timeline(run: &LinkRun) -> BTreeMap<u64, String> {
    let end = run.records.last().map_or(0.0, |(at, _)| *at).ceil() as u64;
    (0..end)
        .filter_map(|s| {
            run.offload_rate_between(s as f64, s as f64 + 1.0)
                .map(|rate| (s, format!("{:.2}", rate)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_outage_makes_the_bandit_answer_on_the_device_and_offloading_recovers() {
    let _serial = one_at_a_time();
    const SAMPLES: usize = 800;
    let cloud = LocalCloud::start(&repo().join("models/default"), device())
        .await
        .unwrap();
    // Nothing passes in either direction from 5 s to 10 s.
    let link = "[uplink]\nrate = { kind = \"constant\", rate_mbps = 50 }\ndelay_ms = 5\n\
                [downlink]\nrate = { kind = \"constant\", rate_mbps = 50 }\ndelay_ms = 5\n\
                [[outages]]\nat_s = 5\nduration_s = 5\n";
    for (name, policy) in POLICIES {
        let agent = agent_toml(&format!(
            "[cloud]\nrequest_timeout_ms = 1000\nconnect_timeout_ms = 500\nbackoff_initial_ms = 100\n\
             backoff_max_ms = 500\n{OFFLOAD_OR_LOCAL}{policy}"
        ));
        let run = run(&cloud, link, &agent, SAMPLES, Duration::from_millis(25)).await;

        assert_each_answered_once(&run.records, SAMPLES);
        let rate = |from, to| run.offload_rate_between(from, to).unwrap();
        let (before, during, after) = (rate(2.0, 5.0), rate(6.5, 10.0), rate(14.0, 100.0));
        let timeline = timeline(&run);
        println!(
            "{name}: offload rate before {before:.2}, during {during:.2}, after {after:.2}: \
             {timeline:?}"
        );
        assert!(
            before > 0.7,
            "{name}: offloading pays before the outage: {before:.2} {timeline:?}"
        );
        // What the outage costs: once the agent knows the worker is unreachable, an offload
        // fails at once and the device finishes the sample, charged what the all-device arm
        // costs. Beyond that, only the requests caught by the outage wait for their timeout.
        let (charged, local): (f64, f64) = run
            .records
            .iter()
            .filter(|(at, r)| (6.5..10.0).contains(&(at - r.latency_ms.total / 1000.0)))
            .map(|(_, r)| {
                (
                    r.cost_ms.unwrap(),
                    LOCAL_MS * r.tokens.unwrap() as f64 / 32.0,
                )
            })
            .fold((0.0, 0.0), |(c, l), (rc, rl)| (c + rc, l + rl));
        println!(
            "{name}: charged during the outage {:.0} % of the all-device cost",
            100.0 * charged / local
        );
        let mut outcomes: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for (at, record) in &run.records {
            if (6.5..10.0).contains(&(at - record.latency_ms.total / 1000.0)) {
                let key = format!(
                    "{:?} {}",
                    record.answered,
                    record.error.as_deref().unwrap_or("")
                );
                let entry = outcomes.entry(key).or_default();
                entry.0 += 1;
                entry.1 += record.cost_ms.unwrap_or(0.0);
            }
        }
        assert!(
            charged <= 1.1 * local,
            "{name}: the outage costs {charged:.0} ms, the device alone {local:.0} ms; \
             (count, cost) by outcome: {outcomes:#?}"
        );
        if name == "SW-UCB" {
            // It also stops choosing the offload arm: the timeouts stay in its window.
            assert!(
                during < before / 2.0,
                "{name}: falls during the outage: {during:.2} {timeline:?}"
            );
        }
        assert!(
            after > 0.7,
            "{name}: and recovers after it: {after:.2} {timeline:?}"
        );
        let in_outage = |(at, record): &&(f64, SampleRecord)| {
            (5.0..10.0).contains(at) && record.answered == Answered::Cloud
        };
        assert!(
            run.records.iter().filter(in_outage).count() <= 16,
            "{name}: no more cloud answers during the outage than were in flight at its start"
        );
    }
    cloud.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_from_lte_to_3g_makes_the_bandit_offload_less() {
    let _serial = one_at_a_time();
    const SAMPLES: usize = 650;
    const SWITCH_S: f64 = 8.0;
    let cloud = LocalCloud::start(&repo().join("models/default"), device())
        .await
        .unwrap();
    // configs/links/lte-to-3g.toml (≈ 5.8 Mbit/s up, 20 ms → ≈ 1 Mbit/s up, 50 ms) with the
    // switch at 8 s.
    let link = std::fs::read_to_string(repo().join("configs/links/lte-to-3g.toml"))
        .unwrap()
        .replace("at_s = 20", &format!("at_s = {SWITCH_S}"));
    assert!(link.contains(&format!("at_s = {SWITCH_S}")));
    // int8 payloads (≈ 10 KB a sentence) every 40 ms: about a third of the LTE uplink when
    // every sample is offloaded, twice what the 3G uplink carries.
    for (name, policy) in POLICIES {
        let agent = agent_toml(&format!(
            "[cloud]\nencoding = \"int8-per-token\"\n{OFFLOAD_OR_LOCAL}{policy}"
        ));
        let run = run(&cloud, &link, &agent, SAMPLES, Duration::from_millis(40)).await;

        assert_each_answered_once(&run.records, SAMPLES);
        let timeline = timeline(&run);
        let on_lte = run.offload_rate_between(3.0, SWITCH_S).unwrap();
        // Bounded adaptation: judged from the 150th sample answered after the switch on.
        let (settled_at, _) = run
            .records
            .iter()
            .filter(|(at, _)| *at >= SWITCH_S)
            .nth(150)
            .expect("150 samples after the switch");
        let on_3g = run
            .offload_rate_between(*settled_at, f64::INFINITY)
            .unwrap();
        println!(
            "{name}: offload rate on LTE {on_lte:.2}, on 3G from {settled_at:.1} s {on_3g:.2}: \
             {timeline:?}"
        );
        assert!(
            on_lte > 0.5,
            "{name}: the bandit prefers offloading on LTE: {on_lte:.2} {timeline:?}"
        );
        assert!(
            on_3g < on_lte / 2.0,
            "{name}: the bandit offloads less on 3G: {on_3g:.2} {timeline:?}"
        );
    }
    cloud.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_packet_loss_loses_no_sample() {
    let _serial = one_at_a_time();
    const SAMPLES: usize = 200;
    let cloud = LocalCloud::start(&repo().join("models/default"), device())
        .await
        .unwrap();
    let link = "seed = 7\n\
                [uplink]\nrate = { kind = \"constant\", rate_mbps = 20 }\ndelay_ms = 10\n\
                loss = { kind = \"bernoulli\", p = 0.1 }\n\
                [downlink]\nrate = { kind = \"constant\", rate_mbps = 20 }\ndelay_ms = 10\n\
                loss = { kind = \"bernoulli\", p = 0.1 }\n";
    let agent = agent_toml(
        "[cloud]\nencoding = \"f32\"\nrequest_timeout_ms = 3000\n\
         [arms]\nsplits = [3]\nthresholds = [1.0]\n[policy]\nkind = \"fixed\"\narm = 0\n",
    );
    let run = run(&cloud, link, &agent, SAMPLES, Duration::from_millis(1)).await;
    cloud.shutdown().await.unwrap();

    assert_each_answered_once(&run.records, SAMPLES);
    // QUIC retransmits what the link drops: nearly every sample still gets the cloud's answer.
    assert!(
        run.summary.in_cloud as usize >= SAMPLES * 9 / 10,
        "{:?}",
        run.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_compares_the_bandit_with_both_baselines_and_plots_its_arms() {
    let _serial = one_at_a_time();
    const SAMPLES: usize = 60;
    let out = tempfile::tempdir().unwrap();
    // The demo reads its default paths relative to the repository root.
    std::env::set_current_dir(repo()).unwrap();
    let options = DemoOptions {
        agent_config: "configs/demo.toml".into(),
        link_config: "configs/links/lte.toml".into(),
        sentences: "simulations/data/sentences/sentence-polarity-test.tsv".into(),
        samples: SAMPLES,
        interval: Duration::from_millis(20),
        baselines: true,
        out: out.path().to_path_buf(),
    };
    let report = demo::run_demo(&options, device(), &CancellationToken::new())
        .await
        .unwrap();
    println!("{}", report.table);

    assert_eq!(report.runs.len(), 3);
    for run in &report.runs {
        assert_each_answered_once(&run.records, SAMPLES);
        assert!(!run.interrupted);
        assert!(
            run.summary.accuracy.is_some_and(|a| a > 0.6),
            "{:?}",
            run.summary
        );
    }
    let [bandit, local, offload] = &report.runs[..] else {
        unreachable!()
    };
    assert!(bandit.records.iter().all(|(_, r)| r.arm.is_some()));
    assert_eq!(local.summary.offload_rate, Some(0.0), "{:?}", local.summary);
    assert_eq!(local.summary.bytes_sent, 0);
    assert_eq!(
        offload.summary.offload_rate,
        Some(1.0),
        "{:?}",
        offload.summary
    );
    assert!(
        offload.summary.in_cloud as usize >= SAMPLES * 9 / 10,
        "{:?}",
        offload.summary
    );
    assert_eq!(report.table.lines().count(), 2 + 3, "{}", report.table);
    for file in [
        "demo-summary.md",
        "demo-arms.png",
        "demo-arms.svg",
        "demo-run1.jsonl",
    ] {
        let path = out.path().join(file);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{}",
            path.display()
        );
    }
}
