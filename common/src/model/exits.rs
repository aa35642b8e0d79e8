//! Exit classifiers: pooled hidden states → linear → softmax.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use super::Hidden;
use crate::config::{ExitConfig, Pooling};
use crate::error::{Error, Result};

#[derive(Module, Debug)]
pub struct ExitHead {
    pub classifier: Linear,
}

/// One [`ExitHead`] per layer listed in [`ExitConfig::layers`], in the same order.
#[derive(Module, Debug)]
pub struct ExitHeads {
    pub heads: Vec<ExitHead>,
    #[module(skip)]
    pub config: ExitConfig,
}

impl ExitHeads {
    /// Zero-initialised heads: until trained, every exit answers the uniform distribution,
    /// which is honest ("no idea") and deterministic, unlike random weights.
    pub fn init(hidden_size: usize, config: &ExitConfig, device: &Device) -> Self {
        let heads = config
            .layers
            .iter()
            .map(|_| ExitHead {
                classifier: LinearConfig::new(hidden_size, config.num_labels)
                    .with_initializer(burn::nn::Initializer::Zeros)
                    .init(device),
            })
            .collect();
        Self {
            heads,
            config: config.clone(),
        }
    }

    fn head(&self, layer: usize) -> Result<&ExitHead> {
        self.config
            .layers
            .iter()
            .position(|&l| l == layer)
            .map(|index| &self.heads[index])
            .ok_or_else(|| Error::NoExit {
                layer,
                available: self.config.layers.clone(),
            })
    }

    pub fn logits(&self, layer: usize, hidden: &Hidden) -> Result<Tensor<2>> {
        let head = self.head(layer)?;
        Ok(head.classifier.forward(pool(self.config.pooling, hidden)))
    }

    pub fn probs(&self, layer: usize, hidden: &Hidden) -> Result<Tensor<2>> {
        Ok(softmax(self.logits(layer, hidden)?, 1))
    }
}

/// `[batch, seq, hidden]` → `[batch, hidden]`.
pub fn pool(pooling: Pooling, hidden: &Hidden) -> Tensor<2> {
    let states = hidden.states.clone();
    let [batch, seq, size] = states.dims();
    match pooling {
        Pooling::Cls => states
            .slice([0..batch, 0..1, 0..size])
            .reshape([batch, size]),
        Pooling::MaskedMean => match &hidden.mask {
            None => states.mean_dim(1).reshape([batch, size]),
            Some(mask) => {
                let weights = mask.real.clone().reshape([batch, seq, 1]);
                let counts = mask.real.clone().sum_dim(1).clamp_min(1.0);
                (states * weights).sum_dim(1).reshape([batch, size]) / counts
            }
        },
    }
}
