//! Checks on an adapter's tensors as read from disk, before any of them reaches a model.
//!
//! An adapter file with no tensors, an integer tensor where PEFT stores floats, or a NaN / infinity would
//! otherwise merge and evaluate silently (`merged 0 modules`, `mean NLL NaN`). [`check_adapter_tensors`] makes
//! each an error naming the file and the tensor. Non-finite values can be let through on purpose (to inspect
//! or repair such an adapter) with [`AdapterChecks::allow_non_finite`], or process-wide with
//! [`set_allow_non_finite`] (what the CLI's `--allow-non-finite` does).

use crate::error::{PeftError, Result};
use candle_core::{DType, Tensor};
use indexmap::IndexMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static ALLOW_NON_FINITE: AtomicBool = AtomicBool::new(false);

/// Lets adapters with NaN or infinite values load everywhere in this process (off by default). Integer
/// tensors and empty files stay errors.
pub fn set_allow_non_finite(allow: bool) {
    ALLOW_NON_FINITE.store(allow, Ordering::Relaxed);
}

/// What [`check_adapter_tensors`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterChecks {
    /// Accept NaN and ±inf values (a warning is still printed by the CLI).
    pub allow_non_finite: bool,
}

impl Default for AdapterChecks {
    /// The process default: non-finite values are errors unless [`set_allow_non_finite`] said otherwise.
    fn default() -> Self {
        Self {
            allow_non_finite: ALLOW_NON_FINITE.load(Ordering::Relaxed),
        }
    }
}

/// Whether `name` is one of the integer tensors PEFT writes: VB-LoRA's top-k indices
/// (`….vblora_logits_A_topk_indices`, `….vblora_logits_B_topk_indices`, `save_only_topk_weights`) and
/// SuperTuning's `….supertuning_indices`, SHiRA's `….shira_indices` and UniLoRA's `….unilora_indices_A` /
/// `_B`, by the last component of the key.
fn admitted_integer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    crate::tuners::vblora::layer::INTEGER_TENSORS.contains(&last)
        || crate::tuners::supertuning::layer::INTEGER_TENSORS.contains(&last)
        || crate::tuners::shira::layer::INTEGER_TENSORS.contains(&last)
        || crate::tuners::unilora::layer::INTEGER_TENSORS.contains(&last)
        || (name.starts_with("base_model.frod_s_indices.")
            || name.starts_with("base_model.frod_s_size."))
}

/// Checks the tensors of an adapter file: at least one tensor, every one of a floating dtype but VB-LoRA's
/// integer top-k indices (admitted by name), and (unless `checks.allow_non_finite`) every value finite. Errors name `path` and the first offending tensor with
/// its first bad value's index.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use indexmap::IndexMap;
/// use peft::io::{AdapterChecks, check_adapter_tensors};
///
/// let mut t = IndexMap::new();
/// t.insert("a.lora_A.weight".to_string(), Tensor::new(&[1f32, f32::NAN], &Device::Cpu)?);
/// let strict = AdapterChecks { allow_non_finite: false };
/// let err = check_adapter_tensors("x.safetensors".as_ref(), &t, strict).unwrap_err().to_string();
/// assert!(err.contains("a.lora_A.weight") && err.contains("NaN"), "{err}");
/// check_adapter_tensors("x.safetensors".as_ref(), &t, AdapterChecks { allow_non_finite: true })?;
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn check_adapter_tensors(
    path: &Path,
    tensors: &IndexMap<String, Tensor>,
    checks: AdapterChecks,
) -> Result<()> {
    let bad = |msg: String| PeftError::Invalid(format!("{}: {msg}", path.display()));
    if tensors.is_empty() {
        return Err(bad(
            "holds no tensors: an adapter file needs its trained weights".into(),
        ));
    }
    for (name, t) in tensors {
        if admitted_integer(name) && t.dtype().is_int() {
            continue; // integers are finite
        }
        if !t.dtype().is_float() {
            return Err(bad(format!(
                "tensor `{name}` is {:?}; adapter weights are floating point (f32, f16 or bf16)",
                t.dtype()
            )));
        }
        if checks.allow_non_finite {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let n = values.iter().filter(|v| !v.is_finite()).count();
            return Err(bad(format!(
                "tensor `{name}` holds {n} non-finite value(s) (the first, {}, at flat index {i}); a \
                 diverged or corrupt adapter. Pass --allow-non-finite (library: AdapterChecks) to load it \
                 anyway",
                if v.is_nan() {
                    "NaN".to_string()
                } else {
                    format!("{v}")
                }
            )));
        }
    }
    Ok(())
}
