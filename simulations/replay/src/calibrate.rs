//! `simulations calibrate`: certifies an agent's arms on a labelled, recorded calibration set
//! ([`splitee_bandits::calibrate`], Learn-then-Test) and writes the certified set into the
//! agent's config as `[arms] allowed`, so that its bandit optimises cost only among arms whose
//! accuracy drop against the final exit is at most ε with probability ≥ 1 − δ. A held-out
//! matrix, when given, shows the drop each certified arm realises on other data.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use splitee_bandits::calibrate::{Certificate, LabelledSample, certify};
use splitee_bandits::{ArmSpace, Confidence, ConfidenceMeasure, DecisionRule, ExitsConfig, decide};

use crate::experiment::AgentTables;
use crate::matrix::ConfidenceMatrix;

/// A matrix laid out per layer: every exit's confidence under the agent's measure (all heads
/// evaluated, as a calibration must see them), its predicted class, and the label.
pub struct Labelled {
    layers: usize,
    confidences: Vec<f64>,
    predictions: Vec<u32>,
    labels: Vec<u32>,
}

impl Labelled {
    pub fn new(matrix: &ConfidenceMatrix, exits: ExitsConfig) -> anyhow::Result<Self> {
        let layers = matrix.num_layers();
        let mut out = Labelled {
            layers,
            confidences: Vec::with_capacity(matrix.len() * layers),
            predictions: Vec::with_capacity(matrix.len() * layers),
            labels: Vec::with_capacity(matrix.len()),
        };
        let classes = matrix.num_classes();
        anyhow::ensure!(
            exits.measure == ConfidenceMeasure::MaxProb || classes.is_some(),
            "exits.measure = {:?} needs each exit's class probabilities, which this matrix does \
             not record",
            exits.measure
        );
        for i in 0..matrix.len() {
            let label = matrix.label(i).with_context(|| {
                format!(
                    "sample `{}` has no label: calibration needs labels",
                    matrix.id(i)
                )
            })?;
            let mut confidences = vec![f64::NAN; layers];
            let mut predictions = vec![u32::MAX; layers];
            let mut running = Confidence::new(exits);
            for (e, &layer) in matrix.exit_layers().iter().enumerate() {
                predictions[layer - 1] = matrix.predictions(i)[e];
                confidences[layer - 1] = match (matrix.probs(i), classes) {
                    (Some(probs), Some(c)) => running.observe(&probs[e * c..(e + 1) * c]),
                    _ => matrix.confidences(i)[e],
                };
            }
            out.confidences.extend(confidences);
            out.predictions.extend(predictions);
            out.labels.push(label);
        }
        Ok(out)
    }

    fn samples(&self) -> Vec<LabelledSample<'_>> {
        (0..self.labels.len())
            .map(|i| LabelledSample {
                confidences: &self.confidences[i * self.layers..][..self.layers],
                predictions: &self.predictions[i * self.layers..][..self.layers],
                label: self.labels[i],
            })
            .collect()
    }

    /// The accuracy drop of every arm against the final exit on these samples.
    fn drops(&self, space: &ArmSpace, rule: DecisionRule) -> anyhow::Result<Vec<f64>> {
        let samples = self.samples();
        let last = self.layers - 1;
        space
            .arms()
            .iter()
            .map(|&arm| {
                let mut loss = 0i64;
                for s in &samples {
                    let answer = match decide(arm, rule, self.layers, s.confidences) {
                        Some(splitee_bandits::Decision::Exit { layer }) => s.predictions[layer - 1],
                        Some(splitee_bandits::Decision::Offload { .. }) => s.predictions[last],
                        None => anyhow::bail!("arm {arm:?} needs a confidence this matrix lacks"),
                    };
                    loss +=
                        i64::from(s.predictions[last] == s.label) - i64::from(answer == s.label);
                }
                Ok(loss as f64 / samples.len() as f64)
            })
            .collect()
    }
}

/// What `calibrate` found, ready to print and to write.
pub struct Calibrated {
    pub space: ArmSpace,
    pub certificate: Certificate,
    /// Each arm's drop on the held-out matrix, when one was given.
    pub held_out: Option<Vec<f64>>,
}

/// Certifies the arm grid of `agent` (its `[arms]` without any `allowed`) on `calibration`.
pub fn calibrate(
    agent: &AgentTables,
    calibration: &ConfidenceMatrix,
    held_out: Option<&ConfidenceMatrix>,
    epsilon: f64,
    delta: f64,
) -> anyhow::Result<Calibrated> {
    let mut arms = agent.arms.clone();
    arms.allowed = None;
    let (space, rule) = arms
        .build(calibration.num_layers(), calibration.exit_layers())
        .context("in [arms]")?;
    let labelled = Labelled::new(calibration, agent.exits)?;
    let certificate = certify(&space, rule, &labelled.samples(), epsilon, delta)?;
    let held_out = held_out
        .map(|m| {
            anyhow::ensure!(
                m.num_layers() == calibration.num_layers()
                    && m.exit_layers() == calibration.exit_layers(),
                "the held-out matrix has other exits than the calibration matrix"
            );
            Labelled::new(m, agent.exits)?.drops(&space, rule)
        })
        .transpose()?;
    Ok(Calibrated {
        space,
        certificate,
        held_out,
    })
}

impl Calibrated {
    /// A markdown table of every arm's test.
    pub fn table(&self) -> String {
        let c = &self.certificate;
        let mut out = format!(
            "Learn-then-Test on {} calibration samples: ε = {} (accuracy drop against the final \
             exit), δ = {}; fixed-sequence tests per split (thresholds descending), Bonferroni \
             over splits.\n\n| arm | split | α | answered on device | worse than final | drop | \
             p-value | certified |{}\n|---|---|---|---|---|---|---|---|{}\n",
            c.samples,
            c.epsilon,
            c.delta,
            if self.held_out.is_some() {
                " held-out drop |"
            } else {
                ""
            },
            if self.held_out.is_some() { "---|" } else { "" },
        );
        for (i, t) in c.tests.iter().enumerate() {
            let _ = write!(
                out,
                "| {} | {} | {} | {:.1} % | {} | {:+.2} pt | {:.2e} | {} |",
                t.index,
                t.split,
                t.threshold,
                100.0 * t.exits as f64 / c.samples as f64,
                t.worse,
                100.0 * t.drop,
                t.p_value,
                if t.certified { "yes" } else { "no" },
            );
            if let Some(held) = &self.held_out {
                let _ = write!(out, " {:+.2} pt |", 100.0 * held[i]);
            }
            out.push('\n');
        }
        out
    }

    /// The largest drop a certified arm realised on the held-out matrix.
    pub fn worst_held_out(&self) -> Option<f64> {
        let held = self.held_out.as_ref()?;
        self.certificate
            .certified()
            .map(|k| held[k.0])
            .fold(None, |worst, d| Some(worst.map_or(d, |w: f64| w.max(d))))
    }

    /// `text` (an agent config) with `[arms] allowed` set to the certified arms, everything
    /// else kept as it was, and a comment saying where the set comes from.
    pub fn write_into(&self, text: &str, source: &Path) -> anyhow::Result<String> {
        let mut document: toml_edit::DocumentMut = text.parse().context("parsing the config")?;
        let arms = document
            .get_mut("arms")
            .and_then(toml_edit::Item::as_table_mut)
            .context("the config has no [arms] table")?;
        let mut allowed = toml_edit::Array::new();
        for k in self.certificate.certified() {
            let arm = self.space.arms()[k.0];
            let mut pair = toml_edit::Array::new();
            pair.push(arm.split as i64);
            pair.push(arm.threshold);
            allowed.push(pair);
        }
        let c = &self.certificate;
        let mut item = toml_edit::value(allowed);
        if let Some(value) = item.as_value_mut() {
            value.decor_mut().set_suffix(format!(
                "  # certified by `simulations calibrate` on {} ({} samples): accuracy drop \
                 against the final exit ≤ {} with probability ≥ {}",
                source.display(),
                c.samples,
                c.epsilon,
                1.0 - c.delta
            ));
        }
        arms.insert("allowed", item);
        Ok(document.to_string())
    }
}
