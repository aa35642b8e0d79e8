//! `simulations demo`: the whole system on one machine over an emulated cellular link.
//!
//! A cloud worker (with freshly generated development certificates) listens on loopback; a
//! link emulator ([`crate::link`]) sits in front of it, shaping traffic like a real uplink
//! and downlink; an edge agent streams labelled sentences through it, paced like arriving
//! requests, while its bandit picks the split layer and threshold. The same sentences then
//! go through two baselines, always on the device and always offloaded, each over a freshly
//! started link (so every run sees the trace from its beginning). Everything runs in this
//! process: stopping it (Ctrl-C cancels the [`CancellationToken`]) lets the current run
//! answer the samples it started, shuts every component down and removes the certificates.
//!
//! [`run_over_link`] is the one piece that drives an agent through a link; the fault tests
//! (`tests/faults.rs`) use it as well.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burn::prelude::Device;
use cloud_worker::{CertOptions, GeneratedCerts, Worker, WorkerConfig};
use edge_agent::input::{self, InputRecord};
use edge_agent::metrics::Metrics;
use edge_agent::{Agent, AgentConfig, Answered, SampleRecord, Summary};
use splitee_bandits::{ArmsConfig, PolicyConfig};
use splitee_model::ModelDir;
use tokio_util::sync::CancellationToken;

use splitee_link::LinkConfig;
use splitee_replay::plots;

use crate::link::LinkEmulator;

/// What the demo runs on; every path is relative to the current directory.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The edge agent's configuration; the demo fills in `[cloud]`'s address and CA.
    pub agent_config: PathBuf,
    /// The emulated link (`configs/links/*.toml`).
    pub link_config: PathBuf,
    /// Labelled sentences, GLUE-style TSV.
    pub sentences: PathBuf,
    /// How many of them each run streams.
    pub samples: usize,
    /// Time between two arriving sentences.
    pub interval: Duration,
    /// Also run the always-on-device and always-offload baselines.
    pub baselines: bool,
    /// Where the table, the per-sample records and the plot go.
    pub out: PathBuf,
}

/// One agent run through the link.
#[derive(Debug, Clone)]
pub struct LinkRun {
    pub name: String,
    pub summary: Summary,
    /// Every record in input order, with the seconds since the link started when it was
    /// answered.
    pub records: Vec<(f64, SampleRecord)>,
    /// Uplink throughput the link delivered, Mbit/s, per half second (time in seconds).
    pub uplink_mbps: Vec<(f64, f64)>,
    /// Whether the run was stopped before every sample was streamed.
    pub interrupted: bool,
}

impl LinkRun {
    /// Fraction of the samples started (the arm chosen) in `from_s..to_s` whose arm sent them
    /// to the cloud (answered there or, failing that, on the device); `None` when none started
    /// then. A sample started when it was answered less its total latency.
    pub fn offload_rate_between(&self, from_s: f64, to_s: f64) -> Option<f64> {
        let window: Vec<&SampleRecord> = self
            .records
            .iter()
            .filter(|(answered_at, record)| {
                let started_at = answered_at - record.latency_ms.total / 1000.0;
                (from_s..to_s).contains(&started_at)
            })
            .map(|(_, record)| record)
            .collect();
        (!window.is_empty()).then(|| {
            let offloaded = window.iter().filter(|r| was_offloaded(r)).count();
            offloaded as f64 / window.len() as f64
        })
    }
}

fn was_offloaded(record: &SampleRecord) -> bool {
    matches!(record.answered, Answered::Cloud | Answered::DeviceFallback)
}

/// A cloud worker on loopback with development certificates in a temporary directory, which
/// is removed when this is dropped.
pub struct LocalCloud {
    pub worker: Worker,
    pub certs: GeneratedCerts,
    _dir: tempfile::TempDir,
}

impl LocalCloud {
    pub async fn start(model: &Path, device: Device) -> anyhow::Result<LocalCloud> {
        let dir = tempfile::tempdir().context("creating a directory for the certificates")?;
        let certs = cloud_worker::gen_certs(&CertOptions {
            out_dir: dir.path().to_path_buf(),
            ..CertOptions::default()
        })?;
        let mut config = WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            metrics_listen: None,
            ..WorkerConfig::default()
        };
        config.tls.cert = certs.server_cert.clone();
        config.tls.key = certs.server_key.clone();
        config.tls.client_ca = Some(certs.worker_client_ca.clone());
        let model_dir = model.to_path_buf();
        let load_device = device.clone();
        let loaded =
            tokio::task::spawn_blocking(move || ModelDir::open(&model_dir)?.load(&load_device))
                .await?
                .with_context(|| format!("loading the model {} for the worker", model.display()))?;
        let worker = Worker::start(&config, loaded, device).await?;
        Ok(LocalCloud {
            worker,
            certs,
            _dir: dir,
        })
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.worker.shutdown().await
    }
}

/// Reads `config` (TOML) as an agent configuration whose `[cloud]` holds the agent's files of
/// `certs` (the CA, the client certificate and key: the local worker wants mutual TLS), or
/// placeholder paths without them, to check a config before any worker exists; the file's
/// other `[cloud]` keys (encoding, timeouts) are kept. The address is left unspecified:
/// [`run_over_link`] points the agent at the link it starts.
pub fn agent_config_for(
    config: &str,
    certs: Option<&GeneratedCerts>,
) -> anyhow::Result<AgentConfig> {
    let mut table: toml::Table = toml::from_str(config)?;
    let cloud = table
        .entry("cloud")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("[cloud] must be a table")?;
    cloud.insert("address".into(), "127.0.0.1:0".into());
    let files = certs.map_or(
        ["ca.pem", "client.pem", "client.key.pem"].map(PathBuf::from),
        |certs| {
            [&certs.agent_ca, &certs.client_cert, &certs.client_key].map(|path| path.to_owned())
        },
    );
    for (key, path) in ["ca", "client_cert", "client_key"].into_iter().zip(files) {
        cloud.insert(key.into(), path.to_string_lossy().into_owned().into());
    }
    AgentConfig::from_toml(&toml::to_string(&table)?)
}

/// Starts `link` in front of `upstream`, points `config` at it, and streams `inputs` through
/// an agent, one every `interval`, calling `on_record` with each answer. Stops early (the
/// samples already started are still answered) when `stop` is cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn run_over_link(
    name: &str,
    mut config: AgentConfig,
    link: &LinkConfig,
    upstream: SocketAddr,
    device: Device,
    inputs: Vec<InputRecord>,
    interval: Duration,
    stop: &CancellationToken,
    on_record: &mut dyn FnMut(f64, &SampleRecord),
) -> anyhow::Result<LinkRun> {
    let link = Arc::new(LinkEmulator::start(link, "127.0.0.1:0".parse()?, upstream)?);
    let cloud = config
        .cloud
        .as_mut()
        .context("the agent needs a [cloud] to run through a link")?;
    cloud.address = link.local_addr().into();
    let mut agent = Agent::start(&config, device, Arc::new(Metrics::new()), true).await?;

    let samples = inputs.len();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let feeding = stop.child_token();
    let feeder = {
        let feeding = feeding.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for input in inputs {
                tokio::select! {
                    () = feeding.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                if sender.send(input).await.is_err() {
                    return;
                }
            }
        })
    };
    // Uplink throughput per half second, on the records' clock (seconds since the link
    // started), each value at the middle of the interval it covers.
    let sampler = {
        let link = Arc::clone(&link);
        let feeding = feeding.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(500));
            ticks.tick().await; // the first tick is immediate
            let origin = link.started_at();
            let (mut before, mut before_at, mut series) =
                (link.stats(), Instant::now(), Vec::new());
            loop {
                tokio::select! {
                    () = feeding.cancelled() => return series,
                    _ = ticks.tick() => {}
                }
                let (now, now_at) = (link.stats(), Instant::now());
                let bytes = now.uplink.since(&before.uplink).delivered_bytes;
                let seconds = (now_at - before_at).as_secs_f64();
                let middle = (before_at - origin).as_secs_f64() + seconds / 2.0;
                series.push((middle, bytes as f64 * 8e-6 / seconds));
                (before, before_at) = (now, now_at);
            }
        })
    };

    let started = link.started_at();
    let mut records = Vec::with_capacity(samples);
    let outcome = agent
        .run(receiver, stop.clone(), &mut |record| {
            let at = started.elapsed().as_secs_f64();
            on_record(at, record);
            records.push((at, record.clone()));
        })
        .await;
    feeding.cancel();
    feeder.await?;
    let uplink_mbps = sampler.await?;
    agent.shutdown().await?;
    Arc::into_inner(link)
        .expect("the sampler, the only other owner, has ended")
        .shutdown()
        .await;
    let summary = outcome?;
    Ok(LinkRun {
        name: name.to_owned(),
        interrupted: records.len() < samples,
        summary,
        records,
        uplink_mbps,
    })
}

/// The demo's runs, table and plot.
pub struct DemoReport {
    pub runs: Vec<LinkRun>,
    /// Markdown table of the runs.
    pub table: String,
    /// Where the plot of the bandit's arm over time was written (`.png` and `.svg`).
    pub plot_stem: PathBuf,
}

/// Runs the demo (see the module documentation) on `device`, writing into `options.out`.
pub async fn run_demo(
    options: &DemoOptions,
    device: Device,
    stop: &CancellationToken,
) -> anyhow::Result<DemoReport> {
    let config_text = std::fs::read_to_string(&options.agent_config)
        .with_context(|| format!("reading {}", options.agent_config.display()))?;
    let link = LinkConfig::load(&options.link_config)?;
    let sentences = input::read_tsv_file(&options.sentences, options.samples)?;
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;

    // Checked before anything starts; the certificates are generated below.
    let template = agent_config_for(&config_text, None)
        .with_context(|| format!("in {}", options.agent_config.display()))?;
    let num_layers = ModelDir::open(&template.model)?.config.num_hidden_layers;
    let mut plan = vec![("bandit".to_owned(), None)];
    if options.baselines {
        plan.push((
            format!("always on device (all {num_layers} layers)"),
            Some((
                format!("splits = [{num_layers}]\nthresholds = [1.0]"),
                "kind = \"fixed\"\narm = 0",
            )),
        ));
        plan.push((
            // The earliest split: the least work on the device for every sample.
            "always offload (after layer 1)".to_owned(),
            Some((
                "splits = [1]\nthresholds = [1.0]".to_owned(),
                "kind = \"fixed\"\narm = 0",
            )),
        ));
    }

    eprintln!(
        "demo: {} sentences from {}, one every {} ms, over {}",
        sentences.len(),
        options.sentences.display(),
        options.interval.as_millis(),
        options.link_config.display()
    );
    let cloud = LocalCloud::start(&template.model, device.clone()).await?;
    let template = agent_config_for(&config_text, Some(&cloud.certs))?;
    eprintln!(
        "demo: cloud worker on {} (certificates in a temporary directory)",
        cloud.worker.local_addr()
    );
    let mut runs = Vec::new();
    let mut failure = None;
    for (name, fixed) in plan {
        if stop.is_cancelled() {
            break;
        }
        let mut config = template.clone();
        if let Some((arms, policy)) = fixed {
            config.arms = toml::from_str::<ArmsConfig>(&arms)?;
            config.policy = toml::from_str::<PolicyConfig>(policy)?;
        }
        let mut progress = Progress::new(&name, sentences.len());
        let run = run_over_link(
            &name,
            config,
            &link,
            cloud.worker.local_addr(),
            device.clone(),
            sentences.clone(),
            options.interval,
            stop,
            &mut |_, record| progress.record(record),
        )
        .await;
        progress.finish();
        match run {
            Ok(run) => {
                write_records(&options.out, runs.len(), &run)?;
                runs.push(run);
            }
            Err(error) => {
                failure = Some(error.context(format!("the {name} run failed")));
                break;
            }
        }
    }
    cloud.shutdown().await?;
    if let Some(error) = failure {
        return Err(error);
    }

    let table = comparison_table(&runs);
    std::fs::write(options.out.join("demo-summary.md"), &table)?;
    let plot_stem = options.out.join("demo-arms");
    if let Some(bandit) = runs.first() {
        plot_arms(&plot_stem, bandit, &options.link_config, num_layers)?;
    }
    Ok(DemoReport {
        runs,
        table,
        plot_stem,
    })
}

/// One markdown row per run: what a user compares policies by. Latency is measured on this
/// machine; cost is what the bandit was charged (the config's `reward.edge_costs`: the
/// demo's device profile for the edge layers, measured network and cloud time).
pub fn comparison_table(runs: &[LinkRun]) -> String {
    let mut out = String::from(
        "| run | samples | accuracy | offload rate | latency mean / p50 / p99 (ms, measured) | mean cost (ms, charged) | mean reward | sent (KB) | device fallbacks |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let percent = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{:.1} %", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    for run in runs {
        let s = &run.summary;
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} / {} / {} | {} | {} | {:.0} | {} |",
            run.name,
            if run.interrupted { " (stopped)" } else { "" },
            s.answered,
            percent(s.accuracy),
            percent(s.offload_rate),
            ms(s.latency_mean_ms),
            ms(s.latency_p50_ms),
            ms(s.latency_p99_ms),
            ms(s.cost_mean_ms),
            s.reward_mean
                .map_or("n/a".to_owned(), |v| format!("{v:.3}")),
            s.bytes_sent as f64 / 1000.0,
            s.fallbacks,
        );
    }
    out
}

fn write_records(out: &Path, index: usize, run: &LinkRun) -> anyhow::Result<()> {
    let path = out.join(format!("demo-run{}.jsonl", index + 1));
    let mut text = String::new();
    for (_, record) in &run.records {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The split the bandit played for each sample, one series per threshold, over the uplink
/// throughput the link delivered.
fn plot_arms(stem: &Path, run: &LinkRun, link: &Path, num_layers: usize) -> anyhow::Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (at, record) in &run.records {
        let Some(arm) = record.arm else { continue };
        let name = format!("split played, α = {:.2}", arm.threshold);
        let points = match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points,
            None => {
                series.push((name, Vec::new()));
                &mut series.last_mut().expect("just pushed").1
            }
        };
        points.push((*at, arm.split as f64));
    }
    series.sort_by(|a, b| a.0.cmp(&b.0));
    plots::arms_over_link(
        stem,
        &format!("demo: the bandit's split over {}", link.display()),
        &series,
        &run.uplink_mbps,
        num_layers,
        plots::ArmAxes {
            time: "time since the link started (s)",
            rate: "uplink delivered (Mbit/s)",
        },
        plots::png_text_available(),
    )
}

/// Live progress of one run: a bar on a terminal, a line every 10 % otherwise.
struct Progress {
    name: String,
    total: usize,
    done: usize,
    offloaded: usize,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(name: &str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>36} [{bar:30}] {pos}/{len} {per_sec:>10} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_owned());
            bar
        });
        Self {
            name: name.to_owned(),
            total,
            done: 0,
            offloaded: 0,
            started: Instant::now(),
            bar,
        }
    }

    fn record(&mut self, record: &SampleRecord) {
        self.done += 1;
        self.offloaded += usize::from(was_offloaded(record));
        let arm = record.arm.map_or("–".to_owned(), |arm| {
            format!("split {} α {:.2}", arm.split, arm.threshold)
        });
        let line = format!(
            "offload {:.0} % · arm {arm}",
            100.0 * self.offloaded as f64 / self.done as f64
        );
        match &self.bar {
            Some(bar) => {
                bar.set_message(line);
                bar.inc(1);
            }
            None if self.done.is_multiple_of((self.total / 10).max(1))
                || self.done == self.total =>
            {
                let per_second = self.done as f64 / self.started.elapsed().as_secs_f64();
                eprintln!(
                    "{}: {}/{} samples, {per_second:.1}/s, {line}",
                    self.name, self.done, self.total
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
