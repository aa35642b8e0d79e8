//! Confidence matrices: what every exit of a multi-exit model said about every sample.
//!
//! # splitee's recorded format (`format = "splitee"`)
//!
//! CSV (RFC 4180 quoting), optional leading comment lines, one header line, one row per
//! sample:
//!
//! ```text
//! # model=3f2a… hidden=384 layers=6 machine=x86_64-ryzen7
//! id,label,tokens,exit1_p0,exit1_p1,exit3_p0,exit3_p1,exit6_p0,exit6_p1,layer1_ms,…,layer6_ms
//! s0,1,23,0.31,0.69,0.12,0.88,0.05,0.95,1.20,1.18,1.21,1.19,1.22,1.20
//! ```
//!
//! * Comment lines start with `#` and come before the header. Whitespace-separated
//!   `key=value` words in them are kept as metadata ([`ConfidenceMatrix::metadata`]);
//!   other words are ignored. Keys the simulator reads: `hidden` (hidden size, for payload
//!   bytes), `layers` (must agree with the columns), `synthetic=true` (outputs are labelled
//!   synthetic).
//! * `id`: any string. `label`: class index, empty when unknown. `tokens`: token count after
//!   truncation (payload bytes are proportional to it).
//! * `exit{l}_p{c}`: probability of class `c` at the exit after encoder layer `l` (1-based).
//!   Exits ascend; every exit lists classes `0..C` in order; every exit has the same `C`.
//!   Exits need not be at every layer, but the last one must be at the last layer (the final
//!   classifier: the cloud's answer `C_L`). Each exit's probabilities must be in `[0, 1]` and
//!   sum to 1 within 1e-3.
//! * `layer{j}_ms`: measured compute time of layer `j` for this sample on the recording
//!   machine, for every `j = 1..=L` in order (`L` = number of these columns). They may be
//!   omitted altogether; then `L` is the last exit's layer and device profiles must come from
//!   a preset.
//!
//! Confidence `C_l` = max probability of exit `l`; prediction = its arg-max (lowest class on
//! ties).
//!
//! # Published formats users may bring
//!
//! * `format = "uee-tsv"` (UEE-UCB, Hanawal et al.): whitespace/tab separated, header
//!   `0 1 … k-1 op_labels`, then per sample the predicted class at each of the `k` exits and
//!   the label. Exits are at layers `1..=k`. There are **no confidences**: only rules whose
//!   outcome does not depend on them (split-only test with exit-at-split fallback, i.e. the
//!   UEE-UCB setting) can be simulated.
//! * `format = "adaee-csv"` (AdaEE / UCBEE, Pacheco et al.): CSV whose header names
//!   `conf_branch_1, infered_class_branches_1, conf_branch_2, infered_class_branches_2,
//!   target` in any order (other columns, e.g. a pandas index, are ignored). Branch 1 is the
//!   early exit at layer 1 and branch 2 the final classifier at layer 2 of a 2-"layer" model.
//!   An empty `target` means the label is unknown.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use splitee_link::InputError;

mod published;
mod splitee_csv;

/// Which file format a matrix is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatrixFormat {
    Splitee,
    UeeTsv,
    AdaeeCsv,
}

impl MatrixFormat {
    pub fn read(self, path: &Path) -> Result<ConfidenceMatrix, InputError> {
        match self {
            MatrixFormat::Splitee => ConfidenceMatrix::read_csv(path),
            MatrixFormat::UeeTsv => ConfidenceMatrix::read_uee_tsv(path),
            MatrixFormat::AdaeeCsv => ConfidenceMatrix::read_adaee_csv(path),
        }
    }
}

/// One sample as the recorder hands it to [`ConfidenceMatrix::push`].
#[derive(Debug, Clone, Copy)]
pub struct SampleRow<'a> {
    pub id: &'a str,
    pub label: Option<u32>,
    pub tokens: u32,
    /// Exit-major: `probs[e * C + c]` is class `c` at the `e`-th exit (in
    /// [`ConfidenceMatrix::exit_layers`] order).
    pub probs: &'a [f32],
    /// `layer_ms[j - 1]` is layer `j`'s compute time; empty when the matrix has no timings.
    pub layer_ms: &'a [f64],
}

/// Per-sample, per-exit confidences, predictions, labels, token counts and layer timings.
///
/// Storage is flat and row-major so that the simulator's inner loop reads contiguous memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfidenceMatrix {
    metadata: BTreeMap<String, String>,
    num_layers: usize,
    exit_layers: Vec<usize>,
    /// `None` for formats that carry predictions only.
    num_classes: Option<usize>,
    has_layer_ms: bool,
    ids: Vec<String>,
    labels: Vec<Option<u32>>,
    tokens: Vec<Option<u32>>,
    /// `n × E × C` (splitee format only).
    probs: Vec<f32>,
    /// `n × E`; NaN where the format carries no confidence.
    confidences: Vec<f64>,
    /// `n × E`.
    predictions: Vec<u32>,
    /// `n × L` when `has_layer_ms`.
    layer_ms: Vec<f64>,
}

const PROB_SUM_TOLERANCE: f64 = 1e-3;

impl ConfidenceMatrix {
    /// An empty matrix in splitee's format. `with_layer_ms` says whether rows carry
    /// `layer{j}_ms` timings for all `num_layers` layers.
    pub fn new(
        num_layers: usize,
        exit_layers: Vec<usize>,
        num_classes: usize,
        with_layer_ms: bool,
    ) -> Result<Self, String> {
        check_exits(num_layers, &exit_layers)?;
        if num_classes < 2 {
            return Err(format!("need at least 2 classes, got {num_classes}"));
        }
        Ok(Self::empty(
            num_layers,
            exit_layers,
            Some(num_classes),
            with_layer_ms,
        ))
    }

    /// A matrix with no samples yet; `num_classes` is `None` for the published formats, which
    /// record a prediction and a confidence per exit instead of probabilities.
    fn empty(
        num_layers: usize,
        exit_layers: Vec<usize>,
        num_classes: Option<usize>,
        has_layer_ms: bool,
    ) -> Self {
        ConfidenceMatrix {
            metadata: BTreeMap::new(),
            num_layers,
            exit_layers,
            num_classes,
            has_layer_ms,
            ids: Vec::new(),
            labels: Vec::new(),
            tokens: Vec::new(),
            probs: Vec::new(),
            confidences: Vec::new(),
            predictions: Vec::new(),
            layer_ms: Vec::new(),
        }
    }

    /// Places the exits of a format that only numbers them (UEE-UCB's, AdaEE's) at `exit_layers`
    /// of a `num_layers`-layer model, so that layer-priced costs count real depth. Only for
    /// matrices without layer timings.
    pub fn place_exits(
        &mut self,
        exit_layers: Vec<usize>,
        num_layers: usize,
    ) -> Result<(), String> {
        if exit_layers.len() != self.exit_layers.len() {
            return Err(format!(
                "{} exit layers given, the matrix has {} exits",
                exit_layers.len(),
                self.exit_layers.len()
            ));
        }
        if self.has_layer_ms {
            return Err("the matrix records layer times: its exits are already placed".into());
        }
        check_exits(num_layers, &exit_layers)?;
        self.exit_layers = exit_layers;
        self.num_layers = num_layers;
        Ok(())
    }

    /// Sets a metadata `key=value` (written as a `#` comment line). Keys and values must be
    /// non-empty and free of whitespace, and keys free of `=`, so that they read back.
    pub fn set_metadata(&mut self, key: &str, value: &str) -> Result<(), String> {
        let bad = |s: &str| s.is_empty() || s.chars().any(char::is_whitespace);
        if bad(key) || key.contains('=') || bad(value) {
            return Err(format!(
                "metadata `{key}={value}`: key and value must be non-empty without whitespace, key without `=`"
            ));
        }
        self.metadata.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    /// Appends one sample, checking it against the matrix's shape.
    pub fn push(&mut self, row: SampleRow<'_>) -> Result<(), String> {
        let classes = self
            .num_classes
            .ok_or("this matrix carries predictions only")?;
        let exits = self.exit_layers.len();
        if row.probs.len() != exits * classes {
            return Err(format!(
                "sample `{}`: {} probabilities, expected {exits} exits × {classes} classes",
                row.id,
                row.probs.len()
            ));
        }
        let want_ms = if self.has_layer_ms {
            self.num_layers
        } else {
            0
        };
        if row.layer_ms.len() != want_ms {
            return Err(format!(
                "sample `{}`: {} layer timings, expected {want_ms}",
                row.id,
                row.layer_ms.len()
            ));
        }
        if let Some(label) = row.label
            && label as usize >= classes
        {
            return Err(format!(
                "sample `{}`: label {label} is not a class (< {classes})",
                row.id
            ));
        }
        for (e, probs) in row.probs.chunks_exact(classes).enumerate() {
            check_distribution(probs)
                .map_err(|m| format!("sample `{}`, exit {}: {m}", row.id, self.exit_layers[e]))?;
        }
        if let Some(ms) = row.layer_ms.iter().find(|m| !(m.is_finite() && **m >= 0.0)) {
            return Err(format!("sample `{}`: layer time {ms} ms", row.id));
        }
        for probs in row.probs.chunks_exact(classes) {
            let pred = splitee_bandits::argmax(probs);
            self.predictions.push(pred);
            self.confidences.push(f64::from(probs[pred as usize]));
        }
        self.ids.push(row.id.to_owned());
        self.labels.push(row.label);
        self.tokens.push(Some(row.tokens));
        self.probs.extend_from_slice(row.probs);
        self.layer_ms.extend_from_slice(row.layer_ms);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// 1-based layers carrying an exit, ascending; the last is [`num_layers`](Self::num_layers).
    pub fn exit_layers(&self) -> &[usize] {
        &self.exit_layers
    }

    pub fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Whether the file says it was generated (`synthetic=true`), not recorded.
    pub fn is_synthetic(&self) -> bool {
        self.metadata.get("synthetic").map(String::as_str) == Some("true")
    }

    /// Whether confidences are known (false for predictions-only formats).
    pub fn has_confidences(&self) -> bool {
        self.num_classes.is_some() || self.confidences.iter().all(|c| !c.is_nan())
    }

    pub fn has_layer_ms(&self) -> bool {
        self.has_layer_ms
    }

    pub fn id(&self, sample: usize) -> &str {
        &self.ids[sample]
    }

    pub fn label(&self, sample: usize) -> Option<u32> {
        self.labels[sample]
    }

    pub fn tokens(&self, sample: usize) -> Option<u32> {
        self.tokens[sample]
    }

    /// Confidences of every exit of `sample`, in exit order (NaN when unknown).
    pub fn confidences(&self, sample: usize) -> &[f64] {
        let e = self.exit_layers.len();
        &self.confidences[sample * e..(sample + 1) * e]
    }

    pub fn predictions(&self, sample: usize) -> &[u32] {
        let e = self.exit_layers.len();
        &self.predictions[sample * e..(sample + 1) * e]
    }

    /// Class probabilities, exit-major (splitee format only).
    pub fn probs(&self, sample: usize) -> Option<&[f32]> {
        let c = self.num_classes?;
        let stride = self.exit_layers.len() * c;
        Some(&self.probs[sample * stride..(sample + 1) * stride])
    }

    pub fn layer_ms(&self, sample: usize) -> Option<&[f64]> {
        self.has_layer_ms
            .then(|| &self.layer_ms[sample * self.num_layers..(sample + 1) * self.num_layers])
    }

    /// Mean compute time of each layer over all samples.
    pub fn mean_layer_ms(&self) -> Option<Vec<f64>> {
        if !self.has_layer_ms || self.is_empty() {
            return None;
        }
        let mut sum = vec![0.0; self.num_layers];
        for row in self.layer_ms.chunks_exact(self.num_layers) {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
        }
        Some(sum.into_iter().map(|s| s / self.len() as f64).collect())
    }

    /// Mean token count over samples that have one.
    pub fn mean_tokens(&self) -> Option<f64> {
        let (sum, n) = self
            .tokens
            .iter()
            .flatten()
            .fold((0.0, 0usize), |(s, n), &t| (s + t as f64, n + 1));
        (n > 0).then(|| sum / n as f64)
    }
}

fn check_exits(num_layers: usize, exit_layers: &[usize]) -> Result<(), String> {
    if exit_layers.is_empty() {
        return Err("no exits".into());
    }
    if exit_layers.windows(2).any(|w| w[0] >= w[1]) || exit_layers[0] == 0 {
        return Err(format!(
            "exit layers {exit_layers:?} must be 1-based and strictly ascending"
        ));
    }
    if *exit_layers.last().expect("non-empty") != num_layers {
        return Err(format!(
            "the last exit must be at the last layer {num_layers} (the final classifier), exits are {exit_layers:?}"
        ));
    }
    Ok(())
}

fn check_distribution(probs: &[f32]) -> Result<(), String> {
    let mut sum = 0.0f64;
    for &p in probs {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("probability {p} outside [0, 1]"));
        }
        sum += p as f64;
    }
    if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
        return Err(format!("probabilities sum to {sum}, not 1"));
    }
    Ok(())
}

fn parse_unit(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a probability in [0, 1]"))
    }
}

/// A non-negative integer; `3.0` is accepted because pandas writes integer columns with a
/// missing value as floats.
fn parse_class(s: &str) -> Result<u32, String> {
    if let Ok(v) = s.parse::<u32>() {
        return Ok(v);
    }
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64 => Ok(v as u32),
        _ => Err(format!("`{s}` is not a non-negative integer")),
    }
}

fn read_text(path: &Path) -> Result<String, InputError> {
    fs::read_to_string(path).map_err(|e| InputError::new(path, format!("cannot read: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ConfidenceMatrix {
        let mut m = ConfidenceMatrix::new(3, vec![1, 3], 2, true).unwrap();
        m.set_metadata("hidden", "8").unwrap();
        m.push(SampleRow {
            id: "a,b \"quoted\"",
            label: Some(1),
            tokens: 5,
            probs: &[0.3, 0.7, 0.1, 0.9],
            layer_ms: &[1.5, 2.0, 0.1],
        })
        .unwrap();
        m.push(SampleRow {
            id: "unlabelled",
            label: None,
            tokens: 9,
            probs: &[0.5, 0.5, 0.8, 0.2],
            layer_ms: &[1.0, 1.0, 1.0],
        })
        .unwrap();
        m
    }

    #[test]
    fn csv_round_trips_exactly() {
        let m = tiny();
        let mut buf = Vec::new();
        m.write_csv_to(&mut buf).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        fs::write(&path, &buf).unwrap();
        let back = ConfidenceMatrix::read_csv(&path).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.predictions(1), &[0, 0]);
        assert_eq!(back.confidences(0)[1], 0.9f32 as f64);
        assert_eq!(back.mean_layer_ms().unwrap(), vec![1.25, 1.5, 0.55]);
    }

    #[test]
    fn push_rejects_rows_that_do_not_fit() {
        let mut m = tiny();
        let row = |probs: &'static [f32], label| SampleRow {
            id: "x",
            label,
            tokens: 1,
            probs,
            layer_ms: &[1.0, 1.0, 1.0],
        };
        assert!(m.push(row(&[0.3, 0.7], Some(0))).is_err());
        assert!(m.push(row(&[0.3, 0.6, 0.1, 0.9], Some(0))).is_err());
        assert!(m.push(row(&[0.3, 0.7, 0.1, 0.9], Some(2))).is_err());
        assert!(ConfidenceMatrix::new(3, vec![1, 2], 2, false).is_err());
        assert!(m.set_metadata("a b", "c").is_err());
    }
}
