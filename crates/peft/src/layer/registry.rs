//! Adapters from configs: the entry points that build a method's layer adapter, through its
//! [`PeftMethod`](crate::tuners::PeftMethod) hooks ([`PeftConfig::method`]). No method is named here: a new
//! method plugs in through its hooks alone.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use peft::layer::registry;
//! use peft::{BaseLayer, PeftConfig, PeftRng};
//!
//! let config = PeftConfig::from_json_str(r#"{"peft_type": "LORA", "r": 2, "target_modules": ["fc"]}"#)?;
//! let base = BaseLayer::linear(Tensor::zeros((6, 4), DType::F32, &Device::Cpu)?, None)?;
//! let adapter = registry::new_adapter(&config, "fc", &base, &mut PeftRng::new(0))?;
//! assert_eq!(adapter.peft_type(), "LORA");
//! assert_eq!(registry::param_prefixes(&config)?[0], "lora_A");
//! # Ok::<(), peft::PeftError>(())
//! ```

use super::{Adapter, BaseLayer};
use crate::config::PeftConfig;
pub use crate::tuners::SharedTensors;
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of the method's adapter tensors (the first component after the module name in a
/// file key), used by [`crate::io::split_keys`].
pub fn param_prefixes(config: &PeftConfig) -> Result<&'static [&'static str]> {
    config.method().param_prefixes()
}

/// Whether the method is additive (`W + ΔW`), so that it can be merged with a weight.
pub fn is_additive(config: &PeftConfig) -> bool {
    config.method().is_additive()
}

/// Names a key relative to `module` as the file does (`base_model.model.<module>.<key>`); model-level keys
/// (`base_model.vera_A`) are left as they are.
fn in_module(module: &str, key: String) -> String {
    if key.starts_with("base_model.") {
        key
    } else {
        crate::io::peft_key(module, &key)
    }
}

/// Errors about one module's tensors, with the keys named as in the file.
fn name_keys(module: &str, e: PeftError) -> PeftError {
    match e {
        PeftError::MissingKey(k) => PeftError::MissingKey(in_module(module, k)),
        PeftError::ShapeMismatch {
            name,
            expected,
            got,
        } => PeftError::ShapeMismatch {
            name: in_module(module, name),
            expected,
            got,
        },
        PeftError::UnexpectedKeys(ks) => {
            PeftError::UnexpectedKeys(ks.into_iter().map(|k| in_module(module, k)).collect())
        }
        other => other,
    }
}

/// Builds the adapter for `module` from its saved tensors (keys relative to the module), for a method without
/// model-level shared tensors (VeRA needs [`build_adapter_with_shared`]).
pub fn build_adapter(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    tensors: &IndexMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    build_adapter_with_shared(config, module, base, tensors, &SharedTensors::new())
}

/// Creates a freshly initialised adapter for `module`, for a method without model-level shared tensors (VeRA
/// needs [`new_adapter_with_shared`]).
pub fn new_adapter(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    rng: &mut PeftRng,
) -> Result<Box<dyn Adapter>> {
    new_adapter_with_shared(config, module, base, rng, &SharedTensors::new())
}

/// The model-level tensors an adapter's layers need ([`crate::tuners::PeftMethod::shared_tensors`]), from the
/// file's keys outside `base_model.model.` (`file_shared`, [`crate::io::SplitKeys::shared`]; `None` for a
/// freshly created adapter) and the `(in_features, out_features)` of every targeted layer. VeRA: its
/// projections. Other methods have none, and a file that holds such keys is an error naming them.
pub fn shared_tensors(
    config: &PeftConfig,
    file_shared: Option<&SharedTensors>,
    targets: &[crate::tuners::TargetLayer],
    device: &candle_core::Device,
) -> Result<SharedTensors> {
    config.method().shared_tensors(file_shared, targets, device)
}

/// The model-level tensors of a freshly created adapter ([`crate::tuners::PeftMethod::new_shared_tensors`]),
/// random ones drawn from `rng` (VB-LoRA's vector bank); otherwise as [`shared_tensors`] with no file.
pub fn new_shared_tensors(
    config: &PeftConfig,
    targets: &[crate::tuners::TargetLayer],
    device: &candle_core::Device,
    rng: &PeftRng,
) -> Result<SharedTensors> {
    config.method().new_shared_tensors(targets, device, rng)
}

/// The shared tensors an adapter file holds (those under `base_model.`, when the method saves them at all:
/// [`saves_shared`]); the others are the method's own layout (UniLoRA's per-layer indices), never saved.
pub fn saved_shared(
    config: &PeftConfig,
    shared: &SharedTensors,
) -> Vec<(String, candle_core::Tensor)> {
    if !saves_shared(config) {
        return Vec::new();
    }
    shared
        .iter()
        .filter(|(k, _)| k.starts_with("base_model."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect()
}

/// Whether the method saves its [`shared_tensors`] in the adapter file (VeRA with `save_projection`,
/// VB-LoRA).
pub fn saves_shared(config: &PeftConfig) -> bool {
    config.method().saves_shared()
}

/// [`build_adapter`] for every method, given the adapter's model-level [`shared_tensors`] (ignored by
/// methods that have none). Errors name the keys as in the file.
pub fn build_adapter_with_shared(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    tensors: &IndexMap<String, Tensor>,
    shared: &SharedTensors,
) -> Result<Box<dyn Adapter>> {
    config
        .method()
        .build_adapter(module, base, tensors, shared)
        .map_err(|e| name_keys(module, e))
}

/// [`new_adapter`] for every method, given the adapter's model-level [`shared_tensors`] (ignored by methods
/// that have none). Each module draws from its own stream of `rng` (forked by the module's name).
pub fn new_adapter_with_shared(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    rng: &mut PeftRng,
    shared: &SharedTensors,
) -> Result<Box<dyn Adapter>> {
    config
        .method()
        .new_adapter(module, base, &mut rng.fork(module), shared)
}
