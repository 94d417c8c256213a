//! The LOHA adapter layer (PEFT's `tuners/loha/layer.py`). Not implemented yet.

use super::config::LoHaConfig;
use crate::layer::{Adapter, BaseLayer};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of a LOHA adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
];

fn todo() -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: "LOHA".into(),
        reason: "this method's layers are not implemented yet".into(),
    }
}

/// The adapter for `module` from its saved tensors (keys relative to the module, adapter name stripped).
pub fn build(
    _config: &LoHaConfig,
    _module: &str,
    _base: &BaseLayer,
    _tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}

/// A freshly initialised adapter for `module`.
pub fn create(
    _config: &LoHaConfig,
    _module: &str,
    _base: &BaseLayer,
    _rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    Err(todo())
}
