//! The published formats users may bring (see the [module docs](super)): UEE-UCB's
//! predictions-only TSV and AdaEE/UCBEE's two-branch CSV.

use std::path::Path;

use splitee_link::{HeaderCsv, InputError};

use super::{ConfidenceMatrix, parse_class, parse_unit, read_text};

impl ConfidenceMatrix {
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
