//! `edge-agent`: runs the first layers of a multi-exit model on the device.

mod inspect;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::prelude::Device;
use clap::{Parser, Subcommand};
use edge_agent::input::{self, InputFormat, InputRecord};
use edge_agent::metrics::Metrics;
use edge_agent::report::Answered;
use edge_agent::{Agent, AgentConfig, profile};
use indicatif::{ProgressBar, ProgressStyle};
use splitee_model::BackendChoice;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "splitee edge agent: early exit on the device, offload to the cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer every sample of an input, printing one JSON line each and a summary.
    Run {
        /// Agent configuration (see configs/edge-agent.toml and configs/edge/).
        #[arg(long, default_value = "configs/edge-agent.toml")]
        config: PathBuf,
        /// Input file, or `-` for stdin.
        #[arg(long, default_value = "-")]
        input: PathBuf,
        /// Input format; by default from the extension (.tsv, .csv, .jsonl; else lines).
        #[arg(long, value_enum)]
        format: Option<InputFormat>,
        /// Where the JSON lines go (`-`: stdout). An existing file is an error (a rerun must
        /// not destroy earlier answers) unless `--overwrite` is given.
        #[arg(long, default_value = "-")]
        output: PathBuf,
        /// Replace an existing `--output` file.
        #[arg(long)]
        overwrite: bool,
        /// Also write the summary as JSON here.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
        /// Stop after this many samples.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Run as a device service: a local HTTP/JSON API (`POST /v1/classify`, `/readyz`,
    /// `/healthz`, `/metrics`; edge-agent/openapi.json) until SIGTERM or SIGINT.
    Serve {
        /// Agent configuration; its [serve] table holds the API's settings.
        #[arg(long, default_value = "configs/edge-agent.toml")]
        config: PathBuf,
        /// TCP address of the API (overrides serve.listen and serve.unix_socket).
        #[arg(long, conflicts_with = "unix")]
        listen: Option<SocketAddr>,
        /// Listen on this Unix socket instead (overrides serve.unix_socket).
        #[arg(long)]
        unix: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Measure per-layer cost on this device; `--write` stores it in the config's [device].
    Profile {
        #[arg(long, default_value = "configs/edge-agent.toml")]
        config: PathBuf,
        /// Sequence length to time (a typical input's token count).
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long)]
        backend: Option<BackendChoice>,
        /// Replace the config's [device] table with the measurement (comments are kept).
        #[arg(long)]
        write: bool,
    },
    /// Print a model's summary, the tokens of a text and per-layer timing and exits.
    Inspect {
        /// Model directory (config.json, tokenizer.json, model.safetensors[, exits.*]);
        /// default: the model embedded in the repository.
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// Compute backend: flex, ndarray or wgpu.
        #[arg(long, default_value_t = BackendChoice::default())]
        backend: BackendChoice,
        /// The text to run.
        text: String,
    },
    /// Fetch a model's cached backbone weights (see its backbone.json); idempotent.
    FetchModel(splitee_model::fetch::FetchArgs),
}

/// Settings the command line may override in the agent's config.
#[derive(clap::Args)]
struct Overrides {
    /// Overrides the config's backend.
    #[arg(long)]
    backend: Option<BackendChoice>,
    /// Replaces the config's cloud address (or list of them) with this one endpoint.
    #[arg(long)]
    cloud: Option<SocketAddr>,
    /// Overrides the config's model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Overrides the config's edge_layers (layers the device loads).
    #[arg(long)]
    edge_layers: Option<usize>,
    /// Overrides the config's cloud.ca (the CA the worker's certificate chains to).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Overrides the config's cloud.client_cert (mutual TLS; with --client-key).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Overrides the config's cloud.client_key.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Ignore a saved bandit state (it is overwritten when the agent saves).
    #[arg(long)]
    fresh_state: bool,
}

impl Overrides {
    /// The config at `path` with these overrides.
    fn load(&self, path: &Path) -> anyhow::Result<AgentConfig> {
        let mut config = AgentConfig::from_file(path)?;
        if let Some(backend) = self.backend {
            config.backend = backend;
        }
        if let Some(model) = &self.model {
            config.model = model.clone();
        }
        if self.edge_layers.is_some() {
            config.edge_layers = self.edge_layers;
        }
        let cloud_flags = self.cloud.is_some() || self.ca.is_some() || self.client_cert.is_some();
        if let (true, Some(cloud)) = (cloud_flags, config.cloud.as_mut()) {
            if let Some(address) = self.cloud {
                cloud.address = address.into();
            }
            if let Some(ca) = &self.ca {
                cloud.ca = ca.clone();
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                cloud.client_cert = Some(cert.clone());
                cloud.client_key = Some(key.clone());
            }
        } else if cloud_flags {
            anyhow::bail!("--cloud, --ca and --client-cert need a [cloud] table in the config");
        }
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    splitee_service::logging::init("info");
    match Cli::parse().command {
        Command::Run {
            config,
            input,
            format,
            output,
            overwrite,
            summary_json,
            overrides,
            limit,
        } => {
            let agent_config = overrides.load(&config)?;
            let (device, _) = pick_device(agent_config.backend);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(run(RunArgs {
                config: agent_config,
                device,
                input,
                format,
                output,
                overwrite,
                summary_json,
                fresh_state: overrides.fresh_state,
                limit,
            }))
        }
        Command::Serve {
            config,
            listen,
            unix,
            overrides,
        } => {
            let mut agent_config = overrides.load(&config)?;
            if let Some(listen) = listen {
                agent_config.serve.listen = listen;
                agent_config.serve.unix_socket = None;
            }
            if unix.is_some() {
                agent_config.serve.unix_socket = unix;
            }
            let (device, _) = pick_device(agent_config.backend);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let shutting_down = CancellationToken::new();
                splitee_service::signals::shutdown_on_signals(shutting_down.clone())?;
                edge_agent::serve::serve(agent_config, device, overrides.fresh_state, shutting_down)
                    .await
            })
        }
        Command::Profile {
            config,
            tokens,
            runs,
            backend,
            write,
        } => {
            let agent_config = AgentConfig::from_file(&config)?;
            let backend = backend.unwrap_or(agent_config.backend);
            let (device, backend) = pick_device(backend);
            let description = format!(
                "measured by `edge-agent profile` with the {backend} backend, {tokens} tokens, \
                 median of {runs} runs"
            );
            let measured =
                profile::measure(&agent_config.model, &device, tokens, runs, description)?;
            println!("{:<8} {:>9}", "stage", "ms");
            println!("{:<8} {:>9.3}", "embed", measured.embed_ms);
            for (index, ms) in measured.layer_ms.iter().enumerate() {
                println!("{:<8} {ms:>9.3}", format!("layer {}", index + 1));
            }
            if write {
                let text = std::fs::read_to_string(&config)?;
                std::fs::write(&config, profile::write_into(&text, &measured)?)?;
                println!("wrote [device] into {}", config.display());
            }
            Ok(())
        }
        Command::Inspect {
            model,
            backend,
            text,
        } => {
            let (device, backend) = pick_device(backend);
            inspect::run(&model, backend, &device, &text)
        }
        Command::FetchModel(args) => Ok(splitee_model::fetch::run(&args)?),
    }
}

/// The one place the device is chosen, by [`edge_agent::WHEN_BACKEND_UNAVAILABLE`] (which
/// logs a fallback).
fn pick_device(backend: BackendChoice) -> (Device, BackendChoice) {
    let selected = backend
        .select(edge_agent::WHEN_BACKEND_UNAVAILABLE)
        .expect("falling back to the CPU never fails");
    (selected.device, selected.backend)
}

struct RunArgs {
    config: AgentConfig,
    device: Device,
    input: PathBuf,
    format: Option<InputFormat>,
    output: PathBuf,
    overwrite: bool,
    summary_json: Option<PathBuf>,
    fresh_state: bool,
    limit: Option<usize>,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    // SIGTERM (systemctl stop) drains like Ctrl-C: the samples started are answered, the
    // output flushed and the state saved.
    splitee_service::signals::shutdown_on_signals(stop.clone())?;
    let http = match args.config.metrics_listen {
        Some(addr) => Some(
            edge_agent::metrics::spawn_endpoint(addr, metrics.clone(), stop.clone(), stop.clone())
                .await?,
        ),
        None => None,
    };
    let mut agent = Agent::start(&args.config, args.device, metrics, args.fresh_state).await?;

    let from_stdin = args.input == Path::new("-");
    let format = args.format.unwrap_or(if from_stdin {
        InputFormat::Lines
    } else {
        InputFormat::detect(&args.input)
    });
    let total = if from_stdin {
        None
    } else {
        Some(count_lines(&args.input, format)?)
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<InputRecord>(args.config.pipeline.window);
    let reader = spawn_reader(
        args.input.clone(),
        format,
        args.config.input.max_line_bytes,
        args.limit,
        sender,
    )?;

    // Line-buffered: what reaches the output is whole records, even when a second signal
    // ends the process at once.
    let mut out: Box<dyn Write> = if args.output == Path::new("-") {
        Box::new(std::io::LineWriter::new(std::io::stdout().lock()))
    } else {
        let file = if args.overwrite {
            std::fs::File::create(&args.output)
        } else {
            std::fs::File::create_new(&args.output)
        };
        let file = file.map_err(|error| {
            let hint = if error.kind() == std::io::ErrorKind::AlreadyExists {
                " (it exists: pass --overwrite to replace it)"
            } else {
                ""
            };
            anyhow::anyhow!("creating {}: {error}{hint}", args.output.display())
        })?;
        Box::new(std::io::LineWriter::new(file))
    };
    let progress = progress_bar(total.map(|t| args.limit.map_or(t, |l| t.min(l as u64))));
    let mut write_error = None;
    let (mut done, mut offloaded) = (0u64, 0u64);
    let summary = agent
        .run(receiver, stop.clone(), &mut |record| {
            if write_error.is_none()
                && let Err(error) = serde_json::to_writer(&mut out, record)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"))
            {
                write_error = Some(error);
                stop.cancel();
            }
            done += 1;
            offloaded += u64::from(matches!(
                record.answered,
                Answered::Cloud | Answered::DeviceFallback
            ));
            if let Some(arm) = record.arm {
                progress.set_message(format!(
                    "offload {:.0}% · arm (s {}, α {:.2})",
                    100.0 * offloaded as f64 / done as f64,
                    arm.split,
                    arm.threshold
                ));
            }
            progress.inc(1);
        })
        .await?;
    progress.finish_and_clear();
    out.flush().context("writing the output")?;
    drop(out);
    if let Some(error) = write_error {
        return Err(error).context("writing the output");
    }
    // The reader ends at end of input, at the limit, or when the agent stopped listening.
    match reader.join() {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the input reader panicked"),
    }
    eprintln!("\n{}", summary.table());
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    agent.shutdown().await?;
    stop.cancel();
    if let Some(http) = http {
        http.await??;
    }
    Ok(())
}

/// Reads the input on its own thread (reading blocks) and feeds the agent; stops early when
/// the agent stops listening.
fn spawn_reader(
    path: PathBuf,
    format: InputFormat,
    max_line_bytes: usize,
    limit: Option<usize>,
    sender: tokio::sync::mpsc::Sender<InputRecord>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let reader: Box<dyn BufRead + Send> = if path == Path::new("-") {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let limit = limit.unwrap_or(usize::MAX);
    Ok(std::thread::Builder::new()
        .name("splitee-input".into())
        .spawn(move || {
            let mut sent = 0;
            input::read(reader, format, max_line_bytes, &path, |record| {
                sent += 1;
                sent <= limit && sender.blocking_send(record).is_ok()
            })
        })?)
}

/// Samples in a file, for the progress bar: its lines, less the header of a table.
fn count_lines(path: &Path, format: InputFormat) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines = BufReader::new(file).split(b'\n').count() as u64;
    Ok(match format {
        InputFormat::Tsv | InputFormat::Csv => lines.saturating_sub(1),
        InputFormat::Jsonl | InputFormat::Lines => lines,
    })
}

fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} · {per_sec} · {msg}",
        )
        .expect("a valid template"),
    );
    bar
}
