//! GLUE-style labelled text: a TSV file with a header naming a `sentence` column and,
//! optionally, `label` and `index` columns (SST-2's train/dev/test files all fit).
//!
//! A broken row (wrong column count, unparsable label) does not abort reading: it is
//! reported with its line number in [`Dataset::bad_rows`] so that the caller can decide whether
//! to stop or to go on without it, and say so.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One text, with its label when the file has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The `index` column when present, else the 1-based line number in the file.
    pub id: String,
    pub text: String,
    pub label: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// 1-based line number in the file (the header is line 1).
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub bad_rows: Vec<BadRow>,
}

impl Dataset {
    pub fn read_tsv(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_tsv(&text, path)
    }

    /// Parses TSV text; `path` is only used in messages.
    pub fn parse_tsv(text: &str, path: &Path) -> Result<Self> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .ok_or_else(|| Error::Config {
                path: path.to_owned(),
                message: "empty file: expected a header line".into(),
            })?
            .split('\t')
            .collect();
        let columns = Columns::from_header(&header, path)?;
        let mut examples = Vec::new();
        let mut bad_rows = Vec::new();
        for (offset, row) in lines.enumerate() {
            if row.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = row.split('\t').collect();
            match columns.example(offset + 2, &fields) {
                Ok(example) => examples.push(example),
                Err(bad) => bad_rows.push(bad),
            }
        }
        Ok(Self {
            path: path.to_owned(),
            examples,
            bad_rows,
        })
    }

    /// Number of classes implied by the labels (max label + 1), if any row is labelled.
    pub fn num_classes(&self) -> Option<usize> {
        self.examples
            .iter()
            .filter_map(|e| e.label)
            .max()
            .map(|m| m + 1)
    }

    /// Fails when any row was bad, listing the first few: for training, where a silently
    /// shrunken dataset would make results irreproducible.
    pub fn require_clean(self) -> Result<Self> {
        if self.bad_rows.is_empty() {
            return Ok(self);
        }
        let shown: Vec<String> = self
            .bad_rows
            .iter()
            .take(5)
            .map(ToString::to_string)
            .collect();
        Err(Error::Config {
            path: self.path.clone(),
            message: format!(
                "{} bad rows ({}{})",
                self.bad_rows.len(),
                shown.join("; "),
                if self.bad_rows.len() > 5 { "; …" } else { "" }
            ),
        })
    }
}

/// Where the `sentence`, `label` and `index` columns are, read from a header row. Shared by
/// [`Dataset`] (whole files) and readers that stream rows one at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    width: usize,
    sentence: usize,
    label: Option<usize>,
    index: Option<usize>,
}

impl Columns {
    /// `path` is only used in the error.
    pub fn from_header(header: &[&str], path: &Path) -> Result<Self> {
        let column = |name: &str| {
            header
                .iter()
                .position(|c| c.trim().eq_ignore_ascii_case(name))
        };
        let sentence = column("sentence").ok_or_else(|| Error::Config {
            path: path.to_owned(),
            message: format!("header {header:?} has no `sentence` column"),
        })?;
        Ok(Self {
            width: header.len(),
            sentence,
            label: column("label"),
            index: column("index"),
        })
    }

    pub fn has_labels(&self) -> bool {
        self.label.is_some()
    }

    /// The example in row `fields`, which is 1-based line `line` of the file.
    pub fn example(&self, line: usize, fields: &[&str]) -> std::result::Result<Example, BadRow> {
        if fields.len() != self.width {
            return Err(BadRow {
                line,
                reason: format!("{} columns, the header has {}", fields.len(), self.width),
            });
        }
        let label = match self.label.map(|i| fields[i].trim()) {
            None => None,
            Some(raw) => Some(raw.parse::<usize>().map_err(|_| BadRow {
                line,
                reason: format!("label {raw:?} is not a class index"),
            })?),
        };
        Ok(Example {
            id: self
                .index
                .map_or_else(|| line.to_string(), |i| fields[i].trim().to_owned()),
            text: fields[self.sentence].to_owned(),
            label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_glue_style_rows_and_reports_bad_ones_by_line() {
        let text = "sentence\tlabel\ngood film\t1\nbroken row without tab\nbad label\tpositive\n\nawful\t0\n";
        let data = Dataset::parse_tsv(text, Path::new("x.tsv")).unwrap();
        let texts: Vec<_> = data
            .examples
            .iter()
            .map(|e| (e.text.as_str(), e.label))
            .collect();
        assert_eq!(texts, [("good film", Some(1)), ("awful", Some(0))]);
        assert_eq!(data.examples[1].id, "6");
        assert_eq!(data.bad_rows.len(), 2);
        assert_eq!(
            data.bad_rows[0].to_string(),
            "line 3: 1 columns, the header has 2"
        );
        assert_eq!(data.bad_rows[1].line, 4);
        let error = data.require_clean().unwrap_err().to_string();
        assert!(
            error.contains("2 bad rows") && error.contains("line 3"),
            "{error}"
        );
    }

    #[test]
    fn columns_are_found_by_name_and_labels_are_optional() {
        let text = "index\tsentence\n7\tsome text\n";
        let data = Dataset::parse_tsv(text, Path::new("test.tsv")).unwrap();
        assert_eq!(
            data.examples,
            [Example {
                id: "7".into(),
                text: "some text".into(),
                label: None
            }]
        );
        assert_eq!(data.num_classes(), None);
        let error = Dataset::parse_tsv("text\tlabel\n", Path::new("y.tsv")).unwrap_err();
        assert!(
            error.to_string().contains("no `sentence` column"),
            "{error}"
        );
    }
}
