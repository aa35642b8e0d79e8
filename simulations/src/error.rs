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
