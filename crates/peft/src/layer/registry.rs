//! The one place that maps a config to its method's adapter: one match arm per method.

use super::{Adapter, BaseLayer};
use crate::config::PeftConfig;
use crate::tuners::lora::LoraAdapter;
use crate::tuners::lora::layer::LoraOptions;
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

fn not_implemented(config: &PeftConfig) -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: config.peft_type().as_str().to_string(),
        reason: "this method's layers are not implemented yet (its config can be read and written)"
            .into(),
    }
}

/// The parameter names of the method's adapter tensors (the first component after the module name in a
/// file key), used by [`crate::io::split_keys`].
pub fn param_prefixes(config: &PeftConfig) -> Result<&'static [&'static str]> {
    match config {
        PeftConfig::Lora(_) => Ok(&[
            "lora_A",
            "lora_B",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
        ]),
        other => Err(not_implemented(other)),
    }
}

/// Whether the method is additive (`W + ΔW`), so that it can be merged with a weight.
pub fn is_additive(config: &PeftConfig) -> bool {
    match config {
        PeftConfig::Lora(c) => !c.use_dora,
        _ => false,
    }
}

/// Builds the adapter for `module` from its saved tensors (keys relative to the module).
pub fn build_adapter(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    let wrap = |e: PeftError| match e {
        PeftError::MissingKey(k) => PeftError::MissingKey(crate::io::peft_key(module, &k)),
        PeftError::ShapeMismatch {
            name,
            expected,
            got,
        } => PeftError::ShapeMismatch {
            name: crate::io::peft_key(module, &name),
            expected,
            got,
        },
        PeftError::UnexpectedKeys(ks) => {
            PeftError::UnexpectedKeys(ks.iter().map(|k| crate::io::peft_key(module, k)).collect())
        }
        other => other,
    };
    match config {
        PeftConfig::Lora(c) => {
            let opts = LoraOptions::from_config(c, module);
            Ok(Box::new(
                LoraAdapter::from_tensors(base, opts, tensors).map_err(wrap)?,
            ))
        }
        other => Err(not_implemented(other)),
    }
}

/// Creates a freshly initialised adapter for `module`.
pub fn new_adapter(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    match config {
        PeftConfig::Lora(c) => {
            let opts = LoraOptions::from_config(c, module);
            Ok(Box::new(LoraAdapter::new(
                base,
                opts,
                &mut rng.fork(module),
            )?))
        }
        other => Err(not_implemented(other)),
    }
}
