use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Each variant names the file
/// or tensor at fault, because the user has to fix that file, not our code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message, not a `source`, so that reports do not repeat it.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid configuration {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("weights file {path} is unreadable (truncated or corrupt?): {message}")]
    WeightsFile { path: PathBuf, message: String },
    #[error("weights file {path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("weights file {path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("weights file {path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DTypeMismatch {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("weights file {path}: tensor `{tensor}`: {message}")]
    TensorLoad {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("layer range {start}..{end} is outside the model's 0..{num_layers}")]
    LayerRange {
        start: usize,
        end: usize,
        num_layers: usize,
    },
    #[error("layer {layer} has no exit head (exits after layers {available:?})")]
    NoExit { layer: usize, available: Vec<usize> },
    #[error("{0}")]
    Shape(String),
    #[error("backend: {0}")]
    Backend(String),
    /// A backbone kept in the cache: not fetched, or not the pinned file.
    #[error(transparent)]
    Backbone(#[from] splitee_fetch::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
