//! `simulations`: a thin command-line dispatcher over the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use burn::prelude::Device;
use clap::{Parser, Subcommand};
use splitee_link::LinkConfig;
use splitee_model::dataset::Dataset;
use splitee_model::{BackendChoice, ModelDir, WhenUnavailable};
use splitee_replay::calibrate::calibrate;
use splitee_replay::experiment::AgentTables;
use splitee_replay::experiment::{ExperimentConfig, Prepared, run_experiment};
use splitee_replay::matrix::ConfidenceMatrix;
use splitee_replay::synth::{SynthSpec, generate};
use splitee_testbed::demo::{self, DemoOptions};
use splitee_testbed::link;
use splitee_training::record::record;
use splitee_training::{self as training, TrainConfig, Trainer};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Offline split early-exit simulations on network traces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment config (TOML): CSVs, plots and report.md under --out.
    Experiment {
        config: PathBuf,
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// Use this matrix instead of the config's (same format), e.g. a synthetic one.
        #[arg(long)]
        matrix: Option<PathBuf>,
        /// Samples per run instead of the config's `samples`.
        #[arg(long)]
        samples: Option<usize>,
        /// Seeds instead of the config's `seeds`, e.g. `--seeds 1,2,3,4,5`.
        #[arg(long, value_delimiter = ',')]
        seeds: Option<Vec<u64>>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Certify an agent's arms on a labelled recorded matrix (Learn-then-Test): the arms whose
    /// accuracy drop against the final exit is ≤ ε with probability ≥ 1 − δ. Prints every arm's
    /// test; `--write` puts the certified set into the config as `[arms] allowed`.
    Calibrate {
        /// The edge-agent config whose `[arms]` grid is certified.
        #[arg(long)]
        config: PathBuf,
        /// The labelled calibration matrix (splitee CSV, `simulations record`).
        #[arg(long)]
        matrix: PathBuf,
        /// Another labelled matrix of the same model: reports each arm's drop on it.
        #[arg(long)]
        held_out: Option<PathBuf>,
        /// Largest accuracy drop a certified arm may have (0.01 = one point).
        #[arg(long, default_value_t = 0.01)]
        epsilon: f64,
        /// Probability that some certified arm exceeds ε.
        #[arg(long, default_value_t = 0.05)]
        delta: f64,
        /// Write `[arms] allowed` into the config (comments and layout kept).
        #[arg(long)]
        write: bool,
    },
    /// Write a SYNTHETIC confidence matrix in splitee's format (see `splitee_replay::synth`).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        samples: usize,
        #[arg(long, default_value_t = 6)]
        layers: usize,
        #[arg(long, default_value_t = 2)]
        classes: usize,
        #[arg(long, default_value_t = 384)]
        hidden: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Run a model over a labelled TSV and write its per-exit probabilities and per-layer
    /// compute times as a confidence matrix (CSV).
    Record {
        /// Model directory (default: the embedded model).
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// GLUE-style TSV (`sentence` and `label` columns).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Record only the first N samples.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = BackendChoice::default())]
        backend: BackendChoice,
    },
    /// Per-exit accuracy and the threshold table of a model on a labelled TSV (markdown).
    Evaluate {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = BackendChoice::default())]
        backend: BackendChoice,
    },
    /// Train the exit heads of a multi-exit model (TOML config, see configs/train-*.toml).
    Train {
        config: PathBuf,
        #[arg(long, default_value_t = BackendChoice::default())]
        backend: BackendChoice,
    },
    /// The whole system on this machine: a cloud worker, a link emulator on a cellular trace
    /// and an edge agent whose bandit picks split and threshold, streaming labelled
    /// sentences; then the always-on-device and always-offload baselines over the same link.
    /// Prints a comparison table and plots the bandit's arm over time. Ctrl-C stops cleanly.
    Demo {
        /// The model, by the agent config it picks: `default` (configs/demo.toml) or
        /// `mpnet-base` (configs/demo-mpnet.toml; fetch its weights first with `fetch-model`).
        #[arg(long, value_enum, default_value_t = DemoModel::Default, conflicts_with = "config")]
        model: DemoModel,
        /// The edge agent's config instead of the model's ([cloud] address and CA are filled
        /// in by the demo).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The emulated link.
        #[arg(long, default_value = "configs/links/lte.toml")]
        link: PathBuf,
        /// Labelled sentences (TSV with `sentence` and `label` columns).
        #[arg(
            long,
            default_value = "simulations/data/sentences/sentence-polarity-test.tsv"
        )]
        sentences: PathBuf,
        /// Sentences per run.
        #[arg(long, default_value_t = 600)]
        samples: usize,
        /// Milliseconds between two arriving sentences.
        #[arg(long, default_value_t = 40)]
        interval_ms: u64,
        /// Skip the two baseline runs.
        #[arg(long)]
        no_baselines: bool,
        #[arg(long, default_value = "results/demo")]
        out: PathBuf,
        #[arg(long, default_value_t = BackendChoice::default())]
        backend: BackendChoice,
    },
    /// Emulate a network link: relay UDP (QUIC) between an edge agent and a cloud worker,
    /// shaping each direction by a link config (configs/links/*.toml), until Ctrl-C. Logs
    /// each second's traffic (RUST_LOG sets the level).
    Link {
        #[arg(long)]
        config: PathBuf,
        /// Where edge agents connect.
        #[arg(long, default_value = "127.0.0.1:5433")]
        listen: SocketAddr,
        /// The cloud worker.
        #[arg(long, default_value = "127.0.0.1:4433")]
        upstream: SocketAddr,
    },
}

/// The models the demo knows, each with the agent config that runs it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DemoModel {
    /// The embedded all-MiniLM-L6-v2, its device charged as a made-up slow board (30 ms a
    /// layer): on this machine's fast cores offloading would never pay.
    Default,
    /// all-mpnet-base-v2 (models/mpnet-base), its device charged as the Raspberry Pi 4
    /// estimate (configs/devices/rpi4-mpnet.toml, 28 ms a layer).
    MpnetBase,
}

impl DemoModel {
    fn agent_config(self) -> &'static str {
        match self {
            DemoModel::Default => "configs/demo.toml",
            DemoModel::MpnetBase => "configs/demo-mpnet.toml",
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Experiment {
            config,
            out,
            matrix,
            samples,
            seeds,
            threads,
            quiet,
        } => {
            if let Some(n) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .context("thread pool")?;
            }
            let mut cfg = ExperimentConfig::load(&config)?;
            if let Some(m) = matrix {
                cfg.matrix.path = m;
            }
            if let Some(n) = samples {
                cfg.samples = n;
            }
            if let Some(seeds) = seeds {
                cfg.seeds = seeds;
            }
            let m = cfg.matrix.load(None)?;
            if m.is_synthetic() {
                eprintln!("note: {} is SYNTHETIC", cfg.matrix.path.display());
            }
            let prepared = Prepared::new(cfg, &m)?;
            let report = run_experiment(&prepared, &out, !quiet)?;
            println!("{report}");
            eprintln!("wrote {}", out.display());
        }
        Command::Synth {
            out,
            samples,
            layers,
            classes,
            hidden,
            seed,
        } => {
            let m: ConfidenceMatrix = generate(SynthSpec {
                samples,
                layers,
                classes,
                hidden,
                seed,
            })?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            m.write_csv(&out)?;
            eprintln!(
                "wrote SYNTHETIC matrix {} ({samples} samples)",
                out.display()
            );
        }
        Command::Calibrate {
            config,
            matrix,
            held_out,
            epsilon,
            delta,
            write,
        } => {
            let agent = AgentTables::from_file(&config)?;
            let read = |path: &PathBuf| {
                ConfidenceMatrix::read_csv(path)
                    .with_context(|| format!("reading the matrix {}", path.display()))
            };
            let calibration = read(&matrix)?;
            let held = held_out.as_ref().map(read).transpose()?;
            let calibrated = calibrate(&agent, &calibration, held.as_ref(), epsilon, delta)?;
            println!("{}", calibrated.table());
            let certified = calibrated.certificate.certified().count();
            println!(
                "{certified} of {} arms certified{}",
                calibrated.certificate.tests.len(),
                calibrated
                    .worst_held_out()
                    .map(|d| format!(
                        "; the worst drop of a certified arm on {}: {:+.2} points (ε = {:.2})",
                        held_out.as_ref().expect("held-out drops").display(),
                        100.0 * d,
                        100.0 * epsilon
                    ))
                    .unwrap_or_default()
            );
            if write {
                anyhow::ensure!(
                    certified > 0,
                    "no arm was certified: the config is unchanged"
                );
                let text = std::fs::read_to_string(&config)?;
                std::fs::write(&config, calibrated.write_into(&text, &matrix)?)
                    .with_context(|| format!("writing {}", config.display()))?;
                eprintln!("wrote [arms] allowed into {}", config.display());
            }
        }
        Command::Record {
            model,
            data,
            out,
            limit,
            backend,
        } => {
            let device = tool_device(backend)?;
            let loaded = ModelDir::open(&model)?.load(&device)?;
            let dataset = Dataset::read_tsv(&data)?;
            for bad in &dataset.bad_rows {
                eprintln!("warning: {}: skipped {bad}", data.display());
            }
            let step = (dataset.examples.len() / 20).max(1);
            let matrix = record(&loaded, &dataset, backend, &device, limit, |done, total| {
                if done % step == 0 || done == total {
                    eprintln!("recorded {done}/{total}");
                }
            })?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            matrix.write_csv(&out)?;
            eprintln!("wrote {} ({} samples)", out.display(), matrix.len());
        }
        Command::Evaluate {
            model,
            data,
            backend,
        } => {
            let device = tool_device(backend)?;
            let outputs = training::evaluate(&model, &data, &device)?;
            println!(
                "{} on {} ({} samples):\n",
                model.display(),
                data.display(),
                outputs.len()
            );
            println!("{}", outputs.markdown(&[0.6, 0.7, 0.8, 0.9]));
        }
        Command::Train { config, backend } => {
            let config = TrainConfig::from_file(&config)?;
            let device = tool_device(backend)?;
            let report = Trainer::new(&config, device, true).run()?;
            println!(
                "trained on {} examples in {:.0} s; test split:",
                report.train_examples, report.seconds
            );
            println!("{}", report.test.markdown(&[0.6, 0.7, 0.8, 0.9]));
        }
        Command::Demo {
            model,
            config,
            link,
            sentences,
            samples,
            interval_ms,
            no_baselines,
            out,
            backend,
        } => {
            // Warnings only by default: the progress bars are the demo's output.
            splitee_service::logging::init("warn");
            let options = DemoOptions {
                agent_config: config.unwrap_or_else(|| model.agent_config().into()),
                link_config: link,
                sentences,
                samples,
                interval: std::time::Duration::from_millis(interval_ms),
                baselines: !no_baselines,
                out,
            };
            // The demo plays an edge agent, so it chooses its device as the agent does.
            let device = backend
                .select(edge_agent::WHEN_BACKEND_UNAVAILABLE)
                .map_err(anyhow::Error::msg)?
                .device;
            let report = tokio::runtime::Runtime::new()?.block_on(async {
                let stop = CancellationToken::new();
                let on_ctrl_c = {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        if tokio::signal::ctrl_c().await.is_ok() {
                            eprintln!(
                                "stopping: answering the samples already started, then cleaning up"
                            );
                            stop.cancel();
                        }
                    })
                };
                let report = demo::run_demo(&options, device, &stop).await;
                on_ctrl_c.abort();
                report
            })?;
            println!("\n{}", report.table);
            println!(
                "Latency is measured on this machine; cost is what the bandit was charged (edge\n\
                 layers as `reward.edge_costs` in {} says, network and cloud time as measured).",
                options.agent_config.display()
            );
            println!(
                "per-sample records, the table and the plot ({}.png/.svg) are in {}",
                report.plot_stem.display(),
                options.out.display()
            );
        }
        Command::Link {
            config,
            listen,
            upstream,
        } => {
            splitee_service::logging::init("info");
            let config = LinkConfig::load(&config)?;
            // One thread is plenty for a relay; the machine's cores stay with the services.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(link::run_until_ctrl_c(&config, listen, upstream))?;
        }
    }
    Ok(())
}

/// The device of the offline tools (`record`, `evaluate`, `train`): they refuse a backend
/// that cannot run here, as the cloud worker does. A run asked for a GPU that quietly ran on
/// the CPU would take many times longer, and `record` would label its matrix with a backend
/// it did not use.
fn tool_device(backend: BackendChoice) -> anyhow::Result<Device> {
    Ok(backend
        .select(WhenUnavailable::Refuse)
        .map_err(|why| anyhow::anyhow!("backend {backend}: {why}"))?
        .device)
}
