//! The OFT adapter layer (PEFT's `tuners/oft/layer.py`). Not implemented yet.

use super::config::OftConfig;
use crate::layer::{Adapter, BaseLayer};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of a OFT adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &["oft_R"];

fn todo() -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: "OFT".into(),
        reason: "this method's layers are not implemented yet".into(),
    }
}

/// The adapter for `module` from its saved tensors (keys relative to the module, adapter name stripped).
pub fn build(
    _config: &OftConfig,
    _module: &str,
    _base: &BaseLayer,
    _tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}

/// A freshly initialised adapter for `module`.
pub fn create(
    _config: &OftConfig,
    _module: &str,
    _base: &BaseLayer,
    _rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}
