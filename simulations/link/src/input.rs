//! Reading input files (traces, matrices, presets): errors that name the file, line and column,
//! and CSV files with a header.

use std::fmt;
use std::path::{Path, PathBuf};

/// A malformed input file (confidence matrix, trace, preset): which file, which line, which
/// column, and what was wrong, so that a user can fix the file without reading our code.
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    pub path: PathBuf,
    /// 1-based line number, when the problem is on one line.
    pub line: Option<u64>,
    /// Column name (or 1-based position when the file has no header).
    pub column: Option<String>,
    pub message: String,
}

impl InputError {
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        InputError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn at(path: &Path, line: u64, message: impl Into<String>) -> Self {
        InputError {
            line: Some(line),
            ..InputError::new(path, message)
        }
    }

    pub fn in_column(mut self, column: impl Into<String>) -> Self {
        self.column = Some(column.into());
        self
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(column) = &self.column {
            write!(f, ": column `{column}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}

/// A CSV input file with a header row (fields trimmed, optionally `#` comment lines), whose
/// every failure is an [`InputError`] with the line: the shape of the 5Gophers traces and of
/// the confidence matrices.
pub struct HeaderCsv<R> {
    path: PathBuf,
    header: csv::StringRecord,
    reader: csv::Reader<R>,
}

impl HeaderCsv<std::fs::File> {
    pub fn open(path: &Path) -> Result<Self, InputError> {
        let reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
        Self::with_reader(path, reader)
    }
}

impl<'a> HeaderCsv<&'a [u8]> {
    /// `text` already read from `path`; `#` starts a comment line when `comments` is set.
    pub fn from_text(path: &Path, text: &'a str, comments: bool) -> Result<Self, InputError> {
        let reader = csv::ReaderBuilder::new()
            .comment(comments.then_some(b'#'))
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        Self::with_reader(path, reader)
    }
}

impl<R: std::io::Read> HeaderCsv<R> {
    fn with_reader(path: &Path, mut reader: csv::Reader<R>) -> Result<Self, InputError> {
        let header = reader.headers().map_err(|e| csv_error(path, e))?.clone();
        Ok(HeaderCsv {
            path: path.to_path_buf(),
            header,
            reader,
        })
    }

    pub fn header(&self) -> &csv::StringRecord {
        &self.header
    }

    /// The line the header was read from (1 unless comment lines came first).
    pub fn header_line(&self) -> u64 {
        self.reader.position().line().saturating_sub(1).max(1)
    }

    /// The position of the column `name`, or an error that lists the columns there are.
    pub fn column(&self, name: &str) -> Result<usize, InputError> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            InputError::at(
                &self.path,
                self.header_line(),
                format!(
                    "no column `{name}`; columns are {}",
                    self.header.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The data rows with their line numbers.
    pub fn rows(&mut self) -> impl Iterator<Item = Result<(u64, csv::StringRecord), InputError>> {
        let path = &self.path;
        self.reader.records().map(move |record| {
            let record = record.map_err(|e| csv_error(path, e))?;
            Ok((record.position().map_or(0, |p| p.line()), record))
        })
    }
}

/// A CSV error as an [`InputError`] on its line.
fn csv_error(path: &Path, e: csv::Error) -> InputError {
    let line = e.position().map(|p| p.line());
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields, the header has {expected_len}"),
        _ => e.to_string(),
    };
    InputError {
        line,
        ..InputError::new(path, message)
    }
}
