//! DoRA (`use_dora`): weight-decomposed LoRA, as PEFT's `tuners/lora/dora.py` and `variants.py`.
//!
//! With `n = ‖W + s·ΔW‖` per output channel (detached) and magnitude `m`:
//! - Linear / Conv1D / Conv2d, no dropout: `y = b + (m/n)⊙(W x + s·B A x)`, computed from the running result
//!   as `result + (m/n − 1)(result − b) + (m/n)·s·BAx`; with dropout in training the base term is recomputed
//!   from the dropped input.
//! - Embedding: `y = (m/n)⊙(E[ids] + s·A ᵀ[ids] Bᵀ)`.
//! - Merge: `W ← (m/n)·(W + s·ΔW)` with `n` from the weight with earlier merges taken out; the norm is kept
//!   to unmerge (`W = W'/(m/n) − s·ΔW`).
//!
//! PEFT quirk kept on purpose: the Linear forward builds `ΔW` by running `lora_B(lora_A(I))`, so with
//! `lora_bias` the norm includes `lora_B.bias` in every column, while the merge's norm does not.

use super::layer::LoraAdapter;
use crate::Result;
use crate::layer::base::linear_apply;
use crate::layer::{BaseKind, BaseLayer, CallCtx, MergeInput, Merged};
use candle_core::Tensor;

/// `ΔW` from [`LoraAdapter::lora_weight`] (`[out, in]`, `[out, in, kh, kw]` or `[D, V]`) in the base weight's layout.
fn to_base_layout(kind: &BaseKind, lw: Tensor) -> Result<Tensor> {
    Ok(match kind {
        BaseKind::Conv1D | BaseKind::Embedding => lw.t()?,
        _ => lw,
    })
}

/// L2 norm per output channel of a weight in its base layout, as a vector.
fn norm_per_output(kind: &BaseKind, w: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        BaseKind::Linear => w.sqr()?.sum(1)?.sqrt()?,
        BaseKind::Conv1D | BaseKind::Embedding => w.sqr()?.sum(0)?.sqrt()?,
        BaseKind::Conv2d(_) => w.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?,
    })
}

/// A per-output vector shaped to multiply a weight in its base layout.
fn weight_view(kind: &BaseKind, v: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        BaseKind::Linear => v.unsqueeze(1)?,
        BaseKind::Conv1D | BaseKind::Embedding => v.unsqueeze(0)?,
        BaseKind::Conv2d(_) => v.reshape(((), 1, 1, 1))?,
    })
}

/// A per-output vector shaped to multiply the layer's output.
fn output_view(kind: &BaseKind, v: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        BaseKind::Conv2d(_) => v.reshape((1, (), 1, 1))?,
        _ => v.clone(),
    })
}

/// `‖W + s·ΔW‖` per output channel (`W` in base layout, `lw` from [`LoraAdapter::lora_weight`]), as a vector.
pub(crate) fn weight_norm(
    kind: &BaseKind,
    w: &Tensor,
    lw: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let lw = to_base_layout(kind, lw.clone())?;
    norm_per_output(kind, &(w + (lw * scaling)?)?)
}

/// The DoRA forward on top of the running `result` (f32); `x` is the layer input (f32, or ids).
pub(crate) fn forward(
    ad: &LoraAdapter,
    base: &BaseLayer,
    x: &Tensor,
    result: Tensor,
    ctx: &CallCtx<'_>,
) -> Result<Tensor> {
    let kind = base.kind();
    let s = ad.scaling();
    let w = base.weight()?.to_dtype(candle_core::DType::F32)?;
    let with_bias = matches!(kind, BaseKind::Linear | BaseKind::Conv1D);
    let norm = weight_norm(kind, &w, &ad.lora_weight(with_bias)?, s)?.detach();
    let m = magnitude(ad)?;
    let mns = output_view(kind, &(m / norm)?)?;
    if *kind == BaseKind::Embedding {
        let lora = (ad.lora_forward(x)? * s)?;
        return Ok((result.broadcast_mul(&mns)? + lora.broadcast_mul(&mns)?)?);
    }
    let dropped = ad.dropout(x, ctx)?;
    let base_result = if ctx.fwd.training && ad.options().dropout > 0.0 {
        match kind {
            BaseKind::Linear => linear_apply(&dropped, &w, true)?,
            BaseKind::Conv1D => linear_apply(&dropped, &w, false)?,
            _ => base.forward_with(&dropped, &w, None)?,
        }
    } else {
        match base.bias() {
            Some(b) => {
                let b = output_view(kind, &b.to_dtype(candle_core::DType::F32)?)?;
                result.broadcast_sub(&b)?
            }
            None => result.clone(),
        }
    };
    let lora = (ad.lora_forward(&dropped)? * s)?;
    let extra = (base_result.broadcast_mul(&(&mns - 1.0)?)? + lora.broadcast_mul(&mns)?)?;
    Ok((result + extra)?)
}

/// DoRA merge: `W ← (m/n)·(W + ΔW)`, the norm taken from the unmerged weight; returns the norm as cache.
pub(crate) fn merge(
    ad: &LoraAdapter,
    input: MergeInput<'_>,
    delta: &Tensor,
    bias: Option<Tensor>,
) -> Result<Merged> {
    let kind = input.kind;
    let norm = norm_per_output(kind, &(input.unmerged_weight + delta)?)?;
    let m = magnitude(ad)?;
    let factor = weight_view(kind, &(m / &norm)?)?;
    let weight = (input.weight + delta)?.broadcast_mul(&factor)?;
    Ok(Merged {
        weight,
        bias,
        cache: Some(norm),
    })
}

/// DoRA unmerge: `W = W' / (m/n) − ΔW` with the norm the merge kept.
pub(crate) fn unmerge(
    ad: &LoraAdapter,
    input: MergeInput<'_>,
    delta: &Tensor,
    norm: &Tensor,
) -> Result<Tensor> {
    let kind = input.kind;
    let m = magnitude(ad)?;
    let factor = weight_view(kind, &(m / norm)?)?;
    Ok((input.weight.broadcast_div(&factor)? - delta)?)
}

fn magnitude(ad: &LoraAdapter) -> Result<Tensor> {
    let m = ad
        .magnitude()
        .ok_or_else(|| crate::PeftError::Invalid("not a DoRA adapter".into()))?;
    Ok(m.flatten_all()?)
}
