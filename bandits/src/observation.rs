use serde::{Deserialize, Serialize};

use crate::decision::Decision;

/// What actually happened to a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The device inferred with the exit head of `layer` (`layer == L`: whole model on device).
    Exited { layer: usize },
    /// The device sent the state after layer `after`; the cloud answered with `C_L`.
    Offloaded { after: usize, final_confidence: f64 },
}

impl Outcome {
    pub fn decision(self) -> Decision {
        match self {
            Outcome::Exited { layer } => Decision::Exit { layer },
            Outcome::Offloaded { after, .. } => Decision::Offload { after },
        }
    }
}

/// Exactly what was observed for one sample, and nothing more.
///
/// Borrowed slices keep it allocation-free: the simulator points into its confidence matrix,
/// the edge agent into its per-sample buffers.
///
/// * `confidences[j - 1]` is the max softmax probability `C_j` of exit `j`, for the exits the
///   device evaluated. The slice ends where the device stopped; a head that was skipped inside
///   that range is [`NOT_EVALUATED`].
/// * `predictions[j - 1]` is the arg-max class of exit `j` (only the UEE-UCB proxy needs it;
///   leave empty otherwise).
/// * `edge_costs[j - 1]` is the measured cumulative device cost of layers `1..=j` (only for
///   [`EdgeCost::Measured`](crate::EdgeCost::Measured)).
/// * `offload_cost` is the measured cost of the offload (only for
///   [`OffloadCost::Measured`](crate::OffloadCost::Measured)), priced for the played split.
/// * `cloud_layer_cost` is what one more cloud layer adds to it: side information prices a
///   shallower split's offload with it (0 when unknown or not measured).
/// * `tokens` is the sample's token count (only for
///   [`EdgeCost::Profile`](crate::EdgeCost::Profile), which scales with it).
///
/// For an offload, `final_confidence` is the confidence of the answer the sample got: the
/// cloud's last exit (`C_L`, or an earlier cloud exit when the request allowed one), or the
/// device's when the offload failed and the device finished the sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation<'a> {
    pub confidences: &'a [f64],
    pub predictions: &'a [u32],
    pub outcome: Outcome,
    pub edge_costs: &'a [f64],
    pub offload_cost: Option<f64>,
    pub cloud_layer_cost: f64,
    pub tokens: Option<usize>,
}

/// Marks an exit head that the device did not evaluate.
pub const NOT_EVALUATED: f64 = f64::NAN;

impl<'a> Observation<'a> {
    /// The sample exited on the device at `layer`.
    pub fn exited(confidences: &'a [f64], layer: usize) -> Self {
        Observation {
            confidences,
            predictions: &[],
            outcome: Outcome::Exited { layer },
            edge_costs: &[],
            offload_cost: None,
            cloud_layer_cost: 0.0,
            tokens: None,
        }
    }

    /// The sample was offloaded after `after`; the cloud reported `final_confidence`.
    pub fn offloaded(confidences: &'a [f64], after: usize, final_confidence: f64) -> Self {
        Observation {
            confidences,
            predictions: &[],
            outcome: Outcome::Offloaded {
                after,
                final_confidence,
            },
            edge_costs: &[],
            offload_cost: None,
            cloud_layer_cost: 0.0,
            tokens: None,
        }
    }

    pub fn with_predictions(mut self, predictions: &'a [u32]) -> Self {
        self.predictions = predictions;
        self
    }

    pub fn with_edge_costs(mut self, edge_costs: &'a [f64]) -> Self {
        self.edge_costs = edge_costs;
        self
    }

    pub fn with_offload_cost(mut self, cost: f64) -> Self {
        self.offload_cost = Some(cost);
        self
    }

    pub fn with_cloud_layer_cost(mut self, cost: f64) -> Self {
        self.cloud_layer_cost = cost;
        self
    }

    pub fn with_tokens(mut self, tokens: usize) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// `C_layer` if the device evaluated that exit head.
    pub fn confidence(&self, layer: usize) -> Option<f64> {
        layer
            .checked_sub(1)
            .and_then(|i| self.confidences.get(i))
            .copied()
            .filter(|c| !c.is_nan())
    }

    /// `C_L` when it was observed: returned by the cloud, or computed on the device when the
    /// device ran the whole model.
    pub fn final_confidence(&self, num_layers: usize) -> Option<f64> {
        match self.outcome {
            Outcome::Offloaded {
                final_confidence, ..
            } => Some(final_confidence),
            Outcome::Exited { .. } => self.confidence(num_layers),
        }
    }

    pub fn prediction(&self, layer: usize) -> Option<u32> {
        layer
            .checked_sub(1)
            .and_then(|i| self.predictions.get(i))
            .copied()
            .filter(|&p| p != crate::NOT_PREDICTED)
    }

    pub fn edge_cost(&self, layer: usize) -> Option<f64> {
        layer
            .checked_sub(1)
            .and_then(|i| self.edge_costs.get(i))
            .copied()
            .filter(|c| !c.is_nan())
    }
}
