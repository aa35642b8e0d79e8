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
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| Error::Io { path, error }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let staged = |name: &str| out.join(format!(".{name}.partial"));
    let config = serde_json::to_string_pretty(model.config()).expect("configs serialise");
    std::fs::write(staged(CONFIG_FILE), config).map_err(io(&staged(CONFIG_FILE)))?;
    let exits = serde_json::to_string_pretty(model.exit_config()).expect("configs serialise");
    std::fs::write(staged(EXIT_CONFIG_FILE), exits).map_err(io(&staged(EXIT_CONFIG_FILE)))?;
    std::fs::copy(tokenizer_json, staged(TOKENIZER_FILE)).map_err(io(tokenizer_json))?;
    let family = model.config().family();
    weights::save(&model.bert, &staged(WEIGHTS_FILE), dtype, family)?;
    weights::save(&model.exits, &staged(EXIT_WEIGHTS_FILE), dtype, family)?;
    for name in [
        CONFIG_FILE,
        EXIT_CONFIG_FILE,
        TOKENIZER_FILE,
        WEIGHTS_FILE,
        EXIT_WEIGHTS_FILE,
    ] {
        std::fs::rename(staged(name), out.join(name)).map_err(io(&out.join(name)))?;
    }
    Ok(())
}
