//! Model configuration: the Hugging Face `config.json` of the backbone and splitee's own
//! description of the exit heads (`exits.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The encoder hyper-parameters splitee reads from a Hugging Face `config.json`, for both
/// architecture families it runs (see [`Family`]; `model_type` chooses).
///
/// Fields that the forward pass does not use (dropout on attention probabilities, `use_cache`,
/// ...) are ignored; fields it relies on are checked by [`BertConfig::validate`] so a config
/// for another architecture fails loudly instead of computing garbage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// BERT's token types; MPNet has none and ignores this field.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Read from the file on purpose: BERT uses 1e-12, and a framework default (1e-5) shifts
    /// the embedding output by ~8e-3.
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// `"bert"` or `"mpnet"`; absent means BERT, as in configs written before MPNet existed.
    #[serde(default)]
    pub model_type: Option<String>,
    /// MPNet: the number of relative-position buckets of the attention bias. Not part of a
    /// BERT config; absent fields are not serialised, so BERT fingerprints stay what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_attention_num_buckets: Option<usize>,
    /// MPNet: the padding index. Positions are RoBERTa-style, `pad_token_id + 1 + index`.
    /// BERT's positions start at 0 whatever its pad id, so BERT configs drop it on reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<usize>,
}

/// The architecture families of the model core. They share the encoder layer (attention, FFN,
/// post-LN residual blocks); MPNet differs in its embeddings and in a relative-position bias
/// added to every layer's attention scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT: absolute positions from 0, token-type embeddings.
    Bert,
    /// MPNet (all-mpnet-base-v2): positions offset past the padding index, no token types,
    /// a bucketed relative-position attention bias shared by all layers.
    MPNet,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "BERT",
            Family::MPNet => "MPNet",
        }
    }
}

/// MPNet's relative positions saturate at this distance. A constant of the architecture
/// (Hugging Face's `relative_position_bucket` default), not a `config.json` field.
pub const MPNET_MAX_DISTANCE: usize = 128;

fn default_type_vocab_size() -> usize {
    2
}
fn default_hidden_act() -> Activation {
    Activation::Gelu
}
fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

/// Feed-forward activation, named as in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io {
            path: path.to_owned(),
            error,
        })?;
        let mut config: Self = serde_json::from_str(&text).map_err(|source| Error::Config {
            path: path.to_owned(),
            message: source.to_string(),
        })?;
        config.validate().map_err(|message| Error::Config {
            path: path.to_owned(),
            message,
        })?;
        if config.family() == Family::Bert {
            config.pad_token_id = None;
            config.relative_attention_num_buckets = None;
        }
        Ok(config)
    }

    /// The architecture family named by `model_type`. Call on a validated config: an unknown
    /// `model_type` is rejected by [`Self::validate`], never guessed from tensor names.
    pub fn family(&self) -> Family {
        match self.model_type.as_deref() {
            Some("mpnet") => Family::MPNet,
            _ => Family::Bert,
        }
    }

    /// The first position id: 0 for BERT, `pad_token_id + 1` for MPNet.
    pub fn position_offset(&self) -> usize {
        match self.family() {
            Family::Bert => 0,
            Family::MPNet => self.pad_token_id.map_or(0, |pad| pad + 1),
        }
    }

    /// The longest token sequence the position table covers: 512 for both MiniLM (512
    /// positions) and all-mpnet-base-v2 (514 positions, the first two never used).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.model_type.as_deref() {
            None | Some("bert") => {}
            Some("mpnet") => self.validate_mpnet()?,
            Some(kind) => {
                return Err(format!(
                    "model_type is {kind:?}; splitee runs \"bert\" and \"mpnet\" encoders only"
                ));
            }
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        if !(0.0..1.0).contains(&self.hidden_dropout_prob) {
            return Err(format!(
                "hidden_dropout_prob {} must be in [0, 1)",
                self.hidden_dropout_prob
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate_mpnet(&self) -> std::result::Result<(), String> {
        let buckets = self.relative_attention_num_buckets.ok_or(
            "an MPNet config needs relative_attention_num_buckets (the attention bias table's rows)",
        )?;
        // Half the buckets per direction, half of those exact distances; the logarithmic
        // rest must span distances beyond the exact ones up to MPNET_MAX_DISTANCE.
        if !(4..4 * MPNET_MAX_DISTANCE).contains(&buckets) {
            return Err(format!(
                "relative_attention_num_buckets {buckets} must be in 4..{}",
                4 * MPNET_MAX_DISTANCE
            ));
        }
        let pad = self
            .pad_token_id
            .ok_or("an MPNet config needs pad_token_id (positions start after it)")?;
        if pad + 1 >= self.max_position_embeddings {
            return Err(format!(
                "max_position_embeddings {} leaves no position after pad_token_id {pad}",
                self.max_position_embeddings
            ));
        }
        Ok(())
    }
}

/// How an exit head summarises the token sequence before its classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The hidden state of the first token (`[CLS]`).
    Cls,
    /// Mean over real tokens (the attention mask), as sentence-transformers pools MiniLM.
    #[default]
    MaskedMean,
}

/// Which encoder layers carry an exit classifier, and its shape (`exits.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitConfig {
    /// 1-based encoder layers followed by an exit, strictly increasing. Layer `L` (the last)
    /// must be among them: it is the model's final classifier.
    pub layers: Vec<usize>,
    pub num_labels: usize,
    #[serde(default)]
    pub pooling: Pooling,
    /// Human-readable class names, index = class id.
    #[serde(default)]
    pub labels: Vec<String>,
}

impl ExitConfig {
    /// An exit after every layer.
    pub fn every_layer(num_layers: usize, num_labels: usize) -> Self {
        Self {
            layers: (1..=num_layers).collect(),
            num_labels,
            pooling: Pooling::default(),
            labels: Vec::new(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io {
            path: path.to_owned(),
            error,
        })?;
        serde_json::from_str(&text).map_err(|source| Error::Config {
            path: path.to_owned(),
            message: source.to_string(),
        })
    }

    pub fn validate(&self, num_layers: usize) -> std::result::Result<(), String> {
        if self.num_labels < 2 {
            return Err(format!("num_labels {} must be at least 2", self.num_labels));
        }
        if !self.labels.is_empty() && self.labels.len() != self.num_labels {
            return Err(format!(
                "{} label names given for {} labels",
                self.labels.len(),
                self.num_labels
            ));
        }
        if self.layers.last() != Some(&num_layers) {
            return Err(format!(
                "exit layers {:?} must end with the last layer {num_layers}",
                self.layers
            ));
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) || self.layers[0] == 0 {
            return Err(format!(
                "exit layers {:?} must be strictly increasing, within 1..={num_layers}",
                self.layers
            ));
        }
        Ok(())
    }
}
