//! A model directory on disk and everything loaded from it.
//!
//! Layout (Hugging Face names where one exists):
//!
//! | file | content |
//! |---|---|
//! | `config.json` | HF config (`model_type` `bert` or `mpnet`) |
//! | `tokenizer.json` | HF tokenizers file |
//! | `model.safetensors` | backbone, HF tensor names and layout |
//! | `backbone.json` | instead of `model.safetensors`: the cached backbone ([`BackboneSpec`]) |
//! | `exits.json` | [`ExitConfig`]: which layers carry exits, labels, pooling (optional) |
//! | `exits.safetensors` | exit heads, `heads.{k}.classifier.{weight,bias}` (optional) |
//!
//! Without `exits.json` the model gets an untrained two-class exit after every layer, so a
//! plain pretrained encoder (such as all-MiniLM-L6-v2) can be inspected and trained.
//!
//! A backbone too large for the repository (all-mpnet-base-v2, 438 MB) stays out of it:
//! `backbone.json` names its cache entry with the pinned size and SHA-256 of the weights,
//! `fetch-model` fills the entry (see `splitee_fetch`), and [`ModelDir::open`] resolves the
//! weights there — failing with the fetch command when they are missing. The weights are
//! hashed against the pin when loaded, and the fingerprint covers their bytes as it covers a
//! local file's, so the model's identity does not depend on where its weights are kept.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use splitee_fetch::{BackboneSpec, SPEC_FILE};

use crate::config::{BertConfig, ExitConfig};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::model::{Bert, ExitHeads, MultiExitBert};
use crate::tokenize::Tokenizer;
use crate::weights;

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const EXIT_CONFIG_FILE: &str = "exits.json";
pub const EXIT_WEIGHTS_FILE: &str = "exits.safetensors";

/// Number of classes given to untrained exits of a model directory without `exits.json`.
pub const DEFAULT_NUM_LABELS: usize = 2;

/// Paths and parsed configs of a model directory; loading the weights is a separate step
/// because it is the slow one and needs a device.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: BertConfig,
    pub exits: ExitConfig,
    /// False when the directory has no trained exit heads.
    pub exits_trained: bool,
    /// The backbone's weights: the directory's `model.safetensors`, or the cache entry its
    /// `backbone.json` names.
    pub weights: PathBuf,
    /// `backbone.json`, when the weights are cached: what they must hash to.
    pub backbone: Option<BackboneSpec>,
}

/// A model ready to run, with its tokenizer and identity.
pub struct LoadedModel {
    pub dir: ModelDir,
    pub model: MultiExitBert,
    pub tokenizer: Tokenizer,
    pub fingerprint: Fingerprint,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::Io {
                path: path.to_owned(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model directory does not exist",
                ),
            });
        }
        let config = BertConfig::from_file(&path.join(CONFIG_FILE))?;
        let exit_config_path = path.join(EXIT_CONFIG_FILE);
        let (exits, exits_trained) = if exit_config_path.is_file() {
            (ExitConfig::from_file(&exit_config_path)?, true)
        } else {
            (
                ExitConfig::every_layer(config.num_hidden_layers, DEFAULT_NUM_LABELS),
                false,
            )
        };
        exits
            .validate(config.num_hidden_layers)
            .map_err(|message| Error::Config {
                path: exit_config_path,
                message,
            })?;
        let (weights, backbone) = Self::resolve_weights(path)?;
        Ok(Self {
            path: path.to_owned(),
            config,
            exits,
            exits_trained,
            weights,
            backbone,
        })
    }

    /// A directory holds its weights or names them in `backbone.json`, never both: two
    /// candidates would leave the model's identity to a rule the user cannot see.
    fn resolve_weights(path: &Path) -> Result<(PathBuf, Option<BackboneSpec>)> {
        let local = path.join(WEIGHTS_FILE);
        let spec_path = path.join(SPEC_FILE);
        if !spec_path.is_file() {
            return Ok((local, None));
        }
        if local.exists() {
            return Err(Error::Config {
                path: spec_path,
                message: format!(
                    "the directory also holds {WEIGHTS_FILE}; keep one source of the weights"
                ),
            });
        }
        let spec = BackboneSpec::from_file(&spec_path)?;
        let weights = spec.cached_weights(&splitee_fetch::cache_dir()?, path)?;
        Ok((weights, Some(spec)))
    }

    pub fn exit_weights_path(&self) -> PathBuf {
        self.path.join(EXIT_WEIGHTS_FILE)
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_file(&self.path.join(TOKENIZER_FILE), self.config.max_tokens())
    }

    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let exit_weights = self.exit_weights_path();
        let mut files = vec![self.weights.as_path()];
        if self.exits_trained {
            files.push(exit_weights.as_path());
        }
        Fingerprint::compute(&self.config, &self.exits, &files)
    }

    /// Loads backbone and exit heads onto `device`.
    pub fn load_model(&self, device: &Device) -> Result<MultiExitBert> {
        self.load_layers(device, self.config.num_hidden_layers)
    }

    /// Loads the embeddings, encoder layers `1..=layers` and the exits after them: what an
    /// edge device that never runs deeper than `layers` needs, and all it keeps in memory.
    pub fn load_layers(&self, device: &Device, layers: usize) -> Result<MultiExitBert> {
        let num_layers = self.config.num_hidden_layers;
        if layers == 0 || layers > num_layers {
            return Err(Error::LayerRange {
                start: 0,
                end: layers,
                num_layers,
            });
        }
        let config = BertConfig {
            num_hidden_layers: layers,
            ..self.config.clone()
        };
        let exits = ExitConfig {
            layers: self
                .exits
                .layers
                .iter()
                .copied()
                .filter(|&l| l <= layers)
                .collect(),
            ..self.exits.clone()
        };
        // A cached file is hashed against its pin before use (~0.3 s for 438 MB): the cache
        // is outside the repository, where anything may have replaced it since the fetch.
        if let Some(spec) = &self.backbone {
            splitee_fetch::verify_file(&self.weights, spec.weights_digest())?;
        }
        // Weights of the layers and heads left out are in the files but never read: loading
        // ignores tensors the module does not have, and heads keep their order.
        let family = config.family();
        let mut bert = Bert::init(&config, device);
        weights::load(&mut bert, &self.weights, family)?;
        bert.pack_weights();
        let mut heads = ExitHeads::init(config.hidden_size, &exits, device);
        if self.exits_trained {
            weights::load(&mut heads, &self.exit_weights_path(), family)?;
        }
        Ok(MultiExitBert { bert, exits: heads })
    }

    pub fn load(self, device: &Device) -> Result<LoadedModel> {
        let layers = self.config.num_hidden_layers;
        self.load_prefix(device, layers)
    }

    /// [`Self::load`] with only layers `1..=layers` (see [`Self::load_layers`]). The
    /// fingerprint is still the whole model's: it is what the cloud checks.
    pub fn load_prefix(self, device: &Device, layers: usize) -> Result<LoadedModel> {
        let model = self.load_layers(device, layers)?;
        let tokenizer = self.tokenizer()?;
        let fingerprint = self.fingerprint()?;
        Ok(LoadedModel {
            dir: self,
            model,
            tokenizer,
            fingerprint,
        })
    }
}

/// Writes `model` as a model directory at `out`, the tokenizer copied from `tokenizer_json`.
///
/// Files are written under temporary names and renamed into place, so an interrupted save
/// never leaves a directory whose files come from two different models.
pub fn save_model(
    model: &MultiExitBert,
    tokenizer_json: &Path,
    out: &Path,
    dtype: weights::StorageDType,
) -> Result<()> {
    let family = model.config().family();
    let mut staged = Staged::new(out)?;
    staged.write(CONFIG_FILE, &json(model.config()))?;
    staged.copy(TOKENIZER_FILE, tokenizer_json)?;
    staged.save(WEIGHTS_FILE, &model.bert, dtype, family)?;
    staged.exits(&model.exits, dtype, family)?;
    staged.commit()
}

/// Writes exit heads trained on `base`'s backbone, unchanged (a frozen backbone), as a model
/// directory at `out` that shares that backbone: into `base` itself only `exits.json` and
/// `exits.safetensors`; elsewhere also `base`'s config, tokenizer and weights source (its
/// `backbone.json`, or its `model.safetensors`), byte for byte.
///
/// The backbone is never re-encoded: a fetched backbone stays in the cache (a repository's
/// model directory gains two small files, not 438 MB), and the copy's weights fingerprint
/// like the original's. Written and renamed into place like [`save_model`].
pub fn save_exits(
    base: &ModelDir,
    exits: &ExitHeads,
    out: &Path,
    dtype: weights::StorageDType,
) -> Result<()> {
    exits
        .config
        .validate(base.config.num_hidden_layers)
        .map_err(|message| Error::Config {
            path: out.join(EXIT_CONFIG_FILE),
            message,
        })?;
    let mut staged = Staged::new(out)?;
    if !same_directory(&base.path, out) {
        let (source, other) = match base.backbone {
            Some(_) => (SPEC_FILE, WEIGHTS_FILE),
            None => (WEIGHTS_FILE, SPEC_FILE),
        };
        // Two weight sources make a directory that does not open (see `resolve_weights`).
        if out.join(other).exists() {
            return Err(Error::Config {
                path: out.join(other),
                message: format!(
                    "the exits of {} go with its {source}; write them to its own directory \
                     or to one without {other}",
                    base.path.display()
                ),
            });
        }
        staged.copy(CONFIG_FILE, &base.path.join(CONFIG_FILE))?;
        staged.copy(TOKENIZER_FILE, &base.path.join(TOKENIZER_FILE))?;
        staged.link_or_copy(source, &base.path.join(source))?;
    }
    staged.exits(exits, dtype, base.config.family())?;
    staged.commit()
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("configs serialise")
}

/// Whether two paths name the same directory (a missing `b` is a new one).
fn same_directory(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Files of a model directory written under temporary names, renamed into place together by
/// [`Staged::commit`].
struct Staged<'a> {
    out: &'a Path,
    names: Vec<&'static str>,
}

impl<'a> Staged<'a> {
    fn new(out: &'a Path) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(io(out))?;
        Ok(Self {
            out,
            names: Vec::new(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.out.join(format!(".{name}.partial"))
    }

    fn write(&mut self, name: &'static str, text: &str) -> Result<()> {
        let path = self.path(name);
        std::fs::write(&path, text).map_err(io(&path))?;
        self.names.push(name);
        Ok(())
    }

    fn copy(&mut self, name: &'static str, from: &Path) -> Result<()> {
        std::fs::copy(from, self.path(name)).map_err(io(from))?;
        self.names.push(name);
        Ok(())
    }

    /// A hard link where the file system allows one (a per-epoch checkpoint beside a local
    /// backbone then costs no copy of its weights), else a copy. Safe because weight files are
    /// only ever replaced by renaming a new file over them, never rewritten in place.
    fn link_or_copy(&mut self, name: &'static str, from: &Path) -> Result<()> {
        if std::fs::hard_link(from, self.path(name)).is_ok() {
            self.names.push(name);
            return Ok(());
        }
        self.copy(name, from)
    }

    fn save<M: burn::store::ModuleSnapshot>(
        &mut self,
        name: &'static str,
        module: &M,
        dtype: weights::StorageDType,
        family: crate::config::Family,
    ) -> Result<()> {
        weights::save(module, &self.path(name), dtype, family)?;
        self.names.push(name);
        Ok(())
    }

    fn exits(
        &mut self,
        exits: &ExitHeads,
        dtype: weights::StorageDType,
        family: crate::config::Family,
    ) -> Result<()> {
        self.write(EXIT_CONFIG_FILE, &json(&exits.config))?;
        self.save(EXIT_WEIGHTS_FILE, exits, dtype, family)
    }

    fn commit(self) -> Result<()> {
        for name in &self.names {
            let (from, to) = (self.path(name), self.out.join(name));
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |error| Error::Io { path, error }
}
