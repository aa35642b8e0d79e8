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
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use splitee_link::{HeaderCsv, InputError};

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

    /// Writes splitee's recorded format (see the module docs). Probabilities are written in
    /// the shortest form that reads back to the same `f32`, timings to the same `f64`.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::io::BufWriter::new(fs::File::create(path)?);
        self.write_csv_to(&mut file)?;
        file.flush()?;
        Ok(())
    }

    pub fn write_csv_to<W: Write>(&self, out: &mut W) -> anyhow::Result<()> {
        let classes = self
            .num_classes
            .ok_or_else(|| anyhow::anyhow!("a predictions-only matrix has no probabilities"))?;
        if !self.metadata.is_empty() {
            let words: Vec<String> = self
                .metadata
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(out, "# {}", words.join(" "))?;
        }
        let mut csv = csv::Writer::from_writer(out);
        let mut header = vec!["id".to_owned(), "label".to_owned(), "tokens".to_owned()];
        for l in &self.exit_layers {
            header.extend((0..classes).map(|c| format!("exit{l}_p{c}")));
        }
        if self.has_layer_ms {
            header.extend((1..=self.num_layers).map(|j| format!("layer{j}_ms")));
        }
        csv.write_record(&header)?;
        let mut record: Vec<String> = Vec::with_capacity(header.len());
        for i in 0..self.len() {
            record.clear();
            record.push(self.ids[i].clone());
            record.push(self.labels[i].map(|l| l.to_string()).unwrap_or_default());
            record.push(self.tokens[i].map(|t| t.to_string()).unwrap_or_default());
            record.extend(self.probs(i).unwrap_or(&[]).iter().map(|p| p.to_string()));
            record.extend(
                self.layer_ms(i)
                    .unwrap_or(&[])
                    .iter()
                    .map(|m| m.to_string()),
            );
            csv.write_record(&record)?;
        }
        csv.flush()?;
        Ok(())
    }

    /// Reads splitee's recorded format (see the module docs).
    pub fn read_csv(path: &Path) -> Result<Self, InputError> {
        let text = read_text(path)?;
        let mut metadata = BTreeMap::new();
        for line in text.lines().take_while(|l| l.trim_start().starts_with('#')) {
            for word in line.trim_start().trim_start_matches('#').split_whitespace() {
                if let Some((k, v)) = word.split_once('=')
                    && !k.is_empty()
                {
                    metadata.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        let mut csv = HeaderCsv::from_text(path, &text, true)?;
        let header = csv.header().iter().map(str::to_owned).collect::<Vec<_>>();
        let header_line = csv.header_line();
        let layout = Layout::parse(&header).map_err(|m| InputError::at(path, header_line, m))?;
        if let Some(layers) = metadata.get("layers") {
            match layers.parse::<usize>() {
                Ok(l) if l == layout.num_layers => {}
                _ => {
                    return Err(InputError::new(
                        path,
                        format!(
                            "metadata says layers={layers}, the columns describe {} layers",
                            layout.num_layers
                        ),
                    ));
                }
            }
        }
        let mut matrix = ConfidenceMatrix::new(
            layout.num_layers,
            layout.exit_layers.clone(),
            layout.num_classes,
            layout.has_layer_ms,
        )
        .map_err(|m| InputError::at(path, header_line, m))?;
        matrix.metadata = metadata;
        let mut probs = Vec::with_capacity(layout.exit_layers.len() * layout.num_classes);
        let mut layer_ms = Vec::with_capacity(layout.num_layers);
        for row in csv.rows() {
            let (line, record) = row?;
            let field_error = |col: usize, m: String| {
                InputError::at(path, line, m).in_column(header[col].clone())
            };
            if record.len() != header.len() {
                return Err(InputError::at(
                    path,
                    line,
                    format!("{} fields, the header has {}", record.len(), header.len()),
                ));
            }
            let id = &record[0];
            let label = if record[1].is_empty() {
                None
            } else {
                Some(parse_class(&record[1]).map_err(|m| field_error(1, m))?)
            };
            let tokens = parse_class(&record[2]).map_err(|m| field_error(2, m))?;
            probs.clear();
            for col in 3..3 + layout.exit_layers.len() * layout.num_classes {
                let p = parse_unit(&record[col]).map_err(|m| field_error(col, m))?;
                probs.push(p as f32);
            }
            layer_ms.clear();
            for col in 3 + probs.len()..header.len() {
                let v: f64 = record[col]
                    .parse()
                    .map_err(|_| field_error(col, format!("`{}` is not a number", &record[col])))?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(field_error(col, format!("time {v} ms is not ≥ 0")));
                }
                layer_ms.push(v);
            }
            matrix
                .push(SampleRow {
                    id,
                    label,
                    tokens,
                    probs: &probs,
                    layer_ms: &layer_ms,
                })
                .map_err(|m| InputError::at(path, line, m))?;
        }
        if matrix.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        Ok(matrix)
    }

    /// Reads UEE-UCB's predictions-only TSV (see the module docs).
    pub fn read_uee_tsv(path: &Path) -> Result<Self, InputError> {
        let text = read_text(path)?;
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, l))
            .filter(|(_, l)| !l.trim().is_empty());
        let (header_line, header) = lines
            .next()
            .ok_or_else(|| InputError::new(path, "empty file"))?;
        let names: Vec<&str> = header.split_whitespace().collect();
        let k = names.len().saturating_sub(1);
        if k == 0 || names[k] != "op_labels" {
            return Err(InputError::at(
                path,
                header_line,
                "header must be `0 1 … k-1 op_labels`",
            ));
        }
        for (i, name) in names[..k].iter().enumerate() {
            if *name != i.to_string() {
                return Err(InputError::at(
                    path,
                    header_line,
                    format!("header column {} is `{name}`, expected `{i}`", i + 1),
                ));
            }
        }
        let mut matrix = ConfidenceMatrix::empty(k, (1..=k).collect(), None, false);
        for (line, text) in lines {
            let fields: Vec<&str> = text.split_whitespace().collect();
            if fields.len() != k + 1 {
                return Err(InputError::at(
                    path,
                    line,
                    format!("{} fields, expected {}", fields.len(), k + 1),
                ));
            }
            for (col, field) in fields.iter().enumerate() {
                let v = parse_class(field)
                    .map_err(|m| InputError::at(path, line, m).in_column(names[col]))?;
                if col < k {
                    matrix.predictions.push(v);
                    matrix.confidences.push(f64::NAN);
                } else {
                    matrix.labels.push(Some(v));
                }
            }
            matrix.ids.push(format!("{}", matrix.ids.len()));
            matrix.tokens.push(None);
        }
        if matrix.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        Ok(matrix)
    }

    /// Reads AdaEE/UCBEE's two-branch CSV (see the module docs).
    pub fn read_adaee_csv(path: &Path) -> Result<Self, InputError> {
        const COLUMNS: [&str; 5] = [
            "conf_branch_1",
            "infered_class_branches_1",
            "conf_branch_2",
            "infered_class_branches_2",
            "target",
        ];
        let text = read_text(path)?;
        let mut csv = HeaderCsv::from_text(path, &text, false)?;
        let mut at = [0usize; 5];
        for (slot, name) in at.iter_mut().zip(COLUMNS) {
            *slot = csv.column(name)?;
        }
        let mut matrix = ConfidenceMatrix::empty(2, vec![1, 2], None, false);
        for row in csv.rows() {
            let (line, record) = row?;
            let field = |i: usize| -> Result<&str, InputError> {
                record.get(at[i]).ok_or_else(|| {
                    InputError::at(path, line, "row is shorter than the header")
                        .in_column(COLUMNS[i])
                })
            };
            let err = |i: usize, m: String| InputError::at(path, line, m).in_column(COLUMNS[i]);
            for branch in 0..2 {
                let conf = parse_unit(field(2 * branch)?).map_err(|m| err(2 * branch, m))?;
                let class =
                    parse_class(field(2 * branch + 1)?).map_err(|m| err(2 * branch + 1, m))?;
                matrix.confidences.push(conf);
                matrix.predictions.push(class);
            }
            let target = field(4)?;
            matrix.labels.push(if target.is_empty() {
                None
            } else {
                Some(parse_class(target).map_err(|m| err(4, m))?)
            });
            matrix.ids.push(format!("{}", matrix.ids.len()));
            matrix.tokens.push(None);
        }
        if matrix.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        Ok(matrix)
    }
}

/// Column layout of a splitee header.
struct Layout {
    exit_layers: Vec<usize>,
    num_classes: usize,
    num_layers: usize,
    has_layer_ms: bool,
}

impl Layout {
    fn parse(header: &[String]) -> Result<Layout, String> {
        if header.len() < 3 || header[0] != "id" || header[1] != "label" || header[2] != "tokens" {
            return Err("header must start with `id,label,tokens`".into());
        }
        let mut exits: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut col = 3;
        while col < header.len() {
            let Some((l, c)) = parse_exit_column(&header[col]) else {
                break;
            };
            match exits.last_mut() {
                Some((last, classes)) if *last == l => classes.push(c),
                Some((last, _)) if *last > l => {
                    return Err(format!(
                        "column `{}`: exits must ascend (after exit {last})",
                        header[col]
                    ));
                }
                _ => exits.push((l, vec![c])),
            }
            col += 1;
        }
        if exits.is_empty() {
            return Err("no `exit{l}_p{c}` columns after `tokens`".into());
        }
        let num_classes = exits[0].1.len();
        for (l, classes) in &exits {
            if *l == 0 {
                return Err("exit layers are 1-based: `exit0_…`".into());
            }
            if *classes != (0..num_classes).collect::<Vec<_>>() {
                return Err(format!(
                    "exit {l}: class columns must be p0..p{} in order, like the first exit",
                    num_classes - 1
                ));
            }
        }
        let mut num_timings = 0;
        while col < header.len() {
            let want = format!("layer{}_ms", num_timings + 1);
            if header[col] != want {
                return Err(format!("column `{}`: expected `{want}`", header[col]));
            }
            num_timings += 1;
            col += 1;
        }
        let exit_layers: Vec<usize> = exits.iter().map(|(l, _)| *l).collect();
        let last_exit = *exit_layers.last().expect("non-empty");
        let num_layers = if num_timings > 0 {
            num_timings
        } else {
            last_exit
        };
        Ok(Layout {
            exit_layers,
            num_classes,
            num_layers,
            has_layer_ms: num_timings > 0,
        })
    }
}

fn parse_exit_column(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("exit")?;
    let (l, c) = rest.split_once("_p")?;
    Some((l.parse().ok()?, c.parse().ok()?))
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
