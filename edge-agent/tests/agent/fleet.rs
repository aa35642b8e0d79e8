//! The fleet test: three real workers on loopback, three agents streaming to all of them; one
//! worker is killed hard, another drained, the first restarted, and no sample is lost or
//! answered twice while offloading goes on. Prints the failover time and the rates of each
//! phase (`cargo test --workspace --release --test agent fleet -- --nocapture`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud_worker::GeneratedCerts;
use edge_agent::input::InputRecord;
use edge_agent::metrics::Metrics;
use edge_agent::{Agent, AgentConfig, Answered, SampleRecord};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::support::{self, certs, device, sentences};

const AGENTS: usize = 3;
const WINDOW: usize = 8;
/// A bound on the samples one agent is fed (the phases end on answers counted, not on this).
const MAX_PER_AGENT: usize = 3_000;
/// Answers (over all agents) in each phase before the next event.
const PHASE_ANSWERS: usize = 150;
/// Cloud answers the restarted worker must give before the run ends.
const RESTARTED_ANSWERS: usize = 40;
/// The whole run's bound.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// What happens to a worker running on a thread of its own.
enum Order {
    /// Its runtime is dropped: no drain, no goodbye, its in-flight requests are lost.
    Kill,
    /// `Worker::shutdown`: refuse new work, finish what is admitted.
    Drain,
}

struct WorkerThread {
    address: SocketAddr,
    orders: oneshot::Sender<Order>,
    done: oneshot::Receiver<()>,
}

impl WorkerThread {
    /// A worker on `listen`, on a runtime of its own so that it can be killed outright.
    async fn start(certs: Arc<GeneratedCerts>, listen: String) -> Self {
        let (address_tx, address_rx) = oneshot::channel();
        let (orders, order_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let worker = support::start_worker(&certs, &listen, |_| {}).await;
                let _ = address_tx.send(worker.local_addr());
                if let Ok(Order::Drain) = order_rx.await {
                    worker.shutdown().await.unwrap();
                }
                // A kill leaves the worker running until its runtime goes, below.
            });
            // Drops every task (endpoint, connections, requests) without running it again.
            runtime.shutdown_background();
            let _ = done_tx.send(());
        });
        let address = address_rx.await.expect("the worker started");
        Self {
            address,
            orders,
            done,
        }
    }

    async fn stop(self, order: Order) {
        let _ = self.orders.send(order);
        self.done.await.unwrap();
    }
}

/// One record as the test saw it.
struct Seen {
    agent: usize,
    at: Instant,
    line: usize,
    answered: Answered,
    worker: Option<SocketAddr>,
    total_ms: f64,
}

impl Seen {
    fn started(&self) -> Instant {
        self.at - Duration::from_secs_f64(self.total_ms / 1e3)
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Waits until `done` holds over the log or the run's limit passes (false then).
async fn until(log: &Log, limit: Instant, done: impl Fn(&[Seen]) -> bool) -> bool {
    loop {
        if done(&log.lock().unwrap()) {
            return true;
        }
        if Instant::now() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(certs: &GeneratedCerts, workers: &[SocketAddr]) -> AgentConfig {
    let tables = format!(
        "[pipeline]\nwindow = {WINDOW}\n[arms]\nsplits = [1]\nthresholds = [1.0]\n\
         [policy]\nkind = \"fixed\"\narm = 0\n"
    );
    let one = support::agent_toml(Some((certs, workers[0])), &tables);
    let list: Vec<String> = workers.iter().map(|w| format!("\"{w}\"")).collect();
    let toml = one.replace(
        &format!("address = \"{}\"", workers[0]),
        &format!("address = [{}]", list.join(", ")),
    );
    assert!(toml.contains(&list.join(", ")), "{toml}");
    AgentConfig::from_toml(&toml).unwrap()
}

/// Feeds `agent` numbered copies of the test sentences until `stop`; returns how many.
fn feed(
    sender: tokio::sync::mpsc::Sender<InputRecord>,
    texts: Arc<Vec<InputRecord>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        for seq in 0..MAX_PER_AGENT {
            let mut record = texts[seq % texts.len()].clone();
            record.line = seq + 2;
            record.id = format!("s{seq}");
            tokio::select! {
                () = stop.cancelled() => return seq,
                sent = sender.send(record) => if sent.is_err() { return seq },
            }
        }
        MAX_PER_AGENT
    })
}

/// Cloud answers and samples per second in `from..to`, and the share answered by the cloud.
fn rates(log: &[Seen], from: Instant, to: Instant) -> (f64, f64, f64) {
    let within: Vec<&Seen> = log.iter().filter(|s| s.at >= from && s.at < to).collect();
    let cloud = within
        .iter()
        .filter(|s| s.answered == Answered::Cloud)
        .count();
    let seconds = (to - from).as_secs_f64().max(1e-3);
    let share = cloud as f64 / within.len().max(1) as f64;
    (cloud as f64 / seconds, within.len() as f64 / seconds, share)
}

/// The longest time without a cloud answer for `agent` within `from..to`.
fn longest_gap(log: &[Seen], agent: usize, from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for seen in log
        .iter()
        .filter(|s| s.agent == agent && s.at >= from && s.at < to)
    {
        if seen.answered == Answered::Cloud {
            gap = gap.max(seen.at - last);
            last = seen.at;
        }
    }
    gap.max(to.saturating_duration_since(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_killed_one_drained_lose_no_sample_and_offloading_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Arc::new(certs(dir.path()));
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerThread::start(certs.clone(), "127.0.0.1:0".into()).await);
    }
    let addresses: Vec<SocketAddr> = workers.iter().map(|w| w.address).collect();
    let [killed_at, drained_at, survivor_at] = [addresses[0], addresses[1], addresses[2]];
    let config = config(&certs, &addresses);

    let log: Log = Arc::default();
    let texts = Arc::new(sentences(200));
    let stop = CancellationToken::new();
    let mut agents = Vec::new();
    let mut feeders = Vec::new();
    let mut receivers = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..AGENTS {
        let agent_metrics = Arc::new(Metrics::new());
        let agent = Agent::start(&config, device(), agent_metrics.clone(), true)
            .await
            .unwrap();
        assert_eq!(agent.cloud_endpoints().len(), 3);
        agents.push(agent);
        metrics.push(agent_metrics);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        receivers.push(receiver);
        feeders.push((sender, texts.clone()));
    }

    let began = Instant::now();
    let limit = began + RUN_LIMIT;
    let finished = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (log, stop, certs, finished) =
            (log.clone(), stop.clone(), certs.clone(), finished.clone());
        let mut workers = workers.into_iter();
        let (a, b, c) = (
            workers.next().unwrap(),
            workers.next().unwrap(),
            workers.next().unwrap(),
        );
        tokio::spawn(async move {
            let answers_since = |at: Instant| {
                move |log: &[Seen]| log.iter().filter(|s| s.at >= at).count() >= PHASE_ANSWERS
            };
            until(&log, limit, answers_since(began)).await;
            let kill = Instant::now();
            a.stop(Order::Kill).await;
            until(&log, limit, answers_since(kill)).await;
            let drain = Instant::now();
            b.stop(Order::Drain).await;
            let drained = Instant::now();
            until(&log, limit, answers_since(drained)).await;
            let restart = Instant::now();
            let a = WorkerThread::start(certs.clone(), killed_at.to_string()).await;
            let restarted = Instant::now();
            let ok = until(&log, limit, |log| {
                let after: Vec<&Seen> = log.iter().filter(|s| s.at >= restarted).collect();
                after.len() >= PHASE_ANSWERS
                    && after.iter().filter(|s| s.worker == Some(killed_at)).count()
                        >= RESTARTED_ANSWERS
            })
            .await;
            finished.store(ok, Ordering::SeqCst);
            stop.cancel();
            (kill, drain, drained, restart, restarted, a, c)
        })
    };

    let feeding: Vec<_> = feeders
        .into_iter()
        .map(|(sender, texts)| feed(sender, texts, stop.clone()))
        .collect();
    let runs = agents
        .iter_mut()
        .zip(receivers)
        .enumerate()
        .map(|(index, (agent, receiver))| {
            let log = log.clone();
            async move {
                let mut sink = |record: &SampleRecord| {
                    log.lock().unwrap().push(Seen {
                        agent: index,
                        at: Instant::now(),
                        line: record.line,
                        answered: record.answered,
                        worker: record.worker,
                        total_ms: record.latency_ms.total,
                    });
                };
                agent
                    .run_as_answered(receiver, CancellationToken::new(), &mut sink)
                    .await
                    .unwrap()
            }
        });
    let summaries = futures::future::join_all(runs).await;
    let ended = Instant::now();
    let (kill, drain, drained, restart, restarted, a, c) = supervisor.await.unwrap();
    let mut fed = Vec::new();
    for feeder in feeding {
        fed.push(feeder.await.unwrap());
    }
    assert!(
        finished.load(Ordering::SeqCst),
        "the run hit its {RUN_LIMIT:?} limit before the restarted worker gave \
         {RESTARTED_ANSWERS} answers"
    );
    let moved: Vec<String> = metrics
        .iter()
        .map(|m| metric(&m.encode(), "splitee_agent_cloud_offloads_moved_total").to_string())
        .collect();
    let texts: Vec<String> = metrics.iter().map(|m| m.encode()).collect();
    for agent in agents {
        agent.shutdown().await.unwrap();
    }
    a.stop(Order::Drain).await;
    c.stop(Order::Drain).await;

    let log = log.lock().unwrap();
    // Not one sample lost, not one answered twice.
    for (agent, &fed) in fed.iter().enumerate() {
        let mut lines: BTreeMap<usize, usize> = BTreeMap::new();
        for seen in log.iter().filter(|s| s.agent == agent) {
            *lines.entry(seen.line).or_default() += 1;
        }
        let twice = lines.values().filter(|&&n| n > 1).count();
        assert_eq!(twice, 0, "agent {agent}: {twice} samples answered twice");
        let expected: Vec<usize> = (2..fed + 2).collect();
        assert_eq!(
            lines.keys().copied().collect::<Vec<_>>(),
            expected,
            "agent {agent}: fed {fed}, answered {}",
            lines.len()
        );
        assert_eq!(summaries[agent].answered, fed as u64);
    }
    assert!(log.iter().all(|s| s.answered != Answered::Error));

    // Nobody answers from a worker that is gone (a record may trail its answer a little).
    let margin = Duration::from_millis(200);
    let from = |worker: SocketAddr, range: std::ops::Range<Instant>| {
        log.iter()
            .filter(|s| s.worker == Some(worker) && range.contains(&s.at))
            .count()
    };
    assert_eq!(from(killed_at, kill + margin..restarted), 0);
    assert_eq!(from(drained_at, drained + margin..ended), 0);
    // Offloading goes on after each event, on the workers left.
    let phases = [
        ("3 workers", began, kill),
        ("killed 1 (2 left)", kill, drain),
        ("drained 1 more (1 left)", drained, restart),
        ("restarted the killed one (2)", restarted, ended),
    ];
    println!("fleet: {AGENTS} agents, window {WINDOW}, workers {addresses:?}");
    for (name, from, to) in phases {
        let (cloud, samples, share) = rates(&log, from, to);
        println!(
            "fleet: {name:<30} {:>6.1} s  {cloud:>6.1} cloud answers/s  {samples:>6.1} samples/s  \
             cloud share {:.3}",
            (to - from).as_secs_f64(),
            share
        );
        assert!(
            share >= 0.8,
            "{name}: only {share:.3} of the samples answered by the cloud"
        );
    }
    assert!(from(survivor_at, drained..restart) > 0);
    assert!(from(killed_at, restarted..ended) >= RESTARTED_ANSWERS);
    // Failover: how long the samples in flight when the worker was killed took to be answered.
    for agent in 0..AGENTS {
        let caught: Vec<&Seen> = log
            .iter()
            .filter(|s| s.agent == agent && s.started() < kill && s.at >= kill)
            .collect();
        let failover = caught.iter().map(|s| s.at - kill).max().unwrap_or_default();
        let fallbacks = caught
            .iter()
            .filter(|s| s.answered == Answered::DeviceFallback)
            .count();
        println!(
            "fleet: agent {agent}: {} samples started before the kill were answered after it, the \
             last {} ms after it ({fallbacks} on the device); longest gap in cloud answers {} ms after the \
             kill, {} ms after the drain; offloads moved {}",
            caught.len(),
            failover.as_millis(),
            longest_gap(&log, agent, kill, drain).as_millis(),
            longest_gap(&log, agent, drain, restart).as_millis(),
            moved[agent],
        );
        assert!(
            failover < Duration::from_secs(6),
            "agent {agent}: {failover:?}"
        );
    }
    let fallbacks = log
        .iter()
        .filter(|s| s.answered == Answered::DeviceFallback)
        .count();
    println!(
        "fleet: {} samples, {fallbacks} answered on the device after a failed offload, 0 lost, \
         0 twice",
        log.len()
    );
    // Each agent's metrics: the endpoints' state at the end and who answered.
    for text in &texts {
        let up = |w: SocketAddr| {
            metric(
                text,
                &format!("splitee_agent_cloud_endpoint_up{{endpoint=\"{w}\"}}"),
            )
        };
        assert_eq!(
            (up(killed_at), up(drained_at), up(survivor_at)),
            (1.0, 0.0, 1.0),
            "{text}"
        );
        for worker in addresses.iter() {
            let answered = metric(
                text,
                &format!(
                    "splitee_agent_cloud_endpoint_offloads_total{{endpoint=\"{worker}\",result=\"answered\"}}"
                ),
            );
            assert!(answered > 0.0, "{worker}: {text}");
        }
    }
    let moved_total: f64 = moved.iter().map(|m| m.parse::<f64>().unwrap()).sum();
    assert!(moved_total >= 1.0, "no offload moved to another endpoint");
}

/// A sample's value in an OpenMetrics text (labels in the order the agent writes them).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offload_the_worker_is_too_busy_for_moves_to_another_endpoint() {
    const SAMPLES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    // One request at a time: with eight in flight, most of what comes to it is `busy`.
    let narrow = support::start_worker(&certs, "127.0.0.1:0", |c| {
        c.batching.max_in_flight = 1;
    })
    .await;
    let wide = support::start_worker(&certs, "127.0.0.1:0", |_| {}).await;
    let config = config(&certs, &[narrow.local_addr(), wide.local_addr()]);
    let agent_metrics = Arc::new(Metrics::new());
    let mut agent = Agent::start(&config, device(), agent_metrics.clone(), true)
        .await
        .unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for record in sentences(SAMPLES) {
            sender.send(record).await.unwrap();
        }
    });
    let mut records = Vec::new();
    let summary = agent
        .run(receiver, CancellationToken::new(), &mut |record| {
            records.push(record.clone())
        })
        .await
        .unwrap();
    feeder.await.unwrap();
    agent.shutdown().await.unwrap();
    let text = agent_metrics.encode();
    narrow.shutdown().await.unwrap();
    wide.shutdown().await.unwrap();

    // Every sample answered once, by the cloud: what was busy on one worker went to the other.
    assert_eq!(records.len(), SAMPLES);
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.line, index + 2);
        assert_eq!(record.answered, Answered::Cloud, "{record:?}");
    }
    assert_eq!(summary.in_cloud, SAMPLES as u64, "{summary:?}");
    let count = |worker: SocketAddr, result: &str| {
        let name = format!(
            "splitee_agent_cloud_endpoint_offloads_total{{endpoint=\"{worker}\",result=\"{result}\"}}"
        );
        text.lines()
            .find_map(|line| line.strip_prefix(name.as_str())?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse().unwrap())
    };
    let busy = count(config_worker(&config, 0), "busy");
    assert!(busy >= 1.0, "the narrow worker was never busy:\n{text}");
    assert!(metric(&text, "splitee_agent_cloud_offloads_moved_total") >= busy);
    let answered: f64 = (0..2)
        .map(|i| count(config_worker(&config, i), "answered"))
        .sum();
    assert_eq!(answered, SAMPLES as f64, "{text}");
    // Its cloud answers say which worker gave them.
    assert!(records.iter().all(|r| r.worker.is_some()));
}

/// The `index`-th worker address of an agent config.
fn config_worker(config: &AgentConfig, index: usize) -> SocketAddr {
    match &config.cloud.as_ref().unwrap().address.0[index] {
        edge_agent::config::WorkerAddress::Socket(socket) => *socket,
        other => panic!("{other}"),
    }
}
