//! The BOFT adapter layer (PEFT's `tuners/boft/layer.py`). Not implemented yet.

use super::config::BoftConfig;
use crate::layer::{Adapter, BaseLayer};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of a BOFT adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &["boft_R", "boft_s"];

fn todo() -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: "BOFT".into(),
        reason: "this method's layers are not implemented yet".into(),
    }
}

/// The adapter for `module` from its saved tensors (keys relative to the module, adapter name stripped).
pub fn build(
    _config: &BoftConfig,
    _module: &str,
    _base: &BaseLayer,
    _tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}

/// A freshly initialised adapter for `module`.
pub fn create(
    _config: &BoftConfig,
    _module: &str,
    _base: &BaseLayer,
    _rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}
