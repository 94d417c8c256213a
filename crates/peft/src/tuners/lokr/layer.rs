//! The LOKR adapter layer (PEFT's `tuners/lokr/layer.py`). Not implemented yet.

use super::config::LoKrConfig;
use crate::layer::{Adapter, BaseLayer};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of a LOKR adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &[
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

fn todo() -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: "LOKR".into(),
        reason: "this method's layers are not implemented yet".into(),
    }
}

/// The adapter for `module` from its saved tensors (keys relative to the module, adapter name stripped).
pub fn build(
    _config: &LoKrConfig,
    _module: &str,
    _base: &BaseLayer,
    _tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}

/// A freshly initialised adapter for `module`.
pub fn create(
    _config: &LoKrConfig,
    _module: &str,
    _base: &BaseLayer,
    _rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}
