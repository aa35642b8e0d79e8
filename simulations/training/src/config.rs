//! The training run's TOML file (`configs/train-*.toml`) and its checks.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use splitee_model::Pooling;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Pretrained model directory (HF `config.json`, `tokenizer.json`, `model.safetensors`).
    pub base_model: PathBuf,
    pub train: PathBuf,
    pub dev: PathBuf,
    pub test: PathBuf,
    /// Where the trained model directory is written.
    pub output: PathBuf,
    /// Exit layers (1-based); default: every layer.
    #[serde(default)]
    pub exit_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub pooling: Pooling,
    /// Class names, index = label.
    #[serde(default)]
    pub labels: Vec<String>,
    pub strategy: Strategy,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Training sequences are truncated here (inference still allows the model's maximum).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Use only the first N training examples (quick runs and tests).
    #[serde(default)]
    pub max_train_examples: Option<usize>,
    /// Per-epoch checkpoints go here (model directories `epoch-N`).
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(default = "default_storage")]
    pub storage: Storage,
    /// A directory where a frozen backbone's pooled features are kept between runs, so that
    /// another run with other head settings skips the backbone (8–14 min for
    /// all-mpnet-base-v2's train and dev sets on 2 cores). Files are named by a hash of what
    /// they depend on: the backbone's config and weight bytes, exit layers, pooling and every
    /// sample's token ids. Only for `separate` without `finetune`.
    #[serde(default)]
    pub feature_cache: Option<PathBuf>,
}

fn default_seed() -> u64 {
    13
}
fn default_max_seq_len() -> usize {
    128
}
fn default_batch_size() -> usize {
    32
}
fn default_storage() -> Storage {
    Storage::F16
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    F32,
    F16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    Separate {
        /// Fine-tune backbone + final exit first; absent: the backbone stays as pretrained.
        #[serde(default)]
        finetune: Option<Stage>,
        heads: Stage,
        #[serde(default)]
        distillation: Option<Distillation>,
        /// Which epoch's weights each exit head keeps.
        #[serde(default)]
        head_selection: HeadSelection,
    },
    Joint {
        #[serde(flatten)]
        stage: Stage,
    },
}

/// How the head stages of the separate strategy pick the epoch whose weights a head keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadSelection {
    /// One epoch for all heads: the best mean dev accuracy; stop after `patience` epochs
    /// without a better mean.
    #[default]
    Mean,
    /// Each head its own best dev epoch; stop when no head has improved for `patience` epochs.
    /// The heads are independent linear classifiers on fixed features (the loss is a sum of
    /// per-head terms, and AdamW steps each parameter on its own), so one head's epoch says
    /// nothing about another's.
    Each,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub epochs: usize,
    pub learning_rate: f64,
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default)]
    pub weight_decay: f64,
}

fn default_patience() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distillation {
    pub temperature: f64,
    /// Weight of the distillation term; `1 − alpha` goes to the hard-label loss.
    pub alpha: f64,
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.max_seq_len < 2 {
            bail!("batch_size must be ≥ 1 and max_seq_len ≥ 2");
        }
        let stages: Vec<&Stage> = match &self.strategy {
            Strategy::Separate {
                finetune,
                heads,
                distillation,
                ..
            } => {
                if let Some(d) = distillation
                    && (!(0.0..=1.0).contains(&d.alpha)
                        || d.temperature.is_nan()
                        || d.temperature <= 0.0)
                {
                    bail!("distillation needs alpha in [0, 1] and temperature > 0");
                }
                finetune.iter().chain([heads]).collect()
            }
            Strategy::Joint { stage } => vec![stage],
        };
        let frozen = matches!(self.strategy, Strategy::Separate { finetune: None, .. });
        if self.feature_cache.is_some() && !frozen {
            bail!(
                "feature_cache needs a frozen backbone (`separate` without `finetune`): trained \
                 weights give other features"
            );
        }
        for stage in stages {
            if stage.epochs == 0 || stage.learning_rate.is_nan() || stage.learning_rate <= 0.0 {
                bail!("each stage needs epochs ≥ 1 and learning_rate > 0");
            }
        }
        Ok(())
    }
}
