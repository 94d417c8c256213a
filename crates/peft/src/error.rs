//! The library's one error type.

use std::path::PathBuf;

/// Every error the `peft` library returns.
///
/// Variants name the offending key, field, shape or file so that a user can fix the input without reading
/// the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
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
        /// What serde said.
        message: String,
    },
    /// A safetensors file is corrupt, truncated or holds an unsupported dtype.
    #[error("{path}: not a valid safetensors file: {message}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// `peft_type` names a method this library does not know.
    #[error("unknown peft_type {0:?}{hint}", hint = crate::config::peft_type_hint(.0))]
    UnknownPeftType(String),
    /// A config flag is set to a value whose behaviour this library does not implement.
    #[error("`{field}` = {value} is not supported by peft-rs ({reason})")]
    Unsupported {
        /// The config field, as named in `adapter_config.json`.
        field: String,
        /// The value it was set to.
        value: String,
        /// Why, or what would be needed.
        reason: String,
    },
    /// A config is inconsistent (e.g. `layers_to_transform` with a regex `target_modules`).
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A tensor does not have the shape the adapter or the base model needs.
    #[error("shape mismatch for {name}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor (its key in the adapter file or base model).
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// A tensor the adapter needs is absent from the file.
    #[error("missing tensor {0}")]
    MissingKey(String),
    /// The adapter file holds tensors that no targeted module uses.
    #[error("unexpected tensors in adapter: {}", .0.join(", "))]
    UnexpectedKeys(Vec<String>),
    /// The adapter targets a module that the base model does not have.
    #[error(
        "the adapter targets module `{module}`, which the base model does not have (no tensor `{module}.weight`)"
    )]
    MissingModule {
        /// The module's dotted name.
        module: String,
    },
    /// No module of the model matched the target specification.
    #[error("target modules {0} not found in the base model")]
    NoTargetMatched(String),
    /// An adapter name was not found.
    #[error("adapter `{0}` not found")]
    UnknownAdapter(String),
    /// An adapter name that is already taken.
    #[error("an adapter named `{0}` already exists")]
    DuplicateAdapter(String),
    /// A request that needs an adapter unmerged (adding over it, deleting it, replacing base tensors).
    #[error("{module}: adapter `{adapter}` is merged; unmerge it first")]
    AdapterMerged {
        /// The module (slot) that holds the merge.
        module: String,
        /// The merged adapter.
        adapter: String,
    },
    /// A forward with adapters disabled while some are merged into the base weights, which then still hold
    /// them.
    #[error(
        "{module}: adapters are disabled but {merged:?} are merged into the base; unmerge first"
    )]
    DisabledWhileMerged {
        /// The module (slot).
        module: String,
        /// The merged adapters.
        merged: Vec<String>,
    },
    /// Any other invalid request, described in words.
    #[error("{0}")]
    Invalid(String),
}

impl PeftError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PeftError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;
