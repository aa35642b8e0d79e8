//! What a model card reports: per-exit accuracy and, for confidence thresholds, where samples
//! exit and how accurate they are there.

use std::fmt::Write;

/// Exit probabilities of a set of labelled samples: `probs[sample][exit][class]`.
pub struct ExitOutputs {
    pub exit_layers: Vec<usize>,
    pub probs: Vec<Vec<Vec<f32>>>,
    pub labels: Vec<usize>,
}

/// The threshold rule: a sample exits at the first exit whose top probability reaches `α`,
/// and at the last exit otherwise.
pub fn exit_index(sample: &[Vec<f32>], threshold: f32) -> usize {
    sample
        .iter()
        .position(|probs| max(probs) >= threshold)
        .unwrap_or(sample.len() - 1)
}

fn max(probs: &[f32]) -> f32 {
    probs.iter().copied().fold(f32::MIN, f32::max)
}

/// The predicted class as an index into labels: the first of equal top scores (the
/// bandits' rule, so training and the agent agree on ties).
pub fn argmax(scores: &[f32]) -> usize {
    splitee_bandits::argmax(scores) as usize
}

pub struct ThresholdRow {
    pub threshold: f32,
    /// Per exit: fraction of samples exiting there, and their accuracy (`None` if none did).
    pub per_exit: Vec<(f64, Option<f64>)>,
    pub accuracy: f64,
    /// Mean number of layers run per sample.
    pub mean_layers: f64,
}

impl ExitOutputs {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn exit_accuracy(&self) -> Vec<f64> {
        (0..self.exit_layers.len())
            .map(|exit| {
                let correct = self
                    .probs
                    .iter()
                    .zip(&self.labels)
                    .filter(|(sample, label)| argmax(&sample[exit]) == **label)
                    .count();
                correct as f64 / self.len().max(1) as f64
            })
            .collect()
    }

    pub fn threshold_row(&self, threshold: f32) -> ThresholdRow {
        let exits = self.exit_layers.len();
        let mut counts = vec![0usize; exits];
        let mut correct = vec![0usize; exits];
        for (sample, &label) in self.probs.iter().zip(&self.labels) {
            let exit = exit_index(sample, threshold);
            counts[exit] += 1;
            correct[exit] += usize::from(argmax(&sample[exit]) == label);
        }
        let n = self.len().max(1) as f64;
        ThresholdRow {
            threshold,
            per_exit: counts
                .iter()
                .zip(&correct)
                .map(|(&c, &k)| (c as f64 / n, (c > 0).then(|| k as f64 / c as f64)))
                .collect(),
            accuracy: correct.iter().sum::<usize>() as f64 / n,
            mean_layers: counts
                .iter()
                .zip(&self.exit_layers)
                .map(|(&c, &layer)| (c * layer) as f64)
                .sum::<f64>()
                / n,
        }
    }

    /// Markdown tables for the model card.
    pub fn markdown(&self, thresholds: &[f32]) -> String {
        let mut out = String::new();
        let header: Vec<String> = self
            .exit_layers
            .iter()
            .map(|l| format!("exit {l}"))
            .collect();
        let rule = "|---".repeat(self.exit_layers.len() + 1) + "|";
        writeln!(out, "| | {} |", header.join(" | ")).unwrap();
        writeln!(out, "{rule}").unwrap();
        let accuracy: Vec<String> = self
            .exit_accuracy()
            .iter()
            .map(|a| format!("{:.2}%", a * 100.0))
            .collect();
        writeln!(out, "| accuracy | {} |", accuracy.join(" | ")).unwrap();
        writeln!(out).unwrap();
        writeln!(
            out,
            "Threshold rule: exit at the first exit whose top probability ≥ α, else at the last. \
             Each cell: share of samples exiting there (their accuracy)."
        )
        .unwrap();
        writeln!(out).unwrap();
        writeln!(
            out,
            "| α | {} | accuracy | mean layers |",
            header.join(" | ")
        )
        .unwrap();
        writeln!(out, "{}|", "|---".repeat(self.exit_layers.len() + 3)).unwrap();
        for &threshold in thresholds {
            let row = self.threshold_row(threshold);
            let cells: Vec<String> = row
                .per_exit
                .iter()
                .map(|(share, accuracy)| match accuracy {
                    Some(a) => format!("{:.1}% ({:.1}%)", share * 100.0, a * 100.0),
                    None => "0%".to_owned(),
                })
                .collect();
            writeln!(
                out,
                "| {threshold} | {} | {:.2}% | {:.2} |",
                cells.join(" | "),
                row.accuracy * 100.0,
                row.mean_layers
            )
            .unwrap();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_rule_and_tables_count_correctly() {
        let outputs = ExitOutputs {
            exit_layers: vec![1, 2],
            probs: vec![
                vec![vec![0.9, 0.1], vec![0.8, 0.2]], // exits at 1 for α ≤ 0.9, right
                vec![vec![0.6, 0.4], vec![0.1, 0.9]], // exits at 2 for α > 0.6, right
                vec![vec![0.3, 0.7], vec![0.7, 0.3]], // exits at 1 for α ≤ 0.7, wrong there
            ],
            labels: vec![0, 1, 0],
        };
        assert_eq!(outputs.exit_accuracy(), [1.0 / 3.0, 1.0]);
        let row = outputs.threshold_row(0.65);
        assert_eq!(row.per_exit[0], (2.0 / 3.0, Some(0.5)));
        assert_eq!(row.per_exit[1], (1.0 / 3.0, Some(1.0)));
        assert!((row.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((row.mean_layers - 4.0 / 3.0).abs() < 1e-12);
        assert!(
            outputs
                .markdown(&[0.65])
                .contains("| 0.65 | 66.7% (50.0%) | 33.3% (100.0%) |")
        );
    }
}
