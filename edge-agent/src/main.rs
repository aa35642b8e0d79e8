//! `edge-agent`: runs the first layers of a multi-exit model on the device.

mod inspect;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use splitee_common::BackendChoice;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect {
            model,
            backend,
            text,
        } => {
            // The one place the device is chosen.
            let device = backend.device().map_err(anyhow::Error::msg)?;
            inspect::run(&model, backend, &device, &text)
        }
    }
}
