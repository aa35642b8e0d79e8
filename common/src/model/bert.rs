//! The encoder backbone of both families (BERT and MPNet, see [`Family`]). Field names mirror
//! the Hugging Face BERT checkpoint layout so that [`crate::weights`] only has to rename the
//! keys Rust cannot spell (`self`, `LayerNorm`) and, for MPNet, its own names of the same
//! attention weights. The encoder layer is one type for both: MPNet's only difference inside a
//! layer is the relative-position bias, an optional input of [`EncoderLayer::forward`].

use std::sync::Arc;

use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::gelu;
use super::packed::{self, PackedLinear};
use crate::config::{Activation, BertConfig, Family, MPNET_MAX_DISTANCE};

#[derive(Module, Debug)]
pub struct Bert {
    pub embeddings: Embeddings,
    pub layers: Vec<EncoderLayer>,
    /// MPNet only: the bias table `[buckets, heads]` (`encoder.relative_attention_bias`),
    /// shared by all layers.
    pub relative_attention_bias: Option<Embedding>,
    #[module(skip)]
    pub config: BertConfig,
}

impl Bert {
    pub fn init(config: &BertConfig, device: &Device) -> Self {
        let relative_attention_bias = match config.family() {
            Family::Bert => None,
            Family::MPNet => Some(
                EmbeddingConfig::new(
                    config.relative_attention_num_buckets.unwrap_or_default(),
                    config.num_attention_heads,
                )
                .init(device),
            ),
        };
        Self {
            embeddings: Embeddings::init(config, device),
            layers: (0..config.num_hidden_layers)
                .map(|_| EncoderLayer::init(config, device))
                .collect(),
            relative_attention_bias,
            config: config.clone(),
        }
    }

    /// Builds every layer's [`PackedLinear`]s from the weights as they are now, for inference
    /// on a device that [`packed::packs_on`] (elsewhere it does nothing). Call it after
    /// loading; weights changed afterwards are not seen by the packs (see [`packed`]).
    pub fn pack_weights(&mut self) {
        if !packed::packs_on(&self.embeddings.layer_norm.gamma.val().device()) {
            return;
        }
        for layer in &mut self.layers {
            let attention = &mut layer.attention.self_attention;
            attention.packed = Some(PackedLinear::pack(&[
                &attention.query,
                &attention.key,
                &attention.value,
            ]));
            for block in [&mut layer.attention.output, &mut layer.output] {
                block.packed = Some(PackedLinear::pack(&[&block.dense]));
            }
            layer.intermediate.packed = Some(PackedLinear::pack(&[&layer.intermediate.dense]));
        }
    }

    /// The additive attention bias for sequences of `seq_len` tokens, `[1, heads, seq, seq]`,
    /// or `None` for BERT. It depends on positions only, so every call of `run_layers`
    /// recomputes it from the sequence length: a split worker needs nothing from the edge but
    /// the hidden states, and both halves add exactly the same bias.
    pub fn attention_bias(&self, seq_len: usize) -> Option<Tensor<4>> {
        let table = self.relative_attention_bias.as_ref()?;
        let [num_buckets, _] = table.weight.dims();
        // One bucket per relative position `key − query` ∈ −(seq−1)..=seq−1, then spread out.
        let last = seq_len as i64 - 1;
        let by_relative: Vec<i64> = (-last..=last)
            .map(|relative| relative_position_bucket(relative, num_buckets) as i64)
            .collect();
        let buckets: Vec<i64> = (0..seq_len)
            .flat_map(|query| {
                by_relative[last as usize - query..][..seq_len]
                    .iter()
                    .copied()
            })
            .collect();
        let device = table.weight.device();
        let buckets =
            Tensor::<2, Int>::from_data(TensorData::new(buckets, [seq_len, seq_len]), &device);
        // [seq, seq, heads] → [1, heads, query, key]
        Some(table.forward(buckets).permute([2, 0, 1]).unsqueeze::<4>())
    }
}

/// MPNet's (and T5's) bidirectional bucket of the relative position `key − query`: half the
/// buckets per direction (keys after the query take the upper half); within one, distances
/// below a quarter of the buckets are exact and longer ones share logarithmically wider
/// buckets up to [`MPNET_MAX_DISTANCE`], beyond which they all fall in the last one.
///
/// Computed in f64 where Hugging Face uses f32: the bucket edges that land exactly on an
/// integer (distances 16, 32, 64 with 32 buckets) are exact in both, and the unit test below
/// checks the whole table against an integer-only closed form.
pub fn relative_position_bucket(relative: i64, num_buckets: usize) -> usize {
    let half = num_buckets / 2;
    let exact = half / 2;
    let direction = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let within = if distance < exact {
        distance
    } else {
        let log_ratio =
            (distance as f64 / exact as f64).ln() / (MPNET_MAX_DISTANCE as f64 / exact as f64).ln();
        (exact + (log_ratio * (half - exact) as f64) as usize).min(half - 1)
    };
    direction + within
}

fn layer_norm(config: &BertConfig, device: &Device) -> LayerNorm {
    LayerNormConfig::new(config.hidden_size)
        .with_epsilon(config.layer_norm_eps)
        .init(device)
}

fn dropout(config: &BertConfig) -> Dropout {
    DropoutConfig::new(config.hidden_dropout_prob).init()
}

#[derive(Module, Debug)]
pub struct Embeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    /// BERT only: MPNet has no token types.
    pub token_type_embeddings: Option<Embedding>,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
    /// The position id of the first token ([`BertConfig::position_offset`]).
    #[module(skip)]
    pub position_offset: usize,
}

impl Embeddings {
    fn init(config: &BertConfig, device: &Device) -> Self {
        let token_type_embeddings = match config.family() {
            Family::Bert => {
                Some(EmbeddingConfig::new(config.type_vocab_size, config.hidden_size).init(device))
            }
            Family::MPNet => None,
        };
        Self {
            word_embeddings: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                .init(device),
            position_embeddings: EmbeddingConfig::new(
                config.max_position_embeddings,
                config.hidden_size,
            )
            .init(device),
            token_type_embeddings,
            layer_norm: layer_norm(config, device),
            dropout: dropout(config),
            position_offset: config.position_offset(),
        }
    }

    /// `token_ids`: `[batch, seq]` → `[batch, seq, hidden]`; `seq_len` must fit the position
    /// table after the offset (checked by `MultiExitBert::embed`).
    ///
    /// Positions are consecutive from the offset and every token has token type 0
    /// (single-segment inputs), so both are added as broadcast rows instead of two more
    /// embedding look-ups. Padding positions get the next ids too, where Hugging Face's MPNet
    /// gives them the padding index: their rows are never attended to or pooled, so no real
    /// token sees the difference.
    pub fn forward(&self, token_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, seq_len] = token_ids.dims();
        let words = self.word_embeddings.forward(token_ids);
        let offset = self.position_offset;
        let positions = self
            .position_embeddings
            .weight
            .val()
            .slice(offset..offset + seq_len)
            .unsqueeze::<3>();
        let summed = words + positions;
        let summed = match &self.token_type_embeddings {
            Some(table) => summed + table.weight.val().slice(0..1).unsqueeze::<3>(),
            None => summed,
        };
        self.dropout.forward(self.layer_norm.forward(summed))
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    #[module(skip)]
    pub num_heads: usize,
    /// Q, K and V as one packed product, once [`Bert::pack_weights`] has run.
    #[module(skip)]
    pub packed: Option<Arc<PackedLinear>>,
}

#[derive(Module, Debug)]
pub struct DenseNorm {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
    #[module(skip)]
    pub packed: Option<Arc<PackedLinear>>,
}

impl DenseNorm {
    fn init(d_in: usize, config: &BertConfig, device: &Device) -> Self {
        Self {
            dense: LinearConfig::new(d_in, config.hidden_size).init(device),
            layer_norm: layer_norm(config, device),
            dropout: dropout(config),
            packed: None,
        }
    }

    /// BERT's post-LN residual block: `LayerNorm(dropout(dense(x)) + residual)`.
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.layer_norm
            .forward(self.dropout.forward(self.project(x)) + residual)
    }

    /// `dense(x)`, through its pack where [`usable`].
    pub fn project(&self, x: Tensor<3>) -> Tensor<3> {
        match usable(&self.packed, &x) {
            Some(packed) => packed.forward(x),
            None => self.dense.forward(x),
        }
    }
}

#[derive(Module, Debug)]
pub struct Attention {
    pub self_attention: SelfAttention,
    pub output: DenseNorm,
}

#[derive(Module, Debug)]
pub struct Intermediate {
    pub dense: Linear,
    #[module(skip)]
    pub packed: Option<Arc<PackedLinear>>,
}

#[derive(Module, Debug)]
pub struct EncoderLayer {
    pub attention: Attention,
    pub intermediate: Intermediate,
    pub output: DenseNorm,
    #[module(skip)]
    pub activation: Activation,
}

impl EncoderLayer {
    fn init(config: &BertConfig, device: &Device) -> Self {
        let hidden = config.hidden_size;
        let linear = |d_out| LinearConfig::new(hidden, d_out).init(device);
        Self {
            attention: Attention {
                self_attention: SelfAttention {
                    query: linear(hidden),
                    key: linear(hidden),
                    value: linear(hidden),
                    num_heads: config.num_attention_heads,
                    packed: None,
                },
                output: DenseNorm::init(hidden, config, device),
            },
            intermediate: Intermediate {
                dense: linear(config.intermediate_size),
                packed: None,
            },
            output: DenseNorm::init(config.intermediate_size, config, device),
            activation: config.hidden_act,
        }
    }

    /// `x`: `[batch, seq, hidden]`; `padding_keys`: `[batch, 1, 1, seq]`, true at padding;
    /// `bias`: `[1, heads, seq, seq]`, added to the attention scores (MPNet).
    pub fn forward(
        &self,
        x: Tensor<3>,
        padding_keys: Option<&Tensor<4, Bool>>,
        bias: Option<&Tensor<4>>,
    ) -> Tensor<3> {
        let self_attention = &self.attention.self_attention;
        let heads = self_attention.project(x.clone());
        let context = self_attention.attend(heads, padding_keys, bias);
        let attended = self.attention.output.forward(context, x);
        let inner = self.expand(attended.clone());
        self.output.forward(inner, attended)
    }

    /// The feed-forward block's first half: its nonlinearity of the intermediate projection.
    pub fn expand(&self, attended: Tensor<3>) -> Tensor<3> {
        let dense = &self.intermediate.dense;
        if let (Activation::Gelu, Some(packed)) = (
            self.activation,
            usable(&self.intermediate.packed, &attended),
        ) {
            // The packed product already added the bias.
            let [batch, seq, _] = attended.dims();
            let width = packed.d_out();
            let product = packed.forward(attended).reshape([batch * seq, width]);
            return gelu::gelu(product).reshape([batch, seq, width]);
        }
        match (self.activation, &dense.bias) {
            // BERT's and MPNet's case, the one worth a fused pass (see `gelu`).
            (Activation::Gelu, Some(bias)) => {
                let [batch, seq, hidden] = attended.dims();
                let weight = dense.weight.val();
                let [_, width] = weight.dims();
                let product = attended.reshape([batch * seq, hidden]).matmul(weight);
                gelu::bias_gelu(product, bias.val()).reshape([batch, seq, width])
            }
            (activation, _) => {
                let inner = dense.forward(attended);
                match activation {
                    Activation::Gelu => activation::gelu(inner),
                    Activation::GeluTanh => activation::gelu_approximate(inner),
                    Activation::Relu => activation::relu(inner),
                }
            }
        }
    }
}

/// The pack of a projection of `x`, where it exists and pays for `x`'s rows.
fn usable<'a>(packed: &'a Option<Arc<PackedLinear>>, x: &Tensor<3>) -> Option<&'a PackedLinear> {
    let [batch, seq, _] = x.dims();
    packed
        .as_deref()
        .filter(|_| batch * seq <= packed::MAX_ROWS)
}

/// Query, key and value of every head, `[batch, heads, seq, head_dim]` each.
#[derive(Debug, Clone)]
pub struct Heads {
    pub query: Tensor<4>,
    pub key: Tensor<4>,
    pub value: Tensor<4>,
}

impl SelfAttention {
    /// The three projections of `x` (`[batch, seq, hidden]`), split into heads.
    pub fn project(&self, x: Tensor<3>) -> Heads {
        let [batch, seq, hidden] = x.dims();
        let heads = self.num_heads;
        let split_heads = |t: Tensor<3>| {
            t.reshape([batch, seq, heads, hidden / heads])
                .swap_dims(1, 2)
        };
        if let Some(packed) = usable(&self.packed, &x) {
            let all = packed.forward(x);
            let part = |index: usize| split_heads(all.clone().narrow(2, index * hidden, hidden));
            return Heads {
                query: part(0),
                key: part(1),
                value: part(2),
            };
        }
        Heads {
            query: split_heads(self.query.forward(x.clone())),
            key: split_heads(self.key.forward(x.clone())),
            value: split_heads(self.value.forward(x)),
        }
    }

    /// Scaled dot-product attention of every head, merged back to `[batch, seq, hidden]`.
    pub fn attend(
        &self,
        heads: Heads,
        padding_keys: Option<&Tensor<4, Bool>>,
        bias: Option<&Tensor<4>>,
    ) -> Tensor<3> {
        let Heads { query, key, value } = heads;
        let [batch, num_heads, seq, head_dim] = query.dims();
        let full = [batch, num_heads, seq, seq];
        let mask = padding_keys.map(|mask| mask.clone().expand(full));
        let bias = bias.map(|bias| bias.clone().expand(full));
        // Attention-probability dropout is left out: burn's fused attention has none, and the
        // hidden-state dropout after each block regularises fine-tuning enough for exits.
        // burn scales q·kᵀ by 1/√d, then masks, then adds the bias: a masked score stays −∞,
        // the same softmax as MPNet's bias-then-mask order.
        attention(
            query,
            key,
            value,
            mask,
            bias,
            AttentionModuleOptions::default(),
        )
        .swap_dims(1, 2)
        .reshape([batch, seq, num_heads * head_dim])
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    /// With 32 buckets (8 exact distances, 8 logarithmic ones up to distance 128),
    /// `8 + ⌊8·ln(d/8)/ln 16⌋ = 8 + ⌊log₂(d²/64)⌋ = ⌊log₂ d²⌋ + 2`: integers only, so float
    /// rounding at the bucket edges cannot hide behind it.
    #[test]
    fn buckets_match_the_integer_closed_form() {
        for distance in 0..600i64 {
            let expected = match distance {
                0..8 => distance as usize,
                8..128 => (distance * distance).ilog2() as usize + 2,
                _ => 15,
            };
            assert_eq!(
                relative_position_bucket(-distance, 32),
                expected,
                "{distance}"
            );
            if distance > 0 {
                assert_eq!(
                    relative_position_bucket(distance, 32),
                    16 + expected,
                    "{distance}"
                );
            }
        }
    }
}
