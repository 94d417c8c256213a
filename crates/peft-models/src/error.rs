//! The error type of model loading, tokenization and export.
//!
//! [`ModelError`] converts from [`peft::PeftError`] and [`candle_core::Error`] (so `?` works on library
//! calls), and into [`peft::PeftError`] (so code that returns `peft::Result` can call these loaders with `?`).

use std::path::PathBuf;

/// Every error of the loaders, the tokenizer and the exporter in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An error of the `peft` library (safetensors reading and writing, atomic files, …).
    #[error(transparent)]
    Peft(#[from] peft::PeftError),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON document could not be parsed or does not have the expected form.
    #[error("{context}: invalid JSON: {message}")]
    Json {
        /// Where the JSON came from (a file name or a field).
        context: String,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is truncated, corrupt or inconsistent (missing key, wrong shape, unknown tensor).
    #[error("{path}: invalid GGUF file: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model (or its tokenizer) is valid but of a kind this crate does not load.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The tokenizer could not be built, loaded, saved or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template could not be compiled or rendered (including `raise_exception` in the template).
    #[error("chat template: {0}")]
    Template(String),
    /// Any other invalid request, described in words.
    #[error("{0}")]
    Invalid(String),
    /// An error with what was being done when it happened (`loading the model directory …`); the cause is
    /// its [`std::error::Error::source`].
    #[error("{context}")]
    Context {
        /// What was being done.
        context: String,
        /// The error.
        source: Box<ModelError>,
    },
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps `self` with what was being done when it happened ([`ModelError::Context`]).
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        ModelError::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }

    /// A JSON error with its context.
    pub fn json(context: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        ModelError::Json {
            context: context.to_string(),
            message: message.to_string(),
        }
    }
}

impl From<tokenizers::Error> for ModelError {
    fn from(e: tokenizers::Error) -> Self {
        ModelError::Tokenizer(e.to_string())
    }
}

impl From<minijinja::Error> for ModelError {
    fn from(e: minijinja::Error) -> Self {
        // minijinja's message names the error kind, the detail and the template line.
        ModelError::Template(e.to_string())
    }
}

impl From<ModelError> for peft::PeftError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Peft(e) => e,
            ModelError::Candle(e) => peft::PeftError::Candle(e),
            ModelError::Io { path, source } => peft::PeftError::Io { path, source },
            ModelError::Json { context, message } => peft::PeftError::Json { context, message },
            ModelError::Context { context, source } => {
                peft::PeftError::Invalid(format!("{context}: {source}"))
            }
            other => peft::PeftError::Invalid(other.to_string()),
        }
    }
}

/// The result type of this crate's loaders, tokenizer and exporter.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
