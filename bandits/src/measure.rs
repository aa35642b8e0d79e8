//! How confident an exit is: the number the exit test compares with `α`, and the `C_i` of the
//! rewards. One definition for the edge agent (which reads its exits' probabilities from the
//! model) and the simulator (which reads them from a recorded matrix), so both test and price
//! the same value.

use serde::{Deserialize, Serialize};

/// How an exit's class probabilities become its confidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConfidenceMeasure {
    /// The top class probability.
    #[default]
    MaxProb,
    /// `1 − H(p) / ln K`: 1 for a one-hot distribution, 0 for the uniform one.
    Entropy,
    /// PABEE: `min(1, r / patience)` where `r` counts the consecutive evaluated exits (ending
    /// at this one) that predicted the same class; with `α = 1` a sample exits once `patience`
    /// exits in a row agree.
    Patience,
}

/// The `[exits]` table of agent and simulator configs.
///
/// ```toml
/// measure = "max-prob"   # | "entropy" | "patience"
/// patience = 2           # for measure = "patience"
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExitsConfig {
    pub measure: ConfidenceMeasure,
    pub patience: usize,
}

impl Default for ExitsConfig {
    fn default() -> Self {
        Self {
            measure: ConfidenceMeasure::MaxProb,
            patience: 2,
        }
    }
}

impl ExitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.measure == ConfidenceMeasure::Patience && self.patience == 0 {
            return Err("exits.patience must be at least 1".into());
        }
        Ok(())
    }
}

/// The running confidence of one sample's exits, fed in layer order. The cloud's answer is
/// the sample's last exit: feeding it too gives the confidence the reward uses for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confidence {
    measure: ConfidenceMeasure,
    patience: usize,
    /// Class of the previous evaluated exit and how many exits in a row predicted it.
    run: Option<(u32, usize)>,
}

impl Confidence {
    pub fn new(exits: ExitsConfig) -> Self {
        Self {
            measure: exits.measure,
            patience: exits.patience.max(1),
            run: None,
        }
    }

    /// Patience counts agreeing exits in a row, so it must see every head up to the split.
    pub fn needs_every_head(&self) -> bool {
        self.measure == ConfidenceMeasure::Patience
    }

    /// Confidence of the next evaluated exit, whose class probabilities are `probs`.
    pub fn observe(&mut self, probs: &[f32]) -> f64 {
        let predicted = argmax(probs);
        let run = match self.run {
            Some((class, run)) if class == predicted => run + 1,
            _ => 1,
        };
        self.run = Some((predicted, run));
        match self.measure {
            ConfidenceMeasure::MaxProb => max_prob(probs),
            ConfidenceMeasure::Entropy => normalized_certainty(probs),
            ConfidenceMeasure::Patience => (run as f64 / self.patience as f64).min(1.0),
        }
    }
}

/// The predicted class: the first of equal top probabilities.
pub fn argmax(probs: &[f32]) -> u32 {
    first_max_index(probs.iter().copied()) as u32
}

/// Index of the first maximum (ties go to the lowest index; 0 when empty): the one rule for
/// predicted classes and for the policies' best arm.
#[inline]
pub(crate) fn first_max_index<T: PartialOrd>(values: impl IntoIterator<Item = T>) -> usize {
    let mut values = values.into_iter().enumerate();
    let Some((_, mut best_value)) = values.next() else {
        return 0;
    };
    let mut best = 0;
    for (i, v) in values {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best
}

pub fn max_prob(probs: &[f32]) -> f64 {
    f64::from(probs.iter().copied().fold(0.0, f32::max))
}

/// `1 − H(p) / ln K`, clamped to `[0, 1]` against rounding.
fn normalized_certainty(probs: &[f32]) -> f64 {
    if probs.len() < 2 {
        return 1.0;
    }
    let entropy: f64 = probs
        .iter()
        .map(|&p| f64::from(p))
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    (1.0 - entropy / (probs.len() as f64).ln()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exits(measure: ConfidenceMeasure, patience: usize) -> ExitsConfig {
        ExitsConfig { measure, patience }
    }

    #[test]
    fn max_prob_and_entropy_agree_on_the_extremes() {
        let mut c = Confidence::new(exits(ConfidenceMeasure::MaxProb, 1));
        assert_eq!(c.observe(&[0.25, 0.75]), 0.75);
        let mut e = Confidence::new(exits(ConfidenceMeasure::Entropy, 1));
        assert!((e.observe(&[0.5, 0.5]) - 0.0).abs() < 1e-12);
        assert!((e.observe(&[1.0, 0.0]) - 1.0).abs() < 1e-12);
        let mid = e.observe(&[0.9, 0.1]);
        assert!(mid > 0.5 && mid < 0.6, "{mid}");
    }

    #[test]
    fn patience_counts_agreeing_exits_in_a_row() {
        let mut c = Confidence::new(exits(ConfidenceMeasure::Patience, 3));
        let pos = [0.1, 0.9];
        let neg = [0.8, 0.2];
        let seen: Vec<f64> = [pos, pos, neg, neg, neg, neg]
            .iter()
            .map(|p| c.observe(p))
            .collect();
        assert_eq!(seen, [1.0 / 3.0, 2.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]);
        assert!(c.needs_every_head());
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[0.5, 0.5]), 0);
        assert_eq!(argmax(&[0.1, 0.2, 0.7]), 2);
    }

    #[test]
    fn zero_patience_is_a_config_error() {
        assert!(exits(ConfidenceMeasure::Patience, 0).validate().is_err());
        assert!(exits(ConfidenceMeasure::MaxProb, 0).validate().is_ok());
    }
}
