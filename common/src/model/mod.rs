//! The multi-exit encoder (BERT or MPNet, see [`crate::config::Family`]), written once against
//! burn's runtime-selected [`Device`].
//!
//! The model is split the way split computing needs it: [`MultiExitBert::embed`] turns token
//! ids into layer-0 hidden states, [`MultiExitBert::run_layers`] runs any contiguous range of
//! encoder layers, and [`MultiExitBert::exit_probs`] classifies the hidden states after any
//! layer that carries an exit. The edge runs `embed` + `0..s`, the cloud runs `s..L`; because
//! every layer is a pure function of the previous hidden states and the token mask, the two
//! halves compose to exactly the full forward pass. MPNet's relative-position attention bias
//! keeps that true: it depends on the sequence length only, and `run_layers` recomputes it.

mod bert;
mod exits;
mod gelu;
mod packed;

use std::ops::Range;

use burn::prelude::*;

pub use bert::{Bert, Embeddings, EncoderLayer, Heads};
pub use exits::{ExitHead, ExitHeads, pool};

use crate::config::{BertConfig, ExitConfig};
use crate::error::{Error, Result};

/// Hidden states of a batch of token sequences, with the padding mask they were computed under.
///
/// `mask` is `None` for a batch of sequences of equal length (one sequence, typically): then
/// no token is padding and attention needs no mask.
#[derive(Debug, Clone)]
pub struct Hidden {
    /// `[batch, seq, hidden]`.
    pub states: Tensor<3>,
    pub mask: Option<PaddingMask>,
}

/// Which positions of a padded batch are real tokens.
#[derive(Debug, Clone)]
pub struct PaddingMask {
    /// `[batch, seq]`, 1.0 for a real token and 0.0 for padding: the weights of masked-mean
    /// pooling.
    pub real: Tensor<2>,
    /// `[batch, 1, 1, seq]`, `true` where the key is padding: broadcast over heads and queries
    /// so that no real token ever attends to padding.
    pub padding_keys: Tensor<4, Bool>,
}

impl PaddingMask {
    /// Builds the mask for sequences of the given real lengths, padded to `seq_len`.
    pub fn from_lengths(lengths: &[usize], seq_len: usize, device: &Device) -> Self {
        let real: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..seq_len).map(move |pos| if pos < len { 1.0 } else { 0.0 }))
            .collect();
        let real = Tensor::<2>::from_data(TensorData::new(real, [lengths.len(), seq_len]), device);
        let padding_keys = real.clone().equal_elem(0.0).unsqueeze_dims::<4>(&[1, 2]);
        Self { real, padding_keys }
    }
}

/// A BERT-style encoder (either family) with exit classifiers after some of its layers.
#[derive(Module, Debug)]
pub struct MultiExitBert {
    pub bert: Bert,
    pub exits: ExitHeads,
}

impl MultiExitBert {
    /// A freshly initialised model (random backbone, zero exit heads). Use
    /// [`crate::ModelDir::load`] to get pretrained weights.
    pub fn init(config: &BertConfig, exits: &ExitConfig, device: &Device) -> Self {
        Self {
            bert: Bert::init(config, device),
            exits: ExitHeads::init(config.hidden_size, exits, device),
        }
    }

    /// See [`Bert::pack_weights`]: [`crate::ModelDir`] does it on load; a model built by
    /// [`Self::init`] and given weights by other means calls it itself.
    pub fn pack_weights(mut self) -> Self {
        self.bert.pack_weights();
        self
    }

    pub fn config(&self) -> &BertConfig {
        &self.bert.config
    }

    pub fn exit_config(&self) -> &ExitConfig {
        &self.exits.config
    }

    pub fn num_layers(&self) -> usize {
        self.bert.layers.len()
    }

    /// Layer-0 hidden states: `LayerNorm(word + position + token_type[0])` (BERT) or
    /// `LayerNorm(word + position)` with positions from `pad_token_id + 1` (MPNet).
    ///
    /// `token_ids` is `[batch, seq]`; `mask` must be given when sequences are padded.
    pub fn embed(&self, token_ids: Tensor<2, Int>, mask: Option<PaddingMask>) -> Result<Hidden> {
        let [_, seq_len] = token_ids.dims();
        let max = self.config().max_tokens();
        if seq_len > max {
            return Err(Error::Shape(format!(
                "sequence of {seq_len} tokens is longer than the model's {max} positions"
            )));
        }
        Ok(Hidden {
            states: self.bert.embeddings.forward(token_ids),
            mask,
        })
    }

    /// Runs encoder layers `range` (0-based, half-open: `0..2` runs layers 1 and 2) on the
    /// output of layer `range.start`.
    pub fn run_layers(&self, hidden: Hidden, range: Range<usize>) -> Result<Hidden> {
        self.check_range(&range)?;
        let Hidden { mut states, mask } = hidden;
        let attention_mask = mask.as_ref().map(|mask| &mask.padding_keys);
        let bias = if range.is_empty() {
            None
        } else {
            self.bert.attention_bias(states.dims()[1])
        };
        for layer in &self.bert.layers[range] {
            states = layer.forward(states, attention_mask, bias.as_ref());
        }
        Ok(Hidden { states, mask })
    }

    /// Class probabilities `[batch, num_labels]` of the exit after encoder layer `layer`
    /// (1-based: the exit that reads the output of the `layer`-th layer).
    pub fn exit_probs(&self, layer: usize, hidden: &Hidden) -> Result<Tensor<2>> {
        self.exits.probs(layer, hidden)
    }

    /// Exit logits, for training losses that want them unnormalised.
    pub fn exit_logits(&self, layer: usize, hidden: &Hidden) -> Result<Tensor<2>> {
        self.exits.logits(layer, hidden)
    }

    fn check_range(&self, range: &Range<usize>) -> Result<()> {
        let num_layers = self.num_layers();
        if range.start > range.end || range.end > num_layers {
            return Err(Error::LayerRange {
                start: range.start,
                end: range.end,
                num_layers,
            });
        }
        Ok(())
    }

    /// Number of parameters of the backbone and of the exit heads.
    pub fn param_counts(&self) -> (usize, usize) {
        (self.bert.num_params(), self.exits.num_params())
    }
}
