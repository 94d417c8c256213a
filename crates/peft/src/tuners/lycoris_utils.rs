//! What LoHa and LoKr share (PEFT's `tuners/lycoris_utils.py`): both build a full-size `ΔW` from small
//! factors and add `F.linear(x, ΔW)` / `F.conv2d(x, ΔW, …)` to the base output, with whole-module dropout
//! and row ("rank") dropout during training.
//!
//! ```text
//! y = base(x) + op(x, ΔW · rank_mask)      (skipped entirely with probability module_dropout in training)
//! ```

use crate::config::helpers::int_if_integral;
use crate::layer::{BaseKind, BaseLayer, CallCtx};
use crate::{PeftError, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The fields LoHa and LoKr share, flattened into [`LoHaConfig`](crate::config::LoHaConfig) and
/// [`LoKrConfig`](crate::config::LoKrConfig) as `lycoris`.
///
/// ```
/// use peft::config::{LoHaConfig, LycorisFields};
/// let c = LoHaConfig { lycoris: LycorisFields { r: 4, alpha: 8.0, ..Default::default() }, ..Default::default() };
/// assert_eq!(serde_json::to_value(&c)?["alpha"].as_u64(), Some(8));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LycorisFields {
    /// `r`: the rank (default 8).
    pub r: usize,
    /// `alpha` (default 8; an `int` in PEFT, written as an integer when integral). The scale is `alpha / r`.
    #[serde(serialize_with = "int_if_integral")]
    pub alpha: f64,
    /// `rank_dropout`: dropout on rank rows during training (default 0.0).
    pub rank_dropout: f64,
    /// `module_dropout`: probability of skipping the adapter during training (default 0.0).
    pub module_dropout: f64,
    /// `use_effective_conv2d`: CP-decomposed Conv2d weights for kernels larger than 1×1 (default `false`).
    pub use_effective_conv2d: bool,
}

impl Default for LycorisFields {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
        }
    }
}

/// Refuses the layer kinds LyCORIS methods cannot wrap here: PEFT wraps `nn.Linear`, `nn.Conv1d` and
/// `nn.Conv2d`; peft-rs models have no `nn.Conv1d`, and an Embedding or GPT-2 `Conv1D` is PEFT's
/// "Target module … not supported" error. Grouped convolutions are refused too.
pub fn check_supported(method: &str, base: &BaseLayer) -> Result<()> {
    match base.kind() {
        BaseKind::Linear => Ok(()),
        BaseKind::Conv2d(s) if s.groups == 1 => Ok(()),
        BaseKind::Conv2d(s) => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a Conv2d with groups={}", s.groups),
            reason: format!("{method} supports only ungrouped Conv2d layers here"),
        }),
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: format!("{method} supports only Linear and Conv2d layers (as PEFT)"),
        }),
    }
}

/// PEFT's `_get_delta_activations`: `F.linear(x, ΔW)` for a Linear, `F.conv2d(x, ΔW, stride, padding,
/// dilation, groups)` for a Conv2d, no bias (the base output already holds it). `delta` has the base
/// weight's shape; `x` is cast to its dtype.
pub fn delta_activations(base: &BaseLayer, x: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(delta.dtype())?;
    Ok(match base.kind() {
        BaseKind::Conv2d(s) => x.conv2d(delta, s.padding, s.stride, s.dilation, s.groups)?,
        _ => crate::layer::base::linear_apply(&x, delta, true)?,
    })
}

/// Whether module dropout skips the adapter in this forward (PEFT: applied unless training and
/// `torch.rand(1) <= module_dropout`).
pub fn module_dropped(ctx: &CallCtx<'_>, module_dropout: f64) -> bool {
    ctx.fwd.training
        && module_dropout > 0.0
        && ctx.rng("module_dropout").uniform_f64() <= module_dropout
}

/// PEFT's rank dropout on `ΔW` (training only, when `rank_dropout > 0`): every output row (dimension 0) is
/// kept with probability `1 − p`; with `rescale` the mask is divided by its mean (LoHa always, LoKr with
/// `rank_dropout_scale`).
pub fn rank_dropout(ctx: &CallCtx<'_>, delta: &Tensor, p: f64, rescale: bool) -> Result<Tensor> {
    if !ctx.fwd.training || p <= 0.0 {
        return Ok(delta.clone());
    }
    let rows = delta.dim(0)?;
    let mut rng = ctx.rng("rank_dropout");
    let keep: Vec<f32> = (0..rows)
        .map(|_| if rng.uniform_f64() > p { 1.0 } else { 0.0 })
        .collect();
    let mut mask = Tensor::from_vec(keep, rows, delta.device())?;
    if rescale {
        let mean = mask.mean_all()?.to_scalar::<f32>()?;
        mask = (mask / mean as f64)?;
    }
    let mut shape = vec![rows];
    shape.extend(std::iter::repeat_n(1, delta.rank() - 1));
    let mask = mask.reshape(shape)?.to_dtype(delta.dtype())?;
    Ok(delta.broadcast_mul(&mask)?)
}

/// What `peft inspect` shows of a LoHa / LoKr module: rank and alpha from the config (never from the shapes,
/// which for small LoKr layers are full matrices), `alpha / r`, and which factorisation the file holds
/// (`cp`, `w1_low_rank`, `w2_low_rank`).
pub(crate) fn lycoris_summary(
    r: usize,
    alpha: f64,
    tensors: &[crate::tuners::method::TensorInfo<'_>],
) -> crate::tuners::method::ModuleSummary {
    let has = |k: &str| tensors.iter().any(|t| t.name == k);
    let mut flags = Vec::new();
    if has("hada_t1") || has("lokr_t2") {
        flags.push("cp".to_string());
    }
    if has("lokr_w1_a") {
        flags.push("w1_low_rank".into());
    }
    if has("lokr_w2_a") {
        flags.push("w2_low_rank".into());
    }
    crate::tuners::method::ModuleSummary {
        r: Some(r),
        alpha: Some(alpha),
        scaling: Some(alpha / r as f64),
        flags,
    }
}
