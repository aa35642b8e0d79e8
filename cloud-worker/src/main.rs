//! `cloud-worker`: command-line entry point. Parses flags, sets up logging and the runtime,
//! and calls the library (`cloud_worker`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use burn::prelude::Device;
use clap::{Args, Parser, Subcommand};
use cloud_worker::{CertOptions, StatusEndpoint, Worker, WorkerConfig};
use splitee_model::{BackendChoice, ModelDir};

#[derive(Parser)]
#[command(
    version,
    about = "splitee cloud worker: finishes split forward passes over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve requests until SIGINT/SIGTERM, then finish the in-flight ones and stop (a second
    /// signal stops at once).
    Serve(ServeArgs),
    /// Create a development CA and server + client certificates signed by it, one directory
    /// per holder: ca/ (keep offline), worker/ (what a worker mounts), agent/.
    GenCerts(GenCertsArgs),
    /// Fetch a model's cached backbone weights (see its backbone.json); idempotent.
    FetchModel(splitee_model::fetch::FetchArgs),
}

/// Flags override the configuration file, which overrides the defaults.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (example: configs/cloud-worker.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Model directory, relative to the current directory [default: models/default].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute backend: flex, ndarray or wgpu [default: flex].
    #[arg(long)]
    backend: Option<BackendChoice>,
    /// QUIC (UDP) listen address [default: 0.0.0.0:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address of /metrics, /healthz and /readyz [default: 127.0.0.1:9433].
    #[arg(long, conflicts_with = "no_metrics")]
    metrics_listen: Option<SocketAddr>,
    /// Serve no metrics endpoint.
    #[arg(long)]
    no_metrics: bool,
    /// Server certificate chain, PEM [default: certs/worker/server.pem].
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Server private key, PEM [default: certs/worker/server.key.pem].
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA certificate(s), PEM, that client certificates must chain to (mutual TLS)
    /// [default: certs/worker/client-ca.pem].
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Accept clients without a certificate, also beyond loopback: anyone who trusts the
    /// worker's certificate gets answers. For closed networks only.
    #[arg(long, conflicts_with = "client_ca")]
    insecure_no_client_auth: bool,
    /// Most requests per forward pass [default: 16].
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Longest wait for a batch to fill, microseconds [default: 2000].
    #[arg(long)]
    max_wait_us: Option<u64>,
    /// Requests admitted at once; more are answered `busy` [default: 256].
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Longest accepted sequence [default: the model's position limit].
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Put this server ID into every QUIC connection ID the worker issues (QUIC-LB plaintext,
    /// docs/deployment.md, "Kubernetes"): hex bytes (`0x0a0b0c0d`) or an IPv4 address (`10.1.2.3` = 4
    /// bytes; the Kubernetes manifest passes the pod's IP). Overrides `quic_lb.server_id`, and
    /// enables `[quic_lb]` with its defaults when the file has no such table.
    #[arg(long)]
    quic_lb_server_id: Option<String>,
}

#[derive(Args)]
struct GenCertsArgs {
    /// Directory for ca/{ca.pem, ca.key.pem}, worker/{server.pem, server.key.pem,
    /// client-ca.pem} and agent/{client.pem, client.key.pem, ca.pem}.
    #[arg(long, default_value = "certs")]
    out_dir: PathBuf,
    /// Names (DNS or IP) of the server certificate; repeat for several
    /// [default: localhost, 127.0.0.1].
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Name of the client certificate.
    #[arg(long, default_value = "splitee-edge")]
    client_name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

fn main() -> anyhow::Result<()> {
    splitee_service::logging::init("info");
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::GenCerts(args) => gen_certs(args),
        Command::FetchModel(args) => Ok(splitee_model::fetch::run(&args)?),
    }
}

fn gen_certs(args: GenCertsArgs) -> anyhow::Result<()> {
    let defaults = CertOptions::default();
    let options = CertOptions {
        out_dir: args.out_dir,
        server_names: if args.server_names.is_empty() {
            defaults.server_names
        } else {
            args.server_names
        },
        client_name: args.client_name,
        days: args.days,
        force: args.force,
    };
    let files = cloud_worker::gen_certs(&options)?;
    println!(
        "wrote a development CA and certificates for {:?} (server) and {:?} (client):",
        options.server_names, options.client_name
    );
    for path in [
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
        &files.worker_client_ca,
        &files.client_cert,
        &files.client_key,
        &files.agent_ca,
    ] {
        println!("  {}", path.display());
    }
    println!(
        "give a worker {} and an agent {}; keep {} offline: it signs anything that the worker \
         and agents will trust",
        files
            .server_key
            .parent()
            .unwrap_or(&options.out_dir)
            .display(),
        files
            .client_key
            .parent()
            .unwrap_or(&options.out_dir)
            .display(),
        files.ca_key.display()
    );
    for path in &files.stale {
        eprintln!(
            "warning: {} is left from the flat layout of earlier versions; remove it (a CA key \
             beside a worker's files lets whoever reads them sign client certificates)",
            path.display()
        );
    }
    Ok(())
}

fn config(args: &ServeArgs) -> anyhow::Result<WorkerConfig> {
    // Validated below, once the flags are in (a `[quic_lb]` table may leave its server ID to
    // `--quic-lb-server-id`).
    let mut config = match &args.config {
        Some(path) => WorkerConfig::parse_file(path)?,
        None => WorkerConfig::default(),
    };
    if let Some(model) = &args.model {
        config.model = model.clone();
    }
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics_listen = Some(addr);
    }
    if args.no_metrics {
        config.metrics_listen = None;
    }
    if let Some(cert) = &args.cert {
        config.tls.cert = cert.clone();
    }
    if let Some(key) = &args.key {
        config.tls.key = key.clone();
    }
    if let Some(ca) = &args.client_ca {
        config.tls.client_ca = Some(ca.clone());
    }
    if args.insecure_no_client_auth {
        config.tls.client_ca = None;
        config.insecure_no_client_auth = true;
    }
    if let Some(size) = args.max_batch_size {
        config.batching.max_batch_size = size;
    }
    if let Some(wait) = args.max_wait_us {
        config.batching.max_wait_us = wait;
    }
    if let Some(bound) = args.max_in_flight {
        config.batching.max_in_flight = bound;
    }
    if let Some(len) = args.max_seq_len {
        config.limits.max_seq_len = Some(len);
    }
    if let Some(server_id) = &args.quic_lb_server_id {
        config
            .quic_lb
            .get_or_insert_with(Default::default)
            .server_id = server_id.clone();
    }
    match &args.config {
        Some(path) => config
            .validate()
            .with_context(|| format!("{} with the command line's flags", path.display()))?,
        None => config.validate()?,
    }
    Ok(config)
}

/// Binds the HTTP endpoint first, so that `/healthz` answers and `/readyz` says `loading` while
/// the model loads; then loads it and serves until a signal.
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let device = pick_device(config.backend)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("splitee-io")
        .build()?
        .block_on(async move {
            // A second signal ends the process at once (splitee_service::signals).
            let stop = tokio_util::sync::CancellationToken::new();
            splitee_service::signals::shutdown_on_signals(stop.clone())?;
            let status = StatusEndpoint::bind(&config).await?;
            if let Some(addr) = status.addr() {
                tracing::info!(%addr, "HTTP endpoint up (/readyz: loading)");
            }
            let loading = tokio::task::spawn_blocking({
                let (path, device) = (config.model.clone(), device.clone());
                move || {
                    ModelDir::open(&path)
                        .and_then(|dir| dir.load(&device))
                        .with_context(|| format!("loading the model from {}", path.display()))
                }
            });
            let model = tokio::select! {
                loaded = loading => loaded.context("the model-loading task failed")??,
                () = stop.cancelled() => {
                    tracing::info!("stopped while loading the model");
                    return Ok(());
                }
            };
            let worker = Worker::start_with_status(&config, model, device, status).await?;
            stop.cancelled().await;
            tracing::info!("finishing the admitted requests (a second signal stops at once)");
            worker.shutdown().await
        })
}

/// The one place the device is chosen, by [`cloud_worker::WHEN_BACKEND_UNAVAILABLE`]: a
/// backend that cannot run here (a software rasterizer counts as no GPU unless
/// `SPLITEE_WGPU_ALLOW_SOFTWARE=1`) is an error saying what to choose instead.
fn pick_device(backend: BackendChoice) -> anyhow::Result<Device> {
    let selected = backend
        .select(cloud_worker::WHEN_BACKEND_UNAVAILABLE)
        .map_err(|why| {
            anyhow::anyhow!(
                "backend {backend}: {why}. The worker does not fall back to the CPU; choose \
                 `backend = \"flex\"` (or --backend flex) to serve on the CPU"
            )
        })?;
    Ok(selected.device)
}
