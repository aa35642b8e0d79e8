//! The BERT backbone. Field names mirror the Hugging Face checkpoint layout so that
//! [`crate::weights`] only has to rename the two keys Rust cannot spell (`self`, `LayerNorm`).

use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::config::{Activation, BertConfig};

#[derive(Module, Debug)]
pub struct Bert {
    pub embeddings: Embeddings,
    pub layers: Vec<EncoderLayer>,
    #[module(skip)]
    pub config: BertConfig,
}

impl Bert {
    pub fn init(config: &BertConfig, device: &Device) -> Self {
        Self {
            embeddings: Embeddings::init(config, device),
            layers: (0..config.num_hidden_layers)
                .map(|_| EncoderLayer::init(config, device))
                .collect(),
            config: config.clone(),
        }
    }
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
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl Embeddings {
    fn init(config: &BertConfig, device: &Device) -> Self {
        Self {
            word_embeddings: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                .init(device),
            position_embeddings: EmbeddingConfig::new(
                config.max_position_embeddings,
                config.hidden_size,
            )
            .init(device),
            token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, config.hidden_size)
                .init(device),
            layer_norm: layer_norm(config, device),
            dropout: dropout(config),
        }
    }

    /// `token_ids`: `[batch, seq]` → `[batch, seq, hidden]`.
    ///
    /// Positions start at 0 and every token has token type 0 (single-segment inputs), so both
    /// are added as broadcast rows instead of two more embedding look-ups.
    pub fn forward(&self, token_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, seq_len] = token_ids.dims();
        let words = self.word_embeddings.forward(token_ids);
        let positions = self
            .position_embeddings
            .weight
            .val()
            .slice(0..seq_len)
            .unsqueeze::<3>();
        let token_type = self
            .token_type_embeddings
            .weight
            .val()
            .slice(0..1)
            .unsqueeze::<3>();
        let summed = words + positions + token_type;
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
}

#[derive(Module, Debug)]
pub struct DenseNorm {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl DenseNorm {
    fn init(d_in: usize, config: &BertConfig, device: &Device) -> Self {
        Self {
            dense: LinearConfig::new(d_in, config.hidden_size).init(device),
            layer_norm: layer_norm(config, device),
            dropout: dropout(config),
        }
    }

    /// BERT's post-LN residual block: `LayerNorm(dropout(dense(x)) + residual)`.
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.layer_norm
            .forward(self.dropout.forward(self.dense.forward(x)) + residual)
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
                },
                output: DenseNorm::init(hidden, config, device),
            },
            intermediate: Intermediate {
                dense: linear(config.intermediate_size),
            },
            output: DenseNorm::init(config.intermediate_size, config, device),
            activation: config.hidden_act,
        }
    }

    /// `x`: `[batch, seq, hidden]`; `padding_keys`: `[batch, 1, 1, seq]`, true at padding.
    pub fn forward(&self, x: Tensor<3>, padding_keys: Option<&Tensor<4, Bool>>) -> Tensor<3> {
        let context = self
            .attention
            .self_attention
            .forward(x.clone(), padding_keys);
        let attended = self.attention.output.forward(context, x);
        let inner = self.intermediate.dense.forward(attended.clone());
        let inner = match self.activation {
            Activation::Gelu => activation::gelu(inner),
            Activation::GeluTanh => activation::gelu_approximate(inner),
            Activation::Relu => activation::relu(inner),
        };
        self.output.forward(inner, attended)
    }
}

impl SelfAttention {
    fn forward(&self, x: Tensor<3>, padding_keys: Option<&Tensor<4, Bool>>) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let heads = self.num_heads;
        let split_heads = |t: Tensor<3>| {
            t.reshape([batch, seq, heads, hidden / heads])
                .swap_dims(1, 2)
        };
        let query = split_heads(self.query.forward(x.clone()));
        let key = split_heads(self.key.forward(x.clone()));
        let value = split_heads(self.value.forward(x));
        let mask = padding_keys.map(|mask| mask.clone().expand([batch, heads, seq, seq]));
        // Attention-probability dropout is left out: burn's fused attention has none, and the
        // hidden-state dropout after each block regularises fine-tuning enough for exits.
        attention(
            query,
            key,
            value,
            mask,
            None,
            AttentionModuleOptions::default(),
        )
        .swap_dims(1, 2)
        .reshape([batch, seq, hidden])
    }
}
