//! One sample's pass through the device's layers, as both drivers run it: which exit heads to
//! evaluate, the exit/offload decision, and the record of what was observed.
//!
//! The edge agent runs real layers and reads real exit probabilities; the simulator reads
//! recorded ones. Both ask [`DevicePass::wants_head`] whether to evaluate a layer's head and
//! feed [`DevicePass::observe`], so they evaluate the same heads, see the same confidences
//! (under the same [`ConfidenceMeasure`](crate::ConfidenceMeasure)) and stop at the same layer.

use crate::arms::{Arm, ArmIndex};
use crate::decision::{Decision, DecisionRule, SampleDecision, Step};
use crate::error::BanditError;
use crate::measure::{Confidence, ExitsConfig, argmax};
use crate::observation::NOT_EVALUATED;
use crate::settle::{Reported, SampleReport};

/// Marks an exit head whose class the device did not predict.
pub const NOT_PREDICTED: u32 = u32::MAX;

/// The device side of one sample; reusable across samples ([`start`](Self::start) resets it
/// without allocating).
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePass {
    num_layers: usize,
    rule: DecisionRule,
    /// `heads[j − 1]`: layer `j` has an exit head.
    heads: Vec<bool>,
    evaluate_all_heads: bool,
    exits: ExitsConfig,
    decision: SampleDecision,
    confidence: Confidence,
    confidences: Vec<f64>,
    predictions: Vec<u32>,
    device_ms: Vec<f64>,
    /// Layers run so far.
    ran: usize,
}

impl DevicePass {
    /// A pass over a model of `num_layers` layers with exit heads after `exit_layers`.
    /// `evaluate_all_heads` evaluates every head up to where the device stops, also those the
    /// rule does not test: a head per layer more, and side information for SplitEE-S.
    pub fn new(
        num_layers: usize,
        exit_layers: &[usize],
        rule: DecisionRule,
        exits: ExitsConfig,
        evaluate_all_heads: bool,
    ) -> Result<Self, BanditError> {
        if num_layers == 0 {
            return Err(BanditError::NoLayers);
        }
        exits.validate().map_err(BanditError::InvalidConfig)?;
        let mut heads = vec![false; num_layers];
        for &layer in exit_layers {
            if layer == 0 || layer > num_layers {
                return Err(BanditError::LayerOutOfRange { layer, num_layers });
            }
            heads[layer - 1] = true;
        }
        let placeholder = Arm {
            split: num_layers,
            threshold: 1.0,
        };
        Ok(Self {
            num_layers,
            rule,
            heads,
            evaluate_all_heads,
            exits,
            decision: SampleDecision::new(placeholder, rule, num_layers),
            confidence: Confidence::new(exits),
            confidences: vec![NOT_EVALUATED; num_layers],
            predictions: vec![NOT_PREDICTED; num_layers],
            device_ms: vec![0.0; num_layers],
            ran: 0,
        })
    }

    /// Starts a sample played with `arm`.
    pub fn start(&mut self, arm: Arm) {
        self.decision = SampleDecision::new(arm, self.rule, self.num_layers);
        self.confidence = Confidence::new(self.exits);
        self.confidences.fill(NOT_EVALUATED);
        self.predictions.fill(NOT_PREDICTED);
        self.device_ms.fill(0.0);
        self.ran = 0;
    }

    /// The layer to run next, `None` once the sample is decided.
    pub fn next_layer(&self) -> Option<usize> {
        self.decision
            .decision()
            .is_none()
            .then(|| self.decision.next_layer())
    }

    /// Whether the device evaluates the exit head after `layer`: one the rule tests, the last
    /// layer's (its answer), or any head with `evaluate_all_heads` or a measure that needs
    /// every head (patience).
    pub fn wants_head(&self, layer: usize) -> bool {
        let has_head = layer
            .checked_sub(1)
            .and_then(|i| self.heads.get(i))
            .copied()
            .unwrap_or(false);
        has_head
            && (self.decision.needs_confidence(layer)
                || layer == self.num_layers
                || self.evaluate_all_heads
                || self.confidence.needs_every_head())
    }

    /// Records layer `layer` (the one [`next_layer`](Self::next_layer) named): its exit's class
    /// probabilities when its head was evaluated, and the device time from the start of the
    /// sample to the end of this layer.
    pub fn observe(
        &mut self,
        layer: usize,
        probs: Option<&[f32]>,
        elapsed_ms: f64,
    ) -> Result<Step, BanditError> {
        if probs.is_none() && self.wants_head(layer) {
            return Err(BanditError::MissingConfidence { layer });
        }
        let confidence = probs.map(|p| self.confidence.observe(p));
        let step = self.decision.observe(layer, confidence)?;
        let i = layer - 1;
        if let (Some(c), Some(p)) = (confidence, probs) {
            self.confidences[i] = c;
            self.predictions[i] = argmax(p);
        }
        self.device_ms[i] = elapsed_ms;
        self.ran = layer;
        Ok(step)
    }

    pub fn decision(&self) -> Option<Decision> {
        self.decision.decision()
    }

    /// Layers the device ran.
    pub fn layers_run(&self) -> usize {
        self.ran
    }

    /// `C_j` of the exits evaluated, up to where the device stopped ([`NOT_EVALUATED`] for a
    /// head it skipped).
    pub fn confidences(&self) -> &[f64] {
        &self.confidences[..self.ran]
    }

    /// Predicted classes of the exits evaluated ([`NOT_PREDICTED`] for a head it skipped).
    pub fn predictions(&self) -> &[u32] {
        &self.predictions[..self.ran]
    }

    /// Device time from the start of the sample to the end of each layer run.
    pub fn device_ms(&self) -> &[f64] {
        &self.device_ms[..self.ran]
    }

    /// The confidence of the sample's answer when it came from beyond the device's pass (the
    /// cloud's exit, or the device's after a failed offload): the next exit of the same
    /// running measure.
    pub fn answer_confidence(&mut self, probs: &[f32]) -> f64 {
        self.confidence.observe(probs)
    }

    /// What the driver reports to [`Controller::settle`](crate::Controller::settle).
    pub fn report(&self, arm: ArmIndex, tokens: usize, outcome: Reported) -> SampleReport<'_> {
        SampleReport {
            arm,
            tokens,
            confidences: self.confidences(),
            predictions: self.predictions(),
            device_ms: self.device_ms(),
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{ExitCheck, Fallback};
    use crate::measure::ConfidenceMeasure;

    fn pass(rule: DecisionRule, evaluate_all: bool, measure: ConfidenceMeasure) -> DevicePass {
        let exits = ExitsConfig {
            measure,
            patience: 2,
        };
        DevicePass::new(4, &[1, 2, 3, 4], rule, exits, evaluate_all).unwrap()
    }

    /// Runs the pass over per-layer probabilities as a driver does.
    fn drive(pass: &mut DevicePass, arm: Arm, probs: &[[f32; 2]]) -> (Decision, Vec<usize>) {
        pass.start(arm);
        let mut evaluated = Vec::new();
        while let Some(layer) = pass.next_layer() {
            let p = pass.wants_head(layer).then(|| &probs[layer - 1][..]);
            if p.is_some() {
                evaluated.push(layer);
            }
            pass.observe(layer, p, layer as f64).unwrap();
        }
        (pass.decision().unwrap(), evaluated)
    }

    const UNSURE: [f32; 2] = [0.4, 0.6];

    #[test]
    fn the_whole_model_on_the_device_evaluates_the_last_head_for_its_answer() {
        let mut p = pass(DecisionRule::SPLITEE, false, ConfidenceMeasure::MaxProb);
        let arm = Arm {
            split: 4,
            threshold: 0.9,
        };
        let (decision, evaluated) = drive(&mut p, arm, &[UNSURE; 4]);
        assert_eq!(decision, Decision::Exit { layer: 4 });
        assert_eq!(
            evaluated,
            [4],
            "C_L is observed, the untested heads are not"
        );
        assert!(p.confidences()[..3].iter().all(|c| c.is_nan()));
        assert_eq!(p.confidences()[3], 0.6f32 as f64);
        assert_eq!(p.device_ms(), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn evaluate_all_heads_and_patience_evaluate_every_head_up_to_the_split() {
        let arm = Arm {
            split: 3,
            threshold: 0.99,
        };
        let mut all = pass(DecisionRule::SPLITEE, true, ConfidenceMeasure::MaxProb);
        assert_eq!(drive(&mut all, arm, &[UNSURE; 4]).1, [1, 2, 3]);
        let mut patience = pass(DecisionRule::SPLITEE, false, ConfidenceMeasure::Patience);
        let flip = [[0.6, 0.4], UNSURE, [0.6, 0.4], UNSURE];
        let (decision, evaluated) = drive(&mut patience, arm, &flip);
        assert_eq!(evaluated, [1, 2, 3]);
        assert_eq!(decision, Decision::Offload { after: 3 });
        // No two exits in a row agree; the cloud's answer agreeing with layer 3 makes two.
        assert_eq!(patience.confidences(), [0.5, 0.5, 0.5]);
        assert_eq!(patience.answer_confidence(&[0.7, 0.3]), 1.0);
    }

    #[test]
    fn every_layer_stops_at_the_first_confident_exit() {
        let rule = DecisionRule {
            check: ExitCheck::EveryLayer,
            fallback: Fallback::Offload,
        };
        let mut p = pass(rule, false, ConfidenceMeasure::MaxProb);
        let arm = Arm {
            split: 4,
            threshold: 0.9,
        };
        let (decision, evaluated) = drive(&mut p, arm, &[UNSURE, [0.05, 0.95], UNSURE, UNSURE]);
        assert_eq!(decision, Decision::Exit { layer: 2 });
        assert_eq!(evaluated, [1, 2]);
        assert_eq!(p.predictions(), [1, 1]);
        assert_eq!(p.layers_run(), 2);
    }

    #[test]
    fn a_wanted_head_without_probabilities_is_an_error() {
        let mut p = pass(DecisionRule::SPLITEE, false, ConfidenceMeasure::MaxProb);
        p.start(Arm {
            split: 1,
            threshold: 0.9,
        });
        assert_eq!(
            p.observe(1, None, 1.0),
            Err(BanditError::MissingConfidence { layer: 1 })
        );
        assert!(
            DevicePass::new(4, &[5], DecisionRule::SPLITEE, ExitsConfig::default(), true).is_err()
        );
    }
}
