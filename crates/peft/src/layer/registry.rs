//! The one place that maps a config to its method's adapter: one match arm per method.

use super::{Adapter, BaseLayer};
use crate::config::PeftConfig;
use crate::tuners::lora::LoraAdapter;
use crate::tuners::lora::layer::LoraOptions;
use crate::tuners::vera::VeraConfig;
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
        PeftConfig::Ia3(_) => Ok(&[crate::tuners::ia3::layer::IA3_L]),
        // Bare parameters, no `.weight`: the same names as LoRA's first components, valid for AdaLoRA only.
        PeftConfig::AdaLora(_) => Ok(&["lora_A", "lora_B", "lora_E"]),
        PeftConfig::Vera(_) => Ok(&["vera_lambda_b", "vera_lambda_d"]),
        PeftConfig::LoHa(_) => Ok(crate::tuners::loha::layer::PARAM_PREFIXES),
        PeftConfig::LoKr(_) => Ok(crate::tuners::lokr::layer::PARAM_PREFIXES),
        PeftConfig::Oft(_) => Ok(crate::tuners::oft::layer::PARAM_PREFIXES),
        PeftConfig::Boft(_) => Ok(crate::tuners::boft::layer::PARAM_PREFIXES),
        other => Err(not_implemented(other)),
    }
}

/// Whether the method is additive (`W + ΔW`), so that it can be merged with a weight.
pub fn is_additive(config: &PeftConfig) -> bool {
    match config {
        PeftConfig::Lora(c) => !c.use_dora,
        PeftConfig::Vera(_) => true,
        PeftConfig::AdaLora(_) => true,
        PeftConfig::LoHa(_) | PeftConfig::LoKr(_) => true,
        PeftConfig::Ia3(_) | PeftConfig::Oft(_) | PeftConfig::Boft(_) => false,
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
        PeftConfig::Ia3(c) => {
            use crate::tuners::ia3::layer::{Ia3Adapter, Ia3Options};
            let opts = Ia3Options::from_config(c, module)?;
            Ok(Box::new(
                Ia3Adapter::from_tensors(base, opts, tensors).map_err(wrap)?,
            ))
        }
        PeftConfig::AdaLora(c) => {
            use crate::tuners::adalora::layer::{AdaLoraAdapter, AdaLoraOptions};
            let opts = AdaLoraOptions::from_config(c, module)?;
            Ok(Box::new(
                AdaLoraAdapter::from_tensors(base, opts, tensors).map_err(wrap)?,
            ))
        }
        PeftConfig::LoHa(c) => {
            crate::tuners::loha::layer::build(c, module, base, tensors).map_err(wrap)
        }
        PeftConfig::LoKr(c) => {
            crate::tuners::lokr::layer::build(c, module, base, tensors).map_err(wrap)
        }
        PeftConfig::Oft(c) => {
            crate::tuners::oft::layer::build(c, module, base, tensors).map_err(wrap)
        }
        PeftConfig::Boft(c) => {
            crate::tuners::boft::layer::build(c, module, base, tensors).map_err(wrap)
        }
        PeftConfig::Vera(_) => Err(needs_shared(config)),
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
        PeftConfig::Ia3(c) => {
            use crate::tuners::ia3::layer::{Ia3Adapter, Ia3Options};
            let opts = Ia3Options::from_config(c, module)?;
            Ok(Box::new(Ia3Adapter::new(
                base,
                opts,
                &mut rng.fork(module),
            )?))
        }
        PeftConfig::AdaLora(c) => {
            use crate::tuners::adalora::layer::{AdaLoraAdapter, AdaLoraOptions};
            let opts = AdaLoraOptions::from_config(c, module)?;
            Ok(Box::new(AdaLoraAdapter::new(
                base,
                opts,
                &mut rng.fork(module),
            )?))
        }
        PeftConfig::LoHa(c) => {
            crate::tuners::loha::layer::create(c, module, base, &mut rng.fork(module))
        }
        PeftConfig::LoKr(c) => {
            crate::tuners::lokr::layer::create(c, module, base, &mut rng.fork(module))
        }
        PeftConfig::Oft(c) => {
            crate::tuners::oft::layer::create(c, module, base, &mut rng.fork(module))
        }
        PeftConfig::Boft(c) => {
            crate::tuners::boft::layer::create(c, module, base, &mut rng.fork(module))
        }
        PeftConfig::Vera(_) => Err(needs_shared(config)),
        other => Err(not_implemented(other)),
    }
}

fn needs_shared(config: &PeftConfig) -> PeftError {
    PeftError::Invalid(format!(
        "{} layers share model-level tensors: build them with `build_adapter_with_shared` / \
         `new_adapter_with_shared` and the tensors of `shared_tensors`",
        config.peft_type().as_str()
    ))
}

/// Model-level tensors that a method shares between all its layers, keyed as in an adapter file (VeRA's
/// `base_model.vera_A` / `base_model.vera_B`). Empty for every other method.
pub type SharedTensors = IndexMap<String, Tensor>;

/// The model-level tensors an adapter's layers need, from the file's keys outside `base_model.model.`
/// (`file_shared`, [`crate::io::SplitKeys::shared`]; `None` for a freshly created adapter) and the
/// `(in_features, out_features)` of every targeted layer. VeRA: the saved projections when loading with
/// `save_projection`, else the projections generated bit for bit from `projection_prng_key` over the largest
/// dimensions (PEFT's `_find_dim`). Other methods have none, and a file that holds such keys is an error
/// naming them.
pub fn shared_tensors(
    config: &PeftConfig,
    file_shared: Option<&SharedTensors>,
    dims: &[(usize, usize)],
    device: &candle_core::Device,
) -> Result<SharedTensors> {
    match config {
        PeftConfig::Vera(c) => {
            use crate::tuners::vera::VeraProjections;
            let p = match file_shared {
                Some(f) => VeraProjections::resolve(c, f, dims.iter().copied(), device)?,
                None => {
                    let fresh = VeraConfig {
                        save_projection: false,
                        ..c.clone()
                    };
                    VeraProjections::resolve(
                        &fresh,
                        &SharedTensors::new(),
                        dims.iter().copied(),
                        device,
                    )?
                }
            };
            Ok(p.to_shared().into_iter().collect())
        }
        _ => match file_shared {
            Some(f) if !f.is_empty() => Err(PeftError::UnexpectedKeys(f.keys().cloned().collect())),
            _ => Ok(SharedTensors::new()),
        },
    }
}

/// Whether the method saves its [`shared_tensors`] in the adapter file (VeRA with `save_projection`).
pub fn saves_shared(config: &PeftConfig) -> bool {
    matches!(config, PeftConfig::Vera(c) if c.save_projection)
}

/// [`build_adapter`] for every method, given the adapter's model-level [`shared_tensors`] (ignored by
/// methods that have none).
pub fn build_adapter_with_shared(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    tensors: &IndexMap<String, Tensor>,
    shared: &SharedTensors,
) -> Result<Box<dyn Adapter>> {
    match config {
        PeftConfig::Vera(c) => {
            use crate::tuners::vera::{VeraAdapter, VeraProjections};
            let proj = VeraProjections::from_shared(shared)?;
            let wrap = |e: PeftError| match e {
                PeftError::MissingKey(k) if !k.starts_with("base_model.") => {
                    PeftError::MissingKey(crate::io::peft_key(module, &k))
                }
                PeftError::ShapeMismatch {
                    name,
                    expected,
                    got,
                } if !name.starts_with("base_model.") => PeftError::ShapeMismatch {
                    name: crate::io::peft_key(module, &name),
                    expected,
                    got,
                },
                PeftError::UnexpectedKeys(ks) => PeftError::UnexpectedKeys(
                    ks.iter().map(|k| crate::io::peft_key(module, k)).collect(),
                ),
                other => other,
            };
            Ok(Box::new(
                VeraAdapter::from_tensors(base, c, &proj, tensors).map_err(wrap)?,
            ))
        }
        _ => build_adapter(config, module, base, tensors),
    }
}

/// [`new_adapter`] for every method, given the adapter's model-level [`shared_tensors`] (ignored by methods
/// that have none).
pub fn new_adapter_with_shared(
    config: &PeftConfig,
    module: &str,
    base: &BaseLayer,
    rng: &mut PeftRng,
    shared: &SharedTensors,
) -> Result<Box<dyn Adapter>> {
    match config {
        PeftConfig::Vera(c) => {
            use crate::tuners::vera::{VeraAdapter, VeraProjections};
            let proj = VeraProjections::from_shared(shared)?;
            Ok(Box::new(VeraAdapter::new(
                base,
                c,
                &proj,
                &mut rng.fork(module),
            )?))
        }
        _ => new_adapter(config, module, base, rng),
    }
}
